"""Data-parallel runs: two gloo processes on the CPU, spawned by the tests, against one process."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from pyro_gbnn import distributed
from pyro_gbnn.sharing.gmm import fit_gmm_2d

pytestmark = pytest.mark.integration  # several processes or a whole install: seconds each

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT.parent / "shared" / "fixtures" / "cifar10-resnet20-stage1.pt"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world: int, port: int, worker, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    joined = distributed.setup()
    try:
        worker(*args)
    finally:
        distributed.teardown(joined)


def spawn(worker, *args, nprocs: int = 2) -> None:
    """Run ``worker(*args)`` in ``nprocs`` processes joined as torchrun would join them."""
    mp.spawn(_entry, args=(nprocs, _free_port(), worker, args), nprocs=nprocs)


def _fixture_points() -> torch.Tensor:
    moments = torch.load(FIXTURE, weights_only=True)["moments"]
    loc = torch.cat([m[0].reshape(-1) for m in moments.values()])
    scale = torch.cat([m[1].reshape(-1) for m in moments.values()])
    return torch.stack([loc, scale], -1).double()


def _fit_shard(points: torch.Tensor, settings: dict, out: Path) -> None:
    start, stop = distributed.shard_range(points.shape[0])
    fit = fit_gmm_2d(points[start:stop], distributed=True, **settings)
    torch.save({"fit": [fit.weights, fit.means, fit.covs], "ll": fit.mean_log_likelihood, "n_iter": fit.n_iter}, out / f"rank{distributed.rank()}.pt")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs().amax()).max())


@pytest.mark.skipif(not FIXTURE.is_file(), reason="needs the fixture in ../shared/fixtures")
@pytest.mark.parametrize("mode, max_epochs", [("epoch", 100), ("stepwise", 2)])
def test_distributed_em_equals_single_process_em(tmp_path, mode, max_epochs):
    """The ResNet-20 posterior's 270,906 points split over two ranks, K = 2000 (a third of what ships):
    every rank returns the single-process mixture to 1e-5 relative (float64 E steps,
    so that only the order of summation differs; in float32 the two fits differ by the
    E step's rounding, ~2e-4 after 60 epochs, since each rank's pruning cells differ)."""
    points = _fixture_points()
    settings = dict(num_components=2000, tol=1e-4, max_epochs=max_epochs, seed=0, mode=mode, compute_dtype=torch.float64)
    single = fit_gmm_2d(points, **settings)
    spawn(_fit_shard, points, settings, tmp_path)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["n_iter"] == single.n_iter
        assert got["ll"] == pytest.approx(single.mean_log_likelihood, rel=1e-10)
        for mine, theirs in zip(got["fit"], (single.weights, single.means, single.covs)):
            assert _relative(mine, theirs) < 1e-5


# --------------------------------------------------------------------------- the ELBO's gradient

def _elbo_gradient(x: torch.Tensor, y: torch.Tensor, out: Path) -> None:
    """One step's gradient of the negative ELBO per datum, the batch split over the ranks."""
    from torch import nn

    from pyro_gbnn import BayesianNetwork, Categorical, IIDNormalPrior, MeanFieldGuide
    from pyro_gbnn.elbo import AnalyticKL_ELBO
    from pyro_gbnn.train import elbo_step

    torch.manual_seed(0)
    bnn = BayesianNetwork(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), IIDNormalPrior(0.0, 1.0), Categorical(1000))
    guide = MeanFieldGuide(bnn, init_scale=0.3)
    elbo = AnalyticKL_ELBO(bnn, guide)
    step = distributed.data_parallel(elbo, elbo_step(elbo, 1000))
    torch.manual_seed(1)  # the same weight draw on every rank and in one process
    start, stop = distributed.shard_range(x.shape[0])
    step(x[start:stop], y[start:stop]).loss.backward()
    torch.save({n: p.grad for n, p in elbo.named_parameters()}, out / f"rank{distributed.rank()}.pt")


def test_averaged_gradients_are_the_global_batch_gradient(tmp_path):
    """Each rank scales its likelihood by N / local batch; DDP's average is then the
    gradient of the global batch's ELBO estimate (N / B), as one process computes it."""
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    (tmp_path / "one").mkdir()
    _elbo_gradient(x, y, tmp_path / "one")
    single = torch.load(tmp_path / "one" / "rank0.pt")
    spawn(_elbo_gradient, x, y, tmp_path)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got.keys() == single.keys()
        for name in single:
            torch.testing.assert_close(got[name], single[name], rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- whole runs

TINY = [
    "model=mlp", "progress=false", "data.batch_size=64", "data.eval_batch_size=100",
    "deterministic.epochs=2", "deterministic.optimizer=adam", "deterministic.lr=0.003", "deterministic.weight_decay=0",
    "mean_field.epochs=2", "mean_field.eval_samples=2", "predict.num_samples=4",
    "sharing.num_components=8", "sharing.min_cluster_size=2", "sharing.grad_batches=2", "fine_tune.epochs=2",
]


def tiny_config(data_dir: Path, method: str = "2dgbnn", extra: tuple[str, ...] = ()) -> dict:
    from pyro_gbnn.config import DEFAULTS, apply_overrides

    return apply_overrides(DEFAULTS, [*TINY, f"data.dir={data_dir}", f"method={method}", *extra])


class Killed(BaseException):
    pass


def _fit(config: dict, out: Path, kill_at_step: int | None = None, forbid_writes: bool = False) -> None:
    """``run_fit`` on every rank; optionally killed after ``kill_at_step`` optimizer steps
    (mid-epoch), or with every file write on ranks other than 0 turned into an error."""
    from pyro_gbnn.pipeline import run_fit

    if forbid_writes and distributed.rank() != 0:
        _forbid_writes()
    if kill_at_step is not None:
        _kill_after_steps(kill_at_step)
    try:
        run_fit(config, out)
    except Killed:
        pass


def _kill_after_steps(limit: int) -> None:
    steps = {"n": 0}
    original = torch.optim.Adam.step

    def step(self, *args, **kwargs):
        steps["n"] += 1
        if steps["n"] > limit:
            raise Killed
        return original(self, *args, **kwargs)

    torch.optim.Adam.step = step


def _forbid_writes() -> None:
    import builtins
    import tempfile

    original_open = builtins.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+"):
            raise AssertionError(f"rank {distributed.rank()} opened {file} for writing")
        return original_open(file, mode, *args, **kwargs)

    def no_temp(*args, **kwargs):
        raise AssertionError(f"rank {distributed.rank()} made a temporary file")

    builtins.open = guarded_open
    tempfile.mkstemp = no_temp


def _metrics(out: Path) -> dict:
    import json

    return json.loads((out / "metrics.json").read_text())


def _resume(out: Path) -> None:
    from pyro_gbnn.config import DEFAULTS
    from pyro_gbnn.pipeline import run_fit

    run_fit(dict(DEFAULTS), out, resume=True)


def test_two_processes_reach_the_metrics_of_one_process(fake_mnist, tmp_path):
    """Mean-field (stages 0 and 1) under two gloo processes with one process's global batch
    (64): stage 0 draws no weights, so it reaches one process's metrics to float rounding;
    stage 1 draws other weights on each rank (each rank's own stream), so its metrics agree
    within the noise of the weight draws: accuracy within 0.05, NLL within 25%."""
    from pyro_gbnn.pipeline import run_fit

    config = tiny_config(fake_mnist, "mean-field", ("deterministic.epochs=1",))
    single = run_fit(config, tmp_path / "one")
    spawn(_fit, config, tmp_path / "two")
    two = _metrics(tmp_path / "two")
    one_det, two_det = single["stages"]["deterministic"], two["stages"]["deterministic"]
    assert two_det["accuracy"] == one_det["accuracy"]
    assert two_det["nll"] == pytest.approx(one_det["nll"], rel=1e-4)
    assert one_det["nll"] > 1e-3, "a stage-0 network that is not yet exact, so the comparison means something"
    assert two["accuracy"] == pytest.approx(single["accuracy"], abs=0.05)
    assert two["nll"] == pytest.approx(single["nll"], rel=0.25)


def test_2dgbnn_runs_every_stage_under_two_processes_and_only_rank_0_writes(fake_mnist, tmp_path):
    """Rank 1 may not open a file for writing or make a temporary file (the atomic writes'
    first step); rank 0 writes each record once."""
    import json

    spawn(_fit, tiny_config(fake_mnist), tmp_path / "run", None, True)
    metrics = _metrics(tmp_path / "run")
    assert set(metrics["stages"]) == {"deterministic", "mean_field", "sharing", "fine_tune"}
    assert metrics["n_gaussians"] >= 1
    assert {p.name for p in (tmp_path / "run").iterdir()} == {"config.yaml", "log.jsonl", "checkpoint.pt", "metrics.json", "sharing_plan.pt"}
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records if r.get("finished")] == ["deterministic", "mean_field", "sharing", "fine_tune"]
    assert [(r["stage"], r["epoch"]) for r in records if "loss" in r] == [
        (stage, epoch) for stage in ("deterministic", "mean_field", "fine_tune") for epoch in (1, 2)
    ]


@pytest.mark.parametrize("kill_at_step, resume_with", [(5, "spawn"), (13, "torchrun")])
def test_a_killed_two_process_run_resumes_to_the_uninterrupted_metrics(fake_mnist, tmp_path, kill_at_step, resume_with):
    """Killed mid-epoch (4 steps an epoch: after 5 steps in stage 0's second epoch, after
    13 in stage 1's second), then resumed by two processes from rank 0's checkpoint (the
    second time by ``torchrun ... -m pyro_gbnn.fit --out DIR --resume``): the
    uninterrupted run's metrics."""
    config = tiny_config(fake_mnist, "mean-field", ("threads=1",))
    spawn(_fit, config, tmp_path / "whole")
    spawn(_fit, config, tmp_path / "killed", kill_at_step)
    assert not (tmp_path / "killed" / "metrics.json").exists()
    if resume_with == "spawn":
        spawn(_resume, tmp_path / "killed")
    else:
        done = _torchrun("--out", str(tmp_path / "killed"), "--resume")
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.count("resuming") == 1
    resumed, whole = _metrics(tmp_path / "killed"), _metrics(tmp_path / "whole")
    for metrics in (resumed, whole):
        for result in metrics["stages"].values():
            result.pop("wall_time_s")
    assert resumed == whole


def _evaluate(out: Path, result: Path) -> None:
    from pyro_gbnn.pipeline import load_run_model

    run, bnn, guide = load_run_model(out)
    torch.save(run.evaluate(bnn, guide, "test", 3), result / f"rank{distributed.rank()}.pt")


def test_sharded_evaluation_equals_one_process_evaluation(fake_mnist, tmp_path):
    """128 test images in batches of 30 (5 batches, the last partial): rank 0 scores
    batches 0, 2, 4 and rank 1 batches 1, 3 with the draws one process makes for them."""
    from pyro_gbnn.pipeline import load_run_model, run_fit

    run_fit(tiny_config(fake_mnist, "mean-field", ("data.eval_batch_size=30", "deterministic.epochs=1", "mean_field.epochs=1")), tmp_path / "run")
    run, bnn, guide = load_run_model(tmp_path / "run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: the same kernels, so the same rounding
    try:
        single = run.evaluate(bnn, guide, "test", 3)
        assert single == run.evaluate(bnn, guide, "test", 3), "evaluation draws are seeded by batch"
    finally:
        torch.set_num_threads(threads)
    spawn(_evaluate, tmp_path / "run", tmp_path)
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt") == single


def test_bad_world_sizes_are_one_line_errors(fake_mnist, tmp_path):
    """A global batch that does not split over the processes, and a run resumed by another
    number of processes than saved it, stop before any training."""
    from pyro_gbnn.pipeline import run_fit

    with pytest.raises(Exception, match="data.batch_size 63 .* does not split over 2 processes; use a multiple of 2"):
        spawn(_fit, tiny_config(fake_mnist, "deterministic", ("data.batch_size=63",)), tmp_path / "odd")
    assert not (tmp_path / "odd").exists()
    run_fit(tiny_config(fake_mnist, "deterministic", ("deterministic.epochs=1",)), tmp_path / "one")
    with pytest.raises(Exception, match=r"saved by 1 process\(es\) and is resumed by 2; resume it with a single process"):
        spawn(_resume, tmp_path / "one")


def _torchrun(*fit_args: str):
    """``torchrun --nproc_per_node 2 -m pyro_gbnn.fit FIT_ARGS``, finished."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "pyro_gbnn.fit", *fit_args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_torchrun_runs_the_command_line(fake_mnist, tmp_path):
    """``torchrun --nproc_per_node 2 -m pyro_gbnn.fit``: exit 0, one table (rank 0 prints)."""
    done = _torchrun(
        "--dataset", "mnist", "--method", "mean-field", "--data-dir", str(fake_mnist), "--out", str(tmp_path / "run"),
        *(arg for item in TINY for arg in ("--set", item)), "--set", "threads=1",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("wrote ") == 1
    assert done.stdout.count("mean_field epoch 2/2") == 1
    run = json.loads((tmp_path / "run" / "metrics.json").read_text())["run"]
    assert run["world_size"] == 2 and run["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")


def _fit_recording_outputs(config: dict, out: Path, record: Path) -> None:
    """``run_fit``, each rank saving every finished stage's outputs (its trained state)."""
    from pyro_gbnn import pipeline, stages

    original = stages.FitRun.finish_stage

    def finish_stage(self, stage, *args, **kwargs):
        original(self, stage, *args, **kwargs)
        torch.save(self.outputs[stage], record / f"{stage}-rank{distributed.rank()}.pt")

    stages.FitRun.finish_stage = finish_stage
    pipeline.run_fit(config, out)


METHODS = {  # method: (settings, the stages that hand on trained state)
    "2dgbnn": ([], ["deterministic", "fine_tune", "mean_field", "sharing"]),
    "spike-slab": (["spike_slab.epochs=2", "spike_slab.eval_samples=2", "spike_slab.prior_inclusion=0.1", "prune.epochs=1"],
                   ["deterministic", "prune", "spike_slab"]),
    "ssvi": (["ssvi.epochs=2", "ssvi.eval_samples=2", "ssvi.density=0.2", "ssvi.update_every=2", "ssvi.kl_warmup_epochs=1"], ["ssvi"]),
    "int8": (["int8.scale_bits=[8, 2]"], ["deterministic", "mean_field"]),  # quantize trains nothing
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_rank_ends_each_stage_with_the_same_state(fake_mnist, tmp_path, method):
    """Each method's stages under two processes: the state each stage hands on (networks,
    guides, SSVI's active sets after removal and growth, spike-and-slab's pruning, the
    sharing plan) is identical on both ranks, so rank 0's checkpoint is everyone's."""
    settings, trained = METHODS[method]
    spawn(_fit_recording_outputs, tiny_config(fake_mnist, method, tuple(settings)), tmp_path / "run", tmp_path)
    assert sorted({p.name.rsplit("-rank", 1)[0] for p in tmp_path.glob("*-rank0.pt")}) == trained
    for stage in trained:
        ours, theirs = (torch.load(tmp_path / f"{stage}-rank{r}.pt", weights_only=False) for r in range(2))
        _assert_same(ours, theirs, stage)
    assert _metrics(tmp_path / "run")["method"] == method


def _assert_same(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where
