"""Torch thread count against a busy core: the quickstart's training step on 1 and 2 threads, idle and busy.

The step is the quickstart's (examples/quickstart.py): `train_subject_shift` from the toy world, i.e. the package's
real trainer on the bundled toy-world pipeline (batch 4 + 4 prior-preservation samples at 64×64, UNet and text
encoder shifts). Each configuration runs in a fresh process, twice: with ``--steps`` A and then B training steps.
The time per step is (wall(B) − wall(A)) / (B − A), so loading, the SVD and the class images (generated once by a
warm-up run and then reused) cancel out; ``cpu s/step`` is the same difference of the process's CPU seconds (all
threads).

Configurations: ``1`` and ``2`` torch threads, and ``2-passive`` (2 threads with ``OMP_WAIT_POLICY=PASSIVE``: waiting
OpenMP threads sleep instead of spinning). "busy" runs start one CPU-burning process
(``python -c 'while True: pass'``) first and stop it afterwards, as when another job holds one core of two.
The 1-minute load average before each configuration says how idle the machine really was.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/threads.py [--configs 1 2 2-passive] [--steps 4 14] \
        [--out .bench/threads]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


CONFIGS = {"1": (1, None), "2": (2, None), "2-passive": (2, "PASSIVE")}


def run_worker(threads: int, steps: int, out: Path) -> None:
    """Train `steps` steps of the quickstart recipe on `threads` threads; print wall and CPU seconds as JSON."""
    import torch

    from svdiff_adapter import toyworld as tw
    from svdiff_adapter.toyworld.personalize import ShiftRecipe, train_subject_shift

    torch.set_num_threads(threads)
    started, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    train_subject_shift(tw.get_subject("split_circle"), out / "run", recipe=ShiftRecipe(max_train_steps=steps))
    wall, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    print("RESULT " + json.dumps({"wall": wall, "cpu": cpu}))


def measure(config: str, steps: int, out: Path) -> dict:
    threads, wait_policy = CONFIGS[config]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "SVDIFF_CACHE_DIR": str(out / "svd-cache"), "HF_HUB_OFFLINE": "1"}
    env.pop("OMP_WAIT_POLICY", None)
    if wait_policy:
        env["OMP_WAIT_POLICY"] = wait_policy
    command = [sys.executable, __file__, "--worker", str(threads), str(steps), "--out", str(out)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{config} ({steps} steps) failed:\n{completed.stderr[-3000:]}")
    line = next(line for line in completed.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--loads", nargs="+", default=["idle", "busy"], choices=["idle", "busy"])
    parser.add_argument("--steps", nargs=2, type=int, default=[4, 14], metavar=("A", "B"))
    parser.add_argument("--out", type=Path, default=Path(".bench/threads"))
    parser.add_argument("--worker", nargs=2, type=int, metavar=("THREADS", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(*args.worker, args.out)
        return

    short, long = args.steps
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"warm-up (class images, SVD cache) in {args.out} ...", flush=True)
    measure("1", 1, args.out)
    rows = []
    for load in args.loads:
        for config in args.configs:
            burner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load == "busy" else None
            try:
                time.sleep(1.0 if burner else 0.0)  # let the burner take its core
                load_average = os.getloadavg()[0]
                first, second = measure(config, short, args.out), measure(config, long, args.out)
            finally:
                if burner is not None:
                    burner.kill()
                    burner.wait()
            row = {"threads": config, "machine": load, "loadavg_1min": round(load_average, 2),
                   "s_per_step": (second["wall"] - first["wall"]) / (long - short),
                   "cpu_s_per_step": (second["cpu"] - first["cpu"]) / (long - short),
                   f"wall_{long}_steps_s": second["wall"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
            time.sleep(0.0 if burner is None else 5.0)  # let the load average settle after a burner
    (args.out / "threads.json").write_text(json.dumps(rows, indent=2) + "\n")
    print()
    print(f"| threads | machine | load avg (1 min) before | s/step | CPU s/step | wall of {long} steps incl. setup |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['threads']} | {row['machine']} | {row['loadavg_1min']:.2f} | {row['s_per_step']:.3f} | "
              f"{row['cpu_s_per_step']:.3f} | {row[f'wall_{long}_steps_s']:.1f} s |")


if __name__ == "__main__":
    main()
