"""Device placement checked without a GPU: every method's objects built from a network on
``cuda`` under PyTorch's ``FakeTensorMode``, which makes CUDA tensors on a CPU machine
(no memory, no kernels) and raises ``FakeTensorDeviceMismatchError`` where a CPU tensor
meets a CUDA one.

What fake tensors cannot run, and a real GPU alone checks (benchmarks/gpu_check.py):
backward passes (the autograd engine asks the CUDA driver for a context), and the
data-dependent steps (stage 2's mixture fit, counts, pruning decisions, ``.item()``, the
cumulative BatchNorm average of per-draw statistics, ``Module.cpu()`` of a guide).
For those this file sets gradients by hand and builds the stage-2 plan on the CPU, then
checks that the guides and optimizers built from them live on the network's device.
"""

from __future__ import annotations

import contextlib
import copy
from unittest import mock

import pyro
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError, FakeTensorMode

import pyro_gbnn as pg
from pyro_gbnn.config import DEFAULTS, apply_overrides
from pyro_gbnn.elbo import AnalyticKL_ELBO
from pyro_gbnn.guides.shared_mixture import SEMANTICS, SharedMixtureGuide
from pyro_gbnn.guides.sparse_subspace import SparseSubspaceGuide
from pyro_gbnn.guides.spike_slab import SpikeSlabGuide
from pyro_gbnn.methods.mean_field import build_mean_field
from pyro_gbnn.models import build_model
from pyro_gbnn.quantization import quantize_mean_field
from pyro_gbnn.sharing.build import SharingSettings, build_sharing_plan
from pyro_gbnn.sharing.plan import SharingPlan
from pyro_gbnn.train import deterministic_step, elbo_step, make_optimizer

CUDA = torch.device("cuda", 0)
N = 1000  # data-set size of the likelihood


@contextlib.contextmanager
def fake_tensors():
    """FakeTensorMode, with ``copy.deepcopy`` keeping fake tensors in this mode (the
    BayesianNetwork converts a copy of the network) and Pyro's value checks off (they
    read values, which fake tensors do not have)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    deepcopy = copy.deepcopy

    def same_mode_deepcopy(obj, memo=None, _nil=[]):
        memo = {} if memo is None else memo
        memo.setdefault(id(mode), mode)
        return deepcopy(obj, memo)

    with pyro.validation_enabled(False), mode, mock.patch("copy.deepcopy", same_mode_deepcopy):
        yield mode


def cuda_network(model: str = "resnet20"):
    """A network built on CUDA (inside :func:`fake_tensors`); every other tensor the test
    makes is made by the library, with no default device set."""
    with CUDA:
        return build_model(model, 10, 3, 32)


def batch(size: int = 4):
    return torch.randn(size, 3, 32, 32, device=CUDA), torch.randint(0, 10, (size,), device=CUDA)


def config(*overrides: str) -> dict:
    return apply_overrides(DEFAULTS, list(overrides))


def assert_on_cuda(*modules: torch.nn.Module) -> None:
    for module in modules:
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            assert tensor.device == CUDA, f"{type(module).__name__}.{name} is on {tensor.device}"


def one_step(module: torch.nn.Module, loss: torch.Tensor, section: dict, groups=None) -> torch.optim.Optimizer:
    """What a training step does after the forward pass, with the backward pass replaced by
    gradients of the parameters' own shape and device (fake CUDA tensors have no autograd)."""
    assert loss.device == CUDA
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = make_optimizer(groups or [{"params": params}], section)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    for p in params:
        for value in optimizer.state[p].values():
            if torch.is_tensor(value) and value.dim():
                assert value.device == CUDA
    return optimizer


def test_fake_tensors_catch_a_device_mix():
    """The check this file relies on: a CPU tensor meeting a CUDA one raises."""
    with fake_tensors(), pytest.raises(FakeTensorDeviceMismatchError):
        torch.ones(3, device=CUDA) + torch.ones(3)


def test_deterministic_step_on_cuda():
    with fake_tensors():
        net = cuda_network()
        section = config()["deterministic"]
        result = deterministic_step(net)(*batch())
        one_step(net, result.loss, section)


@pytest.mark.parametrize("estimator", ["weight", "local", "flipout"])
def test_mean_field_guide_and_elbo_step_on_cuda(estimator):
    with fake_tensors():
        net = cuda_network()
        cfg = config(f"bnn.estimator={estimator}")
        bnn, guide = build_mean_field(net, cfg, N)
        assert_on_cuda(bnn, guide)
        elbo = AnalyticKL_ELBO(bnn, guide)
        result = elbo_step(elbo, N)(*batch())
        section = cfg["mean_field"]
        one_step(elbo, result.loss, section, [{"params": list(guide.loc_parameters())}, {"params": list(guide.scale_parameters())}])


def test_mean_field_guide_with_a_scale_mixture_prior_on_cuda():
    """A prior without a closed-form KL: the Monte-Carlo KL term on the network's device."""
    with fake_tensors():
        bnn, guide = build_mean_field(cuda_network(), config("bnn.prior={class: scale_mixture}"), N)
        loss = AnalyticKL_ELBO(bnn, guide)(*batch())
        assert loss.device == CUDA


def _cpu_plan(model: str = "resnet20"):
    """A real stage-2 plan of a mean-field guide of ``model`` (built on the CPU: the mixture
    fit reads values) with a few ellipse weights and outliers."""
    net = build_model(model, 10, 3, 32)
    bnn, guide = build_mean_field(net, config(), N)
    settings = SharingSettings(num_components=20, min_cluster_size=2, gmm_max_epochs=5, mahalanobis_threshold=0.5)
    gradients = {name: torch.rand(shape) for name, shape in bnn.site_shapes.items()}
    plan = build_sharing_plan(guide.posterior_moments(), gradients, settings)
    assert plan.ellipse_index.numel() and plan.outlier_index.numel()
    return plan


@pytest.mark.parametrize("semantics", SEMANTICS)
def test_shared_mixture_guide_from_a_plan_on_cuda(semantics):
    plan = _cpu_plan()
    plan.check()  # reads values: here, not on fake tensors
    with fake_tensors(), mock.patch.object(SharingPlan, "check", lambda self: None):
        net = cuda_network()
        cfg = config(f"fine_tune.semantics={semantics}", "bnn.estimator=local")
        bnn = pg.BayesianNetwork(net, pg.IIDNormalPrior(0.0, 0.1), pg.Categorical(N), estimator="local")
        guide = SharedMixtureGuide(bnn, plan, semantics=semantics)
        assert_on_cuda(bnn, guide)
        elbo = AnalyticKL_ELBO(bnn, guide)
        result = elbo_step(elbo, N)(*batch())
        one_step(elbo, result.loss, cfg["fine_tune"])
        for draws in guide.sample_weights(2).values():
            assert draws.device == CUDA


def test_spike_slab_guide_step_update_and_pruned_guide_on_cuda():
    with fake_tensors():
        net = cuda_network()
        cfg = config("method=spike-slab")
        bnn = pg.BayesianNetwork(net, pg.IIDNormalPrior(0.0, 1.0), pg.Categorical(N))
        guide = SpikeSlabGuide(bnn, prior_inclusion=0.5)
        assert_on_cuda(bnn, guide)
        elbo = AnalyticKL_ELBO(bnn, guide)
        optimizer = one_step(elbo, elbo_step(elbo, N)(*batch()).loss, cfg["spike_slab"])
        guide.after_step(optimizer)
        pruned = guide.prune(0.5)
        assert_on_cuda(pruned)
        elbo = AnalyticKL_ELBO(bnn, pruned)
        one_step(elbo, elbo_step(elbo, N)(*batch()).loss, cfg["prune"])


@pytest.mark.parametrize("addition", ["random", "gradient"])
def test_sparse_subspace_guide_step_and_growth_on_cuda(addition):
    with fake_tensors():
        net = cuda_network()
        cfg = config("method=ssvi")
        bnn = pg.BayesianNetwork(net, pg.IIDNormalPrior(0.0, 1.0), pg.Categorical(N))
        guide = SparseSubspaceGuide(bnn, density=0.1, update_every=1, total_steps=10, addition=addition, added_scale="mean")
        assert_on_cuda(bnn, guide)
        elbo = AnalyticKL_ELBO(bnn, guide)
        optimizer = one_step(elbo, elbo_step(elbo, N)(*batch()).loss, cfg["ssvi"])
        for name, shape in guide.site_shapes.items():  # what the backward hook would store
            guide._store_grad(name, torch.ones(shape.numel(), device=CUDA))
        guide.after_step(optimizer)
        assert_on_cuda(guide)


def test_int8_quantized_guide_predicts_on_cuda():
    with fake_tensors():
        net = cuda_network()
        bnn, guide = build_mean_field(net, config(), N)
        quantized = quantize_mean_field(guide, loc_bits=8, scale_bits=8, per_channel=True)
        assert_on_cuda(quantized)
        draws = quantized.sample_weights(2)
        assert all(d.device == CUDA for d in draws.values())


def test_predict_moves_batches_to_the_network_device():
    """``predict`` on CPU batches (what a loader gives) with a CUDA network."""
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    with fake_tensors():
        net = cuda_network()
        bnn, guide = build_mean_field(net, config(), N)
        prediction = pg.predict(bnn, guide, [(x, y)], num_samples=2)
        assert prediction.probs.shape == (6, 10)


# ----- the static check: where fake tensors cannot go -------------------------------------
# Code that only a real GPU runs through (data-dependent steps: merging while fine-tuning, the
# guide's plan, SSVI's growth) is checked by reading it: a tensor factory in the training
# and sharing code must name its device, unless it is one of these, each CPU by design.
FACTORIES = {"zeros", "ones", "empty", "full", "tensor", "arange", "randn", "rand", "randint", "randperm", "linspace", "eye"}
SCANNED = ("guides", "sharing", "methods", "predict", "elbo.py", "train.py", "bayesian.py", "priors.py", "likelihoods.py",
           "reparameterization.py", "sparse.py", "quantization.py", "pipeline.py")
CPU_BY_DESIGN = {
    ("guides/mean_field.py", "initial_scales"): "drawn by the CPU generator, moved to the weight's device",
    ("predict/__init__.py", "predictive_summary"): "placeholder labels, never on the device",
    ("reparameterization.py", "rademacher"): "a 256 x 8 sign table built once per device, then moved",
    ("train.py", "_summed_over_ranks"): "host totals, staged through the GPU by all_sum under NCCL",
    ("pipeline.py", "_load_data"): "a permutation of data-set indices",
}


def _unplaced_factories(root):
    import ast

    found = []
    for path in sorted(p for name in SCANNED for p in ([root / name] if name.endswith(".py") else (root / name).rglob("*.py"))):
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                continue
            keywords = {k.arg for k in node.keywords}
            if "device" in keywords or None in keywords or "generator" in keywords:  # generator: CPU draws, moved after
                continue
            parent = parents.get(node)
            if isinstance(parent, ast.Attribute) and parent.attr in ("to", "element_size"):
                continue
            function = next((p.name for p in _ancestors(node, parents) if isinstance(p, ast.FunctionDef)), "")
            if (str(path.relative_to(root)), function) not in CPU_BY_DESIGN:
                found.append(f"{path.relative_to(root)}:{node.lineno} torch.{node.func.attr} in {function or 'module'}")
    return found


def _ancestors(node, parents):
    while node in parents:
        node = parents[node]
        yield node


def test_training_and_sharing_code_names_the_device_of_every_tensor_it_makes():
    from pathlib import Path

    root = Path(pg.__file__).parent
    assert _unplaced_factories(root) == []
