"""The benchmark machinery: the FLOP counter against a hand count and against torch's own
FlopCounterMode on the real models, the training-step benchmark in its CPU smoke mode, the result
files and the report.

FlopCounterMode sees attention only as matmuls when SDPA runs its math backend (the CPU's fused
attention kernel is not in its formula table), so the measurements force that backend; its
backward then runs two matmuls per forward matmul, as the counter assumes.
"""

from __future__ import annotations

import dataclasses
import json
import re
import socket
from pathlib import Path

import matplotlib.image
import pytest
import torch
from timm.models.vision_transformer import Block
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bench import report, step
from bench.common import ResultError, read_result, result_path, write_result
from bench.flops import finetune_flops, pretrain_flops, vit_block_flops
from equiav.config import DataConfig, ModelConfig
from equiav.losses import equiav_loss
from equiav.model import EquiAVFinetune, EquiAVPretrain

SMALL_MODEL = ModelConfig(**step.SMOKE_MODEL)
SMALL_DATA = DataConfig(**step.SMOKE_DATA)


def test_vit_block_count_equals_hand_count():
    # One ViT-B block on the 196 visual tokens, counted by hand: 2 * m * k * n per matmul.
    n, d, h = 196, 768, 3072
    qkv = 2 * 196 * 768 * 2304  # 693_633_024
    scores = 2 * 196 * 768 * 196  # q @ k^T over 12 heads of 64: 59_006_976
    weighted = 2 * 196 * 196 * 768  # attention @ v: 59_006_976
    proj = 2 * 196 * 768 * 768  # 231_211_008
    mlp = 2 * (2 * 196 * 768 * 3072)  # fc1 + fc2: 1_849_688_064
    assert qkv + scores + weighted + proj + mlp == 2_892_546_048
    assert vit_block_flops(n, d, h) == 2_892_546_048


def test_vit_block_count_equals_flop_counter_on_a_timm_block():
    block = Block(96, 4, mlp_ratio=4.0, qkv_bias=True)
    block.attn.fused_attn = True
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter, torch.no_grad():
        block(torch.randn(3, 37, 96))
    assert counter.get_total_flops() == 3 * vit_block_flops(37, 96, 384)


def _pretrain_inputs(model: ModelConfig, data: DataConfig, batch: int, device: str = "cpu"):
    g = torch.Generator().manual_seed(0) if device == "cpu" else None

    def randn(*shape):
        if g is None:
            return torch.empty(*shape, device=device)
        return torch.randn(*shape, generator=g)

    audio = (batch, 3, data.num_mel_bins, data.target_length)
    visual = (batch, 3, data.image_size, data.image_size)
    return (
        randn(*audio),
        randn(*visual),
        randn(*audio),
        randn(*visual),
        randn(batch, 24),
        randn(batch, 18),
        randn(batch, model.cen_num, 24),
        randn(batch, model.cen_num, 18),
    )


def test_pretrain_count_equals_flop_counter_on_the_small_model():
    torch.manual_seed(0)
    model = EquiAVPretrain(SMALL_MODEL, SMALL_DATA)
    batch = 3
    inputs = _pretrain_inputs(SMALL_MODEL, SMALL_DATA, batch)
    count = pretrain_flops(SMALL_MODEL, SMALL_DATA, batch)

    forward = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), forward, torch.no_grad():
        equiav_loss(model(*inputs))
    assert forward.get_total_flops() == count.forward_total

    train = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), train:
        equiav_loss(model(*inputs))["total"].backward()
    measured = train.get_total_flops()
    # Autograd computes no input gradient for the layers that read data: exactly the difference
    # between the 3 x forward convention and what runs.
    assert measured == count.executed_train_total
    assert count.executed_train_total < count.train_total
    # Every part of the model contributes, so a part left out of the count would show above.
    assert all(v > 0 for v in count.forward.values())


@pytest.mark.parametrize("ftmode", ["multimodal", "audio_only", "video_only"])
def test_finetune_count_equals_flop_counter_on_the_small_model(ftmode):
    cfg = dataclasses.replace(SMALL_MODEL, ftmode=ftmode)
    torch.manual_seed(0)
    model = EquiAVFinetune(cfg, SMALL_DATA, n_classes=7)
    audio, visual = _pretrain_inputs(cfg, SMALL_DATA, 2)[:2]
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        model(audio, visual).sum().backward()
    count = finetune_flops(cfg, SMALL_DATA, 2, 7)
    assert counter.get_total_flops() == count.executed_train_total
    towers = {"multimodal": {"audio", "visual"}, "audio_only": {"audio"}, "video_only": {"visual"}}
    assert {k.split("_")[0] for k in count.forward if k.endswith("_blocks")} == towers[ftmode]


def test_paper_size_count_agrees_with_flop_counter_on_meta_tensors():
    """The real paper-size model on shape-only (meta) tensors: no arithmetic runs."""
    model_cfg, data_cfg, batch = ModelConfig(), DataConfig(), 2
    with torch.device("meta"):
        model = EquiAVPretrain(model_cfg, data_cfg)
    inputs = _pretrain_inputs(model_cfg, data_cfg, batch, device="meta")
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        out = model(*inputs)
        forward = counter.get_total_flops()
        # equiav_loss cannot run on meta tensors (autocast); its matmuls are counted separately.
        sum(z.sum() for z in out.values()).backward()
    count = pretrain_flops(model_cfg, data_cfg, batch)
    model_forward = count.forward_total - count.forward["loss"]
    assert forward == model_forward
    measured_train = counter.get_total_flops()
    assert measured_train == 3 * model_forward - count.input_layers
    # The MFU convention (3 x forward) is within 0.5 % of what runs at this size ...
    assert abs(count.train_total - measured_train) / measured_train < 0.005
    # ... and MEASURED.md's estimate (~790 GFLOP per sample) is the towers' share of it.
    assert 790e9 < count.train_per_sample < 800e9


def test_peak_table():
    assert step.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert step.peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert step.peak_bf16_tflops("NVIDIA H200") == 989.0
    assert step.peak_bf16_tflops("NVIDIA H200 NVL") == 835.0  # not the SXM part's 989
    assert step.peak_bf16_tflops("NVIDIA H100 NVL") == 835.0
    assert step.peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert step.peak_bf16_tflops("NVIDIA GeForce RTX 4090") is None
    assert step.peak_bf16_tflops(None) is None


def test_find_max_batch_doubles_until_the_first_failure():
    tried = []

    def fits(b):
        tried.append(b)
        return b <= 100

    assert step.find_max_batch(fits, 16, 4096) == 64
    assert tried == [16, 32, 64, 128]
    assert step.find_max_batch(lambda b: b <= 8, 16, 4096) is None
    assert step.find_max_batch(lambda b: True, 16, 256) == 256


@pytest.mark.parametrize("precision", ["fp32", "bf16-master"])
def test_train_step_changes_every_parameter(precision):
    """bf16-master: every float32 master weight (some updates are below bfloat16's resolution,
    so the bfloat16 model need not move everywhere after one step)."""
    setup = step.StepSetup("pretrain", precision, True, False)
    cfg = step.run_config(setup, smoke=True)
    train_step = step.TrainStep(setup, cfg, torch.device("cpu"))
    master = train_step.master
    assert (master is not None) == (precision == "bf16-master")
    named = (
        list(zip(master.names, master.master, strict=True))
        if master is not None
        else list(train_step.model.named_parameters())
    )
    before = {n: p.detach().clone() for n, p in named}
    train_step(step.synthetic_batch("pretrain", cfg, 4, torch.device("cpu")))
    assert float(train_step.last.nonfinite) == 0.0
    unchanged = [n for n, p in named if torch.equal(p, before[n])]
    assert unchanged == []


@pytest.mark.parametrize(
    "mode,levers",
    [
        ("pretrain", {}),
        ("pretrain", {"gelu": "triton", "qkv": "split", "linear": "float8"}),
        ("finetune", {}),
    ],
)
def test_the_step_compiles_its_model_as_one_graph(mode, levers):
    """torch.compile sees the whole model of a step, levers included, as one graph: a graph
    break would split the compiled step in two, with a return to Python between (and no fusion
    across it). Dynamo's graphs go to a backend that counts them and runs them as they are
    (inductor would take minutes here, and crashes on float8's gradients on a CPU)."""
    setup = step.StepSetup(mode, "bf16-master", False, False, **levers)
    cfg = step.run_config(setup, smoke=True)
    train_step = step.TrainStep(setup, cfg, torch.device("cpu"))
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    train_step.net = torch.compile(train_step.model, backend=count)
    for seed in (0, 1):  # a second batch of the same shapes: no recompilation either
        train_step(step.synthetic_batch(mode, cfg, 4, torch.device("cpu"), seed=seed))
    torch._dynamo.reset()
    assert len(graphs) == 1 and float(train_step.last.nonfinite) == 0.0


def test_train_step_refuses_a_setup_its_config_contradicts():
    """The model and optimizer come from the config, precision and compilation from the setup:
    a mismatch (a profile asking for the unfused AdamW of a config with the fused one) would
    record one thing and measure another."""
    setup = step.StepSetup("pretrain", "bf16", False, False)
    cfg = step.run_config(setup, smoke=True)
    assert step.StepSetup.of("pretrain", cfg) == setup
    fused = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, fused=True))
    with pytest.raises(ValueError, match="fused: False in the setup, True in the config"):
        step.TrainStep(setup, fused, torch.device("cpu"))
    gelu = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, gelu="triton"))
    with pytest.raises(ValueError, match="gelu"):
        step.TrainStep(setup, gelu, torch.device("cpu"))
    split = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, qkv="split"))
    with pytest.raises(ValueError, match="qkv: 'packed' in the setup, 'split' in the config"):
        step.TrainStep(setup, split, torch.device("cpu"))
    assert step.StepSetup.of("pretrain", split) == dataclasses.replace(setup, qkv="split")
    float8 = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, linear="float8"))
    with pytest.raises(ValueError, match="linear: 'default' in the setup, 'float8' in the config"):
        step.TrainStep(setup, float8, torch.device("cpu"))


@pytest.fixture(scope="module")
def step_result(tmp_path_factory):
    """The step benchmark's default run in smoke mode (CPU), written to a temporary directory."""
    results = tmp_path_factory.mktemp("results")
    path = step.run(device="cpu", steps=2, warmup=1, results_dir=results, log=lambda s: None)
    return path


def test_step_smoke_writes_a_valid_result(step_result):
    assert step_result.name == f"step-smoke-{socket.gethostname()}.json"
    result = read_result(step_result)  # checks the schema
    assert result["benchmark"] == "step-smoke"
    assert result["summary"]["device"] == "cpu"
    assert result["config"]["smoke"] is True
    assert result["machine"]["torch"] == torch.__version__
    rows = result["rows"]
    assert [(r["mode"], r["batch_size"], r["status"]) for r in rows] == [
        ("pretrain", 4, "ok"),
        ("finetune", 8, "ok"),
    ]
    smoke_cfg = step.run_config(step.StepSetup("pretrain", "bf16", True, False), smoke=True)
    for row in rows:
        assert row["step_time_ms"] > 0
        assert row["samples_per_s"] == pytest.approx(row["batch_size"] / row["step_time_ms"] * 1e3)
        assert row["mfu"] is None and row["peak_memory_gib"] is None  # no peak, no CUDA memory
        flops = step.step_flops(row["mode"], smoke_cfg, row["batch_size"])
        assert row["flops_per_sample"] == pytest.approx(flops.train_per_sample)
        seconds = row["step_time_ms"] / 1e3
        assert row["achieved_tflops"] == pytest.approx(flops.train_total / seconds / 1e12)


@pytest.fixture
def compiled_graphs(monkeypatch) -> list[bool]:
    """torch.compile with a backend that records each graph dynamo hands it (whether its inputs
    have dynamic sizes) and runs it as it is: a stand-in for inductor."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(any(isinstance(x, torch.SymInt) for x in example_inputs))
        return gm.forward

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: compile_(model, backend=record))
    return graphs


def test_step_at_fixed_batches_compiles_one_static_step_per_batch(tmp_path, compiled_graphs):
    """`batch_sizes`: one freshly built (and compiled) step per batch, each compiled for its own
    size: the second is not the dynamic-shape recompilation dynamo makes once a function's code
    has seen two sizes (a recording backend stands in for inductor)."""
    graphs = compiled_graphs
    path = step.run(
        modes=("finetune",),
        precisions=("bf16-master",),
        compiled=(True,),
        device="cpu",
        steps=1,
        warmup=0,
        batch_sizes=(2, 3),
        results_dir=tmp_path,
        log=lambda s: None,
    )
    result = read_result(path)
    rows = result["rows"]
    assert [(r["batch_size"], r["batch_kind"], r["status"]) for r in rows] == [
        (2, "fixed", "ok"),
        (3, "fixed", "ok"),
    ]
    assert all(r["precision"] == "bf16-master" and r["compile"] for r in rows)
    assert result["config"]["batch_sizes"] == [2, 3] and not result["config"]["search_max_batch"]
    assert graphs and not any(graphs)
    with pytest.raises(ValueError, match="batch sizes"):
        step.run(device="cpu", batch_sizes=(0,), results_dir=tmp_path, log=lambda s: None)


def test_each_compiled_configuration_of_a_grid_compiles_its_own_step(
    tmp_path, monkeypatch, compiled_graphs
):
    """A grid's compiled configurations each compile their own step in their first step:
    without dynamo's memory reset between them, the second reuses the first's graph (its
    guards pass) and its first-step time leaves the compilation out (and after a batch
    search it would run the first's dynamic-shape graph)."""
    graphs = compiled_graphs
    seen = []
    measure = step.measure

    def counting(train_step, batch_size, steps, warmup):
        before = len(graphs)
        row = measure(train_step, batch_size, steps, warmup)
        seen.append(len(graphs) - before)
        return row

    monkeypatch.setattr(step, "measure", counting)
    step.run(
        modes=("finetune",), precisions=("fp32",), fused=(True, False), compiled=(True,),
        device="cpu", smoke=True, steps=1, warmup=0, results_dir=tmp_path, log=lambda s: None,
    )  # fmt: skip
    assert len(seen) == 2 and all(n >= 1 for n in seen), seen
    assert not any(graphs)  # static shapes


def test_a_searched_batch_says_whether_the_limit_stopped_the_search(monkeypatch):
    """The largest-batch search doubles up to the limit: its row says when a larger batch was
    never tried (the limit) rather than found not to fit."""
    monkeypatch.setattr(step, "fits", lambda train_step, b: b <= 32)
    monkeypatch.setattr(
        step, "_measure_row", lambda s, b, kind, n, w: {"batch_size": b, "status": "ok"}
    )
    _, out_of_memory = step._setup_rows(None, 8, "paper", 1, 0, True, 64)
    assert out_of_memory == {"batch_size": 32, "status": "ok", "batch_limit_reached": False}
    _, limited = step._setup_rows(None, 8, "paper", 1, 0, True, 32)
    assert limited == {"batch_size": 32, "status": "ok", "batch_limit_reached": True}


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).reshape(2, 8, 3, 2, 8).permute(2, 0, 3, 1, 4)
        return nn.functional.scaled_dot_product_attention(q, k, v).sum()


def attention_ops_of_a_compiled_step(sdpa: str) -> set[str]:
    """The attention operations one compiled forward + backward runs under `sdpa`."""
    torch._dynamo.reset()  # as bench.step does between setups
    compiled = torch.compile(Attention())
    x = torch.randn(2, 8, 16, requires_grad=True)
    with step.forced_attention(sdpa):
        compiled(x).backward()  # compiles
        with torch.profiler.profile() as prof:
            compiled(x).backward()
    return {e.name for e in prof.events() if "attention" in e.name or e.name == "aten::bmm"}


def test_a_forced_attention_kernel_is_compiled_in_after_another_kernel(tmp_path, monkeypatch):
    """AOTAutograd's compile cache keys a graph without the SDPA backend flags, so a step compiled
    after another kernel's step would reuse that kernel (what the H200's `step-sdpa` rows did):
    `forced_attention` must compile the kernel it names. On the CPU: flash (torch's choice), then
    math (matmuls, no fused attention op)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # an empty cache to start with
    flash = "aten::_scaled_dot_product_flash_attention_for_cpu"
    assert flash in attention_ops_of_a_compiled_step("default")
    math_ops = attention_ops_of_a_compiled_step("math")
    assert flash not in math_ops and "aten::bmm" in math_ops, math_ops


def test_step_eager_grid_from_the_command_line(tmp_path):
    """`--grid eager`: every precision x fused/unfused AdamW, none compiled."""
    argv = ["--grid", "eager", "--mode", "finetune", "--device", "cpu", "--steps", "1"]
    assert step.main([*argv, "--warmup", "0", "--results-dir", str(tmp_path)]) == 0
    result = read_result(tmp_path / f"step-grid-smoke-{socket.gethostname()}.json")
    combos = [(r["precision"], r["optimizer"], r["compile"]) for r in result["rows"]]
    want = [
        (p, o, False) for p in ("bf16", "bf16-master", "fp16", "fp32") for o in ("fused", "unfused")
    ]
    assert combos == want
    assert all(r["status"] == "ok" for r in result["rows"]), result["rows"]


@pytest.mark.cuda
def test_step_on_cuda_measures_memory_and_searches_the_largest_batch(tmp_path):
    path = step.run(
        modes=("finetune",),
        device="cuda",
        smoke=True,
        steps=2,
        warmup=1,
        batch_limit=64,
        results_dir=tmp_path,
        log=lambda s: None,
    )
    rows = read_result(path)["rows"]
    assert [r["batch_kind"] for r in rows] == ["smoke", "max"]
    assert rows[1]["status"] == "ok" and rows[1]["batch_size"] == 64  # the tiny model fits
    assert rows[1]["batch_limit_reached"]
    assert all(r["peak_memory_gib"] > 0 for r in rows)
    peak = step.peak_bf16_tflops(torch.cuda.get_device_name())
    assert (rows[0]["mfu"] is None) == (peak is None)


def _loader_payload(gpu: bool) -> dict:
    machine = {"hostname": "gpu-node", "gpu_count": 8, "gpu_name": "NVIDIA H100 80GB HBM3"}
    return {
        "machine": machine if gpu else None,
        "config": {"mode": "pretrain", "batch_size": 16},
        "rows": [
            {"pipeline": "dali", "samples_per_s": 98.0, "mode": "pretrain"},
            {"pipeline": "baseline", "samples_per_s": 46.5, "mode": "pretrain"},
        ],
        "summary": {"speedup": 2.1},
    }


def test_report_writes_markdown_and_plots(step_result, tmp_path):
    results = step_result.parent
    write_result("loader-test", _loader_payload(gpu=True), results)
    out = tmp_path / "out"
    path = report.write_report(results, out)
    text = path.read_text()
    assert path == out / "REPORT.md"
    images = sorted(p.name for p in (out / "plots").glob("*.png"))
    stem = step_result.stem
    assert images == sorted([f"{stem}.png", f"loader-test-{socket.gethostname()}.png"])
    for name in images:
        assert f"(plots/{name})" in text
        pixels = matplotlib.image.imread(out / "plots" / name)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    # The CPU-only step result is marked, the (fake) GPU loader result is not.
    assert f"### `{step_result.name}` (not yet measured on a GPU)" in text
    assert f"### `loader-test-{socket.gethostname()}.json`\n" in text
    loader_section = text.split("## Loader")[1].split("## ")[0]
    assert "not yet measured" not in loader_section
    assert "| dali | 98 | pretrain |" in text
    assert "| pretrain | bf16 | fused | no | 4 | smoke | ok |" in text


def test_report_names_a_bad_result_file(tmp_path):
    bad = tmp_path / "loader-bad.json"
    bad.write_text(json.dumps({"benchmark": "loader", "machine": {}, "config": {}, "summary": {}}))
    with pytest.raises(ResultError, match="loader-bad.json.*rows"):
        report.write_report(tmp_path, tmp_path / "out")
    bad.write_text("{not json")
    assert report.main(["--results", str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    bad.write_text(
        json.dumps(
            {
                "benchmark": "loader",
                "machine": {},
                "config": {},
                "summary": {},
                "rows": [{"samples_per_s": 1.0}],
            }
        )
    )
    with pytest.raises(ResultError, match="loader-bad.json: row 0 .* lacks pipeline"):
        report.write_report(tmp_path, tmp_path / "out")


def test_write_result_is_atomic_and_named_by_host(tmp_path):
    path = write_result("scaling-demo", _loader_payload(gpu=False), tmp_path)
    assert path == result_path("scaling-demo", tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    result = read_result(path)
    assert result["machine"]["hostname"] == socket.gethostname()
    assert result["rows"][0]["pipeline"] == "dali"
    with pytest.raises(ValueError, match="result name"):
        write_result("../escape", _loader_payload(gpu=False), tmp_path)
    with pytest.raises(ResultError, match="rows"):
        write_result("x", {"config": {}, "rows": {}, "summary": {}}, tmp_path)


def test_loader_benchmark_smoke_writes_a_valid_result(synth_small, tmp_path):
    import json

    from bench.loader import main

    args = [
        "--data",
        str(synth_small.root),
        "--seconds",
        "4",
        "--batch-size",
        "2",
        "--batches",
        "2",
        "--warmup",
        "1",
        "--cores",
        "1",
        "--smoke",
        "--results-dir",
        str(tmp_path),
        "--shard-dir",
        str(tmp_path / "shards"),
        "--layouts",
        "frames,webm,frames-shards",
        "--repeats",
        "2",
        "--hw-decoder-load",
        "1.0",  # recorded; the CPU decoder has no hardware path
        "--baseline-work",
        "paper,lean",
    ]
    assert main(args) == 0
    (path,) = tmp_path.glob("loader-smoke-*.json")
    result = json.loads(path.read_text())
    assert result["config"]["hw_decoder_load"] == 1.0
    pipelines = {row["pipeline"] for row in result["rows"]}
    assert pipelines == {
        "dali-frames",
        "dali-webm",
        "dali-frames-shards",
        "baseline-frames",
        "baseline-webm",
        "baseline-frames-lean",
        "baseline-webm-lean",
    }
    assert all(row["samples_per_s"] > 0 for row in result["rows"])
    assert set(result["summary"]["ratio"]) == {"frames", "webm"}
    # The ratio is against the first paper-style loader listed; each one's against its own rows.
    summary, rows = result["summary"], {r["pipeline"]: r for r in result["rows"]}
    assert summary["baseline_work"] == "paper" and result["config"]["baseline_work"] == [
        "paper",
        "lean",
    ]
    assert summary["ratio_by_baseline_work"]["paper"] == summary["ratio"]
    for work, suffix in (("paper", ""), ("lean", "-lean")):
        base = rows[f"baseline-frames{suffix}"]
        assert base["baseline_work"] == work
        want = rows["dali-frames"]["samples_per_s"] / base["samples_per_s"]
        assert summary["ratio_by_baseline_work"][work]["frames"] == pytest.approx(want, abs=0.01)
    # Two alternating rounds: each row is the median of its two, each layout has two ratios.
    assert all(len(row["round_samples_per_s"]) == 2 for row in result["rows"])
    for row in result["rows"]:  # every field of a row comes from the same round
        assert row["samples"] / row["seconds"] == pytest.approx(row["samples_per_s"], rel=0.01)
        assert min(row["round_samples_per_s"]) == pytest.approx(row["samples_per_s"], abs=0.01)
    assert all(len(v) == 2 for v in result["summary"]["ratio_rounds"].values())
    assert result["config"]["train_entries"] == 8
    assert result["summary"]["shards_vs_files"]["frames"] > 0
    assert (tmp_path / "shards" / "shards-frames" / "train.json").exists()
    assert result["summary"]["baseline_ms_per_sample_core"] > 0
    assert result["summary"]["baseline_ms_per_sample_core_paper"] > 0
    source = result["summary"]["source_ms_per_sample_core"]
    assert 0 < source < 100 and result["summary"]["source_cores_at_1200_per_s"] > 0
    assert 0 < result["summary"]["source_ms_per_sample_core_webm"] < 100
    assert 0 < result["summary"]["source_ms_per_sample_core_webm_unprobed"] < 100


@pytest.mark.parametrize("what", ["step", "stage", "e2e"])
def test_profile_smoke_writes_a_valid_result(synth_small, tmp_path, what):
    import json

    from bench.profile import main
    from bench.report import write_report

    args = ["--what", what, "--smoke", "--data", str(synth_small.root), "--seconds", "4"]
    # recorded (the filterbank is torch's on a CPU either way; no JPEG hardware here)
    args += ["--fbank-backend", "torch", "--hw-decoder-load", "1.0"] if what == "e2e" else []
    args += ["--step-stream", "high-priority"] if what == "e2e" else []
    # the step with torch's unfused AdamW, our GELU with fc1's bias (torch's GELU on a CPU) and
    # split q, k, v GEMMs
    args += ["--unfused", "--gelu", "triton-bias", "--qkv", "split"] if what == "step" else []
    assert main(args + ["--cores", "1", "--results-dir", str(tmp_path / "results")]) == 0
    (path,) = (tmp_path / "results").glob(f"profile-{what}-*.json")
    result = json.loads(path.read_text())
    (row,) = result["rows"]
    assert row["what"] == what and row["wall_ms_per_iter"] > 0
    assert row["optimizer"] == ("unfused" if what == "step" else "fused")
    assert row["gelu"] == ("triton-bias" if what == "step" else "torch")
    assert row["qkv"] == ("split" if what == "step" else "packed")
    assert row["fbank_backend"] == ("torch" if what == "e2e" else "auto")
    assert row["fbank_ran"] == "torch"  # "auto" on a CPU is torch's
    assert row["hw_decoder_load"] == (1.0 if what == "e2e" else 0.65)
    assert row["step_stream"] == {"e2e": "high-priority", "step": "default", "stage": None}[what]
    # On the CPU both are torch's for-loop AdamW (fused and foreach need CUDA tensors)
    assert row["optimizer_impl"] == (None if what == "stage" else "for-loop")
    assert row["syncs_per_iter"] == 0 and row["launches_per_iter"] == 0  # no GPU here
    if what == "stage":  # the filterbank, masks, crops and colour ops: hundreds of aten ops
        assert row["dispatched_ops_per_iter"] > 100
        # As a GPU would run it (fused Triton kernels, counted not run): far fewer host ops,
        # and the filterbank and the audio geometry are one launch each.
        assert 0 < row["gpu_policy_ops_per_iter"] < row["dispatched_ops_per_iter"] / 2
        launches = row["gpu_policy_triton_launches"]
        assert launches["fbank"] == 1 and launches["fbank_geometry"] == 1
    ops = {o["name"] for o in result["summary"]["top_ops"]}
    assert ("aten::addmm" in ops or "aten::mm" in ops) if what != "stage" else ops
    assert result["summary"]["device_ms_by_class"] == {}  # no device kernel on a CPU
    report = write_report(tmp_path / "results", tmp_path)
    assert "Profiles: where the time goes" in report.read_text()


def test_fbank_benchmark_smoke_writes_a_valid_result(tmp_path):
    """bench.fbank on real .wav files of a rendered synthetic set: the torch backend timed, the
    Triton kernel (tf32x3 dots) run interpreted in a subprocess (TRITON_INTERPRET=1 must be set
    before triton is imported) and compared with torch's numbers; a JSON the report reads."""
    import subprocess
    import sys

    from bench.report import write_report
    from tests.subprocess_env import interpreter_env

    pytest.importorskip("triton")
    results = tmp_path / "results"
    args = ["--smoke", "--data", str(tmp_path / "data"), "--clips", "4", "--seconds", "1"]
    args += ["--backends", "torch", "triton-tf32x3", "--repeats", "1", "--warmup", "0"]
    env = interpreter_env()
    run = subprocess.run(
        [sys.executable, "-m", "bench.fbank", *args, "--results-dir", str(results)],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    (path,) = results.glob("fbank-smoke-*.json")
    result = read_result(path)
    assert result["config"]["clips_read"] == 2 and result["config"]["samples_per_clip"] == 16000
    rows = {r["backend"]: r for r in result["rows"]}
    assert set(rows) == {"torch", "triton-tf32x3"}
    assert all(r["status"] == "ok" and r["batch_size"] == 2 and r["ms"] > 0 for r in rows.values())
    assert all(r["host_ms"] == r["ms"] for r in rows.values())  # a CPU: the wall clock both
    assert rows["torch"]["frames"] == rows["triton-tf32x3"]["frames"] == 98  # 1 s at 10 ms
    assert rows["torch"]["mean_abs_diff_vs_torch"] == 0
    # Interpreted dots are NumPy's float32: the kernel's IEEE numbers (see test_fbank_kernel)
    assert 0 < rows["triton-tf32x3"]["mean_abs_diff_vs_torch"] < 2e-5
    assert result["summary"] == {"device": "cpu", "fastest": {"2": "torch"}, "vs_triton": {}}
    text = write_report(results, tmp_path).read_text()
    assert "## The input stage's filterbank by backend (`fbank-*`)" in text


def test_fbank_benchmark_names_bad_files_and_keeps_the_other_backends(tmp_path, monkeypatch):
    """bench.fbank reads 16 kHz mono .wav files and says which file is not; a backend that
    fails (a compile error on a GPU) is a row with its error, and the others are measured."""
    import numpy as np
    import soundfile

    from bench import fbank as bench_fbank
    from tests.signals import make_signal

    music = make_signal("music", 1.0, 16000, 0).astype(np.float32)
    good, fast, stereo = tmp_path / "good.wav", tmp_path / "22k.wav", tmp_path / "stereo.wav"
    soundfile.write(good, music, 16000, subtype="PCM_16")
    soundfile.write(fast, music, 22050, subtype="PCM_16")
    soundfile.write(stereo, np.stack([music, music], axis=1), 16000, subtype="PCM_16")
    (wave,) = bench_fbank.read_wavs([good])
    assert wave.shape == (16000,) and wave.dtype == torch.float32
    with pytest.raises(ValueError, match=r"22k\.wav: 22050 Hz"):
        bench_fbank.read_wavs([good, fast])
    with pytest.raises(ValueError, match=r"stereo\.wav: 2 channels"):
        bench_fbank.read_wavs([stereo])

    real = bench_fbank.fbank

    def flaky(wave, lengths, backend="auto"):
        if backend == "auto":
            raise RuntimeError("no kernel today")
        return real(wave, lengths, backend=backend)

    monkeypatch.setattr(bench_fbank, "fbank", flaky)
    rows = bench_fbank.measure([wave], [2], ["auto", "torch"], torch.device("cpu"), 1, 0)
    assert rows[0] == {"backend": "auto", "batch_size": 2,
                       "status": "error: RuntimeError: no kernel today"}  # fmt: skip
    assert rows[1]["backend"] == "torch" and rows[1]["status"] == "ok" and rows[1]["ms"] > 0
    assert bench_fbank.summarize(rows, torch.device("cpu"))["fastest"] == {"2": "torch"}


def test_kernel_classes_of_gpu_profiles(tmp_path):
    """The kernel names of the H200's compiled bf16-master step (a committed profile) fall
    into the classes `bench.profile` sums and the report shows: cuBLAS GEMMs, cuDNN attention
    and its helper kernels, inductor's fused GELU / LayerNorm / layout-copy kernels, the fused
    AdamW's foreach kernel; the loader stage's own kernels (the H200's stage profile) are the
    input stage, DALI's and nvJPEG's are "dali"."""
    from bench.common import DEFAULT_RESULTS_DIR, device_ms_by_class, kernel_class
    from bench.report import write_report

    source = DEFAULT_RESULTS_DIR / "profile-step-master-b128-h200.json"
    summary = read_result(source)["summary"]
    kernels = summary["top_kernels"]
    classes = {k["name"]: kernel_class(k["name"]) for k in kernels}
    want = {
        "nvjet_sm90_tst_192x192_64x3_1x2_h_bz_coopB_splitK_NTN": "gemm",
        "triton_poi_fused_gelu_gelu_backward_view_57": "gelu",
        "triton_poi_fused_clone_permute_stack_61": "copy",
        "triton_red_fused_sum_view_43": "other",
    }
    assert {name: classes[name] for name in want} == want
    by_prefix = {name[:40]: label for name, label in classes.items()}
    assert by_prefix["cudnn_generated_fort_native_sdpa_sm90_fl"] == "attention"
    assert by_prefix["void cudnn::fusion::convert_dq_to_16bits"] == "attention"
    assert by_prefix["triton_per_fused__to_copy_add_native_lay"] == "layer_norm"  # not a copy
    assert by_prefix["void at::native::(anonymous namespace)::"] == "optimizer"
    assert kernel_class("triton_tem_fused_addmm_gelu_7") == "gemm"  # GELU in a GEMM epilogue
    for ours in ("_gelu_kernel", "_gelu_backward_kernel", "_bias_gelu_backward_kernel"):
        assert kernel_class(ours) == "gelu"  # kernels/gelu.py
    stage = read_result(DEFAULT_RESULTS_DIR / "profile-stage-h200.json")["summary"]
    stage_classes = {k["name"]: kernel_class(k["name"]) for k in stage["top_kernels"]}
    assert stage_classes["_jitter_kernel"] == stage_classes["_fbank_kernel"] == "input_stage"
    assert stage_classes["Memcpy HtoD (Pinned -> Device)"] == "copy"
    # DALI's kernels and its codecs' (names as the profiler demangles them, from the libraries
    # of the DALI 2.4 wheel): the loader's, whatever words of other classes they hold.
    for name in (
        "void dali::kernels::transpose_impl::TransposeTiledBatch<int4>"
        "(dali::kernels::transpose_impl::TiledTransposeDesc<int4> const*)",
        "void nvjpeg::dctQuantInvJpegKernel<ushort2, 1, 32, 8>(nvjpeg::InvDctParams)",
        "void nvimgcodec::ConvertKernel<float, float, nvimgcodec::Gray_to_RGB_Converter<float, "
        "float> >(nvimgcodec::Surface<2, float>, nvimgcodec::Surface<2, float>)",
    ):
        assert kernel_class(name) == "dali", name
    kernels = [k for k in kernels if "#" not in k["name"]]  # not the AdamW.step annotation
    totals = device_ms_by_class([(k["name"], k["device_ms_per_iter"]) for k in kernels])
    assert list(totals)[:3] == ["gemm", "attention", "gelu"]  # largest first
    assert sum(totals.values()) == pytest.approx(sum(k["device_ms_per_iter"] for k in kernels))
    # The report shows the classes: of the top kernels for a profile recorded before them.
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / source.name).write_text(source.read_text())
    text = write_report(tmp_path / "results", tmp_path).read_text()
    assert f"| kernel class (its top {len(kernels)} kernels only) |" in text
    gemm_row = next(line for line in text.splitlines() if line.startswith("| gemm |"))
    share = 100 * totals["gemm"] / summary["device_ms_per_iter"]
    assert gemm_row == f"| gemm | {totals['gemm']:.2f} | {share:.1f} % |"
    # An H100 profile of 2026-11-25 lists inductor's kernels twice (host op and kernel, the same
    # time) and the host's "Command Buffer Full" waits: the report counts each kernel once.
    old = DEFAULT_RESULTS_DIR / "profile-step-compiled-b128-h100.json"
    (tmp_path / "results" / old.name).write_text(old.read_text())
    listed = read_result(old)["summary"]["top_kernels"]
    (waits,) = [k["device_ms_per_iter"] for k in listed if k["name"] == "Command Buffer Full"]
    listed = [k for k in listed if k["name"] != "Command Buffer Full"]
    once = {k["name"]: k["device_ms_per_iter"] for k in listed}
    assert len(once) < len(listed)
    text = write_report(tmp_path / "results", tmp_path).read_text()
    assert f"| kernel class (its top {len(once)} kernels only) |" in text
    layer_norm = device_ms_by_class(list(once.items()))["layer_norm"]
    assert f"| layer_norm | {layer_norm:.2f} |" in text and f"| other | {waits:.2f} |" not in text


def test_end_to_end_plot_shows_the_range_of_repeated_rounds():
    """A row measured in several rounds gets a whisker from its slowest to its fastest round
    over its (median) bar; a row measured once, none; rounding of the stored rounds never makes
    a whisker negative."""
    from matplotlib.container import ErrorbarContainer

    base = {"mode": "pretrain", "model": "tiny", "status": "ok", "step_only_samples_per_s": 30.0}
    rows = [
        {**base, "pipeline": "step-only", "samples_per_s": 30.0},
        {**base, "pipeline": "dali-frames", "samples_per_s": 13.327,  # its slower round
         "round_samples_per_s": [16.68, 13.33]},
        {**base, "pipeline": "baseline-frames", "samples_per_s": 8.0,
         "round_samples_per_s": [8.0]},
    ]  # fmt: skip
    plt = report._pyplot()
    fig = report._plot_end_to_end(plt, {"rows": rows}, "t")
    (bars,) = [c for c in fig.axes[0].containers if isinstance(c, ErrorbarContainer)]
    (segments,) = [seg for seg in bars.lines[2][0].get_segments()]
    (x0, low), (x1, high) = segments
    plt.close(fig)
    assert x0 == x1 == pytest.approx(1 - 0.2)  # over the dali row's end-to-end bar
    assert (low, high) == (pytest.approx(13.327), pytest.approx(16.68))


def test_report_states_the_targets_against_the_best_measurements(tmp_path):
    """The "targets at a glance" table: the best GPU measurement at 2 cores per target, met or
    not, "not measured" where there is none; CPU results and other core counts do not count."""
    gpu, cpu = {"device": "cuda"}, {"device": "cpu"}
    frames = {"pipeline": "dali-frames", "layout": "frames", "threads": 2, "status": "ok"}

    def result(name, config, summary, *rows):
        write_result(name, {"config": config, "rows": list(rows), "summary": summary}, tmp_path)

    result("loader-a", {"cores": 2}, {**gpu, "ratio": {"frames": 12.5, "webm": 3.0}},
           {**frames, "samples_per_s": 900.0})  # fmt: skip
    result("loader-b", {"cores": 4}, {**gpu, "ratio": {"frames": 40.0}},
           {**frames, "threads": 4, "samples_per_s": 5000.0})  # fmt: skip
    result("loader-c", {"cores": 2}, {**cpu, "ratio": {"frames": 1.5}},
           {**frames, "samples_per_s": 60.0})  # fmt: skip
    step_row = {"mode": "pretrain", "status": "ok", "batch_kind": "fixed", "batch_size": 64,
                "optimizer": "fused", "compile": True, "step_time_ms": 100.0}  # fmt: skip
    result("step-a", {}, gpu, {**step_row, "precision": "bf16", "mfu": 0.30},
           {**step_row, "precision": "bf16-master", "mfu": 0.36},
           {**step_row, "precision": "bf16-master", "mfu": 0.38, "gelu": "triton-bias",
            "sdpa": "flash", "qkv": "split"},
           {**step_row, "precision": "bf16-master", "mfu": 0.47, "linear": "float8"},
           {**step_row, "precision": "fp32", "mfu": 0.50},
           {**step_row, "mode": "finetune", "precision": "bf16", "mfu": 0.60},
           {**step_row, "precision": "bf16", "mfu": 0.61, "batch_kind": "smoke"})  # fmt: skip
    result("step-smoke", {"smoke": True}, gpu, {**step_row, "precision": "bf16", "mfu": 0.7})
    e2e_row = {"mode": "pretrain", "model": "full", "status": "ok", "batch_size": 64,
               "precision": "bf16-master", "cores": 2, "samples_per_s": 500.0,
               "step_only_samples_per_s": 520.0}  # fmt: skip
    result("end_to_end-a", {"cores": 2},
           {**gpu, "comparisons": [{"mode": "pretrain", "model": "full",
                                    "dali_vs_baseline": 9.5}]},
           {**e2e_row, "pipeline": "dali-frames", "vs_step_only": 0.96, "hw_decoder_load": 1.0,
            "fbank_backend": "triton-tf32x3"},
           {**e2e_row, "pipeline": "baseline-frames", "samples_per_s": 52.6})  # fmt: skip
    # Two DALI-fed rows, one per step stream: each comparison is named by its own row's setting.
    result("end_to_end-b", {"cores": 2},
           {**gpu, "comparisons": [
               {"mode": "pretrain", "model": "full", "step_stream": "default",
                "dali_vs_baseline": 9.0},
               {"mode": "pretrain", "model": "full", "step_stream": "high-priority",
                "dali_vs_baseline": 10.2},
               {"mode": "pretrain", "model": "full", "step_stream": "default",
                "pinned_cores": [0, 1], "dali_vs_baseline": 10.4, "baseline_work": "paper",
                "dali_cpu_cores_busy": 1.234, "baseline_cpu_cores_busy": 1.987}]},
           {**e2e_row, "pipeline": "dali-frames", "vs_step_only": 0.90, "step_stream": "default"},
           {**e2e_row, "pipeline": "dali-frames", "vs_step_only": 0.95,
            "step_stream": "high-priority"},
           {**e2e_row, "pipeline": "baseline-frames", "samples_per_s": 49.0},
           {**e2e_row, "pipeline": "dali-frames", "vs_step_only": 0.93, "step_stream": "default",
            "pinned_cores": [0, 1]},
           {**e2e_row, "pipeline": "baseline-frames", "samples_per_s": 47.0,
            "pinned_cores": [0, 1]})  # fmt: skip
    text = report.write_report(tmp_path, tmp_path / "out").read_text()
    # A contents line whose every link has its anchor, with each section's counts.
    contents = next(line for line in text.splitlines() if line.startswith("Contents: "))
    links = re.findall(r"\]\(#([^)]+)\)", contents)
    assert links == ["targets", "loader", "step", "end_to_end"]
    assert set(links) <= set(re.findall(r'<a id="([^"]+)"></a>', text))
    assert "[Loader throughput by pipeline](#loader) (3 results, 2 on a GPU)" in contents
    table = {
        line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:]
        for line in text.splitlines()
        if line.startswith("| ") and " | " in line
    }
    loader = table["GPU, 2 cores: loader, DALI / paper-style, JPEG frames"]
    assert loader[1:3] == ["12.5x", "yes"]
    # a result from before the choice: the lean paper-style loader
    assert loader[3].endswith("(paper-style loader: lean, without its unused work) |")
    assert table["GPU, 2 cores: loader samples/s, JPEG frames"][1:3] == ["900", "no"]
    assert table["GPU, 2 cores: loader, DALI / paper-style, video files (webm)"][1:3] == [
        "3.00x",
        "no",
    ]
    assert table["CPU (2 cores): loader, DALI / paper-style, JPEG frames"][1:3] == ["1.50x", "no"]
    # float8 GEMMs (47 %) are not bf16's; a smoke run (a tiny model) never counts
    mfu = table["GPU: pretraining step MFU, bf16"]
    assert mfu[1:3] == ["38.0 %", "no"] and mfu[3].startswith("`step-a-")
    assert mfu[3].endswith(
        "(batch 64, bf16-master, compiled, Triton GELU with fc1's bias, split q/k/v GEMMs, "
        "flash attention) |"
    )
    setting = "(batch 64, bf16-master, hardware JPEG share 1, fbank triton-tf32x3) |"
    # The target's condition, the same CPU share: the pinned runs only.
    e2e = table[
        "GPU: DALI-fed / paper-style-fed pretraining, end to end, process pinned to 2 CPUs "
        "(the same CPU share)"
    ]
    assert e2e[1:3] == ["10.40x", "yes"] and e2e[3].startswith("`end_to_end-b-")
    assert e2e[3].endswith(
        "(batch 64, bf16-master, process pinned to 2 cores; paper-style loader: paper, its "
        "unused work included; CPU used: 1.23 cores DALI-fed, 1.99 paper-style) |"
    )
    unpinned = table[
        "GPU: the same, not pinned (2 DALI threads / 2 workers free to use a 16-core machine: "
        "not the target's CPU share)"
    ]
    assert unpinned[1:3] == ["10.20x", "yes"]
    assert unpinned[3].endswith(
        "(batch 64, bf16-master, high-priority step stream; paper-style loader: lean, without "
        "its unused work) |"
    )
    words = report._setting({"batch_size": 16, "precision": "bf16", "optimizer": "unfused"}, {})
    assert words == "batch 16, bf16, unfused AdamW"
    share = table["GPU: DALI-fed pretraining / step-only"]
    assert share[1:3] == ["96.0 %", "yes"] and share[3].endswith(setting)


def test_startup_check_cost_extrapolates_a_cost_per_entry_never_below_zero():
    """The checker's cost at the list's length: the slope between the two check sizes, taken
    as 0 where noise made it negative (both sizes a few milliseconds)."""
    from bench.startup import summarize

    def check(entries: int, cold: float, cached: float) -> dict:
        return {"phase": "check", "entries": entries, "cold_s": cold, "cached_s": cached,
                "trusted_s": cached / 2}  # fmt: skip

    rows = [
        {"phase": "read", "entries": 2000},
        check(40, cold=0.5, cached=0.010),
        check(200, cold=1.3, cached=0.008),  # cached: 2 ms less for more entries
    ]
    summary = summarize(rows, gpus_per_node=8)
    assert summary["check_cold_us_per_entry"] == pytest.approx(1e6 * 0.8 / 160)
    assert summary["check_cold_s_at_entries"] == pytest.approx(1.3 + 0.8 / 160 * 1800)
    assert summary["check_cached_us_per_entry"] == 0
    assert summary["check_cached_s_at_entries"] == 0.008


def test_startup_smoke_writes_a_valid_result(synth_small, tmp_path):
    """Every phase runs in its own process on a list over the synthetic clips; the source a
    DALI worker receives is the list's columns, not per-entry objects or a dense label matrix."""
    import json

    from bench.report import write_report
    from bench.startup import main

    args = ["--smoke", "--data", str(synth_small.root), "--seconds", "4", "--py-workers", "1"]
    assert main([*args, "--results-dir", str(tmp_path), "--quiet"]) == 0
    (path,) = tmp_path.glob("startup-smoke-*.json")
    result = json.loads(path.read_text())
    rows = {row["phase"]: row for row in result["rows"] if row["phase"] != "check"}
    checks = [row for row in result["rows"] if row["phase"] == "check"]
    assert list(rows) == ["read", "source", "loader"]
    assert rows["read"]["entries"] == rows["loader"]["entries"] == 2000
    assert 0 < rows["read"]["cached_s"]
    assert rows["source"]["pickle_mib"] * 2**20 / 2000 < 150  # bytes per entry
    assert rows["loader"]["children"] >= 1 and rows["loader"]["rank_pss_mib"] > 0
    assert [c["entries"] for c in checks] == [c["usable"] for c in checks] == [40, 200]
    assert all(0 < c["trusted_s"] and 0 < c["cached_s"] < c["cold_s"] for c in checks)
    # Trusting the cache skips a stat per file: at 40 entries that is within the timer's noise
    # (this failed about one run in five), at 200 it is not.
    assert checks[-1]["trusted_s"] < checks[-1]["cached_s"]
    summary = result["summary"]
    assert summary["node_gib"] == pytest.approx(8 * summary["rank_pss_mib"] / 1024)
    assert summary["check_cold_s_at_entries"] > summary["check_cached_s_at_entries"] > 0
    report = write_report(tmp_path, tmp_path / "out").read_text()
    # Host-side: never marked as waiting for a GPU measurement.
    assert f"### `{path.name}`\n" in report and "rank_pss_mib" in report


def test_the_benchmarks_take_the_model_levers_with_the_trainers_defaults():
    """--gelu, --qkv and --linear on bench.step, bench.end_to_end and bench.profile: the
    config's choices, its defaults when unset, and a misspelt choice refused."""
    from bench import end_to_end, profile
    from bench.common import model_choices

    assert model_choices("linear") == ("default", "float8")
    for module in (step, end_to_end, profile):
        parser = module.build_parser()
        unset = parser.parse_args([])
        model = ModelConfig()
        assert (unset.gelu, unset.qkv, unset.linear) == (model.gelu, model.qkv, model.linear)
        args = parser.parse_args(["--gelu", "triton", "--qkv", "split", "--linear", "float8"])
        assert (args.gelu, args.qkv, args.linear) == ("triton", "split", "float8")
        with pytest.raises(SystemExit):
            parser.parse_args(["--linear", "fp8"])


def test_every_result_file_the_docs_cite_is_committed():
    """README.md and bench/GPU-SESSIONS.md cite result files by name (`end_to_end-h200-...json`);
    each one a result kind's file (the report's kinds) must be in bench/results/, so that a
    renamed or forgotten result shows here rather than as a dead reference."""
    root = Path(__file__).resolve().parents[1]
    committed = {p.name for p in (root / "bench" / "results").glob("*.json")}
    kinds = "|".join(re.escape(k) for k in report.TITLES)
    cited_in = {}
    for doc in ("README.md", "bench/GPU-SESSIONS.md"):
        for name in re.findall(
            rf"\b((?:{kinds})-[A-Za-z0-9_.-]*\.json)\b", (root / doc).read_text()
        ):
            cited_in.setdefault(name, doc)
    assert len(cited_in) >= 10  # the pattern finds the citations (a broken one would find none)
    missing = {name: doc for name, doc in cited_in.items() if name not in committed}
    assert not missing, f"cited but not in bench/results/: {missing}"
