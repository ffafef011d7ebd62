"""Profile configurations of the benchmark: where a training step or a predictive spends its time.

    python benchmarks/profile_steps.py                              # mean_field, mean_field_lrt, gbnn_tied, deterministic
    python benchmarks/profile_steps.py --configs mean_field --what predict --tool cprofile

``--tool torch`` (default) prints torch.profiler's operator table (self CPU time, the
top ``--top`` rows) for ``--steps`` steps after two warm-up steps; ``--tool cprofile``
prints cProfile's functions by total time, which shows Python overhead (Pyro's effect
handlers, PyroModule attribute lookups) that the operator table hides. ``--what``
selects the training step (``train``) or the 30-sample predictive (``predict``).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import setups  # noqa: E402

DEFAULT_CONFIGS = "deterministic,mean_field,mean_field_lrt,gbnn_tied"


def _work(setup: setups.Setup, what: str, num_samples: int):
    return setup.train_step if what == "train" else (lambda: setup.predict(num_samples))


def profile_torch(fn, steps: int, top: int, sort: str) -> str:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    return prof.key_averages().table(sort_by=sort, row_limit=top)


def profile_python(fn, steps: int, top: int) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        fn()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=DEFAULT_CONFIGS)
    parser.add_argument("--what", choices=["train", "predict"], default="train")
    parser.add_argument("--tool", choices=["torch", "cprofile"], default="torch")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--num-samples", type=int, default=30)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sort", default="self_cpu_time_total")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch = setups.make_batch()
    for name in args.configs.split(","):
        setup = setups.build(name, batch, sharing={"num_components": 256, "gmm_max_epochs": 30})
        fn = _work(setup, args.what, args.num_samples)
        fn(), fn()
        start = time.perf_counter()
        fn()
        one = time.perf_counter() - start
        print(f"=== {name} {args.what}: one call {one * 1000:.1f} ms ({args.steps} profiled) ===", flush=True)
        if args.tool == "torch":
            print(profile_torch(fn, args.steps, args.top, args.sort), flush=True)
        else:
            print(profile_python(fn, args.steps, args.top), flush=True)


if __name__ == "__main__":
    main()
