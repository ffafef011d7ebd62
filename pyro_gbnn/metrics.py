"""Predictive-quality metrics for classifiers: accuracy, calibration, uncertainty, OOD detection.

Plain torch, no Pyro, so they score any model's predictive probabilities. `probs` is the
[N, C] posterior predictive (already averaged over posterior samples), `labels` is [N]
integer classes, `sample_probs` is [S, N, C] per-posterior-sample probabilities. Scalar
metrics return Python floats; entropies are in nats.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from pyro_gbnn.errors import UsageError

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = [
    "accuracy",
    "mean_and_spread",
    "negative_log_likelihood",
    "expected_calibration_error",
    "brier_score",
    "predictive_entropy",
    "mutual_information",
    "auroc",
    "aupr",
    "fpr_at_tpr",
    "classification_metrics",
    "ood_metrics",
    "calibration_bins",
    "reliability_diagram",
]


def _check_probs(probs: Tensor, name: str = "probs") -> None:
    if not isinstance(probs, Tensor) or probs.dim() != 2:
        shape = tuple(probs.shape) if isinstance(probs, Tensor) else type(probs).__name__
        raise UsageError(f"{name} must be a 2-D [N, C] tensor of class probabilities, got shape {shape}")
    if probs.shape[0] == 0 or probs.shape[1] == 0:
        raise UsageError(f"{name} is empty (shape {tuple(probs.shape)}); need at least one example and one class")
    if not probs.is_floating_point():
        raise UsageError(f"{name} must be a floating-point tensor, got dtype {probs.dtype}")


def _check_labels(probs: Tensor, labels: Tensor) -> None:
    _check_probs(probs)
    if not isinstance(labels, Tensor) or labels.dim() != 1:
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise UsageError(f"labels must be a 1-D [N] tensor of class indices, got shape {shape}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise UsageError(f"labels must be an integer tensor (int64 class indices), got dtype {labels.dtype}")
    if labels.shape[0] != probs.shape[0]:
        raise UsageError(f"labels has N={labels.shape[0]} but probs has N={probs.shape[0]}; they must match")
    n_classes = probs.shape[1]
    if labels.min() < 0 or labels.max() >= n_classes:
        raise UsageError(
            f"labels must lie in [0, {n_classes - 1}] for {n_classes} classes, "
            f"got range [{int(labels.min())}, {int(labels.max())}]"
        )


def _check_n_bins(n_bins: int) -> None:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise UsageError(f"n_bins must be an integer >= 1, got {n_bins!r}")


def _check_scores(scores: Tensor, name: str) -> None:
    if not isinstance(scores, Tensor) or scores.dim() != 1:
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise UsageError(f"{name} must be a 1-D tensor of scores, got shape {shape}")
    if scores.numel() == 0:
        raise UsageError(f"{name} is empty; need at least one score from each of in- and out-of-distribution")
    if not torch.isfinite(scores).all():
        raise UsageError(f"{name} contains NaN or infinite values; scores must be finite")


def accuracy(probs: Tensor, labels: Tensor) -> float:
    """Fraction of examples whose most probable class is the label. probs [N, C], labels [N]."""
    _check_labels(probs, labels)
    return (probs.argmax(dim=1) == labels).double().mean().item()


def negative_log_likelihood(probs: Tensor, labels: Tensor, eps: float = 1e-12) -> float:
    """Mean -log p(y) in nats; probabilities are clamped at `eps` so a confident miss stays finite."""
    _check_labels(probs, labels)
    p_true = probs.gather(1, labels.long().unsqueeze(1)).squeeze(1).double()
    return -p_true.clamp_min(eps).log().mean().item()


def calibration_bins(probs: Tensor, labels: Tensor, n_bins: int = 15) -> tuple[Tensor, Tensor, Tensor]:
    """Per-bin (count, summed confidence, summed correctness), each [n_bins] float64: what
    ECE and a reliability diagram are made of (sums, so bins of several sets add up).

    Bins are equal-width over (0, 1], right-closed: bin b holds top-1 confidences in
    (b / n_bins, (b + 1) / n_bins].
    """
    confidence, predicted = probs.max(dim=1)
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64, device=probs.device)
    inner = edges[1:-1].to(confidence.dtype)
    index = torch.bucketize(confidence, inner, right=False)
    correct = (predicted == labels).double()
    zeros = torch.zeros(n_bins, dtype=torch.float64, device=probs.device)
    count = zeros.index_add(0, index, torch.ones_like(correct))
    conf_sum = zeros.index_add(0, index, confidence.double())
    correct_sum = zeros.index_add(0, index, correct)
    return count, conf_sum, correct_sum


def expected_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """Expected calibration error (Guo et al. 2017), in [0, 1].

    Sum over equal-width top-1 confidence bins of (bin count / N) * |accuracy - mean
    confidence|. probs [N, C], labels [N].
    """
    _check_labels(probs, labels)
    _check_n_bins(n_bins)
    _, conf_sum, correct_sum = calibration_bins(probs, labels, n_bins)
    return ((conf_sum - correct_sum).abs().sum() / probs.shape[0]).item()


def brier_score(probs: Tensor, labels: Tensor) -> float:
    """Mean over examples of sum over classes (p_c - onehot_c)^2, in [0, 2]. probs [N, C], labels [N]."""
    _check_labels(probs, labels)
    onehot = torch.nn.functional.one_hot(labels.long(), probs.shape[1]).double()
    return (probs.double() - onehot).pow(2).sum(dim=1).mean().item()


def predictive_entropy(probs: Tensor) -> Tensor:
    """Entropy of each predictive distribution in nats, [N] from probs [N, C]; 0 log 0 = 0."""
    _check_probs(probs)
    return -torch.special.xlogy(probs, probs).sum(dim=-1)


def mutual_information(sample_probs: Tensor) -> Tensor:
    """BALD mutual information between label and parameters, [N] nats from [S, N, C].

    Entropy of the sample mean minus mean per-sample entropy: the part of the predictive
    uncertainty that comes from disagreement between posterior samples. Clamped at 0
    against rounding, since the exact value is never negative.
    """
    if not isinstance(sample_probs, Tensor) or sample_probs.dim() != 3:
        shape = tuple(sample_probs.shape) if isinstance(sample_probs, Tensor) else type(sample_probs).__name__
        raise UsageError(f"sample_probs must be a 3-D [S, N, C] tensor of per-sample probabilities, got shape {shape}")
    if sample_probs.numel() == 0:
        raise UsageError(f"sample_probs is empty (shape {tuple(sample_probs.shape)}); need S, N, C >= 1")
    mean = sample_probs.mean(dim=0)
    entropy_of_mean = -torch.special.xlogy(mean, mean).sum(dim=-1)
    mean_entropy = -torch.special.xlogy(sample_probs, sample_probs).sum(dim=-1).mean(dim=0)
    return (entropy_of_mean - mean_entropy).clamp_min(0.0)


def _binary_curve(scores_in: Tensor, scores_out: Tensor) -> tuple[Tensor, Tensor]:
    """Cumulative (true positives, false positives) at each distinct threshold, high to low.

    OOD is the positive class. Tied scores share one threshold, as in scikit-learn's
    `_binary_clf_curve`. Both outputs are float64 [T].
    """
    _check_scores(scores_in, "scores_in")
    _check_scores(scores_out, "scores_out")
    scores = torch.cat([scores_in.double(), scores_out.double().to(scores_in.device)])
    is_out = torch.cat(
        [
            torch.zeros(scores_in.numel(), dtype=torch.float64, device=scores.device),
            torch.ones(scores_out.numel(), dtype=torch.float64, device=scores.device),
        ]
    )
    scores, order = torch.sort(scores, descending=True, stable=True)
    is_out = is_out[order]
    last_of_tie = torch.cat(
        [
            torch.nonzero(scores[1:] != scores[:-1]).squeeze(1),
            torch.tensor([scores.numel() - 1], device=scores.device),
        ]
    )
    tps = is_out.cumsum(0)[last_of_tie]
    fps = (last_of_tie + 1).double() - tps
    return tps, fps


def auroc(scores_in: Tensor, scores_out: Tensor) -> float:
    """Area under the ROC curve for telling OOD (positive, higher score) from in-distribution.

    scores_in [N_in], scores_out [N_out]; ties count one half, matching
    `sklearn.metrics.roc_auc_score`.
    """
    tps, fps = _binary_curve(scores_in, scores_out)
    zero = tps.new_zeros(1)
    tpr = torch.cat([zero, tps / tps[-1]])
    fpr = torch.cat([zero, fps / fps[-1]])
    return torch.trapezoid(tpr, fpr).item()


def aupr(scores_in: Tensor, scores_out: Tensor) -> float:
    """Average precision with OOD as the positive class (higher score = more likely OOD).

    Sum over thresholds of (recall step) * precision, with no interpolation, matching
    `sklearn.metrics.average_precision_score`. scores_in [N_in], scores_out [N_out].
    """
    tps, fps = _binary_curve(scores_in, scores_out)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    recall_step = torch.diff(recall, prepend=recall.new_zeros(1))
    return (recall_step * precision).sum().item()


def fpr_at_tpr(scores_in: Tensor, scores_out: Tensor, tpr: float = 0.95) -> float:
    """Fraction of in-distribution examples flagged as OOD at the first threshold catching `tpr` of OOD.

    Thresholds are swept from the highest score down; the first one at which the
    OOD true-positive rate reaches `tpr` (in (0, 1]) fixes the reported false-positive rate.
    """
    if not 0.0 < tpr <= 1.0:
        raise UsageError(f"tpr must lie in (0, 1], got {tpr!r}")
    tps, fps = _binary_curve(scores_in, scores_out)
    reached = tps / tps[-1] >= tpr - 1e-12
    first = int(torch.nonzero(reached)[0, 0])
    return (fps[first] / fps[-1]).item()


def classification_metrics(probs: Tensor, labels: Tensor, n_bins: int = 15) -> dict[str, float]:
    """Accuracy, NLL (nats), ECE and Brier score in one dict, keyed accuracy/nll/ece/brier."""
    _check_n_bins(n_bins)
    return {
        "accuracy": accuracy(probs, labels),
        "nll": negative_log_likelihood(probs, labels),
        "ece": expected_calibration_error(probs, labels, n_bins),
        "brier": brier_score(probs, labels),
    }


def ood_metrics(
    probs_in: Tensor,
    probs_out: Tensor,
    sample_probs_in: Tensor | None = None,
    sample_probs_out: Tensor | None = None,
) -> dict[str, float]:
    """OOD-detection quality of predictive entropy and, given samples, mutual information.

    probs_in [N_in, C], probs_out [N_out, C]; optional sample_probs_* [S, N_*, C]. Keys are
    `{score}_{metric}` for score in entropy, mi and metric in auroc, aupr, fpr95, with OOD
    as the positive class.
    """
    _check_probs(probs_in, "probs_in")
    _check_probs(probs_out, "probs_out")
    if probs_in.shape[1] != probs_out.shape[1]:
        raise UsageError(
            f"probs_in has C={probs_in.shape[1]} classes but probs_out has C={probs_out.shape[1]}; they must match"
        )
    if (sample_probs_in is None) != (sample_probs_out is None):
        raise UsageError("pass both sample_probs_in and sample_probs_out, or neither")
    scores = {"entropy": (predictive_entropy(probs_in), predictive_entropy(probs_out))}
    if sample_probs_in is not None and sample_probs_out is not None:
        scores["mi"] = (mutual_information(sample_probs_in), mutual_information(sample_probs_out))
    result = {}
    for name, (score_in, score_out) in scores.items():
        result[f"{name}_auroc"] = auroc(score_in, score_out)
        result[f"{name}_aupr"] = aupr(score_in, score_out)
        result[f"{name}_fpr95"] = fpr_at_tpr(score_in, score_out, 0.95)
    return result


def reliability_diagram(probs: Tensor, labels: Tensor, n_bins: int = 15, ax: Axes | None = None) -> Axes:
    """Bar chart of accuracy per top-1 confidence bin against the diagonal, ECE in the title.

    Draws on `ax`, or on a new pyplot-free Figure (safe under Agg and in threads) when
    None. Empty bins draw no bar. Returns the Axes.
    """
    _check_labels(probs, labels)
    _check_n_bins(n_bins)
    count, conf_sum, correct_sum = calibration_bins(probs, labels, n_bins)
    ece = ((conf_sum - correct_sum).abs().sum() / probs.shape[0]).item()
    bin_accuracy = (correct_sum / count.clamp_min(1)).cpu().numpy()
    left_edges = torch.arange(n_bins, dtype=torch.float64).numpy() / n_bins
    nonempty = (count > 0).cpu().numpy()
    if ax is None:
        from matplotlib.figure import Figure

        ax = Figure().subplots()
    width = 1.0 / n_bins
    ax.bar(left_edges[nonempty], bin_accuracy[nonempty], width=width, align="edge", edgecolor="black", label="accuracy")
    ax.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="gray", label="perfect calibration")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"ECE = {ece:.4f}")
    ax.legend(loc="upper left")
    return ax


def mean_and_spread(runs: list[dict[str, float]]) -> dict[str, Any]:
    """Metrics of one evaluation, or of several (one per evaluation seed) their mean with
    ``spread``: each metric's [min, max] over the runs and ``seeds``, how many there were."""
    if len(runs) == 1:
        return runs[0]
    mean = {key: sum(run[key] for run in runs) / len(runs) for key in runs[0]}
    spread = {key: [min(run[key] for run in runs), max(run[key] for run in runs)] for key in runs[0]}
    return {**mean, "spread": {**spread, "seeds": len(runs)}}
