"""Matmul FLOPs of an EquiAV training step, counted from the model's shapes (for MFU).

Every linear layer and attention matmul of shape (m x k) @ (k x n) counts 2 * m * k * n FLOPs;
the patch embedding (a 16 x 16 convolution with stride 16) counts as the matmul it is, tokens x
(3 * 16 * 16) x width. Elementwise work (norms, activations, softmax, residuals, biases, means,
the optimizer) is not counted: it is memory-bound and small next to the matmuls, and the MFU
convention leaves it out. A training step counts 3 x the forward FLOPs (backward = one matmul
for the input gradient and one for the weight gradient per forward matmul): the usual "model
FLOPs" convention, which gives no credit for recomputation.

What the pretraining forward runs per sample (`EquiAVPretrain.forward`, shapes from `ModelConfig`
and `DataConfig`):

- each tower on two views (clean + augmented): audio 128 x 1024 -> 8 x 64 = 512 tokens, visual
  224 x 224 -> 14 x 14 = 196 tokens; per view the patch embedding and `depth` pre-norm blocks
  (qkv, q @ k^T, attention @ v, output projection, two MLP layers);
- per modality one augmentation-encoder call on 1 + cen_num query vectors (three linears), one
  predictor call (q projection of the queries, k / v projections of the clean tokens, shared by
  all queries as our model computes them once, cross-attention, output projection, the MLP on the
  queries), and the projection heads on three rows (z_equi, z_aug: intra head; z_inv: inter head);
- the loss: ten (B x head_out) @ (head_out x global batch) logit matmuls (InfoNCE: 2, NT-Xent:
  4 per modality).

Comparison with MEASURED.md's estimate (~790 GFLOP per pretrain sample, forward and backward, at
the paper's size): this count gives 797.9 GFLOP. The four tower passes alone are 793.1 GFLOP
(3 x (2 x 97.24 + 2 x 34.94) forward): the estimate is that, rounded. The predictors (mainly their
k / v projections of the 512 audio and 196 visual tokens) add 4.5 GFLOP, the heads 0.25 and the
aug encoders and the loss almost nothing: 0.6 % together. `torch.utils.flop_counter.FlopCounterMode`
measures 796.2 GFLOP on the real model: autograd skips the input gradient of the layers that read
data (the patch embeddings and the first aug-encoder linears: `FlopCount.input_layers`), 1.7 GFLOP
per sample, which `executed_train_total` subtracts. The finetuning model (one view per tower,
linear heads) is 3 x 132.2 = 396.6 GFLOP per sample.
"""

from __future__ import annotations

from dataclasses import dataclass

from equiav.config import DataConfig, ModelConfig


def matmul_flops(m: int, k: int, n: int) -> int:
    """FLOPs of an (m x k) @ (k x n) matmul: m * n dot products of length k, a multiply and an
    add each."""
    return 2 * m * k * n


def vit_block_flops(tokens: int, dim: int, mlp_hidden: int) -> int:
    """Forward matmul FLOPs of one pre-norm ViT block (timm `Block`) on one sequence of `tokens`
    tokens: qkv projection, q @ k^T and attention @ v over all heads (heads x head_dim = dim),
    output projection, and the two MLP layers."""
    qkv = matmul_flops(tokens, dim, 3 * dim)
    scores = matmul_flops(tokens, dim, tokens)  # summed over heads: heads * head_dim = dim
    weighted = matmul_flops(tokens, tokens, dim)
    proj = matmul_flops(tokens, dim, dim)
    mlp = matmul_flops(tokens, dim, mlp_hidden) + matmul_flops(tokens, mlp_hidden, dim)
    return qkv + scores + weighted + proj + mlp


def patch_embed_flops(tokens: int, in_chans: int, patch_size: int, dim: int) -> int:
    """The non-overlapping patch convolution as the matmul it is:
    (tokens x in_chans * p * p) @ (in_chans * p * p x dim)."""
    return matmul_flops(tokens, in_chans * patch_size * patch_size, dim)


def _tokens(height: int, width: int, patch_size: int) -> int:
    return (height // patch_size) * (width // patch_size)


def _mlp_hidden(model: ModelConfig) -> int:
    return int(model.embed_dim * model.mlp_ratio)  # as timm's Block and Mlp round it


def _tower_forward(model: ModelConfig, tokens: int) -> tuple[int, int]:
    """(patch embedding, blocks) forward FLOPs of one view of one sample through a tower."""
    patch = patch_embed_flops(tokens, 3, model.patch_size, model.embed_dim)
    blocks = model.depth * vit_block_flops(tokens, model.embed_dim, _mlp_hidden(model))
    return patch, blocks


def _head_flops(model: ModelConfig) -> int:
    """One row through a ProjectionHead: in -> hidden -> hidden -> out."""
    d, h, o = model.embed_dim, model.head_hidden, model.head_out
    return matmul_flops(1, d, h) + matmul_flops(1, h, h) + matmul_flops(1, h, o)


@dataclass(frozen=True)
class FlopCount:
    """Matmul FLOPs of one training step's forward pass on `batch` samples, by part.

    `input_layers` is the part of `forward` done by layers whose input is data (no gradient is
    computed for it in backward).
    """

    batch: int
    forward: dict[str, int]
    input_layers: int

    @property
    def forward_total(self) -> int:
        """Forward FLOPs of the whole batch."""
        return sum(self.forward.values())

    @property
    def train_total(self) -> int:
        """Forward + backward FLOPs of the batch by the MFU convention: 3 x forward."""
        return 3 * self.forward_total

    @property
    def train_per_sample(self) -> float:
        """`train_total` / batch."""
        return self.train_total / self.batch

    @property
    def executed_train_total(self) -> int:
        """Forward + backward FLOPs that autograd runs: 3 x forward minus the input gradients of
        the layers that read data (what FlopCounterMode measures with math attention)."""
        return self.train_total - self.input_layers


def pretrain_flops(
    model: ModelConfig, data: DataConfig, batch: int, world_size: int = 1
) -> FlopCount:
    """Matmul FLOPs of `EquiAVPretrain.forward` + `equiav_loss` on `batch` samples per process
    (`world_size` processes: the loss scores each row against the global batch)."""
    if batch < 1 or world_size < 1:
        raise ValueError(f"batch ({batch}) and world_size ({world_size}) must be >= 1")
    d, p = model.embed_dim, model.patch_size
    audio_tokens = _tokens(data.num_mel_bins, data.target_length, p)
    visual_tokens = _tokens(data.image_size, data.image_size, p)
    queries = 1 + model.cen_num if model.cen_mean else 1
    inner = model.predictor_heads * model.predictor_head_dim
    aug_h = model.aug_hidden

    forward: dict[str, int] = {}
    input_layers = 0
    for name, tokens, t_size in (
        ("audio", audio_tokens, model.aug_size_a),
        ("visual", visual_tokens, model.aug_size_v),
    ):
        patch, blocks = _tower_forward(model, tokens)
        forward[f"{name}_patch_embed"] = 2 * batch * patch  # clean + augmented view
        forward[f"{name}_blocks"] = 2 * batch * blocks
        first = matmul_flops(queries, t_size, aug_h)
        encoder = first + 2 * matmul_flops(queries, aug_h, aug_h)
        forward[f"{name}_aug_encoder"] = batch * encoder
        predictor = (
            matmul_flops(queries, aug_h, inner)  # to_q
            + 2 * matmul_flops(tokens, d, inner)  # to_k, to_v
            + matmul_flops(queries, inner, tokens)  # q @ k^T over the heads
            + matmul_flops(queries, tokens, inner)  # attention @ v
            + matmul_flops(queries, inner, d)  # to_out
            + matmul_flops(queries, d, _mlp_hidden(model))
            + matmul_flops(queries, _mlp_hidden(model), d)
        )
        forward[f"{name}_predictor"] = batch * predictor
        forward[f"{name}_heads"] = batch * 3 * _head_flops(model)  # z_equi, z_aug, z_inv
        input_layers += 2 * batch * patch + batch * first
    forward["loss"] = 10 * matmul_flops(batch, model.head_out, batch * world_size)
    return FlopCount(batch, forward, input_layers)


def finetune_flops(model: ModelConfig, data: DataConfig, batch: int, n_classes: int) -> FlopCount:
    """Matmul FLOPs of `EquiAVFinetune.forward` (model.ftmode) on `batch` samples; the BCE / CE
    loss has no matmul."""
    if batch < 1 or n_classes < 1:
        raise ValueError(f"batch ({batch}) and n_classes ({n_classes}) must be >= 1")
    p = model.patch_size
    towers = {
        "audio": _tokens(data.num_mel_bins, data.target_length, p),
        "visual": _tokens(data.image_size, data.image_size, p),
    }
    used = {"multimodal": ("audio", "visual"), "audio_only": ("audio",)}.get(
        model.ftmode, ("visual",)
    )
    forward: dict[str, int] = {}
    input_layers = 0
    for name in used:
        patch, blocks = _tower_forward(model, towers[name])
        forward[f"{name}_patch_embed"] = batch * patch
        forward[f"{name}_blocks"] = batch * blocks
        input_layers += batch * patch
    if model.ftmode == "multimodal":
        proj = 2 * matmul_flops(batch, model.embed_dim, model.ft_proj_dim)
        forward["heads"] = proj + matmul_flops(batch, 2 * model.ft_proj_dim, n_classes)
    else:
        forward["heads"] = matmul_flops(batch, model.embed_dim, n_classes)
    return FlopCount(batch, forward, input_layers)
