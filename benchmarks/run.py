"""Benchmark pyro_gbnn against TyXe, bayesian-torch and plain Pyro, plus its GMM and pipeline.

ResNet-20 training steps and predictives of every configuration, 2DGBNN's stage-2
mixture fit against scikit-learn, and the MNIST 2DGBNN pipeline's stages. Not part of
the test suite.

    pip install -e ".[bench]"
    python benchmarks/run.py --out results.json            # full (tens of minutes)
    python benchmarks/run.py --quick --out quick.json      # every configuration, few repetitions (< 5 min)
    python benchmarks/run.py --configs deterministic,mean_field --skip-gmm --skip-pipeline

One process times every configuration (ResNet-20, random CIFAR-shaped batch of 128,
``--threads`` torch threads): all are built first, warmed up, then measured in
``--rounds`` rounds, each visiting the configurations in a new random order and timing
``--steps`` training steps and one 30-sample predictive of each, so that slow drifts of a
shared machine hit all configurations alike. Before anything runs the process re-executes
itself with ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` set (glibc's page
faults on large tensors are otherwise the largest noise source; ``--no-malloc-tuning``
keeps the default allocator settings); ``machine.malloc_env`` records what was set.

The JSON written to ``--out``:

- ``machine``: CPU, cores, torch threads, load average, library versions, malloc settings.
- ``configs.NAME`` (see ``benchmarks/setups.py`` for what each configuration is):
  ``train_ms`` median wall time of one training step (forward + backward + optimizer
  step), with ``train_ms_iqr`` (25th, 75th percentile), ``train_ms_min`` and the number
  of timed steps; ``predict30_ms`` median time of a posterior predictive with 30 weight
  draws for the 128 images (for ``deterministic``: 30 forward passes), likewise with
  spread; ``train_ratio`` / ``predict30_ratio`` the medians divided by ``deterministic``'s
  of the same run; ``train_cpu_ms`` / ``predict30_cpu_ms`` (and their ratios) the same
  in CPU time of this process, all threads, which a busy machine inflates much less than
  wall time (compare them across runs with ``--threads 1``); ``minor_faults_per_step`` page faults per training step (an allocator
  noise check); ``model_state_bytes`` / ``optimizer_state_bytes`` / ``state_bytes`` what training
  keeps between steps (the guide's or network's state_dict, the optimizer's moments; ours and
  deterministic only); for ``ssvi_*``, ``train_time_ratio``, ``state_bytes_ratio`` and
  ``peak_rss_ratio`` against ``mean_field_lrt`` (the same estimator), measured side by side;
  ``peak_rss_mb`` ru_maxrss of a separate process that imports everything,
  builds this configuration only and runs warm-up + ``--rss-steps`` training steps: the
  median of ``--rss-repeats`` such processes (``peak_rss_mb_range`` their min and max;
  one process's peak moves by tens of MB between runs), with ``baseline_rss_mb`` the
  processes' ru_maxrss right after imports (subtract it for the configuration's own memory).
- ``gmm``: :func:`pyro_gbnn.sharing.gmm.fit_gmm_2d` against scikit-learn's
  ``GaussianMixture(covariance_type="full")`` on the same (mu, sigma) points (fit time,
  final mean log-likelihood, time for ours to reach scikit-learn's within 0.1%), and
  ours alone on a large cloud; see benchmarks/gmm_vs_sklearn.py.
- ``pipeline``: wall time of each stage of ``configs/mnist_quick_2dgbnn.yaml`` run through
  ``pyro_gbnn.run_fit`` (metrics.json ``stages.*.wall_time_s``) and the final metrics.
- ``targets``: the issue's targets (ours against deterministic and against the fastest
  peer of the same kind, predictive, memory), each with the value, the limit and ``met``.

Other scripts here: ``profile_steps.py`` (torch.profiler / cProfile of one
configuration's step or predictive), ``check_identical.py`` (a speed change must leave
every number of a seeded run unchanged), ``gmm_vs_sklearn.py`` (the GMM comparison alone).

``--quick`` changes sizes and repetitions, and records each change under ``quick``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))  # this checkout, not an installed copy
from catalog import CONFIGS, GBNN_CONFIGS  # noqa: E402  (no torch yet: see measure_rss)

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
PEERS = ("torch", "torchvision", "pyro-ppl", "tyxe", "bayesian-torch", "scikit-learn", "numpy")
GBNN_SHARING = {"num_components": 2000, "gmm_max_epochs": 100}
GBNN_SHARING_QUICK = {"num_components": 256, "gmm_max_epochs": 30}


# ----- process setup -------------------------------------------------------------------
def reexec_with_malloc_env() -> None:
    """Restart this process with glibc's mmap/trim thresholds raised (they are read at start)."""
    if "--no-malloc-tuning" in sys.argv or all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()):
        return
    os.environ.update(MALLOC_ENV)
    os.execv(sys.executable, [sys.executable, *sys.argv])


def version_of(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info(args: argparse.Namespace) -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: version_of(name) for name in PEERS} | {"pyro_gbnn": _our_version()},
        "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV},
        "load_avg_1m_at_start": os.getloadavg()[0],
        "argv": sys.argv[1:],
    }


def _our_version() -> str:
    import pyro_gbnn

    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "pyro_gbnn"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit, dirty = "", ""
    return f"{pyro_gbnn.__version__} ({commit}{'+modified' if dirty else ''})"


def rss_mb() -> float:
    """This process's peak resident set size so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----- timing of the configurations ----------------------------------------------------
def timed_ms(fn) -> tuple[float, float]:
    """Wall time and CPU time (all threads of this process) of ``fn()``, in ms."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - wall) * 1000, (time.process_time() - cpu) * 1000


def summary(samples: list[float]) -> dict:
    quartiles = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
    return {"median": round(statistics.median(samples), 2), "iqr": [round(quartiles[0], 2), round(quartiles[2], 2)],
            "min": round(min(samples), 2), "n": len(samples)}


def build_setups(names: list[str], sharing: dict, plan_path: str | None) -> tuple[dict, dict]:
    import setups

    batch = setups.make_batch()
    built, build_s = {}, {}
    for name in names:
        start = time.perf_counter()
        built[name] = setups.build(name, batch, plan_path=plan_path, sharing=sharing)
        build_s[name] = round(time.perf_counter() - start, 2)
        print(f"built {name} in {build_s[name]} s", file=sys.stderr, flush=True)
    return built, build_s


def measure(built: dict, rounds: int, steps: int, num_samples: int, seed: int = 0) -> tuple[dict, dict]:
    """Interleaved rounds; returns per configuration the raw train/predict times (ms) and page
    faults, and the bytes of training state after warm-up (where the configuration counts them)."""
    order = list(built)
    for setup in built.values():  # warm-up: allocator, oneDNN primitive caches, lazy guides
        setup.train_step()
        setup.train_step()
        setup.predict(2)
    state = {name: setup.state_bytes() for name, setup in built.items() if setup.state_bytes is not None}
    raw = {name: {key: [] for key in ("train", "train_cpu", "predict", "predict_cpu", "faults")} for name in order}
    rng = random.Random(seed)
    for r in range(rounds):
        rng.shuffle(order)
        for name in order:
            setup, times = built[name], raw[name]
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(steps):
                wall, cpu = timed_ms(setup.train_step)
                times["train"].append(wall)
                times["train_cpu"].append(cpu)
            times["faults"].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps)
            wall, cpu = timed_ms(lambda: setup.predict(num_samples))
            times["predict"].append(wall)
            times["predict_cpu"].append(cpu)
        print(f"round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    return raw, state


def config_results(raw: dict, build_s: dict, notes: dict) -> dict:
    results = {}
    for name, times in raw.items():
        train, predict = summary(times["train"]), summary(times["predict"])
        results[name] = {
            "kind": CONFIGS[name][0],
            "what": CONFIGS[name][1],
            "train_ms": train["median"], "train_ms_iqr": train["iqr"], "train_ms_min": train["min"], "train_steps_timed": train["n"],
            "predict30_ms": predict["median"], "predict30_ms_iqr": predict["iqr"], "predict30_ms_min": predict["min"],
            "predicts_timed": predict["n"],
            "train_cpu_ms": summary(times["train_cpu"])["median"], "predict30_cpu_ms": summary(times["predict_cpu"])["median"],
            "minor_faults_per_step": round(statistics.median(times["faults"]), 1),
            "build_s": build_s[name],
            **({"notes": notes[name]} if notes.get(name) else {}),
        }
    return results


def add_ratios(results: dict) -> None:
    base = results.get("deterministic")
    for entry in results.values():
        for key in ("train", "predict30", "train_cpu", "predict30_cpu"):
            ms = key.replace("_cpu", "") + ("_cpu_ms" if key.endswith("_cpu") else "_ms")
            entry[f"{key}_ratio"] = round(entry[ms] / base[ms], 3) if base else None
    # SSVI against mean-field training with the same estimator (local reparameterization)
    dense = results.get("mean_field_lrt")
    for name, entry in results.items():
        if name.startswith("ssvi_") and dense:
            entry["train_time_ratio"] = round(entry["train_ms"] / dense["train_ms"], 3)
            if entry.get("state_bytes") and dense.get("state_bytes"):
                entry["state_bytes_ratio"] = round(entry["state_bytes"] / dense["state_bytes"], 3)
            if entry.get("peak_rss_mb") and dense.get("peak_rss_mb"):
                entry["peak_rss_ratio"] = round(entry["peak_rss_mb"] / dense["peak_rss_mb"], 3)


OURS_VERSUS_PEERS = {
    "mean_field": ("tyxe", "bt_reparam", "pyro_autonormal"),
    "mean_field_lrt": ("tyxe_lrt",),
    "mean_field_flipout": ("bt_flipout",),
}
PEER_NAMES = ("tyxe", "tyxe_lrt", "bt_reparam", "bt_flipout", "pyro_autonormal")
OURS = ("mean_field", "mean_field_lrt", "mean_field_flipout", "gbnn_tied", "gbnn_independent", "gbnn_hierarchical")


def target_checks(configs: dict) -> dict:
    """The issue's targets, each as {"value": ..., "limit": ..., "met": bool}, where measured."""
    checks: dict = {}

    def check(name: str, value, limit) -> None:
        if value is not None and limit is not None:
            checks[name] = {"value": value, "limit": limit, "met": bool(value <= limit)}

    get = lambda name, key: configs.get(name, {}).get(key)  # noqa: E731
    check("mean_field train_ratio <= 1.1", get("mean_field", "train_ratio"), 1.1)
    check("mean_field_lrt train_ratio <= 2.1", get("mean_field_lrt", "train_ratio"), 2.1)
    check("mean_field_flipout train_ratio <= 2.1", get("mean_field_flipout", "train_ratio"), 2.1)
    check("ssvi_d10 state_bytes <= 0.2 x mean_field_lrt", get("ssvi_d10", "state_bytes_ratio"), 0.2)
    check("ssvi_d10 peak_rss_mb <= mean_field_lrt", get("ssvi_d10", "peak_rss_mb"), get("mean_field_lrt", "peak_rss_mb"))
    check("ssvi_d10 train_ms <= mean_field_lrt", get("ssvi_d10", "train_ms"), get("mean_field_lrt", "train_ms"))
    check("gbnn_tied train_ratio <= 1.1", get("gbnn_tied", "train_ratio"), 1.1)
    for ours, peers in OURS_VERSUS_PEERS.items():
        times = [get(p, "train_ms") for p in peers if get(p, "train_ms") is not None]
        check(f"{ours} train_ms <= fastest peer of its kind", get(ours, "train_ms"), min(times) if times else None)
    peer_predict = [get(p, "predict30_ms") for p in PEER_NAMES if get(p, "predict30_ms") is not None]
    for ours in OURS:
        check(f"{ours} predict30_ratio <= 1.0", get(ours, "predict30_ratio"), 1.0)
        check(f"{ours} predict30_ms <= fastest peer", get(ours, "predict30_ms"), min(peer_predict) if peer_predict else None)
    # Memory: each 2DGBNN guide against mean-field training with the same forward pass
    # (tied draws whole weights, as estimator='weight'; independent uses local reparameterization).
    for gbnn, reference in (("gbnn_tied", "mean_field"), ("gbnn_independent", "mean_field_lrt"), ("gbnn_hierarchical", "mean_field_lrt")):
        check(f"{gbnn} peak_rss_mb <= {reference}", get(gbnn, "peak_rss_mb"), get(reference, "peak_rss_mb"))
    return checks


# ----- peak memory, one subprocess per configuration --------------------------------------
def vm_hwm_mb() -> float | None:
    """Peak RSS of the current address space (VmHWM), which, unlike ru_maxrss, exec resets."""
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    line = next((ln for ln in status.read_text().splitlines() if ln.startswith("VmHWM:")), None)
    return int(line.split()[1]) / 1024 if line else None


def rss_child(name: str, steps: int, sharing: dict, plan_path: str | None) -> dict:
    """Run inside the child: imports, then one configuration's warm-up + ``steps`` training steps."""
    import bayesian_torch.models.dnn_to_bnn  # noqa: F401
    import tyxe  # noqa: F401

    import setups  # imports every library the configurations use

    baseline = rss_mb()
    setup = setups.build(name, setups.make_batch(), sharing=sharing, plan_path=plan_path)
    for _ in range(2 + steps):
        setup.train_step()
    hwm = vm_hwm_mb()
    return {"peak_rss_mb": round(rss_mb(), 1), "baseline_rss_mb": round(baseline, 1),
            "vm_hwm_mb": round(hwm, 1) if hwm is not None else None}


def child_command(*extra: str, args: argparse.Namespace, sharing: dict) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *extra, "--threads", str(args.threads),
            "--sharing", json.dumps(sharing)]


def make_plan(path: str, args: argparse.Namespace, sharing: dict) -> float:
    """Build the 2DGBNN configurations' sharing plan once, in a subprocess; returns its wall time."""
    start = time.perf_counter()
    subprocess.run(child_command("--make-plan", path, args=args, sharing=sharing), check=True)
    return round(time.perf_counter() - start, 2)


def measure_rss(names: list[str], args: argparse.Namespace, sharing: dict, plan_path: str | None) -> dict:
    """Peak RSS of each configuration in its own process, ``--rss-jobs`` processes at a time.

    Each configuration is measured ``--rss-repeats`` times, the rounds interleaved; the
    median is reported with the range (one process's peak moves by tens of MB from run
    to run with the allocator's layout). Called before this process imports torch: a
    child's ru_maxrss starts at its parent's resident size (Linux carries it over fork
    and exec), which is then a few MB."""
    runs: dict[str, list[dict]] = {name: [] for name in names}
    pending = [name for _ in range(args.rss_repeats) for name in names]
    running: list[tuple[str, subprocess.Popen]] = []
    while pending or running:
        while pending and len(running) < args.rss_jobs:
            name = pending.pop(0)
            extra = ["--rss-child", name, "--rss-steps", str(args.rss_steps)] + (["--plan", plan_path] if plan_path else [])
            cmd = child_command(*extra, args=args, sharing=sharing)
            running.append((name, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        name, proc = running.pop(0)
        out, err = proc.communicate()
        if proc.returncode == 0:
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
        else:
            runs[name].append({"peak_rss_mb": None, "error": err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}"})
        print(f"rss {name}: {runs[name][-1]}", file=sys.stderr, flush=True)
    return {name: _rss_summary(entries) for name, entries in runs.items()}


def _rss_summary(entries: list[dict]) -> dict:
    peaks = [e["peak_rss_mb"] for e in entries if e.get("peak_rss_mb") is not None]
    if not peaks:
        return entries[-1]
    baselines = [e["baseline_rss_mb"] for e in entries if e.get("baseline_rss_mb") is not None]
    return {"peak_rss_mb": round(statistics.median(peaks), 1), "peak_rss_mb_range": [min(peaks), max(peaks)],
            "baseline_rss_mb": round(statistics.median(baselines), 1), "rss_runs": len(peaks)}


# ----- GMM -------------------------------------------------------------------------------
def bench_gmm(args: argparse.Namespace) -> dict:
    import torch
    from threadpoolctl import threadpool_limits

    import gmm_vs_sklearn as g

    n_cmp, k_cmp = (100_000, 64) if args.quick else (1_000_000, 256)
    x = g.point_cloud(n_cmp, seed=1)
    points = torch.from_numpy(x)
    cache = Path(args.sklearn_cache) if args.sklearn_cache else None
    cached = json.loads(cache.read_text()) if cache is not None and cache.exists() else {}
    if cached.get("n") == n_cmp and cached.get("k") == k_cmp:
        sk = cached["sklearn"] | {"from_cache": str(cache)}
    else:
        with threadpool_limits(args.threads):
            sk = g.time_sklearn(x, k_cmp)
        sk.pop("_params")
        if cache is not None:
            cache.write_text(json.dumps({"n": n_cmp, "k": k_cmp, "sklearn": sk}))
    target = sk["mean_log_likelihood"] - 1e-3 * abs(sk["mean_log_likelihood"])
    ours = g.time_ours(points, k_cmp, target=target)
    ours.pop("history", None)
    reach = ours.get("time_to_sklearn_within_0.1pct_s")
    result = {
        "versus_sklearn": {
            "n": n_cmp, "k": k_cmp, "sklearn": sk, "ours": ours,
            "speedup_to_reach_sklearn": round(sk["fit_s"] / reach, 2) if reach else None,
            "speedup_full_fit": round(sk["fit_s"] / max(ours["fit_s"], 1e-9), 2),
        },
    }
    if args.quick:
        result["large"] = {"skipped": "--quick"}
    else:
        big = torch.from_numpy(g.point_cloud(11_000_000, seed=2))
        large = g.time_ours(big, 2000)
        large.pop("history", None)
        result["large"] = {"n": 11_000_000, "k": 2000, "ours": large}
    return result


# ----- pipeline --------------------------------------------------------------------------
PIPELINE_QUICK = {
    "data.train_subset": 2048,
    "deterministic.epochs": 1,
    "mean_field.epochs": 1,
    "fine_tune.epochs": 1,
    "sharing.grad_batches": 5,
    "mean_field.eval_samples": 1,
    "fine_tune.eval_samples": 1,
    "predict.num_samples": 4,
}


def bench_pipeline(args: argparse.Namespace) -> dict:
    from pyro_gbnn import load_config, run_fit

    config = load_config(ROOT / "configs" / "mnist_quick_2dgbnn.yaml")
    overrides = {"data.dir": str(Path(args.data_dir).resolve()), "progress": False, "threads": args.threads}
    overrides |= PIPELINE_QUICK if args.quick else {}
    for key, value in overrides.items():
        *path, last = key.split(".")
        section = config
        for part in path:
            section = section[part]
        section[last] = value
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        metrics = run_fit(config, Path(out) / "run", progress=False)
        total = time.perf_counter() - start
    stages = metrics.get("stages", {})
    return {
        "config": "configs/mnist_quick_2dgbnn.yaml",
        "overrides": {k: v for k, v in overrides.items() if k != "data.dir"},
        "stage_wall_time_s": {name: stage.get("wall_time_s") for name, stage in stages.items()},
        "total_wall_time_s": round(total, 2),
        "final": {k: metrics.get(k) for k in ("accuracy", "nll", "ece", "n_params_trainable", "n_gaussians")},
    }


# ----- command line ----------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results.json", help="JSON file to write")
    parser.add_argument("--quick", action="store_true", help="every configuration, few repetitions, small GMM and pipeline")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of: " + ", ".join(CONFIGS))
    parser.add_argument("--skip-gmm", action="store_true")
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--skip-rss", action="store_true", help="no peak-memory subprocesses")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads (default 2)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7, quick 2)")
    parser.add_argument("--steps", type=int, default=None, help="training steps timed per configuration and round (default 3, quick 2)")
    parser.add_argument("--num-samples", type=int, default=30, help="weight draws of the predictive")
    parser.add_argument("--rss-steps", type=int, default=3, help="training steps after warm-up in each memory subprocess")
    parser.add_argument("--rss-jobs", type=int, default=None, help="memory subprocesses at once (default 1, quick 2)")
    parser.add_argument("--rss-repeats", type=int, default=None, help="memory subprocesses per configuration (default 3, quick 1)")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"), help="MNIST for the pipeline")
    parser.add_argument("--sklearn-cache", default=None, help="JSON file with scikit-learn's GMM result: read if it matches, else written")
    parser.add_argument("--no-malloc-tuning", action="store_true", help="keep glibc's default mmap/trim thresholds")
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--make-plan", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--plan", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--sharing", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 7)
    args.steps = args.steps or (2 if args.quick else 3)
    args.rss_jobs = args.rss_jobs or (2 if args.quick else 1)
    args.rss_repeats = args.rss_repeats or (1 if args.quick else 3)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configurations {unknown}; choose from {', '.join(CONFIGS)}")
    args.config_names = names
    return args


def main() -> None:
    reexec_with_malloc_env()
    args = parse_args()
    sharing = json.loads(args.sharing) if args.sharing else (GBNN_SHARING_QUICK if args.quick else GBNN_SHARING)
    if args.rss_child or args.make_plan:
        run_child(args, sharing)
        return
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        plan_path, plan_s = None, None
        if any(name in GBNN_CONFIGS for name in args.config_names):
            plan_path = str(Path(tmp) / "plan.pt")
            plan_s = make_plan(plan_path, args, sharing)
        memory = {} if args.skip_rss else measure_rss(args.config_names, args, sharing, plan_path)
        import torch  # only now: the memory subprocesses above must not inherit a large parent

        torch.set_num_threads(args.threads)
        report = {"machine": machine_info(args), "settings": settings_record(args, sharing, plan_s)}
        if args.quick:
            report["quick"] = quick_record(args, sharing)
        built, build_s = build_setups(args.config_names, sharing, plan_path)
    raw, state = measure(built, args.rounds, args.steps, args.num_samples)
    configs = config_results(raw, build_s, {name: setup.notes for name, setup in built.items()})
    del built
    for name, entry in memory.items():
        configs[name].update(entry)
    for name, entry in state.items():
        configs[name].update(entry, state_bytes=sum(entry.values()))
    add_ratios(configs)
    report["configs"] = configs
    report["targets"] = target_checks(configs)
    _write(args.out, report)
    if not args.skip_gmm:
        report["gmm"] = bench_gmm(args)
        _write(args.out, report)
    if not args.skip_pipeline:
        report["pipeline"] = bench_pipeline(args)
    report["machine"]["load_avg_1m_at_end"] = os.getloadavg()[0]
    report["machine"]["benchmark_wall_s"] = round(time.perf_counter() - started, 1)
    _write(args.out, report)
    print(json.dumps(report, indent=1))


def run_child(args: argparse.Namespace, sharing: dict) -> None:
    import torch

    torch.set_num_threads(args.threads)
    if args.make_plan:
        import setups

        setups.save_plan(args.make_plan, setups.make_batch(), sharing)
    else:
        print(json.dumps(rss_child(args.rss_child, args.rss_steps, sharing, args.plan)))


def settings_record(args: argparse.Namespace, sharing: dict, plan_s: float | None) -> dict:
    return {
        "model": "resnet20 (pyro_gbnn.build_model('resnet20', 10, 3, 32)), batch 128, random CIFAR-shaped inputs",
        "rounds": args.rounds, "steps_per_round": args.steps, "num_samples": args.num_samples,
        "gbnn_sharing": sharing, "gbnn_plan_build_s": plan_s, "rss_steps": args.rss_steps, "rss_jobs": args.rss_jobs, "rss_repeats": args.rss_repeats,
        "optimizer": "torch.optim.Adam for every variational configuration (SGD for deterministic)",
    }


def quick_record(args: argparse.Namespace, sharing: dict) -> dict:
    return {
        "rounds": args.rounds, "steps_per_round": args.steps, "gbnn_sharing": sharing,
        "gmm": "100k points K=64 side by side (full: 1M, K=256); 11M/K=2000 skipped",
        "pipeline": PIPELINE_QUICK,
    }


def _write(path: str, report: dict) -> None:
    Path(path).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
