"""The EquiAV model: towers, predictor, heads, outputs, initialisation, checkpoint maps, finetuning.

Tiny towers with the demo geometry (configs/demo.yaml: width 64, depth 2, audio 128 x 512, image
112) on the CPU; the references are written out here from the spec, independently of the model
code, and compared in float64. One test builds the paper-size model.
"""

from __future__ import annotations

import dataclasses
import io
import math
from pathlib import Path

import pytest
import timm.layers
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from equiav.config import Config, DataConfig, ModelConfig, apply_yaml
from equiav.model import (
    CheckpointError,
    EquiAVFinetune,
    EquiAVPretrain,
    count_parameters,
    init_weights_,
    load_mae_encoders,
    load_pretrain_checkpoint,
    load_released_checkpoint,
    sincos_pos_embed_2d,
)
from equiav.model.keymap import to_released

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
B = 2


@pytest.fixture(scope="module")
def demo_cfg() -> Config:
    return apply_yaml(Config(), DEMO)


def tiny(cfg: Config, **model_overrides) -> tuple[ModelConfig, DataConfig]:
    # The paper's model (cen_mean on) at the demo's sizes; the demo itself pretrains without it.
    overrides = {"cen_mean": True, **model_overrides}
    return dataclasses.replace(cfg.model, **overrides), cfg.data


def inputs(model_cfg: ModelConfig, data: DataConfig, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    audio_shape = (B, 3, data.num_mel_bins, data.target_length)
    visual_shape = (B, 3, data.image_size, data.image_size)
    n = model_cfg.cen_num
    return dict(
        audio=rand(*audio_shape),
        visual=rand(*visual_shape),
        audio_aug=rand(*audio_shape),
        visual_aug=rand(*visual_shape),
        t_a=rand(B, 24),
        t_v=rand(B, 18),
        t_a_cen=rand(B, n, 24),
        t_v_cen=rand(B, n, 18),
    )


# ---------------------------------------------------------------------------------------------
# References written from the spec
# ---------------------------------------------------------------------------------------------


def direct_sincos(dim: int, rows: int, cols: int, tokens: list[int]) -> torch.Tensor:
    """MAE's layout, one scalar at a time: token n = (r, c) row-major; channels [0, D/4) sin of the
    column, [D/4, D/2) cos of the column, then sin / cos of the row; frequency 10000^(-k/(D/4))."""
    quarter = dim // 4
    out = torch.empty(len(tokens), dim, dtype=torch.float64)
    for i, n in enumerate(tokens):
        r, c = divmod(n, cols)
        for j in range(dim):
            pos = c if j < 2 * quarter else r
            k = j % quarter
            angle = pos * 10000.0 ** (-k / quarter)
            out[i, j] = math.sin(angle) if (j // quarter) % 2 == 0 else math.cos(angle)
    return out


def ref_layernorm(x, ln):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * ln.weight + ln.bias


def ref_linear(x, lin):
    y = x @ lin.weight.T
    return y if lin.bias is None else y + lin.bias


def ref_attention(q, k, v):  # (B, H, Nq, d), (B, H, N, d)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return w @ v


def ref_tower(tower, x):
    """Patches cut out by hand (row-major over the grid), explicit attention and MLP."""
    b, c, h, w = x.shape
    p = 16
    patches = (
        x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
    )
    conv = tower.patch_embed.proj
    t = patches @ conv.weight.reshape(conv.weight.shape[0], -1).T + conv.bias
    t = t + tower.pos_embed + tower.modality
    for blk in tower.blocks:
        heads = blk.attn.num_heads
        y = ref_linear(ref_layernorm(t, blk.norm1), blk.attn.qkv)
        q, k, v = y.reshape(b, t.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)
        a = ref_attention(q, k, v).transpose(1, 2).reshape(b, t.shape[1], -1)
        t = t + ref_linear(a, blk.attn.proj)
        y = F.gelu(ref_linear(ref_layernorm(t, blk.norm2), blk.mlp.fc1))
        t = t + ref_linear(y, blk.mlp.fc2)
    return t


def ref_aug_encoder(enc, t):
    def quick_gelu(x):
        return x * torch.sigmoid(1.702 * x)

    return ref_linear(quick_gelu(ref_linear(quick_gelu(ref_linear(t, enc[0])), enc[2])), enc[4])


def ref_predictor(pred, tokens, queries):
    """The original's block, one call per group of queries."""
    at = pred.attn
    b, nq = queries.shape[:2]

    def heads(x):
        return x.reshape(b, x.shape[1], at.num_heads, at.head_dim).transpose(1, 2)

    q = heads(ref_linear(ref_layernorm(queries, pred.norm_aug), at.to_q))
    k, v = heads(ref_linear(tokens, at.to_k)), heads(ref_linear(tokens, at.to_v))
    a = ref_attention(q, k, v).transpose(1, 2).reshape(b, nq, -1) @ at.to_out.weight.T
    x = tokens.mean(1, keepdim=True).repeat(1, nq, 1) + a
    y = F.gelu(ref_linear(ref_layernorm(x, pred.norm), pred.mlp.fc1))
    x = x + ref_linear(y, pred.mlp.fc2)
    return x.mean(1)


def ref_head(head, x):
    x = torch.relu(ref_layernorm(ref_linear(x, head.fc1), head.norm1))
    x = torch.relu(ref_layernorm(ref_linear(x, head.fc2), head.norm2))
    return ref_layernorm(ref_linear(x, head.fc3), head.norm3)


def ref_outputs(model: EquiAVPretrain, x: dict, cen_mean: bool) -> dict:
    out = {}
    for m, clean, aug, t, t_cen in (
        ("a", x["audio"], x["audio_aug"], x["t_a"], x["t_a_cen"]),
        ("v", x["visual"], x["visual_aug"], x["t_v"], x["t_v_cen"]),
    ):
        tower = getattr(model, f"tower_{m}")
        tokens = ref_layernorm(ref_tower(tower, clean), getattr(model, f"norm_{m}"))
        tokens_aug = ref_layernorm(ref_tower(tower, aug), getattr(model, f"norm_{m}_aug"))
        enc, pred = getattr(model, f"aug_encoder_{m}"), getattr(model, f"predictor_{m}")
        intra, inter = getattr(model, f"head_{m}_intra"), getattr(model, f"head_{m}_inter")
        out[f"z_equi_{m}"] = ref_head(
            intra, ref_predictor(pred, tokens, ref_aug_encoder(enc, t[:, None]))
        )
        out[f"z_aug_{m}"] = ref_head(intra, tokens_aug.mean(1))
        if cen_mean:
            out[f"z_inv_{m}"] = ref_head(
                inter, ref_predictor(pred, tokens, ref_aug_encoder(enc, t_cen))
            )
        else:
            out[f"z_inv_{m}"] = ref_head(inter, tokens.mean(1))
    return out


# ---------------------------------------------------------------------------------------------
# Position embeddings and the towers
# ---------------------------------------------------------------------------------------------


def test_sincos_equals_direct_formula_and_is_a_fixed_buffer(demo_cfg):
    for dim, rows, cols in ((64, 8, 32), (64, 7, 7), (768, 8, 64), (768, 14, 14)):
        ours = sincos_pos_embed_2d(dim, rows, cols)
        assert ours.dtype == torch.float32 and ours.shape == (rows * cols, dim)
        # Every token of the small grids; corners, edges and a spread of tokens of the big ones.
        n = rows * cols
        tokens = (
            list(range(n)) if dim == 64 else sorted({0, 1, cols - 1, cols, n - 1, *range(7, n, 37)})
        )
        want = direct_sincos(dim, rows, cols, tokens)
        torch.testing.assert_close(ours[tokens].double(), want, atol=1e-6, rtol=0)
    # A transposed grid is a different embedding (what the checkpoint check relies on).
    assert not torch.allclose(sincos_pos_embed_2d(64, 8, 32), sincos_pos_embed_2d(64, 32, 8))

    model = EquiAVPretrain(*tiny(demo_cfg))
    assert model.tower_a.grid_size == (8, 32) and model.tower_v.grid_size == (7, 7)
    torch.testing.assert_close(model.tower_a.pos_embed[0], sincos_pos_embed_2d(64, 8, 32))
    torch.testing.assert_close(model.tower_v.pos_embed[0], sincos_pos_embed_2d(64, 7, 7))
    names = {n for n, _ in model.named_parameters()}
    assert "tower_a.pos_embed" not in names and "tower_v.pos_embed" not in names
    assert {n for n, _ in model.named_buffers()} == {"tower_a.pos_embed", "tower_v.pos_embed"}
    assert not any("pos_embed" in k for k in model.state_dict())  # regenerated, never saved


def test_towers_attend_through_sdpa_even_with_timm_switch_off(demo_cfg, monkeypatch):
    timm.layers.set_fused_attn(False)
    try:
        model = EquiAVPretrain(*tiny(demo_cfg))
    finally:
        timm.layers.set_fused_attn(True)
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    x = inputs(*tiny(demo_cfg))
    with torch.no_grad():
        model.tower_a(x["audio"])
        assert len(calls) == 2  # one per block
        assert calls[0] == (B, 4, 256, 16)  # (B, heads, 8 x 32 tokens, 64 / 4)
        calls.clear()
        model(**x)
    # Clean + augmented views share a tower pass (batch 2B): 2 blocks x 2 towers; one
    # predictor call per modality for the applied t and the cen_num vectors together.
    assert len(calls) == 6
    assert sorted(c[0] for c in calls) == [B] * 2 + [2 * B] * 4
    assert all(
        isinstance(m.eps, float) and m.eps == 1e-5
        for m in model.modules()
        if isinstance(m, nn.LayerNorm)
    )


def test_tower_rejects_wrong_input_shape(demo_cfg):
    model = EquiAVPretrain(*tiny(demo_cfg))
    x = inputs(*tiny(demo_cfg))
    with pytest.raises(ValueError, match=r"audio tower expects input \(B, 3, 128, 512\)"):
        model.tower_a(x["audio"].transpose(2, 3))  # (B, 3, T, F): the data layout, not the model's
    with pytest.raises(ValueError, match="t_a_cen"):
        model(**{**x, "t_a_cen": None})
    with pytest.raises(ValueError, match="t_v"):
        model(**{**x, "t_v": x["t_v"][:, :17]})


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cen_mean", "qkv"), [(True, "packed"), (False, "packed"), (True, "split")]
)
def test_outputs_equal_reference(demo_cfg, cen_mean, qkv):
    model_cfg, data = tiny(demo_cfg, cen_mean=cen_mean, qkv=qkv)
    torch.manual_seed(0)
    model = EquiAVPretrain(model_cfg, data).double().eval()
    x = inputs(model_cfg, data, dtype=torch.float64)
    if not cen_mean:
        x["t_a_cen"] = x["t_v_cen"] = None
    with torch.no_grad():
        out = model(**x)
        ref = ref_outputs(model, x, cen_mean)
        z_inv_a, z_inv_v = model.embed(x["audio"], x["visual"], x["t_a_cen"], x["t_v_cen"])
    assert set(out) == {"z_inv_a", "z_inv_v", "z_equi_a", "z_equi_v", "z_aug_a", "z_aug_v"}
    for key, value in out.items():
        assert value.shape == (B, model_cfg.head_out), key
        torch.testing.assert_close(value, ref[key], atol=1e-10, rtol=1e-10, msg=key)
    torch.testing.assert_close(z_inv_a, ref["z_inv_a"], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(z_inv_v, ref["z_inv_v"], atol=1e-10, rtol=1e-10)
    # The inputs must matter: different t give different z_equi.
    assert not torch.allclose(out["z_equi_a"], out["z_aug_a"])


def test_gradients_flow_only_where_the_method_says(demo_cfg):
    model_cfg, data = tiny(demo_cfg)
    model = EquiAVPretrain(model_cfg, data)
    x = {k: v.requires_grad_() for k, v in inputs(model_cfg, data).items()}
    out = model(**x)

    # A fixed random read-out: plain sums of the heads' LayerNorm outputs are constant (zero).
    readout = torch.randn(model_cfg.head_out, generator=torch.Generator().manual_seed(1))
    names = list(x)
    grads = {}
    for z, value in out.items():  # one backward pass per output, gradients for every input
        gs = torch.autograd.grad(
            (value * readout).sum(), [x[k] for k in names], retain_graph=True, allow_unused=True
        )
        for k, g in zip(names, gs, strict=True):
            grads[z, k] = torch.zeros(1) if g is None else g

    for m, clean, aug in (("a", "audio", "audio_aug"), ("v", "visual", "visual_aug")):
        t, t_cen = f"t_{m}", f"t_{m}_cen"
        for z, wrt in (
            (f"z_equi_{m}", t),
            (f"z_equi_{m}", clean),
            (f"z_inv_{m}", t_cen),
            (f"z_inv_{m}", clean),
            (f"z_aug_{m}", aug),
        ):
            assert grads[z, wrt].abs().sum() > 0, (z, wrt)
        # Exactly zero: sharing one tower pass and one predictor call must not mix them.
        for z, wrt in (
            (f"z_aug_{m}", t),
            (f"z_aug_{m}", t_cen),
            (f"z_aug_{m}", clean),
            (f"z_equi_{m}", aug),
            (f"z_equi_{m}", t_cen),
            (f"z_inv_{m}", t),
            (f"z_inv_{m}", aug),
        ):
            assert grads[z, wrt].abs().max() == 0, (z, wrt)
    # And no modality leaks into the other.
    assert all(
        grads[f"z_{k}_a", w].abs().max() == 0
        for k in ("inv", "equi", "aug")
        for w in ("visual", "visual_aug", "t_v", "t_v_cen")
    )


# ---------------------------------------------------------------------------------------------
# Initialisation and parameter counts
# ---------------------------------------------------------------------------------------------


def check_xavier(w: torch.Tensor, name: str) -> None:
    fan_out, fan_in = w.shape
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    assert w.abs().max() <= bound + 1e-7, name
    # The uniform's variance bound^2 / 3; torch's default Linear init has a smaller one.
    assert w.var().item() == pytest.approx(bound**2 / 3, rel=0.15), name


def test_initialisation_statistics(demo_cfg):
    torch.manual_seed(0)
    model = EquiAVPretrain(*tiny(demo_cfg))
    pos = model.tower_a.pos_embed.clone()
    with torch.no_grad():  # scramble everything, then initialise again
        for p in model.parameters():
            p.uniform_(-3, 3)
    init_weights_(model)
    linears = convs = norms = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            check_xavier(m.weight, name)
            assert m.bias is None or not m.bias.any(), name
            linears += 1
        elif isinstance(m, nn.Conv2d):
            check_xavier(m.weight.reshape(m.weight.shape[0], -1), name)
            assert not m.bias.any(), name
            convs += 1
        elif isinstance(m, nn.LayerNorm):
            assert (m.weight == 1).all() and not m.bias.any(), name
            norms += 1
    assert (linears, convs) == (2 * 2 * 4 + 2 * (3 + 4 + 2 + 2 * 3), 2)
    assert norms == 2 * 2 * 2 + 4 + 2 * 2 + 4 * 3
    modality = torch.cat([model.tower_a.modality.flatten(), model.tower_v.modality.flatten()])
    assert abs(modality.mean().item()) < 0.01
    assert modality.std().item() == pytest.approx(0.02, rel=0.3)
    assert torch.equal(model.tower_a.pos_embed, pos)


def test_count_parameters(demo_cfg):
    model = EquiAVPretrain(*tiny(demo_cfg))
    counts = count_parameters(model)
    assert list(counts)[:2] == ["tower_a", "tower_v"]
    assert sum(counts.values()) == sum(p.numel() for p in model.parameters())
    d = 64
    assert counts["norm_a_aug"] == 2 * d
    assert (
        counts["head_a_inter"]
        == (d * 128 + 128) + 2 * 128 + (128 * 128 + 128) + 2 * 128 + (128 * 32 + 32) + 2 * 32
    )
    model.head_v_inter.requires_grad_(False)
    assert "head_v_inter" not in count_parameters(model)


def test_paper_size_model():
    """The paper's ViT-B/16 towers: parameter count from the architecture, one batch-1 pass."""
    torch.manual_seed(0)
    model = EquiAVPretrain(ModelConfig(), DataConfig())
    d, depth, mlp = 768, 12, 3072
    block = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d + (d * mlp + mlp) + (mlp * d + d)
    tower = (3 * 16 * 16 * d + d) + d + depth * block
    aug = {m: (n * 256 + 256) + 2 * (256 * 256 + 256) for m, n in (("a", 24), ("v", 18))}
    predictor = (
        2 * 256
        + (256 * 512 + 512)
        + 2 * (d * 512 + 512)
        + 512 * d
        + 2 * d
        + (d * mlp + mlp)
        + (mlp * d + d)
    )
    head = (d * 2048 + 2048) + 4096 + (2048 * 2048 + 2048) + 4096 + (2048 * 512 + 512) + 1024
    expected = 2 * tower + 4 * 2 * d + aug["a"] + aug["v"] + 2 * predictor + 4 * head
    assert expected == 210_963_968
    assert sum(count_parameters(model).values()) == expected
    assert model.tower_a.pos_embed.shape == (1, 512, d)
    assert model.tower_v.pos_embed.shape == (1, 196, d)
    assert model.tower_a.modality.std().item() == pytest.approx(0.02, rel=0.1)

    x = inputs(ModelConfig(), DataConfig())
    x = {k: v[:1] for k, v in x.items()}
    with torch.no_grad():
        out = model(**x)
    assert all(v.shape == (1, 512) and torch.isfinite(v).all() for v in out.values())


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def test_state_dict_round_trip(demo_cfg):
    torch.manual_seed(0)
    source = EquiAVPretrain(*tiny(demo_cfg)).eval()
    torch.manual_seed(1)
    target = EquiAVPretrain(*tiny(demo_cfg)).eval()
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    other = EquiAVPretrain(*tiny(demo_cfg)).eval()
    report = load_pretrain_checkpoint(
        other, {"module." + k: v for k, v in source.state_dict().items()}
    )
    assert report.missing == [] and report.unexpected == []
    x = inputs(*tiny(demo_cfg))
    with torch.no_grad():
        a, b, c = source(**x), target(**x), other(**x)
    for key in a:
        assert torch.equal(a[key], b[key]) and torch.equal(a[key], c[key]), key


def mae_state(depth: int = 2, in_chans: int = 3) -> dict[str, torch.Tensor]:
    """A MAE-style encoder state dict from timm's own ViT (timm names), plus decoder entries."""
    torch.manual_seed(123)
    vit = VisionTransformer(
        img_size=112,
        patch_size=16,
        in_chans=in_chans,
        embed_dim=64,
        depth=depth,
        num_heads=4,
        qkv_bias=True,
    )
    state = {k: v.clone() for k, v in vit.state_dict().items()}
    state["mask_token"] = torch.zeros(1, 1, 32)
    state["decoder_embed.weight"] = torch.zeros(32, 64)
    return state


def test_mae_checkpoint_into_both_towers(demo_cfg, tmp_path):
    model = EquiAVPretrain(*tiny(demo_cfg))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = mae_state(depth=3)  # one block more than the model has
    path = tmp_path / "mae.pth"
    torch.save({"model": state}, path)
    reports = load_mae_encoders(model, audio=str(path), visual=str(path))
    after = model.state_dict()
    for m in ("a", "v"):
        report = reports[m]
        assert sorted(report.ignored) == ["cls_token", "pos_embed"]
        assert report.missing == [f"tower_{m}.modality"]
        assert set(report.unexpected) == {
            "mask_token",
            "decoder_embed.weight",
            "head.weight",
            "head.bias",
        } | {k for k in state if k.startswith("blocks.2.")}
        assert len(report.used) == 2 + 2 * 12 + 2
        for key in report.used:
            ours = f"norm_{m}." + key[5:] if key.startswith("norm.") else f"tower_{m}.{key}"
            assert torch.equal(after[ours], state[key]), key
        for kept in (f"tower_{m}.modality", f"norm_{m}_aug.weight", f"norm_{m}_aug.bias"):
            assert torch.equal(after[kept], before[kept]), kept
    assert torch.equal(after["head_a_intra.fc1.weight"], before["head_a_intra.fc1.weight"])
    assert "ignored (2): cls_token, pos_embed" in reports["a"].summary()


def test_mae_shape_mismatch_names_the_key_and_copies_nothing(demo_cfg, tmp_path):
    model = EquiAVPretrain(*tiny(demo_cfg))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "audiomae.pth"
    torch.save({"model": mae_state(in_chans=1)}, path)
    with pytest.raises(
        CheckpointError, match=r"audiomae\.pth.*patch_embed\.proj\.weight.*\(64, 1, 16, 16\)"
    ):
        load_mae_encoders(model, audio=str(path))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    with pytest.raises(CheckpointError, match="not found"):
        load_mae_encoders(model, visual=str(tmp_path / "missing.pth"))


def spec_released_names(depth: int) -> set[str]:
    """Every key of the original model, written out from the spec's list (no __M__. prefix)."""
    names = set()
    for m in ("a", "v"):
        names |= {f"patch_embed_{m}.proj.weight", f"patch_embed_{m}.proj.bias", f"modality_{m}"}
        for n in range(depth):
            for sub in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
                names |= {f"blocks_{m}.{n}.{sub}.weight", f"blocks_{m}.{n}.{sub}.bias"}
        for norm in (f"norm_{m}", f"norm_{m}_aug"):
            names |= {f"{norm}.weight", f"{norm}.bias"}
        for i in (0, 2, 4):
            names |= {f"aug_encoder_{m}.{i}.weight", f"aug_encoder_{m}.{i}.bias"}
        for sub in (
            "norm_aug",
            "attn.to_q",
            "attn.to_k",
            "attn.to_v",
            "norm",
            "mlp.fc1",
            "mlp.fc2",
        ):
            names |= {f"cross_attn_{m}.{sub}.weight", f"cross_attn_{m}.{sub}.bias"}
        names.add(f"cross_attn_{m}.attn.to_out.weight")  # no bias
        for kind in ("intra", "inter"):
            for sub in ("fc1", "norm1", "fc2", "norm2", "fc3", "norm3"):
                names |= {f"pred_{m}_{kind}.{sub}.weight", f"pred_{m}_{kind}.{sub}.bias"}
    return names


def released_state(model: EquiAVPretrain, depth: int) -> dict[str, torch.Tensor]:
    """What the paper's checkpoint holds, built from our model: mapped names, the unused
    per-block norms, the position embeddings, the wrapper's prefix."""
    state = to_released(model.state_dict())
    assert set(state) == spec_released_names(depth)
    for m in ("a", "v"):
        for n in range(depth):
            for extra in ("norm1_a", "norm1_v", "norm2_a", "norm2_v"):
                state[f"blocks_{m}.{n}.{extra}.weight"] = torch.randn(64)
                state[f"blocks_{m}.{n}.{extra}.bias"] = torch.randn(64)
        state[f"pos_embed_{m}"] = getattr(model, f"tower_{m}").pos_embed.clone()
    return {"__M__." + k: v for k, v in state.items()}


def test_released_checkpoint_key_map(demo_cfg, tmp_path):
    torch.manual_seed(0)
    source = EquiAVPretrain(*tiny(demo_cfg)).eval()
    state = released_state(source, depth=2)
    path = tmp_path / "equiav_released.pth"
    torch.save(state, path)
    torch.manual_seed(1)
    target = EquiAVPretrain(*tiny(demo_cfg)).eval()
    report = load_pretrain_checkpoint(target, path)  # recognises the released layout
    assert report.source.startswith("released EquiAV")
    assert report.unexpected == [] and report.missing == []
    assert len(report.ignored) == 2 + 2 * 2 * 4 * 2  # pos embeds + per-block norms
    assert len(report.used) == len(source.state_dict())
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    x = inputs(*tiny(demo_cfg))
    with torch.no_grad():
        a, b = source(**x), target(**x)
    assert all(torch.equal(a[k], b[k]) for k in a)

    # A position embedding laid out on the transposed grid (time rows, frequency columns).
    bad = dict(state)
    bad["__M__.pos_embed_a"] = sincos_pos_embed_2d(64, 32, 8)[None]
    with pytest.raises(CheckpointError, match="__M__.pos_embed_a.*transposed"):
        load_released_checkpoint(target, bad)
    # Row and column halves swapped (the other way to get the layout wrong).
    pos = source.tower_v.pos_embed
    bad["__M__.pos_embed_a"] = state["__M__.pos_embed_a"]
    bad["__M__.pos_embed_v"] = torch.cat([pos[..., 32:], pos[..., :32]], dim=-1)
    with pytest.raises(CheckpointError, match="pos_embed_v"):
        load_released_checkpoint(target, bad)
    # An unmapped key is reported; a missing one is an error naming it.
    extra = {
        **state,
        "__L_inter__.logit_scale": torch.ones(1),
        "__M__.unknown.weight": torch.ones(1),
    }
    report = load_released_checkpoint(target, extra)
    assert sorted(report.unexpected) == ["__L_inter__.logit_scale", "__M__.unknown.weight"]
    partial = {k: v for k, v in state.items() if not k.startswith("__M__.pred_v_inter.")}
    with pytest.raises(CheckpointError, match="head_v_inter.fc1"):
        load_released_checkpoint(target, partial)


# ---------------------------------------------------------------------------------------------
# Finetuning
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ftmode", ["multimodal", "audio_only", "video_only"])
def test_finetune_heads(demo_cfg, ftmode):
    n_classes = 7
    model_cfg, data = tiny(demo_cfg, ftmode=ftmode, drop_path=0.1)
    torch.manual_seed(0)
    pretrained = EquiAVPretrain(model_cfg, data)
    model = EquiAVFinetune(model_cfg, data, n_classes).double().eval()
    report = model.load_pretrained(pretrained.state_dict())
    pre = pretrained.state_dict()
    for key, value in model.state_dict().items():
        if key.startswith(("tower_", "norm_")):
            assert torch.equal(value, pre[key].double()), key
    assert all(
        k.startswith(
            ("predictor", "head_", "aug_encoder", "norm_a_aug", "norm_v_aug", "tower_", "norm_")
        )
        for k in report.ignored
    )

    expected_new = {
        "multimodal": [
            "proj_a.weight",
            "proj_a.bias",
            "proj_v.weight",
            "proj_v.bias",
            "classifier.weight",
            "classifier.bias",
        ],
        "audio_only": ["classifier.weight", "classifier.bias"],
        "video_only": ["classifier.weight", "classifier.bias"],
    }[ftmode]
    named = dict(model.named_parameters())
    assert [id(p) for p in model.new_parameters()] == [id(named[k]) for k in expected_new]
    assert all(isinstance(m, nn.Linear) for m in model.new_modules())
    assert all(k.startswith(("tower_", "norm_")) for k in named if k not in expected_new)
    assert model.classifier.in_features == (
        2 * model_cfg.ft_proj_dim if ftmode == "multimodal" else 64
    )
    assert all(
        blk.drop_path1.drop_prob == 0.1
        for t in (model.tower_a, model.tower_v)
        if t
        for blk in t.blocks
    )

    x = inputs(model_cfg, data, dtype=torch.float64)
    audio = x["audio"] if ftmode != "video_only" else None
    visual = x["visual"] if ftmode != "audio_only" else None
    with torch.no_grad():
        logits = model(audio, visual)
    assert logits.shape == (B, n_classes)

    def pooled(m, inp):
        tower, norm = getattr(model, f"tower_{m}"), getattr(model, f"norm_{m}")
        return ref_layernorm(ref_tower(tower, inp), norm).mean(1)

    with torch.no_grad():
        if ftmode == "multimodal":
            feats = torch.cat(
                [
                    ref_linear(pooled("a", audio), model.proj_a),
                    ref_linear(pooled("v", visual), model.proj_v),
                ],
                -1,
            )
        else:
            feats = pooled("a", audio) if ftmode == "audio_only" else pooled("v", visual)
        torch.testing.assert_close(
            logits, ref_linear(feats, model.classifier), atol=1e-10, rtol=1e-10
        )
    if ftmode != "multimodal":
        with pytest.raises(ValueError, match="needs the"):
            model(None, None)


def test_finetune_loads_released_checkpoint_and_rejects_partial(demo_cfg):
    model_cfg, data = tiny(demo_cfg)
    torch.manual_seed(0)
    pretrained = EquiAVPretrain(model_cfg, data)
    model = EquiAVFinetune(model_cfg, data, 5)
    report = model.load_pretrained(released_state(pretrained, depth=2))
    assert report.unexpected == [] and report.missing == []
    assert torch.equal(
        model.tower_v.blocks[1].mlp.fc2.weight, pretrained.tower_v.blocks[1].mlp.fc2.weight
    )
    assert torch.equal(model.norm_a.weight, pretrained.norm_a.weight)
    ddp_style = {
        "module." + k: v for k, v in pretrained.state_dict().items() if not k.startswith("norm_v.")
    }
    with pytest.raises(CheckpointError, match="norm_v.weight"):
        model.load_pretrained(ddp_style)


@pytest.mark.parametrize("size", [(128, 1024), (224, 224), (32, 64)])
def test_patch_embedding_equals_timms_convolution(size):
    """Our matmul patch embedding is timm's stride-16 convolution: same parameter names, same
    tokens in the same (row-major) order, same weight gradient."""
    from timm.layers import PatchEmbed as TimmPatchEmbed

    from equiav.model.vit import PatchEmbed

    torch.manual_seed(0)
    ours = PatchEmbed(size, 16, 3, 48)
    ref = TimmPatchEmbed(img_size=size, patch_size=16, in_chans=3, embed_dim=48)
    ref.load_state_dict(ours.state_dict())  # strict: the keys are timm's
    assert ours.grid_size == tuple(ref.grid_size) and ours.num_patches == ref.num_patches
    x = torch.randn(2, 3, *size)
    a, b = ours(x), ref(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    a.square().sum().backward()
    b.square().sum().backward()
    torch.testing.assert_close(ours.proj.weight.grad, ref.proj.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.proj.bias.grad, ref.proj.bias.grad, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# model.qkv: split
# ---------------------------------------------------------------------------------------------


def test_split_qkv_is_the_same_model_with_the_same_gradients(demo_cfg):
    """`model.qkv: split` (q, k, v as three GEMMs on thirds of `qkv`) keeps the parameters, the
    state dict, the outputs and every gradient of timm's one-GEMM attention."""
    from timm.layers import Attention

    from equiav.model.vit import SplitQKVAttention

    packed_cfg, split_cfg = tiny(demo_cfg), tiny(demo_cfg, qkv="split")
    torch.manual_seed(0)
    packed = EquiAVPretrain(*packed_cfg)
    torch.manual_seed(0)
    split = EquiAVPretrain(*split_cfg)
    kinds = {type(m) for m in split.tower_a.modules() if isinstance(m, Attention)}
    assert kinds == {SplitQKVAttention}
    assert not any(isinstance(m, SplitQKVAttention) for m in packed.modules())
    assert len([m for m in split.modules() if isinstance(m, SplitQKVAttention)]) == 4
    split.load_state_dict(packed.state_dict())  # strict: the same keys and shapes
    x = inputs(*packed_cfg)
    readout = torch.randn(packed_cfg[0].head_out, generator=torch.Generator().manual_seed(1))
    outs = []
    for model in (packed, split):
        out = model(**x)
        sum((z * readout).sum() for z in out.values()).backward()
        outs.append(out)
    for key in outs[0]:
        torch.testing.assert_close(outs[1][key], outs[0][key], rtol=1e-5, atol=1e-6, msg=key)
    grads = dict(split.named_parameters())
    for name, p in packed.named_parameters():
        assert p.grad is not None and grads[name].grad is not None, name
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    qkv_grad = split.tower_a.blocks[0].attn.qkv.weight.grad
    assert qkv_grad.abs().amax(dim=1).min() > 0  # every third of the weight gets its gradient


def test_split_qkv_rejects_what_it_does_not_implement():
    from equiav.model.vit import SplitQKVAttention

    with pytest.raises(ValueError, match="q_norm"):
        SplitQKVAttention(64, num_heads=4, qkv_bias=True, qk_norm=True, norm_layer=nn.LayerNorm)
    with pytest.raises(ValueError, match="without a bias"):
        SplitQKVAttention(64, num_heads=4, qkv_bias=False)
    from equiav.config import apply_overrides, default_config, validate

    with pytest.raises(Exception, match="model.qkv"):
        validate(apply_overrides(default_config("pretrain"), {"model.qkv": "fused"}))


def test_split_qkv_backward_graph_copies_no_activation_gradient():
    """The compiled backward (AOTAutograd's graph, as torch.compile hands it to inductor): timm's
    one-GEMM block stacks the three (B, H, N, D) attention gradients into the GEMM's gradient
    (a copy); the split block has no stack, permute or clone, and its only concatenations are
    of the parameter-sized gradients of `qkv`'s thirds. A split that chunks one GEMM's output
    instead fails this."""
    from functorch.compile import make_boxed_func
    from timm.models.vision_transformer import Block
    from torch._dynamo.backends.common import aot_autograd

    from equiav.model.vit import SplitQKVAttention

    def backward_ops(split: bool) -> list[tuple[str, list[tuple[int, ...]]]]:
        graphs = []

        def keep(gm, _inputs):
            graphs.append(gm)
            return make_boxed_func(gm.forward)

        torch.manual_seed(0)
        extra = {"attn_layer": SplitQKVAttention} if split else {}
        block = Block(64, 4, qkv_bias=True, norm_layer=nn.LayerNorm, **extra)
        block.attn.fused_attn = True
        x = torch.randn(2, 16, 64, requires_grad=True)
        torch._dynamo.reset()
        compiled = torch.compile(block, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep))
        compiled(x).sum().backward()
        ops = []
        for node in graphs[-1].graph.nodes:  # the backward graph
            if node.op == "call_function":
                args = node.args[0] if node.args and isinstance(node.args[0], list) else node.args
                values = [getattr(a, "meta", {}).get("val") for a in args]
                shapes = [tuple(v.shape) for v in values if isinstance(v, torch.Tensor)]
                target = str(node.target)  # "aten.stack.default" -> "stack"
                ops.append((target.split(".")[1] if target.startswith("aten.") else target, shapes))
        return ops

    packed = backward_ops(split=False)
    (stacked,) = [shapes for name, shapes in packed if name == "stack"]  # then permuted, copied
    assert stacked == [(2, 4, 16, 16)] * 3  # dq, dk, dv: (B, heads, N, head_dim)
    split = backward_ops(split=True)
    names = [name for name, _ in split]
    assert not {"stack", "permute", "clone"} & set(names)
    cats = [shapes for name, shapes in split if name == "cat"]
    assert sorted(cats) == [[(64,)] * 3, [(64, 64)] * 3]  # qkv.bias and qkv.weight thirds


@pytest.mark.parametrize("kernel", ["cudnn", "flash", "efficient"])
def test_split_qkv_gradients_come_back_as_the_linear_layers_gradients(kernel):
    """Why `model.qkv: split` exists. The GPU attention kernels' backward (their meta functions:
    what torch.compile plans its buffers by; run here on meta tensors, no GPU needed) returns
    dq, dk, dv as three buffers in q's dense layout. With split q, k, v, each of those IS its
    linear layer's (B*N, H*D) output gradient; with timm's one GEMM they are not slices of its
    (B, N, 3, H, D) gradient, which must then be copied together (stack and permute)."""
    aten = torch.ops.aten
    b, n, h, d = 2, 16, 12, 64

    def meta(*shape):
        return torch.empty(*shape, device="meta", dtype=torch.bfloat16)

    def grads(q, k, v):
        if kernel == "cudnn":
            o = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False)
            return aten._scaled_dot_product_cudnn_attention_backward(
                o[0], q, k, v, o[0], o[1], o[6], o[7], None, None, None, n, n, 0.0, False
            )
        if kernel == "flash":
            o = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)
            return aten._scaled_dot_product_flash_attention_backward(
                o[0], q, k, v, o[0], o[1], o[2], o[3], o[4], o[5], 0.0, False, o[6], o[7]
            )
        o = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False)
        g = aten._scaled_dot_product_efficient_attention_backward(
            o[0], q, k, v, meta(0), o[0], o[1], o[2], o[3], 0.0, [True] * 3 + [False], False
        )
        return g[:3]

    split = [meta(b, n, h, d).transpose(1, 2) for _ in range(3)]  # (B, H, N, D) views
    for g in grads(*split):
        assert g.shape == (b, h, n, d)
        # (B, N, H, D) in memory: its (B*N, H*D) view is the linear's gradient, no copy
        assert g.transpose(1, 2).is_contiguous()
    packed = meta(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    assert packed[0].stride(2) == 3 * h * d
    for g in grads(*packed):
        assert g.stride(2) == h * d  # its own buffer, not a slice of the (B, N, 3, H, D) one


@pytest.mark.cuda
def test_split_qkv_on_cuda_computes_the_same_block_without_the_gradient_copy():
    """On the GPU, compiled under bf16 autocast as the trainer runs it: timm's block with one
    q, k, v GEMM has a kernel that stacks attention's gradients into that GEMM's gradient, the
    block with split q, k, v has none, and the two compute the same values and gradients."""
    from timm.models.vision_transformer import Block
    from torch.profiler import ProfilerActivity, profile

    from equiav.model.vit import SplitQKVAttention

    def run(split: bool) -> tuple[set[str], list[torch.Tensor]]:
        torch.manual_seed(0)
        extra = {"attn_layer": SplitQKVAttention} if split else {}
        block = Block(768, 12, qkv_bias=True, norm_layer=nn.LayerNorm, **extra).cuda()
        block.attn.fused_attn = True
        assert isinstance(block.attn, SplitQKVAttention) == split
        x = torch.randn(8, 512, 768, device="cuda").requires_grad_()
        compiled = torch.compile(block)

        def step() -> torch.Tensor:
            with torch.autocast("cuda", torch.bfloat16):
                y = compiled(x)
            y.float().square().mean().backward()
            return y

        step()  # compiles
        x.grad = None
        block.zero_grad()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            y = step()
            torch.cuda.synchronize()
        kernels = {e.key for e in prof.key_averages() if e.key.startswith("triton_")}
        qkv = block.attn.qkv
        return kernels, [y.detach().float(), x.grad, qkv.weight.grad, qkv.bias.grad]

    packed_kernels, packed = run(split=False)
    split_kernels, split = run(split=True)
    assert any("stack" in k for k in packed_kernels), sorted(packed_kernels)
    assert not any("stack" in k for k in split_kernels), sorted(split_kernels)
    for a, b in zip(split, packed, strict=True):
        assert float((a - b).norm() / b.norm()) < 2e-2  # bf16 GEMMs grouped differently
