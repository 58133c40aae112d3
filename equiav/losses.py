"""EquiAV's pretraining losses: inter-modal InfoNCE on the invariant embeddings, intra-modal
NT-Xent on the equivariant ones, and their average (spec: "Losses").

Each rank scores its own B rows against the global batch of W * B rows gathered from every rank;
row i of rank r has global index r * B + i. `gather` picks how other ranks' rows arrive:
"grad" (default) keeps the autograd graph, so that under DDP the loss and gradients equal the
single-process ones on the concatenated batch; "nograd" is the original code's gather (no
gradient through the gathered keys at all when W > 1); None scores against this rank's rows only.

All logits are computed in float32 whatever the caller's precision: the inputs are cast to
float before L2-normalising, and autocast is switched off around the matmuls, since under
autocast the cast alone would not do (autocast sends a float32 matmul back to half precision).
Why it matters: in bf16 the
cosine similarities of 512-wide unit vectors come out wrong by up to ~2e-3 (fp16: ~2e-4), which
the temperature 0.07 multiplies by ~14 into logit errors of ~0.03, and bf16 logits near 14 are
only resolved to steps of 1/16: as large as the gaps between hard negatives. The matrices are
tiny (B x 2*W*B), so float32 costs nothing measurable.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from equiav.train.dist import all_gather_no_grad, all_gather_with_grad, get_rank

Gather = Literal["grad", "nograd"] | None

#: The model-output keys `equiav_loss` reads, each a (B, D) tensor.
EMBEDDING_KEYS = ("z_inv_a", "z_inv_v", "z_equi_a", "z_equi_v", "z_aug_a", "z_aug_v")


def _gather(x: torch.Tensor, gather: Gather) -> tuple[torch.Tensor, int]:
    """Return (the global batch of keys, this rank's offset into it)."""
    if gather is None:
        return x, 0
    if gather == "grad":
        keys = all_gather_with_grad(x)
    elif gather == "nograd":
        keys = all_gather_no_grad(x)
    else:
        raise ValueError(f"gather must be 'grad', 'nograd' or None, got {gather!r}")
    # Without a process group (or with one process) the rank is 0 and the offset 0.
    return keys, get_rank() * x.shape[0]


def _check_pair(a: torch.Tensor, b: torch.Tensor, names: str) -> None:
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"{names} must be two (B, D) tensors of equal shape, got {tuple(a.shape)} and "
            f"{tuple(b.shape)}"
        )


def _normalise(x: torch.Tensor) -> torch.Tensor:
    # float64 stays float64 (the tests compare in double); anything narrower becomes float32.
    return F.normalize(x if x.dtype == torch.float64 else x.float(), dim=-1, p=2)


def _info_nce_logits(
    za: torch.Tensor, zv: torch.Tensor, temperature: float, gather: Gather
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(audio->visual logits, visual->audio logits, labels): each (B, W*B) / (B,)."""
    _check_pair(za, zv, "za, zv")
    with torch.autocast(device_type=za.device.type, enabled=False):
        qa, qv = _normalise(za), _normalise(zv)
        ka, offset = _gather(qa, gather)
        kv, _ = _gather(qv, gather)
        labels = offset + torch.arange(qa.shape[0], device=qa.device)
        return qa @ kv.T / temperature, qv @ ka.T / temperature, labels


def _nt_xent_logits(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float, gather: Gather
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(side-1 logits, side-2 logits, labels): each row scores [all partners | own side], both
    of the global batch, (B, 2*W*B), with the row's own sample masked out of its own side."""
    _check_pair(z1, z2, "z1, z2")
    with torch.autocast(device_type=z1.device.type, enabled=False):
        q1, q2 = _normalise(z1), _normalise(z2)
        k1, offset = _gather(q1, gather)
        k2, _ = _gather(q2, gather)
        labels = offset + torch.arange(q1.shape[0], device=q1.device)
        # -inf removes self-similarity from the softmax exactly (exp(-inf) = 0, zero gradient).
        # (one_hot on a GPU would check the labels' range on the host: a device sync.)
        is_self = labels[:, None] == torch.arange(k1.shape[0], device=labels.device)
        same1 = (q1 @ k1.T / temperature).masked_fill(is_self, float("-inf"))
        same2 = (q2 @ k2.T / temperature).masked_fill(is_self, float("-inf"))
        logits1 = torch.cat([q1 @ k2.T / temperature, same1], dim=1)
        logits2 = torch.cat([q2 @ k1.T / temperature, same2], dim=1)
        return logits1, logits2, labels


def _symmetric_ce(logits1: torch.Tensor, logits2: torch.Tensor, labels: torch.Tensor):
    return (F.cross_entropy(logits1, labels) + F.cross_entropy(logits2, labels)) / 2


@torch.no_grad()
def _top1(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose highest logit is the positive (this rank's rows)."""
    return (logits.argmax(dim=1) == labels).float().mean()


def info_nce(
    za: torch.Tensor, zv: torch.Tensor, temperature: float = 0.07, gather: Gather = "grad"
) -> torch.Tensor:
    """CLIP-style InfoNCE between L2-normalised audio and visual embeddings (B, D): audio i's
    positive is visual i of the same global index and its negatives every other visual sample of
    the global batch; the same from visual to audio; the two directions averaged."""
    return _symmetric_ce(*_info_nce_logits(za, zv, temperature, gather))


def nt_xent(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.07, gather: Gather = "grad"
) -> torch.Tensor:
    """Intra-modal NT-Xent between L2-normalised z_equi (z1) and z_aug (z2), each (B, D): for
    each sample the positive is its partner on the other side; the negatives are all other
    partners and all other samples of its own side across the global batch (self excluded);
    both directions averaged."""
    return _symmetric_ce(*_nt_xent_logits(z1, z2, temperature, gather))


def equiav_loss(
    out: dict[str, torch.Tensor], temperature: float = 0.07, inter_gather_with_grad: bool = True
) -> dict[str, torch.Tensor]:
    """EquiAV's pretraining loss from the model's six embeddings (`EMBEDDING_KEYS`).

    Returns `inter` (InfoNCE on z_inv), `intra_a` / `intra_v` (NT-Xent of z_equi against z_aug,
    always gathered with gradient, as the spec says), `total` = (inter + intra_a + intra_v) / 3,
    and, detached for logging, this rank's top-1 accuracies as fractions: `acc_a2v`, `acc_v2a`
    (inter-modal, each direction) and `acc_intra_a`, `acc_intra_v` (the partner ranked first,
    over both directions). `inter_gather_with_grad=False` is the original's no-gradient
    inter-modal gather (paper_exact).
    """
    missing = [k for k in EMBEDDING_KEYS if k not in out]
    if missing:
        raise KeyError(f"equiav_loss: model output lacks {missing} (has {sorted(out)})")
    inter_gather: Gather = "grad" if inter_gather_with_grad else "nograd"
    a2v, v2a, labels = _info_nce_logits(out["z_inv_a"], out["z_inv_v"], temperature, inter_gather)
    ea, aa, labels_a = _nt_xent_logits(out["z_equi_a"], out["z_aug_a"], temperature, "grad")
    ev, av, labels_v = _nt_xent_logits(out["z_equi_v"], out["z_aug_v"], temperature, "grad")
    inter = _symmetric_ce(a2v, v2a, labels)
    intra_a = _symmetric_ce(ea, aa, labels_a)
    intra_v = _symmetric_ce(ev, av, labels_v)
    return {
        "total": (inter + intra_a + intra_v) / 3,
        "inter": inter,
        "intra_a": intra_a,
        "intra_v": intra_v,
        "acc_a2v": _top1(a2v, labels),
        "acc_v2a": _top1(v2a, labels),
        "acc_intra_a": (_top1(ea, labels_a) + _top1(aa, labels_a)) / 2,
        "acc_intra_v": (_top1(ev, labels_v) + _top1(av, labels_v)) / 2,
    }
