"""Time :func:`pyro_gbnn.sharing.gmm.fit_gmm_2d` against scikit-learn's GaussianMixture.

Two measurements, printed as one JSON object:

- ``versus_sklearn``: ``--n-compare`` points (default 1M), ``--k-compare`` components
  (default 256). scikit-learn's ``GaussianMixture(covariance_type="full")`` with its
  defaults (k-means init, tol 1e-3, max_iter 100), except ``reg_covar`` set to 1e-6 times
  the smaller coordinate variance (its default 1e-6 is absolute and would swamp the
  sigma-coordinate). Ours with its defaults. Reported: fit time, final mean
  log-likelihood, iterations, and the time ours took to first reach scikit-learn's final
  mean log-likelihood within 0.1% (from the per-epoch history).
- ``large``: ours alone on ``--n`` points (default 11M) with ``--k`` components (2000).

The point cloud imitates a BNN's (mu, sigma) pairs: mu ~ 0.05 * Student-t(4) (heavy
tails), log sigma ~ N(log 1e-2, 0.5^2) correlated (rho = 0.3) with mu's magnitude.

    python benchmarks/gmm_vs_sklearn.py --quick        # 100k / K=64 and 1M / K=500
    python benchmarks/gmm_vs_sklearn.py                # the full sizes (minutes)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an installed copy
from pyro_gbnn.sharing.gmm import fit_gmm_2d, gmm_log_likelihood  # noqa: E402


def point_cloud(n: int, seed: int = 0) -> np.ndarray:
    """[n, 2] float64 (mu, sigma) points with heavy-tailed mu and lognormal sigma."""
    rng = np.random.default_rng(seed)
    t = rng.standard_t(df=4, size=n)
    mu = 0.05 * t
    z = (np.log(np.abs(t) + 1e-3) - np.log(0.7)) / 1.1  # roughly standardised log|t|
    log_sigma = math.log(1e-2) + 0.5 * (0.3 * np.clip(z, -3, 3) + math.sqrt(1 - 0.09) * rng.standard_normal(n))
    return np.stack([mu, np.exp(log_sigma)], axis=1)


def time_ours(points: torch.Tensor, k: int, target: float | None = None, **kwargs) -> dict:
    stamps: list[float] = []
    start = time.perf_counter()
    result = fit_gmm_2d(points, k, callback=lambda epoch, ll: stamps.append(time.perf_counter() - start), **kwargs)
    elapsed = time.perf_counter() - start
    out = {
        "fit_s": round(elapsed, 2),
        "mean_log_likelihood": result.mean_log_likelihood,
        "n_iter": result.n_iter,
        "converged": result.converged,
        "history": [round(h, 6) for h in result.history],
        "alive_components": int((result.weights > 0).sum()),
    }
    if target is not None:
        reached = [s for s, h in zip(stamps, result.history) if h >= target]
        out["time_to_sklearn_within_0.1pct_s"] = round(reached[0], 2) if reached else None
    return out


def time_sklearn(x: np.ndarray, k: int) -> dict:
    from sklearn.mixture import GaussianMixture

    reg = 1e-6 * float(x.var(axis=0).min())
    start = time.perf_counter()
    gm = GaussianMixture(k, covariance_type="full", reg_covar=reg, random_state=0).fit(x)
    elapsed = time.perf_counter() - start
    return {
        "fit_s": round(elapsed, 2),
        "mean_log_likelihood": float(gm.score(x)),
        "n_iter": int(gm.n_iter_),
        "converged": bool(gm.converged_),
        "reg_covar": reg,
        "_params": (gm.weights_, gm.means_, gm.covariances_),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (about a minute)")
    parser.add_argument("--n", type=int, default=None, help="points for the large run (11M)")
    parser.add_argument("--k", type=int, default=None, help="components for the large run (2000)")
    parser.add_argument("--n-compare", type=int, default=None, help="points for the sklearn comparison (1M)")
    parser.add_argument("--k-compare", type=int, default=None, help="components for the sklearn comparison (256)")
    parser.add_argument("--skip-sklearn", action="store_true")
    parser.add_argument(
        "--sklearn-cache", default=None,
        help="JSON file with scikit-learn's result for these sizes: read if present, else written",
    )
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--mode", default="epoch", choices=["epoch", "stepwise"])
    parser.add_argument("--max-epochs", type=int, default=100)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    n_cmp = args.n_compare or (100_000 if args.quick else 1_000_000)
    k_cmp = args.k_compare or (64 if args.quick else 256)
    n_big = args.n or (1_000_000 if args.quick else 11_000_000)
    k_big = args.k or (500 if args.quick else 2000)
    ours_kwargs = {"mode": args.mode, "max_epochs": args.max_epochs, "tol": args.tol}

    report: dict = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "load_avg_1m_at_start": os.getloadavg()[0],
            "device": args.device,
        },
        "ours_settings": ours_kwargs,
    }
    if not args.skip_sklearn:
        x = point_cloud(n_cmp, seed=1)
        points = torch.from_numpy(x).to(args.device)
        cache = Path(args.sklearn_cache) if args.sklearn_cache else None
        cached = json.loads(cache.read_text()) if cache is not None and cache.exists() else {}
        if cached.get("n") == n_cmp and cached.get("k") == k_cmp:
            sk = cached["sklearn"]
            sk["from_cache"] = str(cache)
        else:
            sk = time_sklearn(x, k_cmp)
            weights, means, covs = (torch.from_numpy(a) for a in sk.pop("_params"))
            sk["mean_log_likelihood_by_ours"] = gmm_log_likelihood(points, weights, means, covs)
            if cache is not None:
                cache.write_text(json.dumps({"n": n_cmp, "k": k_cmp, "sklearn": sk}))
        target = sk["mean_log_likelihood"] - 1e-3 * abs(sk["mean_log_likelihood"])
        ours = time_ours(points, k_cmp, target=target, **ours_kwargs)
        reach = ours.get("time_to_sklearn_within_0.1pct_s")
        report["versus_sklearn"] = {
            "n": n_cmp,
            "k": k_cmp,
            "sklearn": sk,
            "ours": ours,
            "speedup_to_reach_sklearn": round(sk["fit_s"] / reach, 2) if reach else None,
            "speedup_full_fit": round(sk["fit_s"] / ours["fit_s"], 2),
        }
        print(json.dumps(report, indent=1), flush=True)
    if not args.skip_large:
        points = torch.from_numpy(point_cloud(n_big, seed=2)).to(args.device)
        report["large"] = {"n": n_big, "k": k_big, "ours": time_ours(points, k_big, **ours_kwargs)}
    report["machine"]["load_avg_1m_at_end"] = os.getloadavg()[0]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
