"""Check that a speed change left every number unchanged: same seeds, bit-identical results.

    git stash; python benchmarks/check_identical.py --save /tmp/ref.pt; git stash pop
    python benchmarks/check_identical.py --compare /tmp/ref.pt

For ResNet-20 on a small random batch and every estimator (weight, local, flipout) and
2DGBNN guide (tied, independent), records from a fixed seed: the loss, the gradient of
every trainable tensor, the parameters after three Adam steps, and the 30-sample
posterior predictive; ``--compare`` reports the first tensor that differs in any bit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import setups  # noqa: E402

import pyro  # noqa: E402
import pyro_gbnn as pg  # noqa: E402
from pyro_gbnn.elbo import AnalyticKL_ELBO  # noqa: E402
from pyro_gbnn.guides.shared_mixture import SharedMixtureGuide  # noqa: E402
from pyro_gbnn.predict import predict_batch  # noqa: E402
from pyro_gbnn.sharing.build import SharingSettings  # noqa: E402

SHARING = SharingSettings(num_components=32, gmm_max_epochs=5)


def _record(bnn: pg.BayesianNetwork, guide: torch.nn.Module, batch: setups.Batch) -> dict[str, torch.Tensor]:
    elbo = AnalyticKL_ELBO(bnn, guide)
    params = [p for p in elbo.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    out: dict[str, torch.Tensor] = {}
    pyro.set_rng_seed(7)
    for step in range(3):
        optimizer.zero_grad()
        loss = elbo(batch.x, batch.y) / setups.DATASET_SIZE
        loss.backward()
        if step == 0:
            out["loss"] = loss.detach().clone()
            out |= {f"grad/{n}": p.grad.clone() for n, p in elbo.named_parameters() if p.grad is not None}
        optimizer.step()
    out |= {f"param/{n}": p.detach().clone() for n, p in elbo.named_parameters()}
    out |= {f"buffer/{n}": b.clone() for n, b in elbo.named_buffers() if b.is_floating_point()}
    bnn.eval()
    pyro.set_rng_seed(8)
    out["predict"] = predict_batch(bnn, guide, batch.x, num_samples=30)
    bnn.train()
    return out


def record_all() -> dict[str, dict[str, torch.Tensor]]:
    torch.set_num_threads(1)  # oneDNN's results may depend on the thread count; keep it fixed
    batch = setups.make_batch(16)
    results = {}
    for estimator in ("weight", "local", "flipout"):
        bnn = setups.our_bnn(estimator)
        results[f"mean_field/{estimator}"] = _record(bnn, pg.MeanFieldGuide(bnn), batch)
    pyro.set_rng_seed(0)
    plan_bnn = setups.our_bnn("local")
    plan = setups.sharing_plan_for(plan_bnn, batch, SHARING)
    for semantics in ("tied", "independent"):
        bnn = setups.our_bnn("local")
        results[f"gbnn/{semantics}"] = _record(bnn, SharedMixtureGuide(bnn, plan, semantics=semantics), batch)
    return results


def compare(reference: dict, current: dict) -> list[str]:
    problems = []
    for case, tensors in reference.items():
        for key, value in tensors.items():
            other = current.get(case, {}).get(key)
            if other is None:
                problems.append(f"{case} {key}: missing")
            elif other.shape != value.shape or not torch.equal(other, value):
                diff = (other - value).abs().max().item() if other.shape == value.shape else float("nan")
                problems.append(f"{case} {key}: differs (max abs diff {diff:.3g})")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--save", help="record the current code's numbers to this file")
    group.add_argument("--compare", help="compare the current code's numbers with this file")
    args = parser.parse_args()
    current = record_all()
    if args.save:
        torch.save(current, args.save)
        print(f"saved {sum(len(v) for v in current.values())} tensors of {len(current)} cases to {args.save}")
        return
    problems = compare(torch.load(args.compare, weights_only=True), current)
    for line in problems:
        print(line)
    print("identical" if not problems else f"{len(problems)} tensors differ")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
