"""The EquiAV finetuning model: pretrained towers + final norms + new linear heads (`ftmode`).

- multimodal: mean-pooled tokens of each tower (after norm_a / norm_v) -> a new
  Linear(embed_dim, ft_proj_dim) per modality -> concat -> Linear(2 * ft_proj_dim, n_classes);
- audio_only / video_only: mean-pooled tokens of that tower -> Linear(embed_dim, n_classes).
  (The original's audio_only head cannot run; ours has the video_only shape: spec, 'Finetune
  heads'.)

Only the towers the mode uses are built, so that every parameter receives a gradient (DDP needs
no unused-parameter search). The pretraining predictors, augmentation encoders, aug-view norms and
heads are not part of this model. `new_parameters()` lists what the finetuning recipe trains at
50x the learning rate.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from equiav.config import DataConfig, ModelConfig
from equiav.model.keymap import (
    CheckpointError,
    LoadReport,
    convert_released,
    copy_into,
    is_released_state,
    read_state_dict,
    strip_wrapper_prefixes,
)
from equiav.model.params import init_weights_
from equiav.model.vit import build_audio_tower, build_visual_tower

FTMODES = ("multimodal", "audio_only", "video_only")


class EquiAVFinetune(nn.Module):
    """Classification on top of the pretrained towers; forward(audio, visual) -> logits."""

    def __init__(self, model: ModelConfig, data: DataConfig, n_classes: int) -> None:
        super().__init__()
        if model.ftmode not in FTMODES:
            raise ValueError(f"model.ftmode {model.ftmode!r} is not one of {', '.join(FTMODES)}")
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
        self.ftmode = model.ftmode
        self.uses_audio = model.ftmode in ("multimodal", "audio_only")
        self.uses_visual = model.ftmode in ("multimodal", "video_only")
        d = model.embed_dim

        self.tower_a = build_audio_tower(model, data) if self.uses_audio else None
        self.norm_a = nn.LayerNorm(d) if self.uses_audio else None
        self.tower_v = build_visual_tower(model, data) if self.uses_visual else None
        self.norm_v = nn.LayerNorm(d) if self.uses_visual else None

        if self.ftmode == "multimodal":
            self.proj_a = nn.Linear(d, model.ft_proj_dim)
            self.proj_v = nn.Linear(d, model.ft_proj_dim)
            self.classifier = nn.Linear(2 * model.ft_proj_dim, n_classes)
        else:
            self.proj_a = self.proj_v = None
            self.classifier = nn.Linear(d, n_classes)
        init_weights_(self)

    def new_modules(self) -> list[nn.Linear]:
        """The Linear layers created for finetuning (not loaded from pretraining)."""
        return [m for m in (self.proj_a, self.proj_v, self.classifier) if m is not None]

    def new_parameters(self) -> list[nn.Parameter]:
        """Parameters of `new_modules()`: the group trained at `optim.head_lr` x the lr."""
        return [p for m in self.new_modules() for p in m.parameters()]

    def pooled_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """(B, 3, F, T) -> (B, embed_dim): mean of the audio tokens after norm_a."""
        return self.norm_a(self.tower_a(audio)).mean(dim=1)

    def pooled_visual(self, visual: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, embed_dim): mean of the visual tokens after norm_v."""
        return self.norm_v(self.tower_v(visual)).mean(dim=1)

    def forward(
        self, audio: torch.Tensor | None = None, visual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """-> logits (B, n_classes). The modality a mode does not use may be None."""
        for needed, value, name in (
            (self.uses_audio, audio, "audio"),
            (self.uses_visual, visual, "visual"),
        ):
            if needed and value is None:
                raise ValueError(f"ftmode {self.ftmode!r} needs the {name} input")
        if self.ftmode == "multimodal":
            x = torch.cat(
                [self.proj_a(self.pooled_audio(audio)), self.proj_v(self.pooled_visual(visual))],
                dim=-1,
            )
        elif self.ftmode == "audio_only":
            x = self.pooled_audio(audio)
        else:
            x = self.pooled_visual(visual)
        return self.classifier(x)

    def load_pretrained(self, source: str | os.PathLike | Mapping[str, torch.Tensor]) -> LoadReport:
        """Load the towers and clean-view norms from a pretraining checkpoint: ours (an
        `EquiAVPretrain` state dict, possibly under `module.` / `_orig_mod.`) or the paper's
        released one (keys under `__M__.`, mapped and position-checked).

        Every tower / norm key of this model must be present (else CheckpointError); the
        pretraining-only entries (predictors, encoders, heads, aug norms, the unused towers of a
        single-modality mode) are reported as ignored.
        """
        if isinstance(source, Mapping):
            state, name = dict(source), "state dict"
        else:
            state, name = read_state_dict(source), str(source)
        if is_released_state(state):
            state, report = convert_released(state, self, source=f"released EquiAV {name}")
        else:
            state, report = strip_wrapper_prefixes(state), LoadReport(f"EquiAV pretrain {name}")
        loadable = tuple(
            f"{prefix}_{m}."
            for m, used in (("a", self.uses_audio), ("v", self.uses_visual))
            if used
            for prefix in ("tower", "norm")
        )
        keep = {k: v for k, v in state.items() if k.startswith(loadable)}
        report.ignored += [k for k in state if k not in keep]
        expected = [k for k in self.state_dict() if k.startswith(loadable)]
        copy_into(self, keep, report, expected)
        if report.missing:
            raise CheckpointError(
                f"{report.source}: lacks {len(report.missing)} tower/norm keys: "
                + ", ".join(report.missing[:8])
            )
        return report
