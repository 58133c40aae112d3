"""The ViT tower shared by both modalities: patch embedding, fixed 2-D sin-cos positions, blocks.

A tower maps an image-like input (B, 3, H, W) to its token sequence (B, H/16 * W/16, width),
BEFORE any final LayerNorm: EquiAV keeps one final norm per view (`norm_a` for the clean audio
view, `norm_a_aug` for the augmented one, same for visual), so the norms live in the models that
own the towers. There is no class token.

Audio: the input is the fbank as (B, 3, F, T) = (B, 3, 128, 1024), giving an 8 x 64 grid (frequency
rows, time columns). Visual: (B, 3, 224, 224), a 14 x 14 grid. Both sizes come from the config.

The blocks are timm's `Block` (pre-norm attention + MLP). Their attention calls
`torch.nn.functional.scaled_dot_product_attention` when its `fused_attn` flag is set; timm sets
that flag from a global switch (`TIMM_FUSED_ATTN`, `timm.layers.set_fused_attn`) at
construction, so the tower sets it on every block itself (`force_fused_attention`) to use SDPA
whatever that switch says.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention, Mlp
from timm.models.vision_transformer import Block
from torch import nn

from equiav.config import DataConfig, ModelConfig
from kernels.float8 import Float8Linear, linear_fn
from kernels.gelu import GELU as TritonGELU
from kernels.gelu import bias_gelu


def sincos_pos_embed_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Sin-cos codes of `positions` (M,): (M, embed_dim) = [sin(p w_k) | cos(p w_k)], k < D/2,
    w_k = 10000^(-k / (D/2)). Computed in float64."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {embed_dim}")
    half = embed_dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / half)
    angles = positions.to(torch.float64).reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_pos_embed_2d(embed_dim: int, grid_rows: int, grid_cols: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings, laid out as MAE's helper lays them out.

    Returns float32 (grid_rows * grid_cols, embed_dim); token n is grid cell (n // cols, n % cols),
    i.e. row-major, which is the order of a flattened patch-embedding conv output. Channels
    [0, D/2) are the 1-D code of the cell's COLUMN index and [D/2, D) of its ROW index: MAE builds
    its grid with `meshgrid(w, h)`, so the half it labels "h" receives the column coordinate. The
    released EquiAV checkpoints hold exactly this layout.
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding width must be a multiple of 4, got {embed_dim}")
    rows = torch.arange(grid_rows).repeat_interleave(grid_cols)  # 0,0,..,0,1,1,..
    cols = torch.arange(grid_cols).repeat(grid_rows)  # 0,1,..,C-1,0,1,..
    emb = torch.cat(
        [sincos_pos_embed_1d(embed_dim // 2, cols), sincos_pos_embed_1d(embed_dim // 2, rows)],
        dim=1,
    )
    return emb.float()


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` patches -> tokens (B, H/p * W/p, embed_dim), row-major.

    The same function and parameters as timm's ``PatchEmbed`` (a p x p convolution with stride p,
    kept as ``proj`` so that checkpoints and MAE weights load unchanged), computed as the matmul
    it is: the patches are cut out with a reshape and multiplied by the flattened kernel. On an
    H100 cuDNN ran the 16 x 16 / stride-16 convolution at a fraction of its matmul speed (14.5 of
    310 ms of a compiled batch-128 pretraining step, forward and backward) and spent ~2 ms of host
    time per call choosing it; as a linear layer it is one small GEMM.
    """

    def __init__(
        self, img_size: tuple[int, int], patch_size: int, in_chans: int, embed_dim: int
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.patch_size
        gh, gw = h // p, w // p
        # (B, C, gh, p, gw, p) -> (B, gh, gw, C, p, p): each row holds one patch in the
        # (channel, row, column) order of the flattened kernel.
        patches = x.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, -1)
        return nn.functional.linear(patches, self.proj.weight.flatten(1), self.proj.bias)


def force_fused_attention(blocks: nn.ModuleList) -> None:
    """Make every block's attention call `F.scaled_dot_product_attention` (see module doc)."""
    for block in blocks:
        block.attn.fused_attn = True


class BiasGELUMlp(Mlp):
    """timm's Mlp (the same parameters and state dict) with fc1's bias and the exact GELU in
    one op, `kernels.gelu.bias_gelu`: on CUDA its backward kernel also sums fc1's bias gradient,
    which a separate reduction over the (tokens, hidden) gradient would read again."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **{**kwargs, "act_layer": nn.Identity})  # GELU is in bias_gelu
        if self.fc1.bias is None or not isinstance(self.fc1, nn.Linear):
            raise ValueError("BiasGELUMlp needs fc1 as a Linear layer with a bias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = bias_gelu(linear_fn(self.fc1)(x, self.fc1.weight), self.fc1.bias)
        x = self.drop1(x)
        x = self.norm(x)
        x = self.fc2(x)
        return self.drop2(x)


class SplitQKVAttention(Attention):
    """timm's Attention (the same parameters and state dict) with q, k and v as three GEMMs on
    thirds of `qkv` instead of one, then `scaled_dot_product_attention`.

    Why: with one GEMM, q, k and v are strided views into its (B, N, 3, H, D) output, but the
    GPU attention kernels return their gradients as three buffers of their own (dense, in q's
    dimension order), so stacking those into the GEMM's (B, N, 3, H, D) gradient is a copy of
    3 x tokens x 768 values per block (5.4 ms of a compiled batch-128 pretraining step on an
    H200: `clone_permute_stack` in `bench/results/profile-step-master-b128-h200.json`). Here
    each of q, k, v is a dense (B, N, H, D) tensor seen as (B, H, N, D): its gradient comes back
    in that layout, which is its linear's (B*N, H*D) output gradient as it lies. The cost: three
    GEMMs of 768 outputs instead of one of 2304 (forward, input and weight gradients). It
    always calls `scaled_dot_product_attention` (the towers force timm's `fused_attn` anyway).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        extras = [
            name
            for name in ("q_norm", "k_norm", "norm")
            if not isinstance(getattr(self, name, nn.Identity()), nn.Identity)
        ]
        if getattr(self, "gate", None) is not None:
            extras.append("gate")
        if extras or self.qkv.bias is None:
            raise ValueError(
                f"SplitQKVAttention is for ViT-B's plain attention with a qkv bias; got "
                f"{', '.join(extras) or 'qkv without a bias'}"
            )

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        b, n, _ = x.shape
        h, d = self.num_heads, self.head_dim
        linear = linear_fn(self.qkv)  # F.linear, or float8 GEMMs (model.linear)
        q, k, v = (
            linear(x, w, bias).view(b, n, h, d).transpose(1, 2)
            for w, bias in zip(self.qkv.weight.chunk(3), self.qkv.bias.chunk(3), strict=True)
        )
        x = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.attn_drop.p if self.training else 0.0,
            is_causal=is_causal,
        )
        x = x.transpose(1, 2).reshape(b, n, h * d)
        return self.proj_drop(self.proj(x))


class ViTTower(nn.Module):
    """Patch embedding + fixed sin-cos positions + learned modality vector + transformer blocks.

    `forward` returns the token sequence before the final norm, (B, num_patches, embed_dim).
    `pos_embed` is a non-persistent buffer (regenerated, never trained, never saved).
    """

    def __init__(
        self,
        name: str,
        input_size: tuple[int, int],
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        in_chans: int = 3,
        act_layer: type[nn.Module] = nn.GELU,
        mlp_layer: type[nn.Module] = Mlp,
        attn_layer: type[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        height, width = input_size
        if height % patch_size or width % patch_size:
            raise ValueError(
                f"{name} tower: input size {input_size} is not a multiple of the patch size "
                f"{patch_size}"
            )
        self.name = name
        self.input_shape = (in_chans, height, width)
        self.patch_embed = PatchEmbed((height, width), patch_size, in_chans, embed_dim)
        self.grid_size: tuple[int, int] = tuple(self.patch_embed.grid_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.register_buffer(
            "pos_embed", sincos_pos_embed_2d(embed_dim, *self.grid_size)[None], persistent=False
        )
        self.modality = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # The original uses torch's LayerNorm (eps 1e-5), not timm's default (eps 1e-6); the
        # same drop-path rate in every block, as the original finetuning model does.
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=True,
                drop_path=drop_path,
                norm_layer=nn.LayerNorm,
                act_layer=act_layer,
                mlp_layer=mlp_layer,
                # passed for split only: the default is timm's attention, whatever Block takes
                **({"attn_layer": attn_layer} if attn_layer is not None else {}),
            )
            for _ in range(depth)
        )
        force_fused_attention(self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> tokens (B, num_patches, embed_dim), before the final norm."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"{self.name} tower expects input (B, {', '.join(map(str, self.input_shape))}), "
                f"got {tuple(x.shape)}"
            )
        x = self.patch_embed(x) + self.pos_embed + self.modality
        for block in self.blocks:
            x = block(x)
        return x


def audio_input_size(data: DataConfig) -> tuple[int, int]:
    """(F, T): the audio tower's input height (mel bins) and width (frames)."""
    return (data.num_mel_bins, data.target_length)


def visual_input_size(data: DataConfig) -> tuple[int, int]:
    """(H, W) of the visual tower's input."""
    return (data.image_size, data.image_size)


def use_float8_linears(blocks: nn.ModuleList) -> None:
    """Run the blocks' four linear layers (qkv, proj, fc1, fc2) with float8 GEMMs
    (`kernels.float8`; model.linear=float8), keeping their parameters and state dict."""
    for block in blocks:
        for part, name in (("attn", "qkv"), ("attn", "proj"), ("mlp", "fc1"), ("mlp", "fc2")):
            owner = getattr(block, part)
            layer = getattr(owner, name)
            if type(layer) is not nn.Linear:
                raise TypeError(f"float8 linears replace nn.Linear, found {type(layer).__name__}")
            setattr(owner, name, Float8Linear.taking_over(layer))


def _tower(name: str, size: tuple[int, int], model: ModelConfig) -> ViTTower:
    tower = ViTTower(
        name,
        size,
        patch_size=model.patch_size,
        embed_dim=model.embed_dim,
        depth=model.depth,
        num_heads=model.num_heads,
        mlp_ratio=model.mlp_ratio,
        drop_path=model.drop_path,
        # The same exact GELU either way; "triton", "triton-bias": our kernels on CUDA
        # (kernels/gelu.py)
        act_layer=TritonGELU if model.gelu == "triton" else nn.GELU,
        mlp_layer=BiasGELUMlp if model.gelu == "triton-bias" else Mlp,
        attn_layer=SplitQKVAttention if model.qkv == "split" else None,  # None: timm's
    )
    if model.linear == "float8":
        use_float8_linears(tower.blocks)
    return tower


def build_audio_tower(model: ModelConfig, data: DataConfig) -> ViTTower:
    """The audio tower for inputs (B, 3, num_mel_bins, target_length)."""
    return _tower("audio", audio_input_size(data), model)


def build_visual_tower(model: ModelConfig, data: DataConfig) -> ViTTower:
    """The visual tower for inputs (B, 3, image_size, image_size)."""
    return _tower("visual", visual_input_size(data), model)
