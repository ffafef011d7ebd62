"""Stage 2 of 2DGBNN at ImageNet-model size: wall time and peak memory as N and K grow.

    python benchmarks/sharing_scale.py --sizes 6.4e6 25.6e6 86e6 --components 6000 2000 4000 \
        --k-at 6.4e6 --out benchmarks/results/2026-12-03-sharing-scale.json

The points are the real CIFAR-10 ResNet-20 stage-1 posterior (``../shared/fixtures``)
resampled with replacement to N weights, each mean, std and gradient multiplied by
(1 + 0.02 eps) so no two points coincide: the cloud keeps its real shape (dense band,
heavy tails) at ResNet-50 (25.6M) or ViT-B/16 (86M) size. The weights are split into
sites of at most 2.4M (ResNet-50's largest layer). Stage 2 runs with the shipped
CIFAR-10 settings (``configs/cifar10_resnet20.yaml``) except ``num_components``; each
(N, K) runs in its own process so its peak resident memory (``ru_maxrss``, which
includes the resampled inputs themselves) is its own. ``--compare-subset N`` also fits
the mixture of N weights to all their inliers and to the 2M that stage 2 fits, and scores
both on all of them. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from pyro_gbnn.sharing.build import SharingSettings

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT.parent / "shared" / "fixtures" / "cifar10-resnet20-stage1.pt"
CONFIG = ROOT / "configs" / "cifar10_resnet20.yaml"
SITE_SIZE = 2_400_000


def resampled(n: int, seed: int = 0) -> tuple[dict, dict]:
    """The fixture's (mean, std, |gradient|) resampled to n weights with 2% jitter, in sites."""
    fixture = torch.load(FIXTURE, weights_only=True)
    sites = list(fixture["moments"])
    loc = torch.cat([fixture["moments"][s][0].reshape(-1) for s in sites])
    scale = torch.cat([fixture["moments"][s][1].reshape(-1) for s in sites])
    grad = torch.cat([fixture["gradients"][s].reshape(-1) for s in sites])
    generator = torch.Generator().manual_seed(seed)
    moments, gradients = {}, {}
    for start in range(0, n, SITE_SIZE):
        size = min(SITE_SIZE, n - start)
        pick = torch.randint(0, loc.numel(), (size,), generator=generator)
        jitter = 1 + 0.02 * torch.randn(3, size, generator=generator)
        name = f"site{start // SITE_SIZE}.weight"
        moments[name] = (loc[pick] * jitter[0], scale[pick] * jitter[1])
        gradients[name] = grad[pick] * jitter[2]
    return moments, gradients


def shipped_settings(k: int) -> SharingSettings:
    """Stage 2's settings as the CIFAR-10 config ships them, with K = k."""
    import yaml

    from pyro_gbnn.sharing.build import SharingSettings

    section = {key: value for key, value in yaml.safe_load(CONFIG.read_text())["sharing"].items() if key != "grad_batches"}
    return SharingSettings.from_dict(section | {"num_components": k})


def one(n: int, k: int, threads: int, device: str = "cpu") -> dict:
    """Stage 2 on n resampled weights with K = k components, in this process, on ``device``
    (stage 2 runs where the moments are, as in a run)."""
    from pyro_gbnn.sharing.build import build_sharing_plan

    torch.set_num_threads(threads)
    moments, gradients = resampled(n)
    moments = {name: (loc.to(device), scale.to(device)) for name, (loc, scale) in moments.items()}
    gradients = {name: grad.to(device) for name, grad in gradients.items()}
    settings = shipped_settings(k)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    plan = build_sharing_plan(moments, gradients, settings)
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - started
    report = {key: value for key, value in plan.report.items() if key != "settings"}
    result = {
        "n_weights": n, "num_components": k, "device": device, "wall_time_s": round(wall, 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "report": report,
    }
    if cuda:
        result["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def subset_against_all(n: int, k: int, threads: int) -> dict:
    """The mixture fitted to all n inliers against the one fitted to ``gmm_max_points`` of
    them (as stage 2 does), both scored on all of them: what the subset costs in fit."""
    from pyro_gbnn.sharing.build import _fitting_positions, _flatten, _points
    from pyro_gbnn.sharing.gmm import fit_gmm_2d, gmm_log_likelihood
    from pyro_gbnn.sharing.outliers import outlier_mask

    torch.set_num_threads(threads)
    settings = shipped_settings(k)
    flat = _flatten(*resampled(n))
    inliers = (~outlier_mask(flat.loc, flat.grad, settings.tau_w, settings.top_grad_fraction)).nonzero().squeeze(-1)
    points = _points(flat, inliers)
    result = {"n_weights": n, "n_inliers": int(points.shape[0]), "num_components": k}
    for name, fitted in (("all", points), ("subset", _points(flat, _fitting_positions(inliers, settings.gmm_max_points, settings.seed)))):
        started = time.perf_counter()
        gmm = fit_gmm_2d(
            fitted, k, batch_size=settings.gmm_batch_size, max_epochs=settings.gmm_max_epochs, tol=settings.gmm_tol,
            seed=settings.seed, mode=settings.gmm_mode,
        )
        result[name] = {
            "points": int(fitted.shape[0]), "epochs": gmm.n_iter, "fit_time_s": round(time.perf_counter() - started, 1),
            "mean_log_likelihood_all_points": gmm_log_likelihood(points, gmm.weights, gmm.means, gmm.covs),
        }
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[25.6e6, 86e6], help="numbers of weights N, at the first K")
    parser.add_argument("--components", type=int, nargs="+", default=[6000], help="values of K; the others at --k-at weights")
    parser.add_argument("--k-at", type=float, default=25.6e6, help="N at which the other values of K run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="where stage 2 runs (cpu, cuda)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--compare-subset", type=float, metavar="N", help="also fit N weights' mixture to all inliers and to the 2M subset")
    parser.add_argument("--one", nargs=2, type=float, metavar=("N", "K"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(int(args.one[0]), int(args.one[1]), args.threads, args.device)))
        return {}
    runs = []
    grid = [(int(n), args.components[0]) for n in args.sizes] + [(int(args.k_at), k) for k in args.components[1:]]
    for n, k in grid:
        command = [sys.executable, __file__, "--one", str(n), str(k), "--threads", str(args.threads), "--device", args.device]
        finished = subprocess.run(command, capture_output=True, text=True, check=True)
        runs.append(json.loads(finished.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    if args.compare_subset:
        comparison = subset_against_all(int(args.compare_subset), args.components[0], args.threads)
        print(json.dumps(comparison), file=sys.stderr, flush=True)
    result = {
        "benchmark": "sharing_scale",
        "command": " ".join(["python", "benchmarks/sharing_scale.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
                   f"{args.threads} threads" + (f", {torch.cuda.get_device_name(0)}" if args.device.startswith("cuda") else ""),
        "runs": runs,
    }
    if args.compare_subset:
        result["subset_against_all"] = comparison
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
