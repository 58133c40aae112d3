"""Zero-shot audio-visual retrieval with the pretrained model (spec: 'Evaluation').

Every clip of the retrieval list is embedded with the eval pipeline: z_inv of each modality (the
inter head of the predictor's output for `cen_num` sampled augmentation vectors, or of the
mean-pooled tokens without `cen_mean`), L2-normalised; the cosine similarity matrix S has the
audio queries as rows and the visual items as columns, so audio -> visual retrieval reads S row by
row (row i's match is column i) and visual -> audio reads S transposed.

Rank of the true match: 1 + the number of items scored strictly higher than it (the original's
`compute_metrics` finds the first position of the match's score in the sorted row, which is the
same number; with exact ties the original counts a query several times, we count it once).
Recall at k: the fraction of queries whose match ranks <= k. Median rank: the median of the ranks.

The `cen_num` vectors of clip i are `dali_pipelines.augment.draw_cen(eval.retrieval_seed, 0, i,
...)` with i the clip's entry index, so results repeat (quirks.retrieval_seeded); the original
draws them unseeded, which `seeded=False` reproduces (a fresh seed from the OS per call).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from dali_pipelines.augment import draw_cen
from equiav.config import Config
from equiav.metrics import gather_indexed
from equiav.train.optim import autocast

DIRECTIONS = ("audio_to_visual", "visual_to_audio")


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float64; a zero row stays zero)."""
    x = np.asarray(x, np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def similarity(za: np.ndarray, zv: np.ndarray) -> np.ndarray:
    """Cosine similarity (N, N): audio rows against visual columns."""
    za, zv = np.asarray(za), np.asarray(zv)
    if za.ndim != 2 or za.shape != zv.shape:
        raise ValueError(f"audio {za.shape} and visual {zv.shape} embeddings must be equal (N, D)")
    return l2_normalize(za) @ l2_normalize(zv).T


def match_ranks(sim: np.ndarray) -> np.ndarray:
    """Rank (1 = first) of each row's true match, column i of row i: 1 + the number of columns
    scored strictly higher."""
    sim = np.asarray(sim)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"the similarity matrix must be square, got {sim.shape}")
    diag = np.diagonal(sim)[:, None]
    return 1 + np.sum(sim > diag, axis=1)


def recall_at_k(sim: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Recall at each k, row queries against column items (row i's match is column i)."""
    ranks = match_ranks(sim)
    return {int(k): float(np.mean(ranks <= k)) for k in ks}


def median_rank(sim: np.ndarray) -> float:
    """Median rank of the true matches, row queries against column items."""
    return float(np.median(match_ranks(sim)))


def _direction_metrics(sim: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    out = {f"R@{k}": r for k, r in recall_at_k(sim, ks).items()}
    out["median_rank"] = median_rank(sim)
    return out


def retrieval_metrics(
    za: np.ndarray, zv: np.ndarray, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, Any]:
    """Recall at `ks` and median rank in both directions of L2-normalised embeddings (row i of
    `za` and of `zv` are the same clip): ``{"n": N, "audio_to_visual": {"R@1": ..., ...,
    "median_rank": ...}, "visual_to_audio": {...}}``."""
    sim = similarity(za, zv)
    return {
        "n": int(sim.shape[0]),
        "audio_to_visual": _direction_metrics(sim, ks),
        "visual_to_audio": _direction_metrics(sim.T, ks),
    }


def top_k_table(
    sim: np.ndarray, ids: Sequence[str], k: int = 10, direction: str = "audio_to_visual"
) -> list[dict[str, Any]]:
    """One row per query for a CSV: ``query`` id, ``direction``, ``rank`` of its true match and
    ``top_1`` ... ``top_k``, the ids of the best-scored items (ties: lower index first). Pass
    `sim` for audio -> visual and `sim.T` for visual -> audio."""
    sim = np.asarray(sim)
    if len(ids) != sim.shape[0]:
        raise ValueError(f"{len(ids)} ids for a {sim.shape} similarity matrix")
    ranks = match_ranks(sim)
    k = min(k, sim.shape[1])
    top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    rows = []
    for i, query in enumerate(ids):
        row: dict[str, Any] = {"query": query, "direction": direction, "rank": int(ranks[i])}
        row.update({f"top_{j + 1}": ids[top[i, j]] for j in range(k)})
        rows.append(row)
    return rows


def cen_vectors(cfg: Config, indices: Sequence[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The `cen_num` sampled vectors of each clip: (B, cen_num, 24), (B, cen_num, 18)."""
    a, v = [], []
    for i in indices:
        ta, tv = draw_cen(
            seed,
            0,
            int(i),
            cfg.augment,
            cfg.model.cen_num,
            cfg.data.target_length,
            cfg.data.num_mel_bins,
            cfg.augment.time_mask,
            cfg.augment.freq_mask,
            cfg.data.image_size,
        )
        a.append(ta)
        v.append(tv)
    return np.stack(a), np.stack(v)


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    """Concatenated rows; a rank without rows passes an empty array (skipped when gathered)."""
    return np.concatenate(parts) if parts else np.zeros((0,), np.float32)


def embed_dataset(
    model: nn.Module,
    loader,
    cfg: Config,
    seeded: bool = True,
    precision: str = "fp32",
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """z_inv of every clip of an eval-mode `loader` (a `DaliLoader`) under `model` (an
    `EquiAVPretrain`): (video ids, audio (N, D), visual (N, D)), float32, not normalised, in entry
    order, each clip once, gathered from every rank (a collective under torch.distributed).

    `seeded`: the `cen_num` vectors come from `eval.retrieval_seed` (repeatable); otherwise from a
    fresh seed per call, as the original's unseeded draws.
    """
    device = next(model.parameters()).device
    seed = cfg.eval.retrieval_seed if seeded else int(np.random.default_rng().integers(2**62))
    use_cen = cfg.model.cen_mean
    was_training = model.training
    model.eval()
    indices, za_parts, zv_parts = [], [], []
    try:
        with torch.no_grad():
            for batch in loader:
                index = batch["index"].cpu().numpy()
                if len(index) == 0:  # a last batch of padding rows only
                    continue
                t_a = t_v = None
                if use_cen:
                    ta, tv = cen_vectors(cfg, index, seed)
                    t_a, t_v = torch.from_numpy(ta).to(device), torch.from_numpy(tv).to(device)
                with autocast(precision, device):
                    za, zv = model.embed(batch["audio"], batch["visual"], t_a, t_v)
                indices.append(index)
                za_parts.append(za.float().cpu().numpy())
                zv_parts.append(zv.float().cpu().numpy())
    finally:
        model.train(was_training)
    index, (za, zv) = gather_indexed(_cat(indices), _cat(za_parts), _cat(zv_parts))
    if len(index) == 0:
        raise RuntimeError("the retrieval loader yielded no sample")
    ids = [loader.entries[i].video_id for i in index]
    return ids, za, zv
