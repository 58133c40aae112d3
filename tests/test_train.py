"""The pretraining trainer on the real DALI pipeline (CPU, fp32, tiny towers)."""

import math
import os
import signal

import pytest
import torch

from equiav.config import apply_overrides, default_config
from equiav.train.checkpoint import load
from equiav.train.dist import DistInfo
from equiav.train.loop import StopTraining, Task, train
from tests.tiny import synthetic_data_overrides
from train import finetune_task, pretrain_task

DIST = DistInfo(0, 1, 0, torch.device("cpu"))


def tiny_config(info, save_path, mode="pretrain", **extra):
    overrides = {
        **synthetic_data_overrides(info),
        "model.embed_dim": 32,
        "model.depth": 1,
        "model.num_heads": 2,
        "model.aug_hidden": 16,
        "model.head_hidden": 32,
        "model.head_out": 16,
        "model.predictor_heads": 2,
        "model.predictor_head_dim": 8,
        "model.cen_num": 2,
        "optim.lr": 1e-3,
        "optim.warmup_epochs": 0.5,
        "optim.max_epoch": 3,
        "optim.fused": False,
        "train.batch_size": 2,
        "train.precision": "fp32",
        "train.save_path": str(save_path),
        "train.log_every": 1,
    }
    overrides.update(extra)
    return apply_overrides(default_config(mode), overrides)


def run(cfg, task_fn=pretrain_task, wrap=None):
    torch.manual_seed(cfg.train.seed)
    task = task_fn(cfg)
    if wrap is not None:
        task = wrap(task)
    return train(cfg, task, DIST), task.model


@pytest.mark.parametrize("precision", ["fp32", "bf16-master"])
def test_a_short_run_lowers_the_loss(synth_small, tmp_path, precision):
    cfg = tiny_config(
        synth_small, tmp_path, **{"train.max_steps": 12, "train.precision": precision}
    )
    summary, _ = run(cfg)
    losses = [h["loss"] for h in summary["history"]]
    assert summary["steps"] == 12 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert (tmp_path / "config.yaml").exists()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    lines = (tmp_path / "tb" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) >= 12 and "train/inter" in lines[-1] and "perf/data_wait_frac" in lines[-1]


def test_one_step_changes_every_parameter_and_no_buffer(synth_small, tmp_path):
    cfg = tiny_config(synth_small, tmp_path, **{"train.max_steps": 1, "optim.grad_clip": 0.0})
    torch.manual_seed(0)
    before_model = pretrain_task(cfg).model
    before = {k: v.clone() for k, v in before_model.state_dict().items()}
    buffers = {k: v.clone() for k, v in before_model.named_buffers()}
    _, model = run(cfg)
    after = model.state_dict()
    params = dict(model.named_parameters())
    for name, value in after.items():
        if name in params:
            assert not torch.equal(value, before[name]), f"{name} did not change"
    for name, value in model.named_buffers():
        assert torch.equal(value, buffers[name]), f"buffer {name} changed"


@pytest.mark.parametrize("precision", ["fp32", "bf16-master"])
def test_resume_is_bit_exact_across_an_epoch_boundary(synth_small, tmp_path, precision):
    """6 steps straight == 3 steps, stop, resume, 3 more (8 clips / batch 2 = 4 steps an epoch).
    bf16-master: the model trains in bfloat16 and the checkpoints hold the float32 master
    weights, from which a resumed run continues exactly."""
    extra = {"train.precision": precision}
    straight_cfg = tiny_config(
        synth_small, tmp_path / "straight", **extra, **{"train.max_steps": 6}
    )
    straight_summary, straight = run(straight_cfg)
    first = tiny_config(synth_small, tmp_path / "split", **extra, **{"train.max_steps": 3})
    summary, _ = run(first)
    assert summary["steps"] == 3 and summary["epoch"] == 0
    second = tiny_config(
        synth_small, tmp_path / "split", **extra, **{"train.max_steps": 6, "train.resume": "auto"}
    )
    summary, resumed = run(second)
    assert summary["steps"] == 6 and summary["loss_is_finite"]
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    saved = load(straight_summary["checkpoint"])["model"]
    resumed_saved = load(summary["checkpoint"])["model"]
    for (name, a), b in zip(saved.items(), resumed_saved.values(), strict=True):
        assert a.dtype == torch.float32 or not a.is_floating_point()
        assert torch.equal(a, b), name
    want = torch.bfloat16 if precision == "bf16-master" else torch.float32
    assert all(p.dtype == want for p in straight.parameters())
    for name, p in straight.named_parameters():  # the model: its master weights, rounded
        assert torch.equal(p, saved[name].to(want)), name


def test_a_float32_run_resumes_in_bf16_master(synth_small, tmp_path):
    """Checkpoints are float32 whatever the precision, and the optimiser holds float32
    parameters in the same order either way: a run may switch precision when it resumes."""
    summary, _ = run(tiny_config(synth_small, tmp_path, **{"train.max_steps": 2}))
    first = load(summary["checkpoint"])
    cfg = tiny_config(
        synth_small,
        tmp_path,
        **{"train.max_steps": 4, "train.resume": "auto", "train.precision": "bf16-master"},
    )
    summary, model = run(cfg)
    assert summary["steps"] == 4 and summary["loss_is_finite"]
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    second = load(summary["checkpoint"])
    moment = second["optimizer"]["state"][0]["exp_avg"]
    assert moment.dtype == torch.float32
    assert not torch.equal(moment, first["optimizer"]["state"][0]["exp_avg"])
    changed = [k for k, v in second["model"].items() if not torch.equal(v, first["model"][k])]
    assert changed and all(v.dtype == torch.float32 for v in second["model"].values())


def test_checkpoint_holds_everything_a_resume_needs(synth_small, tmp_path):
    summary, _ = run(tiny_config(synth_small, tmp_path, **{"train.max_steps": 2}))
    state = load(summary["checkpoint"])
    for key in ("model", "optimizer", "schedule", "step", "rng", "loader", "config", "task"):
        assert key in state
    assert state["step"] == 2 and state["loader"][0]["global_position"] == 4


def _nan_at(task: Task, steps: set[int]) -> Task:
    calls = {"n": 0}
    inner = task.loss

    def loss(net, batch):
        value, metrics = inner(net, batch)
        calls["n"] += 1
        return (value * float("nan") if calls["n"] in steps else value), metrics

    task.loss = loss
    return task


def test_non_finite_losses_are_skipped_and_counted(synth_small, tmp_path):
    cfg = tiny_config(synth_small, tmp_path, **{"train.max_steps": 4})
    summary, _ = run(cfg, wrap=lambda t: _nan_at(t, {2, 3}))
    assert summary["steps"] == 4 and summary["nonfinite_total"] == 2
    assert summary["loss_is_finite"]


def test_too_many_non_finite_losses_stop_the_run(synth_small, tmp_path):
    cfg = tiny_config(
        synth_small, tmp_path, **{"train.max_steps": 6, "train.max_nonfinite_in_row": 2}
    )
    with pytest.raises(StopTraining, match="2 non-finite losses in a row"):
        run(cfg, wrap=lambda t: _nan_at(t, {2, 3}))


def test_sigterm_writes_a_checkpoint_and_stops_cleanly(synth_small, tmp_path):
    def wrap(task):
        calls = {"n": 0}
        inner = task.loss

        def loss(net, batch):
            calls["n"] += 1
            if calls["n"] == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return inner(net, batch)

        task.loss = loss
        return task

    summary, _ = run(tiny_config(synth_small, tmp_path, **{"train.max_steps": 8}), wrap=wrap)
    assert summary["stopped_by_signal"] == signal.SIGTERM and summary["steps"] == 2
    assert load(summary["checkpoint"])["step"] == 2


def test_missing_checkpoint_is_a_clear_error(synth_small, tmp_path):
    cfg = tiny_config(synth_small, tmp_path, **{"train.resume": str(tmp_path / "nope.pt")})
    with pytest.raises(Exception, match="nope.pt"):
        run(cfg)


def _eval_loss(cfg, model):
    """Mean BCE of the model over the training clips, read in eval mode (no augmentation)."""
    from dali_pipelines.loader import build_loader

    loader = build_loader(cfg, "train", "eval")
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            logits = model(batch["audio"], batch["visual"])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, batch["labels"], reduction="sum"
            )
            total, n = total + float(loss), n + logits.numel()
    model.train()
    return total / n


@pytest.mark.parametrize("ftmode", ["multimodal", "audio_only", "video_only"])
def test_finetune_modes_train_and_lower_the_loss(synth_small, tmp_path, ftmode):
    cfg = tiny_config(
        synth_small,
        tmp_path,
        "finetune",
        **{
            "model.ftmode": ftmode,
            "train.max_steps": 12,
            "optim.lr": 1e-4,
            "augment.ft_timem": 96,
            "model.pretrained_model": None,
            "train.batch_size": 4,
            "augment.mixup": 0.0,
            "optim.head_lr": 10.0,
            "optim.max_epoch": 10,
        },
    )
    torch.manual_seed(cfg.train.seed)
    before = _eval_loss(cfg, finetune_task(cfg).model)
    summary, model = run(cfg, task_fn=finetune_task)
    assert summary["steps"] == 12 and summary["loss_is_finite"]
    assert summary["best_metric"] is None  # no validation list configured
    after = _eval_loss(cfg, model)
    assert after < before - 0.02, (before, after)


def test_dry_run_prints_the_parameter_count(capsys):
    from train import main

    assert main(["pretrain", "--config", "configs/pretrain_audioset.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "trainable parameters: 210963968" in out and "tower_a: 85" in out


@pytest.mark.parametrize("val", ["val_json", "val_fraction"])
def test_finetuning_validates_every_epoch_and_keeps_the_best(
    synth_small, tmp_path, check_trust, val
):
    """On a validation list of its own, or on a held-out part of the training list, whose
    dataset check the validation loader takes from the training loader's cache as it is."""
    from train import finetune_task as task_fn

    source = (
        {"data.val_json": str(synth_small.root / "test.json")}
        if val == "val_json"
        else {"data.val_fraction": 0.25}
    )
    cfg = tiny_config(
        synth_small,
        tmp_path,
        "finetune",
        **{
            "train.max_steps": 6,
            "train.batch_size": 4,
            "optim.max_epoch": 10,
            "model.pretrained_model": None,
            "augment.ft_timem": 96,
            **source,
        },
    )
    torch.manual_seed(0)
    summary = train(cfg, task_fn(cfg, dist=DIST), DIST)
    assert check_trust == [False, val == "val_fraction"]  # the training list's check, then val's
    rows = [
        line
        for line in (tmp_path / "tb" / "metrics.jsonl").read_text().splitlines()
        if "eval/mAP" in line
    ]
    # 2 steps an epoch on the 8 training clips, 1 on the 6 left by the held-out 2: an
    # evaluation after each epoch of the 6 steps
    assert len(rows) == {"val_json": 3, "val_fraction": 6}[val]
    assert summary["best_metric"] is not None and 0 < summary["best_metric"] <= 1
    assert (tmp_path / "checkpoints" / "best.pt").exists()


def test_a_compiled_run_follows_the_eager_run(synth_small, tmp_path, monkeypatch):
    """train.compile: the trainer's loop around a torch.compile'd model (inductor on the CPU)
    gives the eager run's losses, and one compilation serves every batch (a recompilation, e.g.
    on a batch whose views have other strides, raises)."""
    import torch._dynamo

    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    losses = []
    for compiled in (False, True):
        cfg = tiny_config(
            synth_small,
            tmp_path / f"compile{compiled}",
            **{"train.max_steps": 3, "train.compile": compiled},
        )
        summary, _ = run(cfg)
        losses.append([h["loss"] for h in summary["history"]])
    eager, compiled = losses
    assert len(eager) == len(compiled) == 3
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    torch._dynamo.reset()


def test_compile_modes_of_our_own_reach_torch_compile_as_options(monkeypatch):
    """`train.compile_mode: coordinate-descent` (`gemm-autotune`) is torch.compile's default mode
    with inductor's coordinate-descent tuning (GEMM autotuning), passed as options (torch.compile
    takes a mode or options, not both); torch's own modes pass as modes. The calls are real:
    torch.compile checks option names when called (a misspelt one raises), and compiles only on
    first use."""
    from equiav.config import (
        COMPILE_OPTIONS,
        ConfigError,
        apply_overrides,
        default_config,
        validate,
    )
    from equiav.train.loop import compile_model

    calls = []
    real = torch.compile

    def spy(module, **kwargs):
        calls.append(kwargs)
        return real(module, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    module = torch.nn.Linear(2, 2)
    assert compile_model(module, "coordinate-descent") is not module
    compile_model(module, "gemm-autotune")
    compile_model(module, "reduce-overhead")
    assert calls == [
        {"options": {"coordinate_descent_tuning": True}},
        {"options": {"max_autotune_gemm": True}},
        {"mode": "reduce-overhead"},
    ]
    monkeypatch.setitem(COMPILE_OPTIONS, "misspelt", {"coordinate_descent_tunin": True})
    with pytest.raises(RuntimeError, match="coordinate_descent_tunin"):
        compile_model(module, "misspelt")

    def with_mode(mode: str):
        return validate(apply_overrides(default_config("pretrain"), {"train.compile_mode": mode}))

    assert with_mode("coordinate-descent").train.compile_mode == "coordinate-descent"
    with pytest.raises(ConfigError, match="compile_mode"):
        with_mode("coordinate")
