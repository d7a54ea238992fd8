"""dCor on the global batch: 2 CPU processes (gloo) equal 1 process on the concatenated batch.

The original MV-MR code computed dCor per GPU, so its objective changed with the number of
GPUs. Here two processes each hold half of a batch; with ``scope="global"`` every process
computes the loss of the whole batch, and after DistributedDataParallel averages the
gradients, the update is the one a single process computes on the concatenated batch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from mvmr_hf.loss.dcor import gather_no_grad, gather_with_grad
from mvmr_hf.loss.objective import MVMRLoss

WORLD = 2
BATCH = 8  # global


def _problem():
    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(6, 4, dtype=torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64))
    x = torch.randn(BATCH, 6, generator=generator, dtype=torch.float64)
    x_aug = x + 0.2 * torch.randn(BATCH, 6, generator=generator, dtype=torch.float64)
    teacher = torch.randn(BATCH, 3, 5, generator=generator, dtype=torch.float64) + x[:, :1, None]
    return model, x, x_aug, teacher


def _loss_and_grads(model, x, x_aug, teacher, loss_fn):
    out = loss_fn(model(x), model(x_aug), {"teacher": teacher})
    out.total.backward()
    module = getattr(model, "module", model)
    return {
        "loss": out.total.item(),
        "terms": {k: v.item() for k, v in out.terms.items()},
        "grads": [p.grad.flatten().tolist() for p in module.parameters()],
    }


def _worker(rank: int, init_file: str, out_dir: str, scope: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model, x, x_aug, teacher = _problem()
        shard = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        ddp = DistributedDataParallel(model)
        result = _loss_and_grads(ddp, x[shard], x_aug[shard], teacher[shard], MVMRLoss(scope=scope))
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()  # neither process tears gloo down while the other may still be talking to it
    finally:
        dist.destroy_process_group()


def _spawn(worker: Callable[..., None], args: tuple, results: list[Path]) -> list[dict]:
    """Run ``worker`` in WORLD processes and read the results they wrote.

    About one run in 10-20 on a 2-core machine, gloo aborts a process in its teardown ("terminate
    called without an active exception", SIGABRT) after every process has written its result and
    passed the barrier: that abort is not the code under test, whose results are still checked.
    """
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        mp.spawn(worker, args=args, nprocs=WORLD, join=True)
    except mp.ProcessExitedException as error:
        if error.signal_name != "SIGABRT" or not all(path.is_file() for path in results):
            raise
    return [json.loads(path.read_text()) for path in results]


def _run_two_processes(tmp_path: Path, scope: str) -> list[dict]:
    results = [tmp_path / f"rank{r}.json" for r in range(WORLD)]
    return _spawn(_worker, (str(tmp_path / "init"), str(tmp_path), scope), results)


def test_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    model, x, x_aug, teacher = _problem()
    single = _loss_and_grads(model, x, x_aug, teacher, MVMRLoss(scope="global"))
    for result in _run_two_processes(tmp_path, "global"):
        assert result["loss"] == pytest.approx(single["loss"], abs=1e-10)
        for name, value in single["terms"].items():
            assert result["terms"][name] == pytest.approx(value, abs=1e-10), name
        for got, expected in zip(result["grads"], single["grads"], strict=True):
            assert got == pytest.approx(expected, abs=1e-10)


def test_local_scope_differs_from_the_global_batch(tmp_path):
    # The per-process estimate (what the paper's code did) is a different objective.
    model, x, x_aug, teacher = _problem()
    single = _loss_and_grads(model, x, x_aug, teacher, MVMRLoss(scope="global"))
    results = _run_two_processes(tmp_path, "local")
    assert all(abs(r["loss"] - single["loss"]) > 1e-3 for r in results)


def _gather_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        local = torch.arange(3, dtype=torch.float64).mul(rank + 1).requires_grad_(True)
        gathered = gather_with_grad(local)
        weights = torch.arange(6, dtype=torch.float64)
        (gathered * weights).sum().backward()
        result = {
            "gathered": gathered.tolist(),
            "grad": local.grad.tolist(),
            "no_grad": gather_no_grad(local.detach() + 1).tolist(),
        }
        Path(out_dir, f"gather{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_gather_with_grad_sums_gradients_and_keeps_the_own_slice(tmp_path):
    paths = [tmp_path / f"gather{rank}.json" for rank in range(WORLD)]
    for rank, result in enumerate(_spawn(_gather_worker, (str(tmp_path / "init"), str(tmp_path)), paths)):
        assert result["gathered"] == [0.0, 1.0, 2.0, 0.0, 2.0, 4.0]
        assert result["no_grad"] == [1.0, 2.0, 3.0, 1.0, 3.0, 5.0]
        # Each process's loss is Σ w·g; the gradient of the sum over both processes' losses
        # with respect to this process's slice is 2·w[slice].
        own = slice(3 * rank, 3 * rank + 3)
        assert result["grad"] == [2.0 * w for w in range(6)[own]]
