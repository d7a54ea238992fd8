"""The GPU check (``make gpu-check``): the GPU tests, every benchmark on CUDA and a real distillation.

Run on a CUDA machine after installing the package (``make gpu-check`` does both). Each step is a
subprocess with its own time limit, in order of what it proves (the GPU targets first), and the
steps share a budget (``--budget``, 430 s: with the installation, about 35 s, within the 8
minutes of one call on a lent GPU machine): a step gets at most what is left of it, and the steps it cannot
reach are skipped and reported, so that the check ends in time whatever happens:

1. ``pytest -m gpu``: the tests marked ``gpu`` (skipped on CPU-only CI);
2. ``bench_loop.py``: the training loop's own rate at the paper's configuration against its parts
   alone, with and without the teacher cache, and pretraining (issue 19's targets);
3. ``bench_representations.py``, ``bench_dataloading.py`` (reduced grids): ScatNet against
   kymatio's own on the GPU, decoding and device views with 16 workers;
4. ``bench_evaluation.py``: linear probe and kNN of ImageNet-sized features (target <= 10 min);
5. ``bench_distill.py`` (reduced): a real distillation with bf16, channels-last, ``--compile`` and
   device views (2 processes when 2 GPUs exist), against an eager fp32 run;
6. ``bench_teachers.py``: each default teacher's memory at batch 512, and bfloat16's agreement;
7. ``bench_dcor.py`` and ``bench_protocols.py`` (reduced): dCor's cost, fine-tuning and the
   multilabel probe on CUDA.

``bench_step.py`` (the step split into synchronised phases) stays a separate diagnosis: its
phases are each followed by a device synchronisation, so it cannot give the loop's rate.

Each benchmark writes ``benchmarks/results/<name>-cuda.json``; this script prints each step's
status and time and writes them to ``benchmarks/results/gpu-check-cuda.json``. It exits 1 when a
step failed, ran out of time or was skipped (the others still run), 2 without a CUDA device.

    make gpu-check
    python benchmarks/gpu_check.py [--quick]        # --quick: every benchmark's reduced grid
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import RESULTS, machine

ROOT = Path(__file__).resolve().parent.parent  # the steps run here, named by paths relative to it
TESTS = ["-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
# (benchmark, seconds allowed, reduced grid always): the GPU targets first
# Limits: about 1.3x each step's time in the H200 run of 2026-12-04 (gpu-check-cuda.json); bench_distill's
# quick grid now runs only its fast configuration, which needed about 70 of the 120 s both took.
BENCHMARKS = [("loop", 150, False), ("representations", 25, True), ("dataloading", 45, True),
              ("evaluation", 40, False), ("distill", 90, True), ("teachers", 30, False),
              ("dcor", 25, True), ("protocols", 30, True)]  # fmt: skip
BUDGET_S = 430
MIN_STEP_S = 10  # below this a step cannot even import torch: skip it


def _run(name: str, command: list[str], limit: int) -> dict:
    """Run one step; its output streams to ours. Returns its status and seconds."""
    print(f"\n=== {name} (at most {limit} s)", flush=True)
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    began = time.perf_counter()
    # A session of its own, so that a step out of time is killed with its workers and launched processes,
    # which would otherwise hold the GPU's memory during the next steps.
    process = subprocess.Popen([sys.executable, *command], env=environment, cwd=ROOT, start_new_session=True)
    try:
        code = process.wait(timeout=limit)
        status = "passed" if code == 0 else f"failed (exit {code})"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        status = f"ran out of time ({limit} s)"
    seconds = time.perf_counter() - began
    print(f"=== {name}: {status} in {seconds:.0f} s", flush=True)
    return {"step": name, "command": " ".join(command), "status": status, "seconds": round(seconds, 1)}


def main(argv: list[str]) -> int:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--quick", action="store_true", help="every benchmark's reduced grid")
    cli.add_argument("--budget", type=int, default=BUDGET_S, help="seconds for all steps together")
    args = cli.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: the GPU check needs a CUDA device and torch sees none: run it on a GPU machine",
              file=sys.stderr)  # fmt: skip
        return 2
    device = torch.device("cuda")
    began = time.perf_counter()
    planned = [("gpu tests", TESTS, 110)]
    for name, limit, always_quick in BENCHMARKS:
        quick = always_quick or args.quick
        output = RESULTS / f"{name}-cuda{'-quick' if args.quick and not always_quick else ''}.json"
        script, output = f"benchmarks/bench_{name}.py", os.path.relpath(output, ROOT)
        command = [script, "--device", "cuda", "--output", output]
        planned.append((f"bench_{name}", command + (["--quick"] if quick else []), limit))
    steps = []
    for name, command, limit in planned:
        left = int(args.budget - (time.perf_counter() - began))
        if left < MIN_STEP_S:
            steps.append({"step": name, "command": " ".join(command), "status": "skipped (budget spent)",
                          "seconds": 0.0})  # fmt: skip
            continue
        steps.append(_run(name, command, min(limit, left)))
    summary = {"machine": machine(device), "seconds": round(time.perf_counter() - began, 1), "steps": steps}
    (RESULTS / "gpu-check-cuda.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n| step | status | s |\n|---|---|---|")
    for step in steps:
        print(f"| {step['step']} | {step['status']} | {step['seconds']:.0f} |")
    return 0 if all(step["status"] == "passed" for step in steps) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
