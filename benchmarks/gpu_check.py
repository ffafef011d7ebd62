"""GPU acceptance check: every method, export, torchrun, kill-and-resume and the step benchmark on one CUDA GPU.

    python benchmarks/gpu_check.py [--data-dir DIR] [--out FILE] [--only STEP ...]

On a machine without a CUDA GPU it prints one line and exits 0 (nothing is checked). On a
GPU machine it runs, in order, each step timed, a failed step recorded and the next one run:

1. data: MNIST from ``--data-dir`` (default ``../shared/data``), else a synthetic MNIST
   (a bar per class plus noise, in torchvision's IDX layout) written into a temp folder.
2. methods: ``python -m pyro_gbnn.fit`` on a training subset with ``device: auto`` (nothing
   passed), one run per built-in method and variant: deterministic, mean-field with each
   estimator (weight, local, flipout), 2DGBNN with tied and hierarchical fine-tuning,
   spike-and-slab, SSVI, INT8. Each must write ``metrics.json`` with an accuracy above
   twice chance and name a CUDA device.
3. export: the tied 2DGBNN run's model file (``python -m pyro_gbnn.export``), scored on
   the CPU (``CUDA_VISIBLE_DEVICES=``) with the run's evaluation seeds: its accuracy must
   equal the run's recorded one to 1e-6; the same score on the GPU is recorded beside it;
   ``python -m pyro_gbnn.predict --device cpu`` (or, if that flag is unknown, with
   ``CUDA_VISIBLE_DEVICES=``) on test images.
4. torchrun: ``torchrun --standalone --nproc_per_node 1 -m pyro_gbnn.fit ... --set
   device=cuda`` must finish with ``metrics.json``; with one process the library joins no
   process group, so a one-process NCCL all-reduce is run beside it under torchrun.
5. resume: a mean-field run killed (SIGKILL) after its first stage-1 checkpoint and
   resumed with ``--resume``, against an uninterrupted run of the same config: identical,
   within 1e-4 NLL (ok), or further apart (failed).
6. benchmark: benchmarks/setups.py's ResNet-20 training steps built on the GPU, timed
   here with their peak GPU memory (``torch.cuda.max_memory_allocated``) and step ratios
   to deterministic; then ``benchmarks/run.py`` (which has no device option: CPU times).
7. sharing: stage 2 (``benchmarks/sharing_scale.py``) on the ResNet-20 fixture's cloud
   resampled to 25.6M weights (ImageNet ResNet-50), K = 6000, on the GPU: wall time, peak
   host and GPU memory, counts. Needs ``../shared/fixtures`` beside the checkout.

Writes one JSON summary (``--out``, default ``benchmarks/results/gpu-check-<date>.json``,
rewritten after every step): versions, GPU, and per step its status, seconds, key metrics
and, for failures, the error's tail; prints a table; exits 1 if any step failed. Sized
for about 8 minutes on one H200; a step that would start after 540 s (``--budget-s``)
is recorded as failed, not run, so the whole check ends within 10 minutes.
``--allow-cpu`` (hidden) runs the same steps on the CPU with tiny sizes, to check the
command lines on a machine without a GPU (torchrun then uses gloo).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("methods", "export", "torchrun", "resume", "benchmark", "sharing")
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
NUM_CLASSES = 10
ACCURACY_FLOOR = 2.0 / NUM_CLASSES  # "above chance": at least twice chance
EXPORT_TOLERANCE = 1e-6
RESUME_NLL_TOLERANCE = 1e-4
BENCH_CONFIGS = ("deterministic", "mean_field", "mean_field_lrt", "mean_field_flipout", "gbnn_tied", "ssvi_d10")


@dataclass(frozen=True)
class Profile:
    """Sizes of one kind of check: the GPU acceptance run, or the tiny CPU dry run."""

    device: str | None  # --set device=...; None: nothing passed (the default, auto)
    torchrun_device: str  # cuda (NCCL) or cpu (gloo)
    train_subset: int
    synthetic_sizes: tuple[int, int]  # (train, test) of the synthetic MNIST
    extra: tuple[str, ...]  # overrides every run takes
    fit_timeout_s: int
    bench_args: tuple[str, ...]
    loop: dict[str, int]  # the GPU step loop: warm-up, timed steps, predictive draws
    predict_images: int = 32
    sharing_scale: tuple[str, str] = ("25.6e6", "6000")  # stage 2 at ImageNet ResNet-50 size: N, K


GPU_PROFILE = Profile(
    device=None,
    torchrun_device="cuda",
    train_subset=10_000,
    synthetic_sizes=(10_000, 2_000),
    extra=(),
    fit_timeout_s=240,
    bench_args=("--quick", "--configs", ",".join(BENCH_CONFIGS), "--skip-gmm", "--skip-pipeline", "--skip-rss",
                "--rounds", "3", "--steps", "3", "--threads", "8"),
    loop={"warmup": 3, "steps": 20, "draws": 30},
)
CPU_PROFILE = Profile(
    device="cpu",
    torchrun_device="cpu",
    train_subset=512,
    synthetic_sizes=(512, 256),
    extra=("data.batch_size=32", "predict.num_samples=4"),
    fit_timeout_s=300,
    bench_args=("--quick", "--configs", "deterministic,mean_field", "--skip-gmm", "--skip-pipeline", "--skip-rss",
                "--rounds", "1", "--steps", "1", "--threads", "2"),
    loop={"warmup": 1, "steps": 2, "draws": 4},
    predict_images=8,
    sharing_scale=("3e5", "500"),
)


@dataclass(frozen=True)
class PlannedRun:
    """One ``python -m pyro_gbnn.fit`` run of the methods step."""

    name: str
    method: str  # a built-in method (pyro_gbnn.methods.METHODS)
    config: str  # relative to the repository root
    overrides: tuple[str, ...]


FAST_GBNN = ("deterministic.epochs=1", "mean_field.epochs=1", "fine_tune.epochs=1", "fine_tune.lr=0.001",
             "sharing.num_components=64", "sharing.min_cluster_size=10", "sharing.gmm_max_epochs=10", "sharing.grad_batches=5")
PLANNED_RUNS: tuple[PlannedRun, ...] = (
    PlannedRun("deterministic", "deterministic", "configs/mnist_quick.yaml", ("deterministic.epochs=2",)),
    *(PlannedRun(f"mean-field-{e}", "mean-field", "configs/mnist_quick.yaml",
                 (f"bnn.estimator={e}", "deterministic.epochs=1", "mean_field.epochs=1")) for e in ("weight", "local", "flipout")),
    *(PlannedRun(f"2dgbnn-{s}", "2dgbnn", "configs/mnist_quick_2dgbnn.yaml", (f"fine_tune.semantics={s}", *FAST_GBNN))
      for s in ("tied", "hierarchical")),
    PlannedRun("spike-slab", "spike-slab", "configs/mnist_quick_spike_slab.yaml",
               ("deterministic.epochs=1", "spike_slab.epochs=1", "prune.epochs=1")),
    PlannedRun("ssvi", "ssvi", "configs/mnist_quick_ssvi.yaml", ("ssvi.epochs=2", "ssvi.kl_warmup_epochs=1", "ssvi.update_every=20")),
    PlannedRun("int8", "int8", "configs/mnist_quick_int8.yaml", ("deterministic.epochs=1", "mean_field.epochs=1", "int8.scale_bits=[8, 4]")),
    # BatchNorm: evaluation with per-draw statistics (draws sampled by a CPU copy of the guide, statistics on the GPU)
    PlannedRun("mean-field-resnet20", "mean-field", "configs/mnist_quick.yaml",
               ("model=resnet20", "deterministic.epochs=1", "mean_field.epochs=1", "predict.num_samples=10")),
)
EXPORTED_RUN = "2dgbnn-tied"
RESUME_RUN = PlannedRun("resume", "mean-field", "configs/mnist_quick.yaml",
                        ("bnn.estimator=local", "deterministic.epochs=1", "mean_field.epochs=3"))


class CheckFailed(Exception):
    """A step's check did not hold (the message says which, with the command's output tail)."""


@dataclass
class Context:
    """What the steps share: sizes, folders, the data and the finished runs."""

    profile: Profile
    gpu: bool
    work: Path
    deadline: float = float("inf")  # time.monotonic() by which every step must be done
    data_dir: Path | None = None
    runs: dict[str, Path] = field(default_factory=dict)  # name -> run folder with metrics.json

    def fit_overrides(self, run: PlannedRun, device: str | None = None) -> list[str]:
        device = self.profile.device if device is None else device
        sets = [f"data.train_subset={self.profile.train_subset}", *self.profile.extra, *run.overrides]
        return sets + ([f"device={device}"] if device else [])

    def timeout(self, wanted_s: float) -> float:
        """``wanted_s``, cut to what is left of the time budget (which must not be spent)."""
        left = self.deadline - time.monotonic()
        if left < 5:
            raise CheckFailed("not run: the time budget (--budget-s) is spent")
        return min(wanted_s, left)


# ----- small helpers -----------------------------------------------------------------------
def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def subprocess_env(hide_gpu: bool = False) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    if hide_gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_command(cmd: list[str], log: Path, timeout_s: float, hide_gpu: bool = False, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``cmd`` in the repository root; its output goes to ``log``; a non-zero exit (if
    ``check``) or a timeout raises :class:`CheckFailed` with the output's tail."""
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(hide_gpu), capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        errs = (err.stderr or b"").decode() if isinstance(err.stderr, bytes) else (err.stderr or "")
        log.write_text(f"$ {' '.join(cmd)}\n{out}\n--- stderr ---\n{errs}")
        raise CheckFailed(f"timed out after {timeout_s:.0f} s: {' '.join(cmd)}\n{tail(errs or out)}") from None
    log.write_text(f"$ {' '.join(cmd)}\n{done.stdout}\n--- stderr ---\n{done.stderr}")
    if check and done.returncode != 0:
        raise CheckFailed(f"exit {done.returncode}: {' '.join(cmd)}\n{tail(done.stderr or done.stdout)}")
    return done


def fit_command(ctx: Context, run: PlannedRun, out: Path, device: str | None = None) -> list[str]:
    cmd = ["-m", "pyro_gbnn.fit", "--config", run.config, "--method", run.method, "--data-dir", str(ctx.data_dir),
           "--out", str(out), "--no-progress"]
    for item in ctx.fit_overrides(run, device):
        cmd += ["--set", item]
    return cmd


def key_metrics(metrics: dict) -> dict[str, Any]:
    keep = ("accuracy", "nll", "ece", "n_params_trainable", "size_bytes", "n_gaussians", "sparsity", "density")
    out = {k: metrics[k] for k in keep if k in metrics}
    out["stage_wall_time_s"] = {s: r.get("wall_time_s") for s, r in metrics.get("stages", {}).items()}
    environment = metrics.get("environment") or {}
    if environment.get("device"):
        out["device"] = environment["device"]
    return out


def ran_on(metrics: dict, first_line: str) -> str | None:
    """The device a run reports (metrics.json ``environment.device``, else fit's first line)."""
    device = (metrics.get("environment") or {}).get("device")
    if device:
        return str(device)
    if " on cuda" in first_line:
        return "cuda"
    if " on cpu" in first_line:
        return "cpu"
    return None


def check_finished_run(ctx: Context, out: Path, stdout: str) -> dict[str, Any]:
    """metrics.json exists, its accuracy is above chance and the run used the expected device."""
    path = out / "metrics.json"
    if not path.is_file():
        raise CheckFailed(f"no metrics.json in {out}\n{tail(stdout)}")
    metrics = json.loads(path.read_text())
    record = key_metrics(metrics)
    first_line = stdout.strip().splitlines()[0] if stdout.strip() else ""
    record["device"] = ran_on(metrics, first_line)
    if ctx.gpu and record["device"] is not None and not record["device"].startswith("cuda"):
        raise CheckFailed(f"the run computed on {record['device']}, not on the GPU: {first_line}")
    if not metrics.get("accuracy", 0.0) > ACCURACY_FLOOR:
        raise CheckFailed(f"accuracy {metrics.get('accuracy')} is not above {ACCURACY_FLOOR} (twice chance)")
    return record


# ----- step 1: data --------------------------------------------------------------------------
def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file (MNIST's format): magic with dtype code 0x08 (uint8), big-endian dims, data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def read_idx(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def write_synthetic_mnist(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """An MNIST look-alike in torchvision's layout (``root/MNIST/raw``), written as the tests'
    ``fake_mnist`` fixture writes it (class c lights up a bar at rows 2c+3..2c+5 plus noise),
    plus a dimmer bar of another class (30-100% as bright), so that some images are close
    calls and the test metrics depend on the weight draws instead of sitting at 100%."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, NUM_CLASSES, n)
        distractors = (labels + rng.integers(1, NUM_CLASSES, n)) % NUM_CLASSES
        brightness = rng.uniform(0.3, 1.0, n) * 255
        images = rng.integers(0, 60, (n, 28, 28))
        for i, (c, d) in enumerate(zip(labels, distractors)):
            images[i, 2 * d + 3 : 2 * d + 6, 4:24] = brightness[i]
            images[i, 2 * c + 3 : 2 * c + 6, 4:24] = 255
        write_idx(root / "MNIST" / "raw" / f"{split}-images-idx3-ubyte", images)
        write_idx(root / "MNIST" / "raw" / f"{split}-labels-idx1-ubyte", labels)
    return root


def has_mnist(folder: Path) -> bool:
    return all((folder / "MNIST" / "raw" / name).is_file() for name in MNIST_FILES)


def step_data(ctx: Context, data_dir: Path, record: dict) -> None:
    if has_mnist(data_dir):
        ctx.data_dir, record["source"] = data_dir.resolve(), f"MNIST in {data_dir.resolve()}"
    else:
        ctx.data_dir = write_synthetic_mnist(ctx.work / "data", *ctx.profile.synthetic_sizes)
        record["source"] = f"synthetic MNIST (no MNIST/raw in {data_dir}) in {ctx.data_dir}"
    raw = ctx.data_dir / "MNIST" / "raw"
    record["train"], record["test"] = (len(read_idx(raw / f"{s}-labels-idx1-ubyte")) for s in ("train", "t10k"))
    record["train_subset"] = ctx.profile.train_subset


# ----- step 2: every method ---------------------------------------------------------------------
def step_fit(ctx: Context, run: PlannedRun, record: dict) -> None:
    out = ctx.work / "runs" / run.name
    cmd = [sys.executable, *fit_command(ctx, run, out)]
    record["command"] = " ".join(cmd[1:])
    done = run_command(cmd, ctx.work / f"{run.name}.log", ctx.timeout(ctx.profile.fit_timeout_s))
    record.update(check_finished_run(ctx, out, done.stdout))
    ctx.runs[run.name] = out


# ----- step 3: export, then predict on the CPU ------------------------------------------------------
def evaluate_model_file(model_file: str, run_dir: str) -> dict[str, Any]:
    """(In a child process.) The model file's test metrics under the run's evaluation seeds,
    on the device the run's config resolves to here (the CPU when CUDA is hidden)."""
    import inspect

    import pyro

    from pyro_gbnn.model_file import load_model
    from pyro_gbnn.pipeline import open_run

    run = open_run(run_dir)
    if "device" in inspect.signature(load_model).parameters:
        model = load_model(model_file, device=run.device)
    else:
        model = load_model(model_file)
    network = model.network.to(run.device)
    guide = model.guide.to(run.device) if model.guide is not None else None
    pyro.set_rng_seed(0)
    repeats = 1 if guide is None else run.config["predict"].get("evaluation_seeds", 1)  # as the run's finish_stage scored it
    scores = [run.evaluate(network, guide, "test", run.config["predict"]["num_samples"], r) for r in range(repeats)]
    metrics = {k: sum(score[k] for score in scores) / len(scores) for k in ("accuracy", "nll", "ece")}
    return {"device": str(run.device), **{k: metrics[k] for k in ("accuracy", "nll", "ece")}}


def write_test_images(data_dir: Path, folder: Path, count: int) -> dict[str, int]:
    """The first ``count`` test images as PNG files; returns file name -> label."""
    from PIL import Image

    raw = data_dir / "MNIST" / "raw"
    images, labels = read_idx(raw / "t10k-images-idx3-ubyte"), read_idx(raw / "t10k-labels-idx1-ubyte")
    folder.mkdir(parents=True, exist_ok=True)
    names = {}
    for i in range(min(count, len(labels))):
        name = f"test{i:04d}.png"
        Image.fromarray(images[i]).save(folder / name)
        names[name] = int(labels[i])
    return names


def predict_on_cpu(ctx: Context, model_file: Path, record: dict) -> None:
    """``python -m pyro_gbnn.predict --device cpu``, or with CUDA hidden if that flag is unknown."""
    labels = write_test_images(ctx.data_dir, ctx.work / "predict-images", ctx.profile.predict_images)
    base = [sys.executable, "-m", "pyro_gbnn.predict", str(model_file), "--images", str(ctx.work / "predict-images"), "--json"]
    log = ctx.work / "predict.log"
    done = run_command(base + ["--device", "cpu"], log, ctx.timeout(ctx.profile.fit_timeout_s), check=False)
    record["predict_cpu_by"] = "--device cpu"
    if done.returncode == 2 and "unrecognized arguments" in done.stderr:
        done = run_command(base, log, ctx.timeout(ctx.profile.fit_timeout_s), hide_gpu=True, check=False)
        record["predict_cpu_by"] = "CUDA_VISIBLE_DEVICES= (predict has no --device flag)"
    if done.returncode != 0:
        raise CheckFailed(f"predict exited {done.returncode}\n{tail(done.stderr or done.stdout)}")
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if len(rows) != len(labels):
        raise CheckFailed(f"predict printed {len(rows)} rows for {len(labels)} images\n{tail(done.stdout)}")
    correct = sum(int(row["label"]) == labels[Path(row["image"]).name] for row in rows)
    record["predict_cli_images"], record["predict_cli_accuracy"] = len(rows), round(correct / len(rows), 4)


def score_model_file(ctx: Context, model_file: Path, run_dir: Path, hide_gpu: bool, name: str) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--evaluate-model", str(model_file), str(run_dir)]
    done = run_command(cmd, ctx.work / f"{name}.log", ctx.timeout(ctx.profile.fit_timeout_s), hide_gpu=hide_gpu)
    return json.loads(done.stdout.strip().splitlines()[-1])


def step_export(ctx: Context, record: dict) -> None:
    run_dir = ctx.runs.get(EXPORTED_RUN)
    if run_dir is None:  # the methods step did not run (--only) or this run failed there
        record["note"] = f"trained its own {EXPORTED_RUN} run"
        step_fit(ctx, next(r for r in PLANNED_RUNS if r.name == EXPORTED_RUN), {})
        run_dir = ctx.runs[EXPORTED_RUN]
    model_file = ctx.work / "model.safetensors"
    done = run_command([sys.executable, "-m", "pyro_gbnn.export", str(run_dir), "--out", str(model_file)],
                       ctx.work / "export.log", ctx.timeout(ctx.profile.fit_timeout_s))
    record["file_bytes"] = json.loads(done.stdout.strip().splitlines()[-1]).get("file")
    saved = json.loads((run_dir / "metrics.json").read_text())
    recorded, recorded_nll = saved["accuracy"], saved["nll"]
    record["recorded_accuracy"], record["recorded_nll"] = recorded, recorded_nll
    on_cpu = score_model_file(ctx, model_file, run_dir, hide_gpu=True, name="score-cpu")
    record["cpu"] = on_cpu
    record["cpu_accuracy_diff"] = on_cpu["accuracy"] - recorded
    record["cpu_nll_diff"] = on_cpu["nll"] - recorded_nll
    try:
        on_device = score_model_file(ctx, model_file, run_dir, hide_gpu=False, name="score-device")
        record["run_device"], record["run_device_accuracy_diff"] = on_device, on_device["accuracy"] - recorded
        record["run_device_nll_diff"] = on_device["nll"] - recorded_nll
    except CheckFailed as err:
        record["run_device_error"] = str(err)[-1500:]
    predict_on_cpu(ctx, model_file, record)
    if abs(record["cpu_accuracy_diff"]) > EXPORT_TOLERANCE:
        raise CheckFailed(f"the exported file scores accuracy {on_cpu['accuracy']} on the CPU, the run recorded {recorded} "
                          f"(difference {record['cpu_accuracy_diff']:.3g} > {EXPORT_TOLERANCE}); "
                          f"on the run's device: {record.get('run_device_accuracy_diff', record.get('run_device_error'))}")


# ----- step 4: torchrun -----------------------------------------------------------------------
def nccl_version() -> str | None:
    import torch

    try:
        version = torch.cuda.nccl.version()
    except Exception:  # noqa: BLE001  (a build without NCCL)
        return None
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def torchrun_command() -> list[str]:
    found = shutil.which("torchrun")
    return [found] if found else [sys.executable, "-m", "torch.distributed.run"]


def nccl_child() -> dict[str, Any]:
    """(Under torchrun.) One all-reduce in a process group of this one process: NCCL on the GPU, else gloo."""
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        x = torch.full((4,), 2.0, device="cuda" if cuda else "cpu")
        dist.all_reduce(x)
        return {"backend": dist.get_backend(), "world_size": dist.get_world_size(), "all_reduce": x.tolist(),
                "nccl_version": nccl_version() if cuda else None}
    finally:
        dist.destroy_process_group()


def step_torchrun(ctx: Context, record: dict) -> None:
    out = ctx.work / "runs" / "torchrun"
    run = PlannedRun("torchrun", "mean-field", "configs/mnist_quick.yaml", ("deterministic.epochs=1", "mean_field.epochs=1"))
    cmd = [*torchrun_command(), "--standalone", "--nproc_per_node", "1", *fit_command(ctx, run, out, ctx.profile.torchrun_device)]
    record["command"] = " ".join(cmd)
    done = run_command(cmd, ctx.work / "torchrun.log", ctx.timeout(ctx.profile.fit_timeout_s))
    record.update(check_finished_run(ctx, out, done.stdout))
    group = run_command([*torchrun_command(), "--standalone", "--nproc_per_node", "1", str(Path(__file__).resolve()), "--nccl-child"],
                        ctx.work / "nccl.log", ctx.timeout(120))
    record["process_group"] = json.loads(group.stdout.strip().splitlines()[-1])
    record["note"] = "WORLD_SIZE=1: pyro_gbnn.distributed.setup joins no process group; process_group is a separate one-process all-reduce"


# ----- step 5: kill and resume ------------------------------------------------------------------
def kill_after_first_bayesian_epoch(cmd: list[str], out: Path, log: Path, timeout_s: float) -> dict[str, Any]:
    """Start ``cmd``; SIGKILL it once its checkpoint holds a finished stage-1 epoch."""
    from pyro_gbnn.checkpoint import load_checkpoint

    checkpoint, seen = out / "checkpoint.pt", None
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise CheckFailed(f"the run exited ({proc.returncode}) before its first stage-1 checkpoint\n{tail(log.read_text())}")
                stamp = checkpoint.stat().st_mtime_ns if checkpoint.is_file() else None
                if stamp is not None and stamp != seen:
                    seen = stamp
                    try:
                        state = load_checkpoint(checkpoint)
                    except Exception:  # noqa: BLE001  (replaced while read: look again)
                        continue
                    if state["stage"] == "mean_field" and state["epoch"] >= 1:
                        proc.kill()
                        proc.wait()
                        return {"killed_at": {"stage": state["stage"], "epoch": state["epoch"]}}
                time.sleep(0.02)
            raise CheckFailed(f"no stage-1 checkpoint within {timeout_s:.0f} s\n{tail(log.read_text())}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def step_resume(ctx: Context, record: dict) -> None:
    reference_out, killed_out = ctx.work / "runs" / "resume-reference", ctx.work / "runs" / "resume-killed"
    done = run_command([sys.executable, *fit_command(ctx, RESUME_RUN, reference_out)], ctx.work / "resume-reference.log",
                       ctx.timeout(ctx.profile.fit_timeout_s))
    check_finished_run(ctx, reference_out, done.stdout)
    record.update(kill_after_first_bayesian_epoch([sys.executable, *fit_command(ctx, RESUME_RUN, killed_out)], killed_out,
                                                  ctx.work / "resume-killed.log", ctx.timeout(ctx.profile.fit_timeout_s)))
    resumed = run_command([sys.executable, "-m", "pyro_gbnn.fit", "--out", str(killed_out), "--resume", "--no-progress"],
                          ctx.work / "resume-resumed.log", ctx.timeout(ctx.profile.fit_timeout_s))
    check_finished_run(ctx, killed_out, resumed.stdout)
    a, b = (json.loads((p / "metrics.json").read_text()) for p in (reference_out, killed_out))
    keys = [k for k in ("accuracy", "nll", "ece", "brier") if k in a and k in b]
    record["uninterrupted"], record["resumed"] = {k: a[k] for k in keys}, {k: b[k] for k in keys}
    record["difference"] = {k: b[k] - a[k] for k in keys}
    if all(a[k] == b[k] for k in keys):
        record["verdict"] = "identical"
    elif abs(b["nll"] - a["nll"]) <= RESUME_NLL_TOLERANCE:
        record["verdict"] = f"within {RESUME_NLL_TOLERANCE} NLL, not identical"
    else:
        record["verdict"] = "differs"
        raise CheckFailed(f"resumed NLL {b['nll']} vs uninterrupted {a['nll']}: more than {RESUME_NLL_TOLERANCE} apart")


# ----- step 6: benchmarks ---------------------------------------------------------------------------
def step_benchmark_run_py(ctx: Context, record: dict) -> None:
    out = ctx.work / "bench.json"
    cmd = [sys.executable, "benchmarks/run.py", *ctx.profile.bench_args, "--out", str(out)]
    record["command"] = " ".join(cmd[1:])
    record["note"] = "benchmarks/run.py has no device option: these times are the CPU's"
    run_command(cmd, ctx.work / "bench.log", ctx.timeout(420))
    configs = json.loads(out.read_text())["configs"]
    keys = ("train_ms", "train_ratio", "predict30_ms", "predict30_ratio", "state_bytes")
    record["configs"] = {name: {k: entry.get(k) for k in keys} for name, entry in configs.items()}


def step_benchmark_gpu(ctx: Context, record: dict) -> None:
    device = "cuda" if ctx.gpu else "cpu"
    loop = ctx.profile.loop
    cmd = [sys.executable, str(Path(__file__).resolve()), "--step-loop-child", device,
           *(f"--loop-{k}={v}" for k, v in loop.items())]
    done = run_command(cmd, ctx.work / "step-loop.log", ctx.timeout(300))
    result = json.loads(done.stdout.strip().splitlines()[-1])
    record.update(result)
    failed = [name for name, entry in result["configs"].items() if "error" in entry]
    if failed:
        raise CheckFailed("step loop failed for " + "; ".join(f"{n}: {result['configs'][n]['error']}" for n in failed))


def step_sharing_scale(ctx: Context, record: dict) -> None:
    """Stage 2 on the ResNet-20 fixture's cloud resampled to ResNet-50 size, on the GPU."""
    fixture = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "cifar10-resnet20-stage1.pt"
    if not fixture.is_file():
        raise CheckFailed(f"needs {fixture} (../shared/fixtures beside the checkout)")
    n, k = ctx.profile.sharing_scale
    cmd = [sys.executable, "benchmarks/sharing_scale.py", "--sizes", n, "--components", k,
           "--device", "cuda" if ctx.gpu else "cpu", "--out", str(ctx.work / "sharing-scale.json")]
    record["command"] = " ".join(cmd[1:])
    run_command(cmd, ctx.work / "sharing-scale.log", ctx.timeout(240))
    run = json.loads((ctx.work / "sharing-scale.json").read_text())["runs"][0]
    record.update({key: run.get(key) for key in ("n_weights", "num_components", "wall_time_s", "peak_rss_gb", "peak_gpu_memory_gb")})
    record["report"] = {key: run["report"].get(key) for key in ("gmm_time_s", "gmm_epochs", "n_gaussians", "n_outliers", "n_ellipses")}


def step_loop(device_name: str, warmup: int, steps: int, draws: int) -> dict[str, Any]:
    """(In a child process.) benchmarks/setups.py's ResNet-20 training steps and predictive,
    built on ``device_name``: ms per step, ratio to deterministic, peak GPU memory."""
    import pyro
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import setups  # noqa: E402

    import pyro_gbnn as pg
    from pyro_gbnn.guides.shared_mixture import SharedMixtureGuide
    from pyro_gbnn.guides.sparse_subspace import SparseSubspaceGuide
    from pyro_gbnn.sharing.build import SharingSettings

    device = torch.device(device_name)
    cuda = device.type == "cuda"
    batch = setups.make_batch()
    batch = setups.Batch(batch.x.to(device), batch.y.to(device))

    def bnn(estimator: str) -> pg.BayesianNetwork:
        return pg.BayesianNetwork(setups.resnet20().to(device), pg.IIDNormalPrior(0.0, 1.0), pg.Categorical(setups.DATASET_SIZE), estimator=estimator)

    def deterministic() -> setups.Setup:
        net = setups.resnet20().to(device)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        return setups.Setup("deterministic", lambda: setups._optimizer_step(optimizer, F.cross_entropy(net(batch.x), batch.y)),
                            lambda s: setups._eval_no_grad(net, lambda: setups._averaged(lambda: net(batch.x), s)))

    def mean_field(estimator: str) -> Callable[[], setups.Setup]:
        def build() -> setups.Setup:
            b = bnn(estimator)
            guide = pg.MeanFieldGuide(b)
            return setups._variational_setup(estimator, b, guide, guide.loc_parameters(), guide.scale_parameters(), batch)
        return build

    def gbnn_tied() -> setups.Setup:
        b = bnn("local")
        plan = setups.sharing_plan_for(b, batch, SharingSettings(num_components=256, gmm_max_epochs=30))
        guide = SharedMixtureGuide(b, plan, semantics="tied")
        locs = [guide.centre_mu, guide.outlier_loc]
        scales = [p for n, p in guide.named_parameters() if n not in ("centre_mu", "outlier_loc")]
        return setups._variational_setup("gbnn_tied", b, guide, locs, scales, batch)

    def ssvi_d10() -> setups.Setup:
        b = bnn("local")
        guide = SparseSubspaceGuide(b, 0.1, update_every=100, total_steps=10**6)
        return setups._variational_setup("ssvi_d10", b, guide, guide.loc_parameters(), guide.scale_parameters(), batch)

    builders = {"deterministic": deterministic, "mean_field": mean_field("weight"), "mean_field_lrt": mean_field("local"),
                "mean_field_flipout": mean_field("flipout"), "gbnn_tied": gbnn_tied, "ssvi_d10": ssvi_d10}
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    results: dict[str, dict] = {}
    for name, build in builders.items():
        try:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            pyro.set_rng_seed(0)
            setup = build()
            for _ in range(warmup):
                setup.train_step()
            sync()
            start = time.perf_counter()
            for _ in range(steps):
                setup.train_step()
            sync()
            train_ms = (time.perf_counter() - start) * 1000 / steps
            start = time.perf_counter()
            setup.predict(draws)
            sync()
            results[name] = {"train_ms": round(train_ms, 2), f"predict{draws}_ms": round((time.perf_counter() - start) * 1000, 1),
                             "peak_gpu_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if cuda else None}
            del setup
        except Exception as err:  # noqa: BLE001  (recorded; the next configuration runs)
            results[name] = {"error": tail(f"{type(err).__name__}: {err}", 3)}
        gc.collect()
    base = results.get("deterministic", {}).get("train_ms")
    for entry in results.values():
        if base and "train_ms" in entry:
            entry["train_ratio"] = round(entry["train_ms"] / base, 3)
    return {"device": str(device), "batch": 128, "model": "resnet20", "warmup": warmup, "steps": steps, "configs": results}


# ----- running and reporting ---------------------------------------------------------------------------
def run_step(ctx: Context, name: str, fn: Callable[[dict], None], results: list[dict]) -> None:
    print(f"[{len(results) + 1}] {name} ...", flush=True)
    record: dict[str, Any] = {}
    start = time.perf_counter()
    try:
        ctx.timeout(0)  # nothing starts once the budget is spent
        fn(record)
        status, error = "ok", None
    except CheckFailed as err:
        status, error = "failed", str(err)[-3000:]
    except Exception:  # noqa: BLE001  (a bug in a step must not stop the others)
        status, error = "failed", tail(traceback.format_exc(), 25)
    entry = {"name": name, "status": status, "seconds": round(time.perf_counter() - start, 1), "metrics": record}
    if error:
        entry["error"] = error
    results.append(entry)
    print(f"    {status} in {entry['seconds']} s" + (f": {error.splitlines()[0]}" if error else ""), flush=True)


def planned_steps(ctx: Context, data_dir: Path, only: list[str] | None) -> list[tuple[str, Callable[[dict], None]]]:
    wanted = set(only or STEPS)
    steps: list[tuple[str, Callable[[dict], None]]] = [("data", lambda r: step_data(ctx, data_dir, r))]
    if "methods" in wanted:
        steps += [(f"fit {run.name}", lambda r, run=run: step_fit(ctx, run, r)) for run in PLANNED_RUNS]
    if "export" in wanted:
        steps.append(("export + predict on cpu", lambda r: step_export(ctx, r)))
    if "torchrun" in wanted:
        steps.append((f"torchrun 1 process ({'nccl' if ctx.profile.torchrun_device == 'cuda' else 'gloo'})", lambda r: step_torchrun(ctx, r)))
    if "resume" in wanted:
        steps.append(("kill + resume", lambda r: step_resume(ctx, r)))
    if "benchmark" in wanted:
        steps += [(f"benchmark step loop ({'cuda' if ctx.gpu else 'cpu'})", lambda r: step_benchmark_gpu(ctx, r)),
                  ("benchmark run.py (cpu)", lambda r: step_benchmark_run_py(ctx, r))]
    if "sharing" in wanted:
        steps.append((f"stage 2 at {ctx.profile.sharing_scale[0]} weights ({'cuda' if ctx.gpu else 'cpu'})", lambda r: step_sharing_scale(ctx, r)))
    return steps


def environment(gpu: bool) -> dict[str, Any]:
    import pyro
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "pyro": pyro.__version__, "cuda": torch.version.cuda,
                            "python": sys.version.split()[0], "argv": sys.argv[1:]}
    if gpu:
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "gpu_memory_gb": round(props.total_memory / 2**30, 1),
                 "cudnn": torch.backends.cudnn.version(), "gpu_count": torch.cuda.device_count(), "nccl": nccl_version()}
    else:
        info["gpu"] = None
        info["note"] = "--allow-cpu: the GPU steps ran on the CPU with tiny sizes (a dry run of the command lines)"
    return info


def headline(metrics: dict) -> str:
    for keys in (("accuracy", "nll"), ("verdict",), ("cpu_accuracy_diff", "predict_cli_accuracy")):
        if all(k in metrics for k in keys):
            return " ".join(f"{k}={metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k}={metrics[k]}" for k in keys)
    if "configs" in metrics:
        ratios = {n: e.get("train_ratio") for n, e in metrics["configs"].items()}
        return "train x det: " + ", ".join(f"{n} {r}" for n, r in ratios.items())
    return metrics.get("source", "")


def print_table(results: list[dict], total_s: float) -> None:
    print(f"\n{'step':<34} {'status':<7} {'seconds':>8}  key metrics")
    for entry in results:
        print(f"{entry['name']:<34} {entry['status']:<7} {entry['seconds']:>8.1f}  {headline(entry['metrics'])[:110]}")
    failed = sum(e["status"] != "ok" for e in results)
    print(f"{len(results)} steps, {failed} failed, {total_s:.0f} s in all")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data", help="folder holding MNIST/raw (default ../shared/data); else synthetic")
    parser.add_argument("--out", help="JSON summary (default benchmarks/results/gpu-check-<date>.json)")
    parser.add_argument("--only", nargs="+", choices=STEPS, metavar="STEP", help=f"run only these steps: {', '.join(STEPS)} (data always runs)")
    parser.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)  # keep the runs and logs here
    parser.add_argument("--budget-s", type=float, default=540, help=argparse.SUPPRESS)  # steps after it are not run
    parser.add_argument("--evaluate-model", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--nccl-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--step-loop-child", help=argparse.SUPPRESS)
    for key in ("warmup", "steps", "draws"):
        parser.add_argument(f"--loop-{key}", type=int, default=GPU_PROFILE.loop[key], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def child_main(args: argparse.Namespace) -> int:
    if args.evaluate_model:
        print(json.dumps(evaluate_model_file(*args.evaluate_model)))
    elif args.nccl_child:
        print(json.dumps(nccl_child()))
    else:
        print(json.dumps(step_loop(args.step_loop_child, args.loop_warmup, args.loop_steps, args.loop_draws)))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.evaluate_model or args.nccl_child or args.step_loop_child:
        return child_main(args)
    import torch

    gpu = torch.cuda.is_available()
    if not gpu and not args.allow_cpu:
        print(f"gpu_check: no CUDA GPU on this machine (torch {torch.__version__}, CUDA build {torch.version.cuda}); nothing checked")
        return 0
    started = time.perf_counter()
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(GPU_PROFILE if gpu else CPU_PROFILE, gpu, work, deadline=time.monotonic() + args.budget_s)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"gpu-check-{datetime.date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"environment": environment(gpu), "budget_s": args.budget_s, "steps": []}
    try:
        for name, fn in planned_steps(ctx, Path(args.data_dir), args.only):
            run_step(ctx, name, fn, report["steps"])
            report["total_s"] = round(time.perf_counter() - started, 1)
            out.write_text(json.dumps(report, indent=1) + "\n")  # after every step: a killed check keeps what it found
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print_table(report["steps"], report["total_s"])
    print(f"wrote {out}")
    return 1 if any(e["status"] != "ok" for e in report["steps"]) else 0


if __name__ == "__main__":
    sys.exit(main())
