"""A user's training method, defined outside the package, named by dotted path like a prior or guide."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pyro_gbnn import pipeline
from pyro_gbnn.errors import UsageError
from pyro_gbnn.fit import main
from pyro_gbnn.methods import METHODS, Method, method_class
from pyro_gbnn.validation import validate_config
from tests.conftest import TINY, kill_then_resume, tiny_config

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_method() -> str:
    """The README's own example method (the block that defines ``ColdMeanField``), so the two cannot drift."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return next(block for block in blocks if "class ColdMeanField" in block)


FORGETFUL = textwrap.dedent(
    '''

    class Forgetful(MeanField):
        """A stage that records nothing."""

        stages = MeanField.stages + ("nothing",)

        def stage_nothing(self, run, net, resume):
            pass

        def model_nothing(self, run, net):
            return None, None
    '''
)


@pytest.fixture
def user_method(tmp_path, monkeypatch):
    folder = tmp_path / "usercode"
    folder.mkdir()
    (folder / "my_method.py").write_text(readme_method() + FORGETFUL)
    monkeypatch.syspath_prepend(str(folder))
    sys.modules.pop("my_method", None)
    return folder


@pytest.mark.integration
def test_a_method_defined_outside_the_package_trains_through_the_command_line(fake_mnist, tmp_path, user_method):
    out = tmp_path / "cli"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(user_method), os.environ.get("PYTHONPATH", "")])}
    flags = [x for item in TINY for x in ("--set", item)]
    command = [sys.executable, "-m", "pyro_gbnn.fit", "--dataset", "mnist", "--method", "my_method.ColdMeanField",
               "--set", "method_args.temperature=0.25", "--data-dir", str(fake_mnist), "--out", str(out), "--no-progress", *flags]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "my_method.ColdMeanField"
    assert list(metrics["stages"]) == ["deterministic", "mean_field", "cold"]
    assert metrics["stages"]["cold"]["epochs"] == 1 and metrics["accuracy"] > 0.5
    cold_epochs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    cold_epochs = [r for r in cold_epochs if r.get("stage") == "cold" and "epoch" in r]
    assert len(cold_epochs) == 1 and cold_epochs[0]["train_kl_weight"] == pytest.approx(0.25)  # its section reached the ELBO

    run = pipeline.open_run(out)
    _, after_stage1 = pipeline.model_after_stage(run, "mean_field")
    _, after_cold = pipeline.model_after_stage(run)
    assert not torch.equal(after_cold.loc_parameters().__next__(), after_stage1.loc_parameters().__next__())

    again = subprocess.run(command + ["--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr  # the original command plus --resume: nothing left to do
    changed = subprocess.run(command[:7] + ["--set", "method_args.temperature=0.5"] + command[9:] + ["--resume"],
                             capture_output=True, text=True, env=env, timeout=300)
    assert changed.returncode == 2 and "method_args.temperature 0.5 != saved 0.25" in changed.stderr


@pytest.mark.parametrize("kill_after_saves", [7, 9])  # inside the user's stage (3 saves per stage before it); after it
def test_a_user_method_resumes_exactly(fake_mnist, tmp_path, monkeypatch, user_method, kill_after_saves):
    config = tiny_config(fake_mnist, "my_method.ColdMeanField", ["method_args={epochs: 2}"])
    reference = pipeline.run_fit(config, tmp_path / "reference")
    resumed = kill_then_resume(config, tmp_path / "killed", monkeypatch, kill_after_saves)
    for key in ("accuracy", "nll", "ece"):
        assert resumed[key] == reference[key]
    assert reference["stages"]["cold"]["epochs"] == 2


BAD_METHODS = [
    ("no_such_method", "unknown method 'no_such_method'; use one of deterministic"),
    ("my_method.Missing", "cannot import method class 'my_method.Missing'"),
    ("torch.nn.Linear", "must subclass pyro_gbnn.methods.Method"),
    ("tests.test_user_method.NoStages", "declares no stages"),
    ("tests.test_user_method.NoStageFunction", "has no stage_extra(self, run, net, resume) method"),
    ("tests.test_user_method.NoModelFunction", "has no model_extra(self, run, net) method"),
    ("tests.test_user_method.WrongTrainingStage", "training_stage 'fine_tune' is not one of its stages"),
    ("tests.test_user_method.BrokenInit", "failed in its __init__ with args {}: ValueError: no GPU budget"),
]


class NoStages(Method):
    pass


class NoStageFunction(METHODS["mean-field"]):
    stages = ("deterministic", "mean_field", "extra")

    def model_extra(self, run, net):
        return None, None


class NoModelFunction(METHODS["mean-field"]):
    stages = ("deterministic", "mean_field", "extra")

    def stage_extra(self, run, net, resume):
        pass


class WrongTrainingStage(METHODS["mean-field"]):
    training_stage = "fine_tune"


class BrokenInit(METHODS["mean-field"]):
    def __init__(self):
        raise ValueError("no GPU budget")


@pytest.mark.parametrize("name, message", BAD_METHODS)
def test_a_bad_method_is_one_line_before_any_work(fake_mnist, user_method, name, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)").replace("{", r"\{").replace("}", r"\}")):
        validate_config(tiny_config(fake_mnist, name))


def test_method_args_are_checked_by_the_method_s_own_signature(fake_mnist, user_method, tmp_path, capsys):
    with pytest.raises(UsageError, match="method 'mean-field' rejected args {'temperature': 0.1}"):
        validate_config(tiny_config(fake_mnist, "mean-field", ["method_args.temperature=0.1"]))
    code = main(["--data-dir", str(fake_mnist), "--out", str(tmp_path / "run"), "--method", "my_method.ColdMeanField",
                 "--set", "method_args.warmth=2"])
    assert code == 2 and "rejected args {'warmth': 2}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_stage_that_records_no_results_is_named(fake_mnist, tmp_path, user_method):
    with pytest.raises(UsageError, match="stage_nothing returned without run.finish_stage"):
        pipeline.run_fit(tiny_config(fake_mnist, "my_method.Forgetful"), tmp_path / "run")


def test_the_built_in_methods_are_registered_like_user_methods():
    assert set(METHODS) == {"deterministic", "mean-field", "2dgbnn", "spike-slab", "ssvi", "int8"}
    for name, cls in METHODS.items():
        assert method_class(name) is cls and issubclass(cls, Method)
        assert cls.stages[-1] in {"deterministic", "mean_field", "fine_tune", "prune", "ssvi", "quantize"}
