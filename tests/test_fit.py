"""The `fit` pipeline and command: outputs, resume equals an uninterrupted run, bad input."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch

from pyro_gbnn import pipeline
from pyro_gbnn.checkpoint import load_checkpoint
from pyro_gbnn.fit import main
from tests.conftest import GBNN, kill_then_resume, run_cli, tiny_config


def test_mean_field_run_writes_every_output(fake_mnist, tmp_path):
    out = tmp_path / "run"
    metrics = pipeline.run_fit(tiny_config(fake_mnist), out)
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "log.jsonl", "checkpoint.pt", "metrics.json"}
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert set(saved["stages"]) == {"deterministic", "mean_field"}
    for key in ("accuracy", "nll", "ece", "brier", "n_params_trainable", "size_bytes"):
        assert key in saved
    assert saved["accuracy"] > 0.5, "the fake data set is easy"
    n_det = saved["stages"]["deterministic"]["n_params_trainable"]
    assert saved["n_params_trainable"] == 2 * n_det
    assert saved["size_bytes"] == 4 * saved["n_params_trainable"]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "epoch" in r] == [1, 2, 1, 2]





@pytest.mark.parametrize("kill_after_saves", [1, 3, 4])
def test_resume_after_a_kill_equals_an_uninterrupted_run(fake_mnist, tmp_path, monkeypatch, kill_after_saves):
    config = tiny_config(fake_mnist)
    reference = pipeline.run_fit(config, tmp_path / "reference")
    resumed = kill_then_resume(config, tmp_path / "killed", monkeypatch, kill_after_saves)

    strip = lambda m: {k: v for k, v in m.items() if k != "stages"}
    assert strip(resumed) == strip(reference)
    for stage in reference["stages"]:
        a, b = dict(reference["stages"][stage]), dict(resumed["stages"][stage])
        a.pop("wall_time_s"), b.pop("wall_time_s")
        assert a == b
    final_a = load_checkpoint(tmp_path / "reference" / "checkpoint.pt")["outputs"]["mean_field"]["elbo"]
    final_b = load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["outputs"]["mean_field"]["elbo"]
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_save_load_gives_identical_predictions(fake_mnist, tmp_path):
    import pyro

    from pyro_gbnn.data import load_dataset, make_loader
    from pyro_gbnn.methods.mean_field import build_mean_field
    from pyro_gbnn.models import build_model
    from pyro_gbnn.predict import predict

    config = tiny_config(fake_mnist)
    pipeline.run_fit(config, tmp_path / "run")
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    data = load_dataset("mnist", fake_mnist)
    loader = make_loader(data.test, 64, shuffle=False)

    def restored():
        net = build_model("mlp", 10, 1, 28)
        bnn, guide = build_mean_field(net, config, len(data.train))
        torch.nn.ModuleDict({"bnn": bnn, "guide": guide}).load_state_dict(saved["outputs"]["mean_field"]["elbo"])
        return bnn, guide

    predictions = []
    for _ in range(2):
        bnn, guide = restored()
        pyro.set_rng_seed(7)
        predictions.append(predict(bnn, guide, loader, num_samples=5).probs)
    assert torch.equal(predictions[0], predictions[1])


def test_cli_runs_and_prints_the_summary(fake_mnist, tmp_path, capsys):
    code = main(["--dataset", "mnist", "--data-dir", str(fake_mnist), "--method", "deterministic", "--out", str(tmp_path / "r"), "--epochs", "1", "--no-progress", "--set", "model=mlp"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("settings: configs/mnist_quick_2dgbnn.yaml (the shipped config for this data set and method)")
    expected_device = "cuda:0 (" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    assert lines[0].endswith(f"mnist / mlp / deterministic on {expected_device} -> {tmp_path / 'r'}") or torch.cuda.is_available()
    assert f" on {expected_device}" in lines[0], "the first line says where the run computes (device: auto)"
    assert lines[1].startswith("deterministic epoch 1/1: loss"), "--no-progress hides the bars, not the epoch lines"
    assert lines[2].split()[:4] == ["stage", "acc", "nll", "ece"]
    assert lines[3].startswith("deterministic")
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "r").iterdir()}
    assert len(set(modes.values())) == 1, f"run files are readable like log.jsonl: {modes}"
    summary = json.loads(next(line for line in lines if line.startswith("{")))
    assert summary["accuracy"] > 0.3
    run = json.loads((tmp_path / "r" / "metrics.json").read_text())["run"]
    assert run["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu") and run["world_size"] == 1
    assert run["precision"] == "fp32" and run["torch"] == torch.__version__ and run["pyro"] == pyro.__version__
    assert run["pyro_gbnn"] and (run["commit"] is None or len(run["commit"].split("+")[0]) == 40)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "svhn"], "unknown dataset 'svhn'"),
        (["--model", "resnet7"], "unknown model 'resnet7'"),
        (["--model", "vit", "--set", "model_args={patch: 7}"], "model 'vit' does not accept 'patch'; it accepts patch_size"),
        (["--method", "bayes"], "unknown method 'bayes'"),
        (["--set", "mean_field.lrr=1"], "unknown config key 'mean_field.lrr'"),
        (["--set", "nokey"], "not of the form key=value"),
        (["--config", "no/such.yaml"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_with_exit_code_2(fake_mnist, tmp_path, capsys, args, message):
    base = ["--data-dir", str(fake_mnist), "--out", str(tmp_path / "r"), "--no-progress"]
    code, err = run_cli(base + args, capsys)
    assert code == 2
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_init_from_skips_stage_0_and_rejects_a_wrong_file(fake_mnist, tmp_path, capsys):
    base = ["--dataset", "mnist", "--data-dir", str(fake_mnist), "--no-progress", "--set", "model=mlp"]
    assert main(base + ["--method", "deterministic", "--epochs", "1", "--out", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    first = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert main(base + ["--method", "deterministic", "--init-from", str(tmp_path / "a" / "checkpoint.pt"), "--out", str(tmp_path / "b")]) == 0
    second = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert second["stages"]["deterministic"]["epochs"] == 0
    assert second["accuracy"] == first["accuracy"]
    capsys.readouterr()
    code, err = run_cli(base + ["--init-from", str(tmp_path / "a" / "metrics.json"), "--out", str(tmp_path / "c")], capsys)
    assert code == 2 and len(err) == 1 and "init-from" in err[0]


def test_missing_and_malformed_data_dir(tmp_path, capsys):
    code, err = run_cli(["--dataset", "mnist", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and len(err) == 1 and "mnist" in err[0].lower()
    (tmp_path / "bad" / "MNIST" / "raw").mkdir(parents=True)
    (tmp_path / "bad" / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"garbage")
    code, err = run_cli(["--dataset", "mnist", "--data-dir", str(tmp_path / "bad"), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and len(err) == 1


def test_bad_yaml_config_is_reported(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("mean_field: [unclosed\n")
    code, err = run_cli(["--config", str(bad), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "not valid YAML" in err[0]


def test_existing_run_is_never_overwritten_and_corrupt_or_other_format_checkpoints_are_reported(fake_mnist, tmp_path, capsys):
    out = tmp_path / "r"
    base = ["--dataset", "mnist", "--data-dir", str(fake_mnist), "--out", str(out), "--no-progress", "--set", "model=mlp"]
    assert main(base + ["--method", "deterministic", "--epochs", "1"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, err = run_cli(base + ["--method", "deterministic"], capsys)
    assert code == 2 and "already holds a run" in err[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    code, err = run_cli(["--out", str(out), "--resume", "--epochs", "3"], capsys)
    assert code == 2 and err[0].endswith("these flags differ: deterministic.epochs 3 != saved 1")
    code, err = run_cli(base + ["--method", "ssvi", "--seed", "4", "--resume"], capsys)
    assert code == 2 and "method 'ssvi' != saved 'deterministic'; seed 4 != saved 0" in err[0]
    # the original command with --resume added agrees with the saved run: it resumes (nothing left to do)
    assert main(base + ["--method", "deterministic", "--epochs", "1", "--resume"]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "metrics.json"} == {k: v for k, v in before.items() if k != "metrics.json"}
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    torch.save(saved | {"format": "pyro_gbnn.checkpoint/1", "written_by": "0.1.3"}, out / "checkpoint.pt")
    code, err = run_cli(["--out", str(out), "--resume"], capsys)
    assert code == 2 and len(err) == 1 and "was written by pyro_gbnn 0.1.3 (format pyro_gbnn.checkpoint/1)" in err[0]
    torch.save({"weights": torch.zeros(2)}, out / "checkpoint.pt")
    code, err = run_cli(["--out", str(out), "--resume"], capsys)
    assert code == 2 and len(err) == 1 and "is not a pyro_gbnn checkpoint (expected format pyro_gbnn.checkpoint/2)" in err[0]
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    code, err = run_cli(["--out", str(out), "--resume"], capsys)
    assert code == 2 and len(err) == 1 and "corrupt" in err[0]


def test_non_finite_loss_exits_1_and_keeps_the_last_checkpoint(fake_mnist, tmp_path, capsys):
    out = tmp_path / "r"
    args = ["--dataset", "mnist", "--data-dir", str(fake_mnist), "--out", str(out), "--no-progress", "--set", "model=mlp"]
    # Epoch 1 trains; the learning rate then grows 1e30-fold and epoch 2 diverges.
    diverging = [
        "deterministic.epochs=2", "deterministic.optimizer=sgd", "deterministic.lr=0.1", "deterministic.schedule=multistep",
        "deterministic.milestones=[1]", "deterministic.gamma=1e30", "data.batch_size=16",
    ]
    code, err = run_cli(args + [x for item in diverging for x in ("--set", item)], capsys)
    assert code == 1 and len(err) == 1 and "diverged" in err[0]
    state = load_checkpoint(out / "checkpoint.pt")
    assert (state["stage"], state["epoch"]) == ("deterministic", 1), "the last finished epoch's checkpoint is kept"
    weights = [v for v in state["states"]["net"].values() if v.is_floating_point()]
    assert weights and all(bool(torch.isfinite(v).all()) for v in weights)


def test_module_entry_point_runs(fake_mnist, tmp_path):
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "pyro_gbnn.fit", "--dataset", "mnist", "--data-dir", str(fake_mnist), "--out", str(tmp_path / "r"),
         "--method", "deterministic", "--epochs", "1", "--no-progress", "--set", "model=mlp"],
        cwd=root, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "r" / "metrics.json").exists()


def test_2dgbnn_run_reports_sharing_counts_and_saves_the_plan(fake_mnist, tmp_path):
    metrics = pipeline.run_fit(tiny_config(fake_mnist, "2dgbnn", GBNN), tmp_path / "g")
    assert list(metrics["stages"]) == ["deterministic", "mean_field", "sharing", "fine_tune"]
    for stage in ("sharing", "fine_tune"):
        result = metrics["stages"][stage]
        for key in ("accuracy", "nll", "ece", "n_outliers", "n_ellipses", "n_gaussians", "n_params_trainable", "size_bytes", "size_bytes_index"):
            assert key in result
        assert result["size_bytes"] == result["size_bytes_values"] + result["size_bytes_index"]
        assert result["size_bytes_values"] == 4 * result["n_params_trainable"] and result["size_bytes_index"] > 0
    assert metrics["n_params_trainable"] < metrics["stages"]["mean_field"]["n_params_trainable"] / 5
    plan = load_checkpoint_plan(tmp_path / "g" / "sharing_plan.pt")
    assert plan.num_components == metrics["n_gaussians"]
    counts = (plan.outlier_index.numel(), plan.ellipse_index.numel(), plan.num_components)
    assert metrics["n_params_paper"] == counts[0] + counts[1] + 2 * counts[2]
    # tied with the weight prior trains two values per component and two per outlier
    normalisation = metrics["stages"]["deterministic"]["n_params_trainable"] - sum(
        s.numel() for s in bnn_site_shapes(metrics)
    )
    assert metrics["n_params_trainable"] == 2 * counts[2] + 2 * counts[0] + normalisation


def bnn_site_shapes(metrics):
    """Shapes of the Bayesian sites of the tiny run's network (Conv2d and Linear parameters)."""
    from pyro_gbnn.models import build_model

    net = build_model(metrics["model"], 10, 1, 28)
    return [p.shape for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for p in m.parameters(recurse=False)]


def load_checkpoint_plan(path):
    from pyro_gbnn.sharing.plan import SharingPlan

    return SharingPlan.from_state(torch.load(path, weights_only=True))


@pytest.mark.parametrize(
    ("kill_after_saves", "semantics"), [(6, "tied"), (7, "tied"), (8, "tied"), (7, "hierarchical")]
)
def test_2dgbnn_resume_after_a_kill_in_stages_2_and_3(fake_mnist, tmp_path, monkeypatch, kill_after_saves, semantics):
    config = tiny_config(fake_mnist, "2dgbnn", GBNN + [f"fine_tune.semantics={semantics}"])
    reference = pipeline.run_fit(config, tmp_path / "reference")
    resumed = kill_then_resume(config, tmp_path / "killed", monkeypatch, kill_after_saves)
    for key in ("accuracy", "nll", "ece", "n_outliers", "n_ellipses", "n_gaussians", "n_params_trainable"):
        assert resumed[key] == reference[key], key


TINY_VIT = [  # 28x28 images in 7x7 patches: 16 tokens and a class token, one 16-wide block
    "model=vit",
    "model_args={patch_size: 7, num_layers: 1, num_heads: 2, hidden_dim: 16, mlp_dim: 32}",
    "bnn.estimator=local",
]


def count_estimator_inputs(monkeypatch, estimator):
    """Record the rank of every input that ``estimator`` ("local_reparameterized" or "flipout") sees."""
    from pyro_gbnn import reparameterization

    ranks = []
    original = getattr(reparameterization, estimator)

    def recording(op, x, *args, **kwargs):
        ranks.append(x.dim())
        return original(op, x, *args, **kwargs)

    monkeypatch.setattr(reparameterization, estimator, recording)  # what apply_estimator calls
    return ranks


def assert_finite_metrics(metrics):
    for stage, result in metrics["stages"].items():
        for key in ("accuracy", "nll", "ece"):
            assert math.isfinite(result[key]), (stage, key, result[key])


@pytest.mark.parametrize("semantics", ["tied", "hierarchical"])
def test_tiny_vit_runs_all_four_2dgbnn_stages(fake_mnist, tmp_path, monkeypatch, semantics):
    ranks = count_estimator_inputs(monkeypatch, "local_reparameterized")
    config = tiny_config(fake_mnist, "2dgbnn", GBNN + TINY_VIT + [f"fine_tune.semantics={semantics}"])
    metrics = pipeline.run_fit(config, tmp_path / "g")
    assert list(metrics["stages"]) == ["deterministic", "mean_field", "sharing", "fine_tune"]
    assert_finite_metrics(metrics)
    assert 3 in ranks, "stage 1's Normals reach the MLP blocks' Linear layers on [B, T, D]"
    assert metrics["n_params_trainable"] < metrics["stages"]["mean_field"]["n_params_trainable"]


def test_tiny_vit_mean_field_applies_local_reparameterization_to_token_sequences(fake_mnist, tmp_path, monkeypatch):
    ranks = count_estimator_inputs(monkeypatch, "local_reparameterized")
    metrics = pipeline.run_fit(tiny_config(fake_mnist, "mean-field", TINY_VIT), tmp_path / "m")
    assert_finite_metrics(metrics)
    assert 3 in ranks, "the MLP blocks' Linear layers see [B, T, D]"
    assert 4 in ranks and 2 in ranks, "the patch projection and the head"


def test_tiny_vit_takes_a_flipout_step(monkeypatch):
    import pyro_gbnn as pg
    from pyro_gbnn.elbo import AnalyticKL_ELBO

    ranks = count_estimator_inputs(monkeypatch, "flipout")
    net = pg.build_model("vit", 10, 1, 28, patch_size=7, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32)
    bnn = pg.BayesianNetwork(net, pg.IIDNormalPrior(0.0, 1.0), pg.Categorical(100), estimator="flipout")
    guide = pg.MeanFieldGuide(bnn, init_scale=0.01)
    optimizer = torch.optim.Adam(guide.parameters(), lr=1e-3)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    loss = AnalyticKL_ELBO(bnn, guide)(x, y) / 100
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and 3 in ranks
    assert all(torch.isfinite(p).all() for p in guide.parameters())


MERGE_DURING_FINE_TUNING = [  # loose enough that the tiny run's components merge
    "fine_tune.epochs=3",
    "fine_tune.merge_every=1",
    "fine_tune.semantics=hierarchical",  # every value of a component trains
    "sharing.merge=false",
    "sharing.merge_tau_w2sq=1.0",
    "sharing.merge_tau_overlap=null",
    "sharing.merge_neighbours=null",
    "sharing.merge_tau_grad_step=null",
    "sharing.merge_tau_var=null",
]


def test_merging_during_fine_tuning_retires_components_and_reports_the_merged_plan(fake_mnist, tmp_path):
    out = tmp_path / "g"
    metrics = pipeline.run_fit(tiny_config(fake_mnist, "2dgbnn", GBNN + MERGE_DURING_FINE_TUNING), out)
    merges = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "merged" in r]
    assert [r["epoch"] for r in merges] == [1, 2], "after every epoch but the last"
    assert merges[0]["merged"] > 0
    before, after = metrics["stages"]["sharing"]["n_gaussians"], metrics["stages"]["fine_tune"]["n_gaussians"]
    assert after == before - sum(r["merged"] for r in merges) == merges[-1]["n_gaussians"]
    assert metrics["n_params_trainable"] < metrics["stages"]["sharing"]["n_params_trainable"]


@pytest.mark.parametrize("kill_after_saves", [8, 9])
def test_merging_during_fine_tuning_resumes_exactly(fake_mnist, tmp_path, monkeypatch, kill_after_saves):
    config = tiny_config(fake_mnist, "2dgbnn", GBNN + MERGE_DURING_FINE_TUNING)
    reference = pipeline.run_fit(config, tmp_path / "reference")
    resumed = kill_then_resume(config, tmp_path / "killed", monkeypatch, kill_after_saves)
    for key in ("accuracy", "nll", "ece", "n_gaussians", "n_params_trainable", "size_bytes"):
        assert resumed[key] == reference[key], key


@pytest.mark.integration
def test_semantics_comparison_branches_from_stage_1_and_reproduces_the_base_run(fake_mnist, tmp_path):
    base = tmp_path / "base"
    reference = pipeline.run_fit(tiny_config(fake_mnist, "2dgbnn", GBNN), base)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_semantics.py"
    result = subprocess.run(
        [sys.executable, str(script), str(base), "--out", str(tmp_path / "cmp"), "--semantics", "tied", "hierarchical"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout[result.stdout.index("{\n"):])
    assert report["stage1"]["accuracy"] == reference["stages"]["mean_field"]["accuracy"]
    for stage in ("sharing", "fine_tune"):  # same checkpoint, same random state: the same run
        assert report["semantics"]["tied"][stage]["accuracy"] == reference["stages"][stage]["accuracy"]
        assert report["semantics"]["tied"][stage]["nll"] == reference["stages"][stage]["nll"]
    hierarchical = report["semantics"]["hierarchical"]
    assert hierarchical["sharing"]["n_gaussians"] == reference["n_gaussians"]
    assert hierarchical["fine_tune"]["n_params_trainable"] > reference["n_params_trainable"]


def test_dataset_alone_starts_from_its_shipped_config_and_names_the_data_flags(tmp_path, capsys, monkeypatch):
    """`fit --dataset cifar10` as typed: ResNet-20 2DGBNN from configs/cifar10_resnet20.yaml,
    a dated run folder under runs/, and a missing data set names --download and --data-dir."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PYRO_GBNN_DATA", raising=False)
    code = main(["--dataset", "cifar10", "--no-progress"])
    out, err = capsys.readouterr()
    first = out.splitlines()[0]
    assert first.startswith("settings: configs/cifar10_resnet20.yaml") and "cifar10 / resnet20 / 2dgbnn on " in first and " -> runs/cifar10-2dgbnn-" in first
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--download" in err and "--data-dir" in err
    monkeypatch.setenv("PYRO_GBNN_DATA", str(tmp_path / "elsewhere"))
    assert main(["--dataset", "cifar10", "--method", "ssvi", "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert out.startswith("settings: configs/cifar10_resnet20_ssvi.yaml") and str(tmp_path / "elsewhere") in err


def test_out_defaults_to_a_dated_folder_under_runs(fake_mnist, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["--dataset", "mnist", "--data-dir", str(fake_mnist), "--method", "deterministic", "--epochs", "1",
                 "--no-progress", "--set", "model=mlp"])
    assert code == 0
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("mnist-deterministic-") and (run / "metrics.json").is_file()


def test_ctrl_c_ends_with_one_line_naming_the_resume_command(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_fit", interrupted)
    code, err = run_cli(["--dataset", "mnist", "--out", str(tmp_path / "r"), "--no-progress"], capsys)
    assert code == 130 and err == [f"interrupted; the last finished epoch is saved: python -m pyro_gbnn.fit --out {tmp_path / 'r'} --resume"]


def test_dataset_cifar10_as_typed_finishes_on_a_tiny_fake_cifar_folder(tmp_path, capsys, monkeypatch):
    """The mission's command plus --data-dir, --epochs 1, --cache-dir and small settings: all
    four 2DGBNN stages of ResNet-20 from configs/cifar10_resnet20.yaml run to the end."""
    from tests.test_data import write_cifar10_jpeg

    write_cifar10_jpeg(tmp_path / "data", per_class=2)
    monkeypatch.chdir(tmp_path)
    small = ["deterministic.epochs=1", "deterministic.warmup_epochs=0", "mean_field.epochs=1", "mean_field.eval_samples=2",
             "fine_tune.eval_samples=2", "data.batch_size=10", "data.eval_batch_size=10", "sharing.grad_batches=1",
             "sharing.num_components=8", "sharing.gmm_max_epochs=2", "predict.num_samples=2"]
    code = main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--epochs", "1", "--no-progress",
                 "--cache-dir", str(tmp_path / "decoded"), *[x for item in small for x in ("--set", item)]])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("settings: configs/cifar10_resnet20.yaml")
    (run,) = (tmp_path / "runs").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["model"], metrics["method"]) == ("resnet20", "2dgbnn")
    assert list(metrics["stages"]) == ["deterministic", "mean_field", "sharing", "fine_tune"]
    assert metrics["stages"]["fine_tune"]["epochs"] == 1 and metrics["n_gaussians"] >= 1
    assert len(list((tmp_path / "decoded").glob("cifar10-jpeg-*.pt"))) == 2  # --cache-dir holds the decoded images
    assert not (tmp_path / "data" / ".pyro_gbnn_cache").exists()


def test_branch_run_continues_a_finished_stage_under_another_method_and_refuses_what_does_not_fit(fake_mnist, tmp_path):
    from pyro_gbnn.errors import UsageError

    base = pipeline.run_fit(tiny_config(fake_mnist), tmp_path / "base")
    config = pipeline.branch_run(tmp_path / "base", tmp_path / "int8", "mean_field", ["method=int8", "int8.scale_bits=[8]"])
    branched = pipeline.run_fit(config, tmp_path / "int8", resume=True)
    assert list(branched["stages"]) == ["deterministic", "mean_field", "quantize"]
    assert branched["stages"]["mean_field"] == base["stages"]["mean_field"]  # stage 1 reused, not retrained
    with pytest.raises(UsageError, match=r"method 'spike-slab' runs stages \('deterministic', 'spike_slab', 'prune'\), which do not begin with"):
        pipeline.branch_run(tmp_path / "base", tmp_path / "b", "mean_field", ["method=spike-slab"])
    with pytest.raises(UsageError, match="has not finished stage 'fine_tune'"):
        pipeline.branch_run(tmp_path / "base", tmp_path / "c", "fine_tune", [])
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_loader_workers_that_persist_across_epochs_train_exactly_as_the_main_process(fake_mnist, tmp_path):
    """data.num_workers=2: one loader per split keeps its workers for the run (moved from
    epoch to epoch); the run is the one without workers, to the last digit."""
    plain = pipeline.run_fit(tiny_config(fake_mnist), tmp_path / "plain")
    workers = pipeline.run_fit(tiny_config(fake_mnist, extra=["data.num_workers=2"]), tmp_path / "workers")
    for stage in ("deterministic", "mean_field"):
        for key in ("accuracy", "nll", "ece"):
            assert workers["stages"][stage][key] == plain["stages"][stage][key], (stage, key)
