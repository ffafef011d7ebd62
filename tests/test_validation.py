"""One validation pass over the resolved config, before any data is read: every shipped
config passes, and each bad setting is a one-line error naming the key (exit code 2)."""

from pathlib import Path

import pytest
import torch

from pyro_gbnn.config import DEFAULTS, apply_overrides, load_config
from pyro_gbnn.errors import UsageError
from pyro_gbnn.fit import main
from pyro_gbnn.validation import validate_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_is_valid(path):
    validate_config(load_config(path))


@pytest.mark.parametrize("override, message", [
    ("ssvi.density=0", "ssvi.density must be a number in (0, 1], got 0"),
    ("ssvi.replacement_rate=1.5", "ssvi.replacement_rate must be a number in [0, 1], got 1.5"),
    ("spike_slab.prior_inclusion=1.0", "spike_slab.prior_inclusion must be a number in (0, 1), got 1.0"),
    ("deterministic.epochs=1.5", "deterministic.epochs must be an integer >= 0, got 1.5"),
    ("deterministic.milestones=30", "deterministic.milestones must be a list of integers >= 1, got 30"),
    ("mean_field=3", "config key 'mean_field' must be a mapping of settings"),
    ("mean_field.lr=0", "mean_field.lr must be a number > 0, got 0"),
    ("data.batch_size=0", "data.batch_size must be an integer >= 1, got 0"),
    ("int8.scale_bits=[9]", "int8.scale_bits must be a non-empty list of integers in 1..8, got [9]"),
    ("fine_tune.semantics=shared", "unknown fine_tune.semantics 'shared'; use one of tied, hierarchical, independent"),
    ("bnn.estimator=lrt", "unknown bnn.estimator 'lrt'; use one of weight, local, flipout"),
    ("mean_field.optimizer=rmsprop", "unknown mean_field.optimizer 'rmsprop'"),
    ("predict.num_samples=0", "predict.num_samples must be an integer >= 1, got 0"),
    ("device=tpu9", "device 'tpu9' is not a torch device"),
])
def test_bad_settings_are_one_line_errors(override, message):
    with pytest.raises(UsageError) as err:
        validate_config(apply_overrides(DEFAULTS, [override]))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_integral_numbers_where_counts_are_meant_are_read_as_integers():
    config = apply_overrides(DEFAULTS, ["ssvi.update_every=1e2", "mean_field.epochs=3.0"])
    assert config["ssvi"]["update_every"] == 100 and isinstance(config["ssvi"]["update_every"], int)
    assert config["mean_field"]["epochs"] == 3 and isinstance(config["mean_field"]["epochs"], int)
    validate_config(config)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_missing_device_is_named():
    with pytest.raises(UsageError, match="device 'cuda' is not available on this machine; use --set device=cpu"):
        validate_config(apply_overrides(DEFAULTS, ["device=cuda"]))


def test_a_guide_the_method_would_ignore_is_refused():
    custom = ["bnn.guide.args={init_scale: 0.05}"]
    with pytest.raises(UsageError, match="bnn.guide is not used by method ssvi"):
        validate_config(apply_overrides(DEFAULTS, ["method=ssvi", *custom]))
    validate_config(apply_overrides(DEFAULTS, ["method=mean-field", *custom]))  # mean-field uses it
    with pytest.raises(UsageError, match="method 2dgbnn starts from a mean-field posterior"):
        validate_config(apply_overrides(DEFAULTS, ["method=2dgbnn", "bnn.guide={class: tests.test_extension_api.NoDistribution}"]))


def test_the_command_line_checks_settings_before_reading_any_data(tmp_path, capsys):
    """The data folder does not exist: the setting is reported, not the data."""
    code = main(["--dataset", "mnist", "--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "r"),
                 "--method", "ssvi", "--set", "ssvi.density=0", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: ssvi.density must be a number in (0, 1], got 0"]
    assert not (tmp_path / "r").exists()
