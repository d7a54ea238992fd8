"""``metrics.jsonl`` and the trackers: the loss and its terms, averaged between logging steps.

One JSON object per logged step: ``step``, ``epoch``, ``loss`` and every weighted term of the
objective (``invariance``, ``variance``, ``dcor/views``, ``dcor/<representation>``) averaged over
the steps since the previous line and over the processes, ``lr``, ``images_per_s`` (global) and
``skipped`` (images that could not be decoded since the run (re)started). The loss stays on the
device between logging steps: reading it every step would make the host wait for the accelerator.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import Tensor

from mvmr_hf.errors import TrainingError
from mvmr_hf.utils import writing

__all__ = ["METRICS_FILE", "MetricsLogger", "truncate_metrics"]

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    """Running sums of the loss and its terms, kept on the device and read only when logging.

    It also records, without a host sync, the first step at which each term stopped being
    finite, so that the run can stop naming the step and the term.
    """

    def __init__(
        self, accelerator: Accelerator, output_dir: Path, *, images_per_step: int, step: int
    ) -> None:
        self.accelerator = accelerator
        self.path = output_dir / METRICS_FILE
        self.images_per_step = images_per_step
        self.names: list[str] = []
        self.sums = self.first_bad = torch.zeros(0)
        self.micro_steps = self.skipped = self.new_skipped = 0
        self.steps = step  # the optimizer step of the last log
        self.clock = time.perf_counter()

    def add(self, total: Tensor, terms: dict[str, Tensor], *, skipped: int, step: int) -> None:
        """Add one micro-step's loss and terms (of optimizer step ``step``) and its skipped images."""
        values = torch.stack([total.detach(), *(t.detach() for t in terms.values())]).float()
        if not self.names:
            self.names = ["loss", *terms]
            self.sums = torch.zeros_like(values)
            self.first_bad = torch.full_like(values, math.inf)
        self.first_bad = torch.where(torch.isfinite(values), self.first_bad, self.first_bad.clamp(max=step))
        self.sums += values
        self.micro_steps += 1
        self.new_skipped += skipped

    def _reduce(self) -> tuple[list[float], list[float], int]:
        """Over all processes: the mean of each term, the first non-finite step per term, skipped images."""
        counts = torch.tensor([self.new_skipped], dtype=torch.float32, device=self.sums.device)
        packed = torch.cat([self.sums / max(self.micro_steps, 1), self.first_bad, counts])
        gathered = self.accelerator.gather(packed[None]).cpu()
        n = len(self.names)
        return (
            gathered[:, :n].mean(0).tolist(),
            gathered[:, n : 2 * n].min(0).values.tolist(),
            int(gathered[:, -1].sum()),
        )

    def raise_if_not_finite(self) -> None:
        """Raise TrainingError, naming the step and the term, if any term was ever non-finite."""
        if self.names:
            self._check(self._reduce()[1])

    def _check(self, first_bad: list[float]) -> None:
        step = min(first_bad)
        if math.isfinite(step):
            terms = [
                name for name, s in zip(self.names, first_bad, strict=True) if s == step and name != "loss"
            ]
            raise TrainingError(
                f"the loss became non-finite at step {int(step)} (term {', '.join(terms or ['loss'])}); the "
                "last good checkpoint is kept: lower --learning-rate or check the data, then --resume"
            )

    def log(self, step: int, epoch: int, lr: float) -> dict[str, str]:
        """Write the means since the last log to metrics.jsonl and the trackers; return a short summary."""
        means, first_bad, new_skipped = self._reduce()
        self._check(first_bad)
        self.skipped += new_skipped
        images_per_s = (step - self.steps) * self.images_per_step / (time.perf_counter() - self.clock)
        metrics = {"step": step, "epoch": epoch, **dict(zip(self.names, means, strict=True))}
        metrics.update(lr=lr, images_per_s=images_per_s, skipped=self.skipped)
        if self.accelerator.is_main_process:
            with writing("metrics.jsonl", self.path.parent), self.path.open("a") as file:
                file.write(json.dumps(metrics) + "\n")
        self.accelerator.log(metrics, step=step)
        self.sums.zero_()
        self.micro_steps, self.new_skipped, self.steps = 0, 0, step
        self.clock = time.perf_counter()
        return {"loss": f"{means[0]:.4f}", "img/s": f"{images_per_s:.0f}"}


def truncate_metrics(accelerator: Accelerator, output_dir: Path, step: int) -> None:
    """Drop the metrics a killed run logged after the checkpoint it resumes from."""
    path = output_dir / METRICS_FILE
    if accelerator.is_main_process and path.is_file():
        lines = path.read_text().splitlines()
        path.write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= step))
