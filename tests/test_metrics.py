import math

import pytest
import torch

from pyro_gbnn.errors import UsageError
from pyro_gbnn.metrics import (
    accuracy,
    aupr,
    auroc,
    brier_score,
    classification_metrics,
    expected_calibration_error,
    fpr_at_tpr,
    mutual_information,
    negative_log_likelihood,
    ood_metrics,
    predictive_entropy,
    reliability_diagram,
)


@pytest.fixture
def four_examples():
    # conf / predicted / label / correct:
    #   0.90 / 0 / 0 / yes     0.70 / 0 / 1 / no
    #   0.70 / 1 / 1 / yes     0.55 / 0 / 0 / yes
    probs = torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.3, 0.7], [0.55, 0.45]])
    labels = torch.tensor([0, 1, 1, 0])
    return probs, labels


def test_accuracy_hand(four_examples):
    assert accuracy(*four_examples) == pytest.approx(0.75)


def test_nll_hand(four_examples):
    expected = -(math.log(0.9) + math.log(0.3) + math.log(0.7) + math.log(0.55)) / 4
    assert negative_log_likelihood(*four_examples) == pytest.approx(expected, rel=1e-6)


def test_nll_clamps_zero_probability():
    probs = torch.tensor([[1.0, 0.0]])
    labels = torch.tensor([1])
    assert negative_log_likelihood(probs, labels, eps=1e-12) == pytest.approx(-math.log(1e-12))


def test_brier_hand(four_examples):
    # per example: 2*0.1^2=0.02, 2*0.7^2=0.98, 2*0.3^2=0.18, 2*0.45^2=0.405; mean 1.585/4
    assert brier_score(*four_examples) == pytest.approx(0.39625, rel=1e-6)


def test_ece_hand(four_examples):
    # 5 bins (0,.2] (.2,.4] (.4,.6] (.6,.8] (.8,1]:
    #   (.8,1]: n=1 acc 1.0 conf 0.90 -> 1/4 * 0.10 = 0.025
    #   (.6,.8]: n=2 acc 0.5 conf 0.70 -> 2/4 * 0.20 = 0.100
    #   (.4,.6]: n=1 acc 1.0 conf 0.55 -> 1/4 * 0.45 = 0.1125
    # ECE = 0.2375
    assert expected_calibration_error(*four_examples, n_bins=5) == pytest.approx(0.2375, rel=1e-6)


def test_ece_zero_when_calibrated():
    # 10 examples at confidence 0.8 with 8 right, 5 at confidence 0.6 with 3 right.
    probs = torch.tensor([[0.8, 0.2]] * 10 + [[0.6, 0.4]] * 5)
    labels = torch.tensor([0] * 8 + [1] * 2 + [0] * 3 + [1] * 2)
    assert expected_calibration_error(probs, labels, n_bins=15) == pytest.approx(0.0, abs=1e-7)


def test_ece_single_bin_is_gap_between_confidence_and_accuracy():
    generator = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(200, 4, generator=generator), dim=1)
    labels = torch.randint(0, 4, (200,), generator=generator)
    confidence, predicted = probs.max(dim=1)
    gap = abs(confidence.double().mean().item() - (predicted == labels).double().mean().item())
    assert expected_calibration_error(probs, labels, n_bins=1) == pytest.approx(gap, rel=1e-6)


def test_classification_metrics_keys(four_examples):
    result = classification_metrics(*four_examples, n_bins=5)
    nll = -(math.log(0.9) + math.log(0.3) + math.log(0.7) + math.log(0.55)) / 4
    assert result == pytest.approx({"accuracy": 0.75, "nll": nll, "ece": 0.2375, "brier": 0.39625})
    assert all(isinstance(v, float) for v in result.values())


def test_entropy_of_uniform_is_log_c():
    probs = torch.full((3, 7), 1.0 / 7)
    assert torch.allclose(predictive_entropy(probs), torch.full((3,), math.log(7)))


def test_entropy_of_one_hot_is_zero_not_nan():
    entropy = predictive_entropy(torch.tensor([[1.0, 0.0, 0.0]]))
    assert torch.equal(entropy, torch.zeros(1))


def test_mutual_information_zero_when_samples_agree():
    probs = torch.softmax(torch.randn(5, 3, generator=torch.Generator().manual_seed(1)), dim=1)
    mi = mutual_information(probs.expand(8, 5, 3))
    assert mi.shape == (5,)
    assert torch.allclose(mi, torch.zeros(5), atol=1e-6)


def test_mutual_information_positive_when_samples_disagree():
    one_hot_disagree = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    assert mutual_information(one_hot_disagree).item() == pytest.approx(math.log(2))
    generator = torch.Generator().manual_seed(2)
    samples = torch.softmax(2 * torch.randn(10, 6, 4, generator=generator), dim=-1)
    assert (mutual_information(samples) > 0).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_aupr_match_sklearn_with_ties(seed):
    metrics = pytest.importorskip("sklearn.metrics")
    generator = torch.Generator().manual_seed(seed)
    scores_in = torch.randint(0, 6, (50,), generator=generator).float()
    scores_out = torch.randint(2, 9, (30,), generator=generator).float()
    y_true = [0] * 50 + [1] * 30
    y_score = torch.cat([scores_in, scores_out]).numpy()
    assert auroc(scores_in, scores_out) == pytest.approx(metrics.roc_auc_score(y_true, y_score), abs=1e-12)
    assert aupr(scores_in, scores_out) == pytest.approx(metrics.average_precision_score(y_true, y_score), abs=1e-12)


def test_auroc_extremes():
    assert auroc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])) == 1.0
    assert auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 0.0
    assert auroc(torch.tensor([1.0, 1.0]), torch.tensor([1.0])) == 0.5


def test_fpr_at_tpr_hand():
    scores_in = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])
    scores_out = torch.tensor([0.35, 0.45, 0.6, 0.7])
    # Sweeping down: 0.7, 0.6 (2 OOD), 0.5 (1 in), 0.45 (3 OOD = 75%) -> 1 of 5 in flagged.
    assert fpr_at_tpr(scores_in, scores_out, tpr=0.75) == pytest.approx(0.2)
    # All 4 OOD caught only at 0.35, by which 0.4 and 0.5 are flagged too.
    assert fpr_at_tpr(scores_in, scores_out, tpr=0.95) == pytest.approx(0.4)


def test_fpr_at_tpr_tie_takes_whole_threshold():
    # At threshold 0.5 both the OOD score and two in-distribution scores are flagged together.
    assert fpr_at_tpr(torch.tensor([0.5, 0.5, 0.1, 0.2]), torch.tensor([0.5])) == pytest.approx(0.5)


def test_ood_metrics_keys_and_separation():
    confident = torch.tensor([[0.98, 0.01, 0.01]] * 6)
    uncertain = torch.tensor([[0.4, 0.3, 0.3]] * 4)
    result = ood_metrics(confident, uncertain)
    assert set(result) == {"entropy_auroc", "entropy_aupr", "entropy_fpr95"}
    assert result["entropy_auroc"] == 1.0 and result["entropy_aupr"] == 1.0 and result["entropy_fpr95"] == 0.0

    agree = confident.expand(5, 6, 3)
    disagree = torch.eye(3)[torch.tensor([0, 1, 2, 0, 1])].unsqueeze(1).expand(5, 4, 3)
    result = ood_metrics(confident, uncertain, agree, disagree)
    assert {"mi_auroc", "mi_aupr", "mi_fpr95"} <= set(result)
    assert result["mi_auroc"] == 1.0


def test_reliability_diagram(four_examples):
    from matplotlib.figure import Figure

    ax = reliability_diagram(*four_examples, n_bins=5)
    assert "ECE = 0.2375" in ax.get_title()
    assert len(ax.patches) == 3
    given = Figure().subplots()
    assert reliability_diagram(*four_examples, ax=given) is given


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: accuracy(torch.rand(4, 2), torch.zeros(3, dtype=torch.long)), "N=3 but probs has N=4"),
        (lambda: expected_calibration_error(torch.rand(4), torch.zeros(4, dtype=torch.long)), "2-D"),
        (lambda: expected_calibration_error(torch.rand(4, 2), torch.zeros(4, dtype=torch.long), n_bins=0),
         "n_bins must be an integer >= 1"),
        (lambda: brier_score(torch.rand(0, 2), torch.zeros(0, dtype=torch.long)), "empty"),
        (lambda: negative_log_likelihood(torch.rand(2, 2), torch.tensor([0, 2])), r"labels must lie in \[0, 1\]"),
        (lambda: accuracy(torch.rand(2, 2), torch.tensor([0.0, 1.0])), "integer"),
        (lambda: auroc(torch.tensor([]), torch.tensor([1.0])), "scores_in is empty"),
        (lambda: aupr(torch.tensor([1.0]), torch.ones(2, 2)), "scores_out must be a 1-D"),
        (lambda: fpr_at_tpr(torch.tensor([1.0]), torch.tensor([2.0]), tpr=1.5), r"tpr must lie in \(0, 1\]"),
        (lambda: mutual_information(torch.rand(4, 2)), r"3-D \[S, N, C\]"),
        (lambda: ood_metrics(torch.rand(2, 3), torch.rand(2, 3), torch.rand(1, 2, 3)), "both"),
        (lambda: ood_metrics(torch.rand(2, 3), torch.rand(2, 4)), "C=3 classes but probs_out has C=4"),
    ],
)
def test_bad_input_raises_usage_error(call, match):
    with pytest.raises(UsageError, match=match):
        call()
