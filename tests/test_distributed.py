"""Data-parallel runs: two gloo processes on the CPU, spawned by the tests, against one process."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from pyro_gbnn import distributed
from pyro_gbnn.sharing.gmm import fit_gmm_2d

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
    """The ResNet-20 posterior's 270,906 points split over two ranks, K = 2000 as shipped:
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
