"""Users' own priors and guides: ~20-line classes train through run_fit and the command line."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import pyro_gbnn as pg
from pyro_gbnn import pipeline
from pyro_gbnn.errors import UsageError
from pyro_gbnn.registry import GUIDES, PRIORS, build_guide, build_prior
from tests.conftest import tiny_config

USER_MODULE = textwrap.dedent(
    '''
    """A user's research code: a Laplace prior and a guide with one learned scale per tensor."""
    import math

    import pyro.distributions as dist
    import torch
    from torch import nn

    import pyro_gbnn as pg


    class LaplacePrior(pg.Prior):
        """p(w) = Laplace(0, scale) for every weight (torch has KL(Normal || Laplace) in closed form)."""

        def __init__(self, scale=0.1):
            self.scale = scale

        def prior_dist(self, name, module, param):
            return dist.Laplace(torch.zeros_like(param), self.scale).to_event(param.dim())


    class TensorScaleGuide(pg.SiteGuide):
        """A Normal per weight whose standard deviation is shared by the whole tensor."""

        def __init__(self, bnn, init_scale=1e-3):
            super().__init__(bnn)
            self.loc = nn.ParameterDict({pg.site_key(n): nn.Parameter(v.detach().clone()) for n, v in bnn.initial_values.items()})
            self.log_scale = nn.ParameterDict(
                {pg.site_key(n): nn.Parameter(torch.tensor(math.log(init_scale))) for n in bnn.site_shapes}
            )

        def scale_parameters(self):
            return iter(self.log_scale.values())

        def distribution(self, name):
            loc = self.loc[pg.site_key(name)]
            return dist.Normal(loc, self.log_scale[pg.site_key(name)].exp().expand_as(loc)).to_event(loc.dim())
    '''
)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    folder = tmp_path / "usercode"
    folder.mkdir()
    (folder / "my_research.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(folder))
    sys.modules.pop("my_research", None)
    return folder


CUSTOM = [
    "bnn.prior={class: my_research.LaplacePrior, args: {scale: 0.1}}",
    "bnn.guide={class: my_research.TensorScaleGuide, args: {init_scale: 0.001}}",
    "bnn.estimator=weight",
]


def test_custom_prior_and_guide_train_through_run_fit(fake_mnist, tmp_path, user_module):
    metrics = pipeline.run_fit(tiny_config(fake_mnist, extra=CUSTOM), tmp_path / "run")
    assert metrics["accuracy"] > 0.5
    n_det = metrics["stages"]["deterministic"]["n_params_trainable"]
    n_tensors = len(list(pg.build_model("mlp", 10, 1, 28).parameters()))  # one scale per weight tensor
    assert metrics["n_params_trainable"] == n_det + n_tensors
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    kls = [r["train_kl"] for r in log if r.get("stage") == "mean_field" and "train_kl" in r]
    assert len(kls) == 2 and all(k > 0 for k in kls)


def test_custom_prior_and_guide_train_through_the_command_line(fake_mnist, tmp_path, user_module):
    config = tmp_path / "custom.yaml"
    config.write_text(
        textwrap.dedent(
            """
            model: mlp
            method: mean-field
            progress: false
            data: {batch_size: 64, eval_batch_size: 128}
            deterministic: {epochs: 1, optimizer: adam, lr: 0.003, weight_decay: 0}
            mean_field: {epochs: 1, eval_samples: 2}
            predict: {num_samples: 4}
            bnn:
              prior: {class: my_research.LaplacePrior, args: {scale: 0.1}}
              guide: {class: my_research.TensorScaleGuide, args: {init_scale: 0.001}}
              estimator: weight
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(user_module), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "pyro_gbnn.fit", "--config", str(config), "--data-dir", str(fake_mnist), "--out", str(tmp_path / "cli"), "--no-progress"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert saved["method"] == "mean-field" and saved["accuracy"] > 0.3
    assert "my_research.TensorScaleGuide" in (tmp_path / "cli" / "config.yaml").read_text()


def test_built_in_classes_are_registered_like_user_classes():
    assert PRIORS["iid_normal"] is pg.IIDNormalPrior
    assert GUIDES["mean_field"] is pg.MeanFieldGuide
    for name, cls in GUIDES.items():
        assert issubclass(cls, pg.SiteGuide), name


class NotAGuide(torch.nn.Module):
    pass


class NoDistribution(pg.SiteGuide):
    pass


class NotAPrior:
    pass


class NoPriorDist(pg.Prior):
    pass


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"class": "tests.test_extension_api.NotAGuide"}, "must subclass pyro_gbnn.guides.SiteGuide"),
        ({"class": "tests.test_extension_api.NoDistribution"}, "does not implement distribution"),
        ({"class": "mean_field", "args": {"init_scale": -1.0}}, "failed in its __init__ .*ValueError: init_scale must be > 0"),
        ({"class": "mean_field", "args": {"nope": 1}}, "rejected args"),
        ({"class": "no_such_guide"}, "unknown guide 'no_such_guide'; use one of mean_field"),
        ({"class": "no.such.Module"}, "cannot import guide class"),
        ({"klass": "mean_field"}, "guide spec must be a mapping with 'class'"),
        ({"class": "mean_field", "args": [1]}, "'args' must be a mapping"),
    ],
)
def test_wrong_guide_classes_say_what_is_missing(spec, message):
    bnn = pg.BayesianNetwork(torch.nn.Linear(3, 2), pg.IIDNormalPrior(0.0, 1.0), pg.Categorical(10))
    with pytest.raises(UsageError, match=message):
        build_guide(spec, bnn)


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"class": "tests.test_extension_api.NotAPrior"}, "must subclass pyro_gbnn.priors.Prior"),
        ({"class": "tests.test_extension_api.NoPriorDist"}, "does not implement prior_dist"),
        ({"class": "iid_normal", "args": {"width": 2}}, "rejected args"),
    ],
)
def test_wrong_prior_classes_say_what_is_missing(spec, message):
    with pytest.raises(UsageError, match=message):
        build_prior(spec)


def test_a_guide_other_than_mean_field_is_refused_where_a_method_needs_mean_field(fake_mnist, tmp_path, user_module):
    config = tiny_config(fake_mnist, method="2dgbnn", extra=CUSTOM)
    with pytest.raises(UsageError, match="set bnn.guide.class to mean_field"):
        pipeline.run_fit(config, tmp_path / "run")
