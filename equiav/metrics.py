"""Classification metrics of the evaluation (spec: 'Evaluation'), in plain NumPy.

- `average_precision`: per class, exactly scikit-learn's `average_precision_score` (the
  step-wise sum over the precision-recall curve, one point per distinct score, so tied scores
  form one step);
- `roc_auc`: per class, exactly scikit-learn's `roc_auc_score` (the trapezoid under the ROC curve
  with one point per distinct score: a tie between a positive and a negative counts one half);
- `d_prime`: sqrt(2) * Phi^-1(AUC);
- `evaluate_scores`: mAP, mean AUC and d-prime over the classes with at least one positive and one
  negative (the others are counted and named), top-1 accuracy as the original computes it
  (argmax of the scores against argmax of the target) and one row per class.

`gather_indexed` collects per-rank evaluation rows under torch.distributed so that every sample
counts exactly once, in entry order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any

import numpy as np
import torch.distributed as dist


def _binary_targets(targets: np.ndarray) -> np.ndarray:
    """Multi-hot targets as booleans; soft (mixup) targets count as positive from 0.5 up."""
    targets = np.asarray(targets)
    if targets.dtype == bool:
        return targets
    return targets >= 0.5


def _as_columns(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores, targets = np.asarray(scores), _binary_targets(targets)
    if scores.ndim == 1:
        scores, targets = scores[:, None], targets.reshape(-1, 1)
    if scores.ndim != 2 or scores.shape != targets.shape:
        raise ValueError(
            f"scores {scores.shape} and targets {targets.shape} must both be (N,) or (N, C)"
        )
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or infinity")
    return scores, targets


def _curve(score: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positives, true positives) at each distinct score, from the highest down: the
    cumulative counts at the last sample of each block of tied scores (as scikit-learn's
    `_binary_clf_curve`, which sorts the same way)."""
    order = np.argsort(score, kind="mergesort")[::-1]
    score, positive = score[order], positive[order]
    last_of_block = np.r_[np.nonzero(np.diff(score))[0], score.size - 1]
    tps = np.cumsum(positive, dtype=np.float64)[last_of_block]
    fps = 1.0 + last_of_block - tps
    return fps, tps


def _average_precision_1d(score: np.ndarray, positive: np.ndarray) -> float:
    fps, tps = _curve(score, positive)
    ps = tps + fps
    precision = np.zeros_like(tps)
    np.divide(tps, ps, out=precision, where=ps != 0)
    # No positive at all: scikit-learn sets the recall to one everywhere, which makes AP 0.
    recall = np.ones_like(tps) if tps[-1] == 0 else tps / tps[-1]
    precision = np.r_[precision[::-1], 1.0]
    recall = np.r_[recall[::-1], 0.0]
    return float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))


def _roc_auc_1d(score: np.ndarray, positive: np.ndarray) -> float:
    n_pos = int(positive.sum())
    if n_pos == 0 or n_pos == positive.size:
        return math.nan  # undefined with one class only (scikit-learn warns and returns NaN)
    fps, tps = _curve(score, positive)
    if len(fps) > 2:
        # Drop the points collinear with their neighbours, as scikit-learn's roc_curve does (the
        # area is the same; dropping them keeps the floating-point sum the same too).
        keep = np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
        fps, tps = fps[keep], tps[keep]
    fpr = np.r_[0.0, fps] / fps[-1]
    tpr = np.r_[0.0, tps] / tps[-1]
    return float(np.trapezoid(tpr, fpr))


def average_precision(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Average precision per class of (N, C) scores against (N, C) multi-hot targets, exactly as
    `sklearn.metrics.average_precision_score(targets[:, c], scores[:, c])`: 0 for a class
    without positives, 1 for a class of positives only. A 1-D input gives a (1,) array."""
    scores, targets = _as_columns(scores, targets)
    return np.array(
        [_average_precision_1d(scores[:, c], targets[:, c]) for c in range(scores.shape[1])],
        np.float64,
    )


def roc_auc(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Area under the ROC curve per class, exactly as `sklearn.metrics.roc_auc_score` on each
    column (ties between a positive and a negative count one half); NaN for a class whose
    targets are all positive or all negative."""
    scores, targets = _as_columns(scores, targets)
    return np.array(
        [_roc_auc_1d(scores[:, c], targets[:, c]) for c in range(scores.shape[1])], np.float64
    )


def d_prime(auc: float) -> float:
    """sqrt(2) * Phi^-1(auc), Phi the standard normal CDF (+-inf at AUC 1 / 0, NaN for NaN)."""
    auc = float(auc)
    if math.isnan(auc):
        return math.nan
    if auc >= 1.0:
        return math.inf
    if auc <= 0.0:
        return -math.inf
    return math.sqrt(2.0) * NormalDist().inv_cdf(auc)


def accuracy(scores: np.ndarray, targets: np.ndarray) -> float:
    """Top-1 accuracy as the original computes it: argmax of the scores against argmax of the
    target (the first class of a multi-label target)."""
    scores, targets = np.asarray(scores), np.asarray(targets)
    if len(scores) == 0:
        return math.nan
    return float(np.mean(np.argmax(scores, axis=1) == np.argmax(targets, axis=1)))


def _finite_or_none(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def evaluate_scores(
    scores: np.ndarray, targets: np.ndarray, class_names: Sequence[str]
) -> dict[str, Any]:
    """All evaluation metrics of (N, C) scores against (N, C) targets.

    Returns ``mAP``, ``mean_auc`` and ``d_prime`` over the classes with at least one positive and
    one negative; ``accuracy``; ``n_samples``, ``n_classes``, ``n_classes_scored``,
    ``excluded_classes`` (their count) and ``excluded`` (their names); ``per_class``: one row
    per class ``{index, name, ap, auc, positives, scored}`` (ap and auc None when not scored).
    """
    scores, binary = _as_columns(scores, targets)
    n, c = scores.shape
    if len(class_names) != c:
        raise ValueError(f"{len(class_names)} class names for {c} score columns")
    positives = binary.sum(axis=0).astype(np.int64)
    scored = (positives > 0) & (positives < n)
    ap = np.full(c, np.nan)
    auc = np.full(c, np.nan)
    for k in np.nonzero(scored)[0]:
        ap[k] = _average_precision_1d(scores[:, k], binary[:, k])
        auc[k] = _roc_auc_1d(scores[:, k], binary[:, k])
    any_scored = bool(scored.any())
    mean_ap = float(np.mean(ap[scored])) if any_scored else math.nan
    mean_auc = float(np.mean(auc[scored])) if any_scored else math.nan
    return {
        "mAP": mean_ap,
        "mean_auc": mean_auc,
        "d_prime": d_prime(mean_auc),
        "accuracy": accuracy(scores, np.asarray(targets).reshape(n, c)),
        "n_samples": int(n),
        "n_classes": int(c),
        "n_classes_scored": int(scored.sum()),
        "excluded_classes": int(c - scored.sum()),
        "excluded": [str(class_names[k]) for k in np.nonzero(~scored)[0]],
        "per_class": [
            {
                "index": int(k),
                "name": str(class_names[k]),
                "ap": _finite_or_none(ap[k]),
                "auc": _finite_or_none(auc[k]),
                "positives": int(positives[k]),
                "scored": bool(scored[k]),
            }
            for k in range(c)
        ],
    }


def gather_indexed(
    index: np.ndarray, *arrays: np.ndarray
) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """Every rank's rows (entry `index` (n,) and `arrays` (n, ...) of matching rows) on every
    rank, sorted by index; without a process group, this process's rows sorted. A collective:
    every rank must call it. A sample that two ranks both hold is an error (it would count
    twice)."""
    index = np.asarray(index, np.int64).reshape(-1)
    for a in arrays:
        if len(a) != len(index):
            raise ValueError(f"{len(a)} rows for {len(index)} indices")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (index, arrays))
        # A rank without rows sends empty arrays of unknown width: leave those out.
        full = [p for p in parts if len(p[0])] or parts[:1]
        index = np.concatenate([p[0] for p in full])
        arrays = tuple(np.concatenate([p[1][i] for p in full]) for i in range(len(arrays)))
    order = np.argsort(index, kind="stable")
    index = index[order]
    if len(index) > 1 and np.any(index[1:] == index[:-1]):
        dup = np.unique(index[1:][index[1:] == index[:-1]])
        raise RuntimeError(f"entries {dup[:10].tolist()} were evaluated more than once")
    return index, tuple(a[order] for a in arrays)
