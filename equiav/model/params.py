"""Parameter initialisation (the spec's scheme) and per-module parameter counts."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from equiav.model.vit import ViTTower


@torch.no_grad()
def init_weights_(model: nn.Module) -> None:
    """Initialise every submodule of `model` in place as the spec says.

    Linear: Xavier-uniform weight, zero bias. Conv2d (the patch embeddings): Xavier-uniform on the
    weight viewed as a (out, in * k * k) linear map, zero bias. LayerNorm: weight 1, bias 0.
    Tower modality vectors: N(0, 0.02). Position embeddings are fixed buffers and stay as built.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, ViTTower):
            nn.init.normal_(module.modality, std=0.02)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable (requires_grad) parameter count per top-level module name, in definition order.

    A parameter held directly by `model` counts under its own name. The total is the sum of the
    values.
    """
    counts: dict[str, int] = defaultdict(int)
    for name, param in model.named_parameters():
        if param.requires_grad:
            counts[name.split(".", 1)[0]] += param.numel()
    return dict(counts)
