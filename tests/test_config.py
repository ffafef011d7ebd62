"""Configs: every shipped file loads, overrides parse, unknown keys are named."""

from pathlib import Path

import pytest
import yaml

from pyro_gbnn.config import DEFAULTS, apply_overrides, load_config
from pyro_gbnn.data import DATASETS
from pyro_gbnn.errors import UsageError
from pyro_gbnn.models import MODELS

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_name_known_things(path):
    config = load_config(path)
    assert config["dataset"] in DATASETS and config["model"] in MODELS
    for stage in ("deterministic", "mean_field"):
        assert isinstance(config[stage]["lr"], float)


def test_overrides_parse_yaml_values_and_numbers_written_with_exponents():
    config = apply_overrides(DEFAULTS, ["mean_field.lr=1e-4", "deterministic.milestones=[1, 2]", "data.train_subset=null"])
    assert config["mean_field"]["lr"] == 1e-4
    assert config["deterministic"]["milestones"] == [1, 2]
    assert DEFAULTS["mean_field"]["lr"] != 1e-4, "defaults are never mutated"


def test_text_settings_stay_text():
    assert apply_overrides(DEFAULTS, ["data.dir=2024"])["data"]["dir"] == "2024"


def test_prior_spec_replaces_args_when_class_changes():
    config = apply_overrides(DEFAULTS, ["bnn.prior={class: scale_mixture}"])
    assert config["bnn"]["prior"] == {"class": "scale_mixture", "args": {}}


def test_errors_name_the_key_and_what_is_accepted(tmp_path):
    with pytest.raises(UsageError, match="unknown config key 'bnn.priorr'; accepted here: bayesian_norm, estimator"):
        apply_overrides(DEFAULTS, ["bnn.priorr=1"])
    with pytest.raises(UsageError, match="expects a number, got 'fast'"):
        apply_overrides(DEFAULTS, ["mean_field.lr=fast"])
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(UsageError, match="must hold a mapping"):
        load_config(listed)


def test_cifar_budget_config_is_the_fixture_schedule_with_the_shipped_2dgbnn_settings():
    root = Path(__file__).resolve().parents[1]
    budget = load_config(root / "configs" / "cifar10_resnet20_budget.yaml")
    shipped = load_config(root / "configs" / "cifar10_resnet20.yaml")
    assert budget["sharing"] == shipped["sharing"]
    assert {k: v for k, v in budget["fine_tune"].items() if k != "epochs"} == {
        k: v for k, v in shipped["fine_tune"].items() if k != "epochs"
    }
    assert [budget[s]["epochs"] for s in ("deterministic", "mean_field", "fine_tune")] == [4, 2, 1]
    fixture = root.parent / "shared" / "fixtures" / "cifar10-resnet20-budget.yaml"
    if fixture.is_file():  # written with the config keys of its time: compared as raw YAML
        made_it = yaml.safe_load(fixture.read_text())
        written = yaml.safe_load((root / "configs" / "cifar10_resnet20_budget.yaml").read_text())
        for section in ("data", "deterministic", "mean_field"):
            assert written[section] == made_it[section], section
        assert written["bnn"]["estimator"] == made_it["bnn"]["estimator"]
        assert written["bnn"]["prior"] == made_it["bnn"]["prior"]


