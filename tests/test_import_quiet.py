"""``import pyro_gbnn`` is quiet and lazy, and the package leaves Pyro's global settings alone."""

from __future__ import annotations

import json
import subprocess
import sys

import pyro
import torch
from torch import nn

HEAVY = ("arviz", "matplotlib", "tensorboard", "mlflow")


def test_import_prints_nothing_and_loads_no_plotting_or_tracking_library():
    code = (
        "import json, sys, pyro, pyro_gbnn\n"
        f"print(json.dumps([sorted({{m.split('.')[0] for m in sys.modules}} & set({list(HEAVY)!r})),"
        " pyro.settings.get('module_local_params')]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    loaded, local = json.loads(done.stdout)
    assert loaded == [] and local is False
    lazy = subprocess.run(
        [sys.executable, "-c", "import sys, pyro_gbnn; pyro_gbnn.to_inference_data; print('arviz' in sys.modules)"],
        capture_output=True, text=True, timeout=300,
    )
    assert lazy.stdout.strip() == "True", "a lazy name loads its module when used"


def test_training_keeps_parameters_in_the_modules_and_the_setting_off():
    from pyro_gbnn import AnalyticKL_ELBO, BayesianNetwork, Categorical, IIDNormalPrior, MeanFieldGuide

    pyro.clear_param_store()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))  # BatchNorm: plain params
    bnn = BayesianNetwork(net, IIDNormalPrior(0.0, 1.0), Categorical(10))
    guide = MeanFieldGuide(bnn)
    elbo = AnalyticKL_ELBO(bnn, guide)
    optimizer = torch.optim.Adam(elbo.parameters(), 1e-2)
    before = {k: v.clone() for k, v in elbo.state_dict().items()}
    for _ in range(2):
        loss = elbo(torch.randn(5, 4), torch.randint(0, 3, (5,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trace = pyro.poutine.trace(guide).get_trace(torch.randn(5, 4))  # through Pyro: the guide's params as messages
    assert any(site["type"] == "param" for site in trace.nodes.values())
    assert not pyro.settings.get("module_local_params")
    assert list(pyro.get_param_store().keys()) == [], "no parameter went to Pyro's global store"
    assert not torch.equal(before["bnn.net.1.weight"], elbo.state_dict()["bnn.net.1.weight"]), "BatchNorm trains"
