"""One validation pass over the resolved config, before any data is read: every shipped
config passes, and each bad setting is a one-line error naming the key (exit code 2)."""

from pathlib import Path

import pytest
import torch

from pyro_gbnn.config import DEFAULTS, apply_overrides, load_config
from pyro_gbnn.errors import UsageError
from pyro_gbnn.fit import main
from pyro_gbnn.validation import validate_config
from tests.conftest import TINY

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_is_valid(path):
    validate_config(load_config(path))


# (method, override, message): malformed settings across every method, each one line and exit code 2
MALFORMED = [
    ("ssvi", "ssvi.density=0", "ssvi.density must be a number in (0, 1], got 0"),
    ("ssvi", "ssvi.replacement_rate=1.5", "ssvi.replacement_rate must be a number in [0, 1], got 1.5"),
    ("ssvi", "ssvi.removal=random", "unknown ssvi.removal 'random'; use one of"),
    ("ssvi", "ssvi.update_every=0", "ssvi.update_every must be an integer >= 1, got 0"),
    ("spike-slab", "spike_slab.prior_inclusion=1.0", "spike_slab.prior_inclusion must be a number in (0, 1), got 1.0"),
    ("spike-slab", "spike_slab.prune_threshold=0", "spike_slab.prune_threshold must be a number in (0, 1), got 0"),
    ("spike-slab", "bnn.guide.args={init_scale: 0.05}", "bnn.guide is not used by method spike-slab"),
    ("deterministic", "deterministic.epochs=1.5", "deterministic.epochs must be an integer >= 0, got 1.5"),
    ("deterministic", "deterministic.milestones=30", "deterministic.milestones must be a list of integers >= 1, got 30"),
    ("mean-field", "mean_field=3", "config key 'mean_field' must be a mapping of settings"),
    ("mean-field", "mean_field.lr=0", "mean_field.lr must be a number > 0, got 0"),
    ("mean-field", "mean_field.optimizer=rmsprop", "unknown mean_field.optimizer 'rmsprop'"),
    ("mean-field", "data.batch_size=0", "data.batch_size must be an integer >= 1, got 0"),
    ("mean-field", "method_args.depth=3", "method 'mean-field' rejected args {'depth': 3}"),
    ("int8", "int8.scale_bits=[9]", "int8.scale_bits must be a non-empty list of integers in 1..8, got [9]"),
    ("int8", "int8.loc_bits=16", "int8.loc_bits must be an integer in 2..8, got 16"),
    ("2dgbnn", "fine_tune.semantics=shared", "unknown fine_tune.semantics 'shared'; use one of tied, hierarchical, independent"),
    ("2dgbnn", "fine_tune.kl_weighting=mean", "unknown fine_tune.kl_weighting 'mean'"),
    ("2dgbnn", "sharing.num_components=0", "sharing.num_components must be an integer >= 1, got 0"),
    ("2dgbnn", "sharing.mahalanobis_threshold=-1", "sharing.mahalanobis_threshold must be a number > 0, got -1"),
    ("2dgbnn", "sharing.merge_rule=closest", "unknown sharing.merge_rule 'closest'"),
    ("2dgbnn", "sharing.blend_rule=nearest", "unknown sharing.blend_rule 'nearest'; use one of every, own"),
    ("2dgbnn", "sharing.merge_neighbours=1", "sharing.merge_neighbours must be an integer >= 2 or null, got 1"),
    ("2dgbnn", "sharing.merge_tau_overlap=-1", "sharing.merge_tau_overlap must be a number >= 0 or null, got -1"),
    ("2dgbnn", "sharing.gmm_max_points=0", "sharing.gmm_max_points must be an integer >= 1 or null, got 0"),
    ("2dgbnn", "sharing.gmm_max_points=100", "sharing.gmm_max_points (100) is below sharing.num_components"),
    ("2dgbnn", "fine_tune.merge_every=2", "under semantics tied with shared_prior weight their std coordinates never train"),
    ("2dgbnn", "bnn.estimator=lrt", "unknown bnn.estimator 'lrt'; use one of weight, local, flipout"),
    ("2dgbnn", "predict.num_samples=0", "predict.num_samples must be an integer >= 1, got 0"),
    ("2dgbnn", "device=tpu9", "device 'tpu9' is not a torch device"),
    ("bayes-by-backprop", "seed=0", "unknown method 'bayes-by-backprop'; use one of deterministic"),
]


@pytest.mark.parametrize("method, override, message", MALFORMED)
def test_malformed_settings_are_one_line_errors_with_exit_code_2_before_any_data(tmp_path, capsys, method, override, message):
    """The data folder does not exist: the setting is reported, not the data, and no run folder appears."""
    code = main(["--dataset", "mnist", "--method", method, "--set", override, "--data-dir", str(tmp_path / "none"),
                 "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists()


def test_malformed_settings_leave_an_existing_run_folder_as_it_was(fake_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--config", str(CONFIGS[0].parent / "mnist_quick.yaml"), "--data-dir", str(fake_mnist), "--out", str(out), "--no-progress",
                 *[x for item in TINY for x in ("--set", item)]]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for method, override, _ in MALFORMED:
        for resume in ([], ["--resume"]):
            code = main(["--dataset", "mnist", "--method", method, "--set", override, "--data-dir", str(fake_mnist),
                         "--out", str(out), "--no-progress", *resume])
            assert code == 2, (method, override, resume)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_integral_numbers_where_counts_are_meant_are_read_as_integers():
    config = apply_overrides(DEFAULTS, ["ssvi.update_every=1e2", "mean_field.epochs=3.0"])
    assert config["ssvi"]["update_every"] == 100 and isinstance(config["ssvi"]["update_every"], int)
    assert config["mean_field"]["epochs"] == 3 and isinstance(config["mean_field"]["epochs"], int)
    validate_config(config)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_missing_device_is_named():
    with pytest.raises(UsageError, match="device .cuda. is not available on this machine"):
        validate_config(apply_overrides(DEFAULTS, ["device=cuda"]))


def test_a_guide_the_method_would_ignore_is_refused():
    custom = ["bnn.guide.args={init_scale: 0.05}"]
    with pytest.raises(UsageError, match="bnn.guide is not used by method ssvi"):
        validate_config(apply_overrides(DEFAULTS, ["method=ssvi", *custom]))
    validate_config(apply_overrides(DEFAULTS, ["method=mean-field", *custom]))  # mean-field uses it
    with pytest.raises(UsageError, match="method 2dgbnn starts from a mean-field posterior"):
        validate_config(apply_overrides(DEFAULTS, ["method=2dgbnn", "bnn.guide={class: tests.test_extension_api.NoDistribution}"]))
