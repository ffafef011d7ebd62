"""Pictures of a run and ``python -m pyro_gbnn.diagnose``."""

import json

import pytest
import torch

from pyro_gbnn import pipeline
from pyro_gbnn.diagnose import main as diagnose_main
from pyro_gbnn.plots import (
    class_confidence,
    entropy_histograms,
    merging_side_by_side,
    save_figure,
    sharing_plane,
    training_curves,
)
from pyro_gbnn.sharing.build import SharingSettings, build_sharing_plan
from tests.conftest import GBNN, tiny_config


def cloud(n: int = 3000, seed: int = 0) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    loc = 0.1 * torch.randn(n, generator=g)
    scale = torch.tensor([0.01, 0.03])[torch.randint(0, 2, (n,), generator=g)] * (1 + 0.1 * torch.rand(n, generator=g))
    return {"w": (loc, scale)}, {"w": torch.rand(n, generator=g)}


def is_png(path) -> bool:
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_sharing_plane_draws_every_role_and_the_components(tmp_path):
    moments, grads = cloud()
    plan = build_sharing_plan(moments, grads, SharingSettings(num_components=8, min_cluster_size=5, gmm_max_epochs=10))
    ax = sharing_plane(*moments["w"], plan, max_points=500)
    labels = ax.get_legend_handles_labels()[1]
    assert any(label.startswith("outliers") for label in labels) and any(label.startswith("centres") for label in labels)
    assert len(ax.collections) >= 2 + 3, "two ellipse collections and the scatters"
    assert is_png(save_figure(ax, tmp_path / "plane.png"))
    right = merging_side_by_side(*moments["w"], plan)
    assert right.get_title() == f"after merging: {plan.num_components} components"
    assert is_png(save_figure(right, tmp_path / "merging.png"))
    unmerged = build_sharing_plan(moments, grads, SharingSettings(num_components=8, min_cluster_size=5, gmm_max_epochs=10, merge=False))
    with pytest.raises(ValueError, match="before merging"):
        merging_side_by_side(*moments["w"], unmerged)
    with pytest.raises(ValueError, match="plan's 3000 weights"):
        sharing_plane(moments["w"][0][:10], moments["w"][1][:10], plan)


def test_class_confidence_and_training_curves_write_pngs(tmp_path):
    probs = torch.softmax(torch.randn(200, 10), -1)
    labels = torch.randint(0, 10, (200,))
    assert is_png(save_figure(class_confidence(probs, labels), tmp_path / "conf.png"))
    flat = torch.full((200, 10), 0.1)
    assert is_png(save_figure(entropy_histograms(probs, flat), tmp_path / "entropy.png"))
    records = [
        {"stage": "deterministic", "epoch": 1, "loss": 1.0, "eval": {"accuracy": 0.5}},
        {"stage": "mean_field", "epoch": 1, "loss": 0.5},
        {"stage": "mean_field", "finished": True},
    ]
    assert is_png(save_figure(training_curves(records), tmp_path / "curves.png"))
    with pytest.raises(ValueError, match="no epoch records"):
        training_curves([{"stage": "x", "finished": True}])


def test_diagnose_writes_the_pictures_and_summary_of_a_2dgbnn_run(fake_mnist, tmp_path, capsys):
    out = tmp_path / "g"
    pipeline.run_fit(tiny_config(fake_mnist, "2dgbnn", GBNN), out)
    assert diagnose_main([str(out), "--samples", "2"]) == 0
    pictures = sorted((out / "diagnostics").glob("*.png"))
    assert {p.name for p in pictures} == {
        "reliability.png", "class_confidence.png", "training_curves.png", "sharing_plane.png", "entropy_ood.png", "merging.png"
    }
    assert all(is_png(p) for p in pictures)
    summary = (out / "diagnostics" / "summary.md").read_text()
    assert "fine_tune" in summary and "accuracy" in summary
    metrics = json.loads((out / "metrics.json").read_text())
    assert f"{metrics['stages']['fine_tune']['accuracy']:.4f}" in summary
    assert "k-hat: not defined here" in summary, "the tied guide has no density over the weights"
    assert "PSIS-LOO on 128 test examples" in summary
    assert "predictive-entropy AUROC" in summary


def test_diagnose_reports_the_khat_of_a_mean_field_run(fake_mnist, tmp_path):
    out = tmp_path / "m"
    pipeline.run_fit(tiny_config(fake_mnist, "mean-field"), out)
    assert diagnose_main([str(out), "--samples", "2"]) == 0
    summary = (out / "diagnostics" / "summary.md").read_text()
    assert "Pareto k-hat of p(w, D) / q(w) (256 training examples" in summary
    assert "sharing_plane" not in summary


def test_diagnose_names_bad_input_in_one_line(tmp_path, capsys):
    assert diagnose_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no checkpoint.pt" in err[0]
