"""Loading weights from other people's checkpoints into our models, through explicit key maps.

Two sources:

1. A MAE ViT-B checkpoint (`{"model": {timm names}}`: `patch_embed.proj.*`, `blocks.N.*`,
   `norm.*`, `cls_token`, `pos_embed`, possibly a decoder) copied into one tower:
   `patch_embed.*` -> `tower_m.patch_embed.*`, `blocks.N.*` -> `tower_m.blocks.N.*` (the same
   timm names), `norm.*` -> the clean-view final norm `norm_m` only (the augmented-view norm keeps
   its initialisation). `cls_token` and `pos_embed` are not used (no class token; our positions
   are fixed sin-cos); `tower_m.modality` is not in MAE and keeps its initialisation.
2. The paper's released pretraining checkpoint: the state dict of the original's wrapper, every
   key prefixed `__M__.`, mapped by `RELEASED_PREFIXES` (ours <-> theirs, per modality). Its
   per-block LayerNorms `norm1_a`, `norm1_v`, `norm2_a`, `norm2_v` are never used by the
   original's forward pass and are dropped; its `pos_embed_{a,v}` must equal our fixed buffers
   (a transposed grid is an error).

Every loader returns a `LoadReport` (keys used, missing, unexpected, ignored); a shape mismatch is
a `CheckpointError` naming the key, raised before anything is copied.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

RELEASED_PREFIX = "__M__."
MODALITIES = ("a", "v")

# (our prefix, released prefix) per modality; a prefix without a trailing dot is a whole key.
# Inside blocks / predictors / heads the sub-names are the same on both sides (timm's Block names,
# norm_aug, attn.to_q, attn.to_k, attn.to_v, attn.to_out, norm, mlp.fc1, mlp.fc2, fc1..norm3).
RELEASED_PREFIXES: tuple[tuple[str, str], ...] = tuple(
    pair
    for m in MODALITIES
    for pair in (
        (f"tower_{m}.patch_embed.", f"patch_embed_{m}."),
        (f"tower_{m}.modality", f"modality_{m}"),
        (f"tower_{m}.blocks.", f"blocks_{m}."),
        (f"norm_{m}.", f"norm_{m}."),
        (f"norm_{m}_aug.", f"norm_{m}_aug."),
        (f"aug_encoder_{m}.", f"aug_encoder_{m}."),
        (f"predictor_{m}.", f"cross_attn_{m}."),
        (f"head_{m}_intra.", f"pred_{m}_intra."),
        (f"head_{m}_inter.", f"pred_{m}_inter."),
    )
)
# The original's per-block norms that its forward pass never uses.
_UNUSED_BLOCK_NORM = re.compile(r"^blocks_[av]\.\d+\.norm[12]_[av]\.(weight|bias)$")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP, torch.compile


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file or key and why."""


@dataclass
class LoadReport:
    """What a load did. `used`: checkpoint keys copied in; `missing`: model keys the checkpoint
    did not provide (they keep their values); `unexpected`: checkpoint keys with no place in the
    model; `ignored`: checkpoint keys known to be unused (or only checked)."""

    source: str
    used: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def summary(self, max_keys: int = 8) -> str:
        """One line per non-empty list, each with up to `max_keys` names."""

        def names(keys: list[str]) -> str:
            more = f", ... (+{len(keys) - max_keys})" if len(keys) > max_keys else ""
            return ", ".join(keys[:max_keys]) + more

        lines = [f"{self.source}: {len(self.used)} tensors loaded"]
        for label in ("missing", "unexpected", "ignored"):
            keys = getattr(self, label)
            if keys:
                lines.append(f"  {label} ({len(keys)}): {names(keys)}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Files and generic copying
# ---------------------------------------------------------------------------------------------


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file: the file's `model` / `state_dict` entry if it has one,
    else the file's top-level dict. Loaded on the CPU with `weights_only=True` (no arbitrary
    pickled objects)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for bad or unsafe pickles
        raise CheckpointError(f"{path}: cannot load as a weights-only torch checkpoint: {e}") from e
    for key in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path}: expected a state dict (a mapping of names to tensors)")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{path}: entries that are not tensors: {', '.join(map(str, bad[:5]))}"
        )
    return dict(obj)


def strip_wrapper_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop leading `module.` (DDP) and `_orig_mod.` (torch.compile) from every key."""
    out = {}
    for key, value in state.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def _source_state(source: str | os.PathLike | Mapping[str, torch.Tensor]) -> tuple[dict, str]:
    if isinstance(source, Mapping):
        return dict(source), "state dict"
    return read_state_dict(source), str(source)


def copy_into(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    report: LoadReport,
    expected: list[str] | None = None,
    names: Mapping[str, str] | None = None,
) -> LoadReport:
    """Copy the `state` entries (our key names) into `model` after checking every shape.

    Keys of `state` that the model lacks go to `report.unexpected`; model keys among `expected`
    (default: all of the model's state dict) that `state` lacks go to `report.missing`. `names`
    maps our keys to the checkpoint's, for `used`, `unexpected` and errors (default: ours).
    """
    names = names or {}
    targets = model.state_dict()
    for key, value in state.items():
        if key in targets and tuple(value.shape) != tuple(targets[key].shape):
            where = f"{names[key]} (-> {key})" if key in names else key
            raise CheckpointError(
                f"{report.source}: {where}: checkpoint shape {tuple(value.shape)} does not "
                f"match the model's {tuple(targets[key].shape)}"
            )
    with torch.no_grad():
        for key, value in state.items():
            if key in targets:
                targets[key].copy_(value)
                report.used.append(names.get(key, key))
            else:
                report.unexpected.append(names.get(key, key))
    expected = list(targets) if expected is None else expected
    report.missing.extend(k for k in expected if k not in state)
    return report


# ---------------------------------------------------------------------------------------------
# MAE
# ---------------------------------------------------------------------------------------------


def load_mae_encoder(
    model: nn.Module, modality: str, source: str | os.PathLike | Mapping[str, torch.Tensor]
) -> LoadReport:
    """Copy a MAE ViT encoder into `model.tower_{modality}` and `model.norm_{modality}`.

    `source` is a checkpoint path or an already-loaded dict (its `model` entry if present).
    Report keys are the checkpoint's names (used, unexpected, ignored) and ours (missing).
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be 'a' or 'v', got {modality!r}")
    state, name = _source_state(source)
    if isinstance(state.get("model"), Mapping):
        state = dict(state["model"])
    state = strip_wrapper_prefixes(state)
    report = LoadReport(f"MAE encoder {name} -> tower_{modality}")
    tower_prefix, norm_prefix = f"tower_{modality}.", f"norm_{modality}."
    mapped, names = {}, {}
    for key, value in state.items():
        if key in ("cls_token", "pos_embed"):
            report.ignored.append(key)
            continue
        if key.startswith(("patch_embed.", "blocks.")):
            ours = tower_prefix + key
        elif key.startswith("norm."):
            ours = norm_prefix + key[len("norm.") :]
        else:
            report.unexpected.append(key)
            continue
        mapped[ours], names[ours] = value, key
    expected = [k for k in model.state_dict() if k.startswith((tower_prefix, norm_prefix))]
    return copy_into(model, mapped, report, expected, names)


def load_mae_encoders(
    model: nn.Module, audio: str | None = None, visual: str | None = None
) -> dict[str, LoadReport]:
    """Load the MAE checkpoints named by `model.audio_pretrained_encoder` /
    `model.visual_pretrained_encoder` (pass them here) into whichever towers `model` has.

    Returns {"a": report, "v": report} for the towers loaded. A path given for a tower the model
    does not have (a single-modality finetune) is an error.
    """
    reports = {}
    for modality, path in (("a", audio), ("v", visual)):
        if path is None:
            continue
        if getattr(model, f"tower_{modality}", None) is None:
            raise CheckpointError(f"{path}: the model has no tower_{modality} to load it into")
        reports[modality] = load_mae_encoder(model, modality, path)
    return reports


# ---------------------------------------------------------------------------------------------
# The released EquiAV pretraining checkpoint
# ---------------------------------------------------------------------------------------------


def _swap_prefix(key: str, pairs: list[tuple[str, str]]) -> str | None:
    for src, dst in pairs:
        if src.endswith("."):
            if key.startswith(src):
                return dst + key[len(src) :]
        elif key == src:
            return dst
    return None


def released_key(ours: str) -> str:
    """Our pretraining-model key -> the released checkpoint's key (without `__M__.`)."""
    theirs = _swap_prefix(ours, list(RELEASED_PREFIXES))
    if theirs is None:
        raise KeyError(f"{ours}: no released-checkpoint name for this key")
    return theirs


def ours_key(released: str) -> str | None:
    """The released checkpoint's key (without `__M__.`) -> ours, or None when it has no place."""
    return _swap_prefix(released, [(t, o) for o, t in RELEASED_PREFIXES])


def to_released(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our pretraining state dict under the released names (no `__M__.` prefix, no position
    embeddings, no unused per-block norms): the inverse of the map `convert_released` applies."""
    return {released_key(k): v for k, v in state.items()}


def check_pos_embed(model: nn.Module, modality: str, value: torch.Tensor, key: str) -> None:
    """Raise unless a checkpoint's position embedding equals `model.tower_{modality}.pos_embed`."""
    ours = getattr(model, f"tower_{modality}").pos_embed
    theirs = value.detach().to(torch.float32).reshape(-1, *ours.shape[1:]).cpu()
    if value.numel() != ours.numel():
        raise CheckpointError(
            f"{key}: shape {tuple(value.shape)} does not match our {tuple(ours.shape)} "
            "(different input geometry?)"
        )
    diff = (theirs - ours[0].cpu()).abs().max().item()
    if diff > 1e-5:
        raise CheckpointError(
            f"{key}: differs from our fixed 2-D sin-cos embedding by up to {diff:.3g} "
            "(a transposed or differently laid-out grid?)"
        )


def convert_released(
    state: Mapping[str, torch.Tensor], model: nn.Module, source: str = "released checkpoint"
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Map a released EquiAV pretraining state dict to our names.

    Checks `pos_embed_{a,v}` against the towers `model` has, drops the unused per-block norms
    (both into `report.ignored`), and reports keys without a mapping as unexpected. Returns
    (our state dict, report); nothing is copied.
    """
    report = LoadReport(source)
    out = {}
    for full_key, value in strip_wrapper_prefixes(state).items():
        if not full_key.startswith(RELEASED_PREFIX):
            report.unexpected.append(full_key)  # e.g. the loss modules' entries
            continue
        key = full_key[len(RELEASED_PREFIX) :]
        if key in ("pos_embed_a", "pos_embed_v"):
            modality = key[-1]
            if getattr(model, f"tower_{modality}", None) is not None:
                check_pos_embed(model, modality, value, full_key)
            report.ignored.append(full_key)
        elif _UNUSED_BLOCK_NORM.match(key):
            report.ignored.append(full_key)
        else:
            ours = ours_key(key)
            if ours is None:
                report.unexpected.append(full_key)
            else:
                out[ours] = value
    return out, report


def is_released_state(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict looks like the released checkpoint (keys under `__M__.`)."""
    return any(k.startswith(RELEASED_PREFIX) for k in strip_wrapper_prefixes(state))


def load_released_checkpoint(
    model: nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor]
) -> LoadReport:
    """Load the released pretraining checkpoint (path or state dict) into an `EquiAVPretrain`.

    Every model key must be provided (a partial checkpoint is an error naming what is missing).
    """
    state, name = _source_state(source)
    converted, report = convert_released(state, model, source=f"released EquiAV {name}")
    names = {k: RELEASED_PREFIX + released_key(k) for k in converted}
    copy_into(model, converted, report, names=names)
    _require_complete(report)
    return report


def load_pretrain_checkpoint(
    model: nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor]
) -> LoadReport:
    """Load a pretraining checkpoint into an `EquiAVPretrain`: the released one (keys under
    `__M__.`, through the key map) or ours (its state dict, possibly under `module.` /
    `_orig_mod.`). Every model key must be provided."""
    state, name = _source_state(source)
    if is_released_state(state):
        return load_released_checkpoint(model, state)
    report = LoadReport(f"EquiAV pretrain {name}")
    copy_into(model, strip_wrapper_prefixes(state), report)
    _require_complete(report)
    return report


def _require_complete(report: LoadReport) -> None:
    if report.missing:
        raise CheckpointError(
            f"{report.source}: the checkpoint lacks {len(report.missing)} model keys: "
            + ", ".join(report.missing[:8])
        )
