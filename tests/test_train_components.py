"""Tests of the trainer's components: optimiser groups and schedule (equiav.train.optim),
checkpoints (equiav.train.checkpoint) and run logging (equiav.train.metrics_log). CPU only."""

from __future__ import annotations

import copy
import json
import random
import socket
import sys

import numpy as np
import pytest
import torch
from torch import nn

from equiav.config import OptimConfig
from equiav.train.checkpoint import (
    BEST_NAME,
    INDEX_NAME,
    CheckpointError,
    CheckpointManager,
    gather_rank_states,
    latest_checkpoint,
    load,
    resolve_resume,
    rng_state,
    set_rng_state,
)
from equiav.train.metrics_log import (
    METRICS_FILE,
    MetricsLogger,
    ProgressBar,
    StepTimer,
    environment_info,
)
from equiav.train.optim import (
    LRSchedule,
    autocast,
    build_optimizer,
    clip_grad_norm,
    make_scaler,
    master_weights,
)

# ---------------------------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------------------------

BASE, START, MIN = 1e-4, 2e-7, 1e-6


def expected_lr(step: np.ndarray, warmup: int, total: int) -> np.ndarray:
    """The spec's curve written directly: linear warmup, then half a cosine, then flat."""
    warm = START + (BASE - START) * step / max(warmup, 1)
    progress = np.clip((step - warmup) / (total - warmup), 0.0, 1.0)
    cosine = MIN + 0.5 * (BASE - MIN) * (1.0 + np.cos(np.pi * progress))
    return np.where(step < warmup, warm, cosine)


def test_schedule_known_steps_and_formula():
    sched = LRSchedule(BASE, START, MIN, warmup_steps=10, total_steps=110)
    assert sched.lr_at(0) == pytest.approx(START, rel=1e-12)
    assert sched.lr_at(5) == pytest.approx((START + BASE) / 2, rel=1e-12)
    assert sched.lr_at(10) == pytest.approx(BASE, rel=1e-12)  # end of warmup: the peak
    assert sched.lr_at(60) == pytest.approx((BASE + MIN) / 2, rel=1e-12)  # mid cosine
    assert sched.lr_at(110) == pytest.approx(MIN, rel=1e-12)
    assert sched.lr_at(500) == pytest.approx(MIN, rel=1e-12)  # past the end: flat
    steps = np.arange(0, 130)
    got = np.array([sched.lr_at(int(s)) for s in steps])
    np.testing.assert_allclose(got, expected_lr(steps, 10, 110), rtol=1e-12, atol=0)
    diffs = np.diff(got)
    assert (diffs[:10] > 0).all()  # warmup rises
    assert (diffs[10:] <= 0).all() and (diffs[10:109] < 0).all()  # cosine falls, then flat


def test_schedule_without_warmup_and_from_config():
    assert LRSchedule(BASE, START, MIN, 0, 100).lr_at(0) == pytest.approx(BASE, rel=1e-12)
    cfg = OptimConfig(warmup_epochs=1.5, max_epoch=20)
    sched = LRSchedule.from_config(cfg, steps_per_epoch=10)
    assert (sched.warmup_steps, sched.total_steps) == (15, 200)
    assert (sched.base_lr, sched.warmup_start_lr, sched.min_lr) == (cfg.lr, 2e-7, 1e-6)
    with pytest.raises(ValueError, match="total_steps"):
        LRSchedule(BASE, START, MIN, warmup_steps=20, total_steps=10)


def test_schedule_state_dict_round_trip():
    sched = LRSchedule(BASE, START, MIN, 7, 70)
    state = sched.state_dict()
    assert json.loads(json.dumps(state)) == state  # plain numbers
    other = LRSchedule(1.0, 0.0, 0.0, 0, 1)
    other.load_state_dict(state)
    assert other == sched
    with pytest.raises(ValueError, match="keys"):
        other.load_state_dict({"base_lr": 1.0})


# ---------------------------------------------------------------------------------------------
# Optimiser
# ---------------------------------------------------------------------------------------------


def small_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    model[1].bias.requires_grad_(False)  # frozen: must not be optimised
    return model


def test_param_groups_and_head_lr_scale():
    model = small_model()
    cfg = OptimConfig(lr=1e-4, weight_decay=1e-5, betas=(0.9, 0.95), eps=1e-7, head_lr=50.0)
    opt = build_optimizer(model, cfg, "cpu", new_parameters=model[2].parameters())
    assert isinstance(opt, torch.optim.AdamW)
    body, new = opt.param_groups
    assert (body["name"], body["lr_scale"], new["name"], new["lr_scale"]) == (
        "body",
        1.0,
        "new",
        50.0,
    )
    ids = lambda ps: {id(p) for p in ps}
    assert ids(new["params"]) == ids(model[2].parameters())
    assert ids(body["params"]) == {id(model[0].weight), id(model[0].bias), id(model[1].weight)}
    assert body["lr"] == pytest.approx(1e-4) and new["lr"] == pytest.approx(5e-3)
    for group in (body, new):
        assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.9, 0.95), 1e-7, 1e-5)
    assert not opt.defaults.get("fused")  # fused only on CUDA

    sched = LRSchedule(1e-4, 2e-7, 1e-6, 10, 100)
    assert sched.apply(opt, 3) == pytest.approx(sched.lr_at(3))
    assert body["lr"] == pytest.approx(sched.lr_at(3), rel=1e-12)
    assert new["lr"] == pytest.approx(50 * sched.lr_at(3), rel=1e-12)

    # One real step: AdamW's first update is p * (1 - lr * wd) - lr * g / (|g| + eps), so the new
    # layers must move with 50x the learning rate.
    before = {id(p): p.detach().clone() for p in model.parameters()}
    loss = model(torch.randn(5, 4)).square().sum()
    loss.backward()
    opt.step()
    for group in opt.param_groups:
        lr = group["lr"]
        for p in group["params"]:
            g, p0 = p.grad, before[id(p)]
            want = p0 * (1 - lr * 1e-5) - lr * g / (g.abs() + 1e-7)
            torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=1e-9)
    assert torch.equal(model[1].bias, before[id(model[1].bias)])  # frozen stays


def test_optimizer_without_new_layers_and_foreign_parameter():
    model = small_model()
    opt = build_optimizer(model, OptimConfig(), torch.device("cpu"))
    assert [g["name"] for g in opt.param_groups] == ["body"]
    with pytest.raises(ValueError, match="not a parameter of the model"):
        build_optimizer(model, OptimConfig(), "cpu", new_parameters=[nn.Parameter(torch.ones(2))])


def test_master_weights_cast_the_model_and_hold_float32_copies():
    model = small_model()
    model.register_buffer("scale", torch.full((3,), 0.1))
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    master = master_weights(model, "bf16-master")
    assert master_weights(small_model(), "bf16") is None  # the other precisions: no copies
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.scale.dtype == torch.bfloat16
    # The trainable parameters only (model[1].bias is frozen), as exact float32 copies.
    assert master.names == ["0.weight", "0.bias", "1.weight", "2.weight", "2.bias"]
    for name, kept in zip(master.names, master.master, strict=True):
        assert kept.dtype == torch.float32 and torch.equal(kept, weights[name])
    assert master.master_of(model[2].bias) is master.master[4]
    with pytest.raises(ValueError, match="not one of the model's trainable parameters"):
        master.master_of(model[1].bias)

    # The optimiser steps the copies, in the same groups as without them.
    cfg = OptimConfig(lr=1e-4, head_lr=50.0)
    opt = build_optimizer(model, cfg, "cpu", new_parameters=model[2].parameters(), master=master)
    body, new = opt.param_groups
    ids = lambda ps: {id(p) for p in ps}
    assert ids(new["params"]) == ids(master.master[3:])
    assert ids(body["params"]) == ids(master.master[:3])

    # A checkpoint's state: float32 everywhere, the copies' exact values for trainable weights.
    with torch.no_grad():
        master.master[0].add_(1e-4)  # below bfloat16's resolution: only the copy holds it
    state = master.fp32_state(model.state_dict())
    assert list(state) == list(model.state_dict())
    assert all(v.dtype == torch.float32 for v in state.values())
    assert torch.equal(state["0.weight"], master.master[0])
    assert torch.equal(state["1.bias"], weights["1.bias"].bfloat16().float())  # frozen: cast
    assert torch.equal(state["scale"], torch.full((3,), 0.1).bfloat16().float())
    fresh = small_model()
    fresh.register_buffer("scale", torch.zeros(3))
    fresh.load_state_dict(state)  # a float32 model loads it as it is
    assert torch.equal(fresh[0].weight, master.master[0])


def test_apex_requested_but_missing(monkeypatch):
    # A None entry in sys.modules makes `import apex...` raise ImportError, whatever is installed.
    monkeypatch.setitem(sys.modules, "apex", None)
    monkeypatch.setitem(sys.modules, "apex.optimizers", None)
    with pytest.raises(RuntimeError, match="apex is not installed"):
        build_optimizer(small_model(), OptimConfig(use_apex=True), "cuda")


@pytest.mark.cuda
def test_fused_adamw_on_cuda():
    model = small_model().cuda()
    opt = build_optimizer(model, OptimConfig(fused=True), "cuda")
    assert opt.defaults["fused"] is True


def test_clip_grad_norm():
    a = nn.Parameter(torch.zeros(2))
    b = nn.Parameter(torch.zeros(1))
    c = nn.Parameter(torch.zeros(1))  # no grad: ignored
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    assert float(clip_grad_norm([a, b, c], 0)) == pytest.approx(5.0)  # measures only
    torch.testing.assert_close(a.grad, torch.tensor([3.0, 0.0]))
    norm = clip_grad_norm([a, b, c], 1.0)
    assert norm.dim() == 0 and float(norm) == pytest.approx(5.0)  # the norm before clipping
    total = torch.cat([a.grad, b.grad]).norm()
    assert total.item() == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(b.grad, torch.tensor([0.8]), rtol=1e-5, atol=0)
    assert float(clip_grad_norm([c], 1.0)) == 0.0


def test_precision_helpers():
    assert isinstance(make_scaler("fp16", "cpu"), torch.amp.GradScaler)
    assert make_scaler("bf16", "cpu") is None and make_scaler("fp32", "cpu") is None
    assert make_scaler("bf16-master", "cpu") is None
    x = torch.randn(4, 4)
    for precision in ("bf16", "bf16-master"):
        with autocast(precision, "cpu"):
            assert (x @ x).dtype == torch.bfloat16
    with autocast("fp32", "cpu"):
        assert (x @ x).dtype == torch.float32
    with pytest.raises(ValueError, match="precision"):
        autocast("fp8", "cpu")


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def draws() -> tuple[torch.Tensor, np.ndarray, float]:
    return torch.rand(5), np.random.rand(5), random.random()


def test_checkpoint_round_trip(tmp_path):
    model = small_model()
    opt = build_optimizer(model, OptimConfig(), "cpu", new_parameters=model[2].parameters())
    sched = LRSchedule(BASE, START, MIN, 2, 10)
    for step in range(3):
        sched.apply(opt, step)
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    rng = rng_state()
    expected = draws()  # what the generators give next, after the saved state

    manager = CheckpointManager(tmp_path)
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "schedule": sched.state_dict(),
        "loader": gather_rank_states({"epoch": 1, "global_position": 48}),
        "rng": gather_rank_states(rng),
    }
    path = manager.save(state, step=3, epoch=1)
    assert path == tmp_path / "ckpt-step00000003.pt" and path.is_file()
    assert manager.latest() == path

    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())  # state_dict() shares the live tensors
    with torch.no_grad():  # disturb everything the checkpoint must bring back
        for p in model.parameters():
            p.add_(1.0)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    draws()

    ckpt = load(path)
    assert ckpt["meta"]["step"] == 3 and ckpt["meta"]["epoch"] == 1
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"][0])
    for key, value in saved_model.items():
        assert torch.equal(model.state_dict()[key], value), key
    for pid, pstate in saved_opt["state"].items():
        for key, value in pstate.items():
            assert torch.equal(opt.state_dict()["state"][pid][key], value), (pid, key)
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in saved_opt["param_groups"]]
    assert ckpt["loader"] == [{"epoch": 1, "global_position": 48}]
    t, n, r = draws()
    assert torch.equal(t, expected[0])
    np.testing.assert_array_equal(n, expected[1])
    assert r == expected[2]


@pytest.mark.cuda
def test_cuda_rng_round_trip():
    torch.cuda.manual_seed(7)
    state = rng_state()
    expected = torch.rand(5, device="cuda")
    torch.rand(5, device="cuda")
    set_rng_state(state)
    assert torch.equal(torch.rand(5, device="cuda"), expected)


def test_interrupted_save_leaves_nothing_behind(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path)
    good = manager.save({"x": torch.arange(3)}, step=1, epoch=0)

    def crash(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # e.g. the job killed mid-write

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        manager.save({"x": torch.arange(3)}, step=2, epoch=0)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints.json", good.name]
    assert manager.latest() == good
    torch.testing.assert_close(load(good)["x"], torch.arange(3))


def test_leftover_temp_file_is_never_latest(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save({"x": 1}, step=1, epoch=0)
    good = manager.save({"x": 2}, step=2, epoch=0)
    # A crash mid-write of step 3 leaves a truncated temporary file beside the others.
    full = good.read_bytes()
    temp = tmp_path / ".ckpt-step00000003.pt.4242.deadbeef.tmp"
    temp.write_bytes(full[: len(full) // 2])
    assert manager.latest() == good
    assert latest_checkpoint(tmp_path) == good
    (tmp_path / INDEX_NAME).unlink()  # and when the index is gone too: scanning ignores it
    assert latest_checkpoint(tmp_path) == good
    CheckpointManager(tmp_path)  # a new run's manager clears the leftover
    assert not temp.exists() and good.is_file()


def test_keep_last_pruning_and_tags(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in range(1, 6):
        manager.save({"step": torch.tensor(step)}, step=step * 100, epoch=step)
    final = manager.save({"step": torch.tensor(0)}, step=550, epoch=5, tag="final")
    names = sorted(p.name for p in tmp_path.glob("*.pt"))
    assert names == ["ckpt-final.pt", "ckpt-step00000400.pt", "ckpt-step00000500.pt"]
    assert manager.latest() == final
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["regular"] == ["ckpt-step00000400.pt", "ckpt-step00000500.pt"]
    # A resumed run's manager continues the rotation.
    resumed = CheckpointManager(tmp_path, keep_last=2)
    last = resumed.save({"step": torch.tensor(6)}, step=600, epoch=6)
    names = sorted(p.name for p in tmp_path.glob("ckpt-step*.pt"))
    assert names == ["ckpt-step00000500.pt", "ckpt-step00000600.pt"]
    assert latest_checkpoint(tmp_path) == last and (tmp_path / "ckpt-final.pt").is_file()
    with pytest.raises(ValueError, match="tag"):
        resumed.save({}, step=1, epoch=0, tag="step00000001")
    with pytest.raises(ValueError, match="reserved"):
        resumed.save({"meta": 1}, step=1, epoch=0)


@pytest.mark.parametrize(
    ("mode", "metrics", "best_step"),
    [("max", [0.1, 0.5, float("nan"), 0.3], 2), ("min", [0.5, 0.1, float("nan"), 0.3], 2)],
)
def test_best_tracking(tmp_path, mode, metrics, best_step):
    manager = CheckpointManager(tmp_path, keep_last=1, metric_mode=mode)
    for step, metric in enumerate(metrics, start=1):
        manager.save({"value": torch.tensor(metric)}, step=step, epoch=step, metric=metric)
    best = load(tmp_path / BEST_NAME)
    assert best["meta"]["step"] == best_step  # survives the pruning of its regular checkpoint
    assert best["value"].item() == pytest.approx(metrics[best_step - 1])
    assert not (tmp_path / f"ckpt-step{best_step:08d}.pt").exists()
    assert manager.best_metric == pytest.approx(metrics[best_step - 1])
    # A resumed manager remembers the best: a worse metric does not replace best.pt.
    resumed = CheckpointManager(tmp_path, keep_last=1, metric_mode=mode)
    resumed.save({"value": torch.tensor(0.3)}, step=9, epoch=9, metric=0.3)
    assert load(tmp_path / BEST_NAME)["meta"]["step"] == best_step
    better = 0.9 if mode == "max" else 0.01
    resumed.save({"value": torch.tensor(better)}, step=10, epoch=10, metric=better)
    assert load(tmp_path / BEST_NAME)["meta"]["step"] == 10
    # Without the index, the best metric is read back from best.pt itself.
    (tmp_path / INDEX_NAME).unlink()
    assert CheckpointManager(tmp_path, metric_mode=mode).best_metric == pytest.approx(better)


def test_load_errors_name_the_file(tmp_path):
    manager = CheckpointManager(tmp_path)
    good = manager.save({"w": torch.randn(1000)}, step=1, epoch=0)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {"w": torch.ones(1)}}, foreign)
    with pytest.raises(CheckpointError, match=r"foreign\.pt: not an equiav training checkpoint"):
        load(foreign)
    future = tmp_path / "future.pt"
    torch.save({"format": "equiav-checkpoint", "version": 99, "meta": {}}, future)
    with pytest.raises(CheckpointError, match=r"future\.pt: checkpoint format version 99"):
        load(future)
    with pytest.raises(CheckpointError, match=r"missing\.pt: checkpoint file not found"):
        load(tmp_path / "missing.pt")


def test_resolve_resume(tmp_path):
    run = tmp_path / "run"
    assert resolve_resume(None, run) is None
    assert resolve_resume("auto", run) is None  # no directory yet: a fresh start
    manager = CheckpointManager(run)
    assert resolve_resume("auto", run) is None  # an empty directory too
    manager.save({}, step=1, epoch=0)
    second = manager.save({}, step=2, epoch=0)
    assert resolve_resume("auto", run) == second
    first = run / "ckpt-step00000001.pt"
    assert resolve_resume(str(first), tmp_path / "elsewhere") == first
    assert resolve_resume(str(run), tmp_path / "elsewhere") == second
    with pytest.raises(CheckpointError, match="nope.pt: resume checkpoint not found"):
        resolve_resume(str(tmp_path / "nope.pt"), run)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        resolve_resume(str(tmp_path / "empty"), run)


def test_gather_rank_states_without_process_group():
    obj = {"epoch": 2, "position": 96}
    assert gather_rank_states(obj) == [obj]


def _two_rank_worker(rank: int, init_file: str, directory: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        states = gather_rank_states({"rank": rank, "position": 10 * rank})
        manager = CheckpointManager(directory)
        path = manager.save({"loader": states}, step=7, epoch=0)
        dist.barrier()
        with open(f"{out}.{rank}", "w") as f:
            json.dump({"states": states, "path": str(path)}, f)
    finally:
        dist.destroy_process_group()


def test_gather_rank_states_two_ranks_and_rank0_writes(tmp_path):
    import torch.multiprocessing as mp

    directory, out = tmp_path / "ckpt", tmp_path / "out"
    args = (str(tmp_path / "init"), str(directory), str(out))
    # fork: the children inherit the imported modules (spawn would re-import torch: ~10 s here).
    mp.start_processes(_two_rank_worker, args=args, nprocs=2, join=True, start_method="fork")
    expected = [{"rank": 0, "position": 0}, {"rank": 1, "position": 10}]
    for rank in range(2):
        result = json.loads((tmp_path / f"out.{rank}").read_text())
        assert result["states"] == expected
        assert result["path"] == str(directory / "ckpt-step00000007.pt")
    assert load(directory / "ckpt-step00000007.pt")["loader"] == expected
    assert sorted(p.name for p in directory.iterdir()) == [INDEX_NAME, "ckpt-step00000007.pt"]


# ---------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------


def test_metrics_logger_writes_tensorboard_and_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, enabled=True) as log:
        for step in range(3):
            log.log(step, {"loss": torch.tensor(1.0 / (step + 1)), "lr": 1e-4 * step})
        log.text("config", "optim:\n  lr: 1e-4")
    events = list(tmp_path.glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert [s for s, _ in got] == [0, 1, 2]
    np.testing.assert_allclose([v for _, v in got], [1.0, 0.5, 1 / 3], rtol=1e-6)
    assert "config" in acc.Tags()["tensors"] or "config/text_summary" in acc.Tags()["tensors"]

    lines = [json.loads(x) for x in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1, 2]
    assert [x["lr"] for x in lines] == pytest.approx([0.0, 1e-4, 2e-4])
    assert lines[2]["loss"] == pytest.approx(1 / 3)

    # Resuming at step 2: the jsonl keeps steps 0 and 1, then continues.
    with MetricsLogger(tmp_path, enabled=True, purge_step=2) as log:
        log.log(2, {"loss": 0.25})
    lines = [json.loads(x) for x in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [(x["step"], x["loss"]) for x in lines] == [(0, 1.0), (1, 0.5), (2, 0.25)]

    quiet = tmp_path / "quiet"
    with MetricsLogger(quiet, enabled=False) as log:
        log.log(0, {"loss": 1.0})
        log.text("t", "x")
    assert not quiet.exists()


def test_progress_bar(capsys):
    with ProgressBar(4, desc="epoch 0", enabled=True) as bar:
        for _ in range(4):
            bar.update(1, loss=0.123456)
    err = capsys.readouterr().err
    assert "epoch 0" in err and "4/4" in err and "loss=0.1235" in err
    with ProgressBar(4, desc="silent", enabled=False) as bar:
        bar.update(1, loss=1.0)
    assert capsys.readouterr().err == ""


def test_step_timer_on_a_fake_clock():
    now = [0.0]
    timer = StepTimer(window=2, clock=lambda: now[0])
    assert timer.report() == {}

    def step(wait: float, compute: float, samples: int) -> None:
        timer.wait_start()
        now[0] += wait
        timer.wait_end()
        now[0] += compute
        timer.step_end(samples)

    step(0.3, 0.7, 16)  # 1 s, 30 % waiting
    report = timer.report()
    assert report["samples_per_s"] == pytest.approx(16.0)
    assert report["data_wait_frac"] == pytest.approx(0.3)
    assert report["step_ms"] == pytest.approx(1000.0)
    step(0.1, 0.9, 16)  # 2 s over the window, 0.4 s waiting
    report = timer.report()
    assert report["samples_per_s"] == pytest.approx(16.0)
    assert report["data_wait_frac"] == pytest.approx(0.2)
    now[0] += 0.5  # time outside wait_start..step_end (e.g. logging) counts as step time
    step(0.0, 0.5, 32)  # window 2: the first step drops out; 1 + 1 s, 0.1 s waiting
    report = timer.report()
    assert report["samples_per_s"] == pytest.approx(48 / 2.0)
    assert report["data_wait_frac"] == pytest.approx(0.1 / 2.0)
    assert "gpu_mem_gib" not in report
    with pytest.raises(RuntimeError, match="without wait_start"):
        timer.wait_end()


def test_environment_info():
    import nvidia.dali
    import timm

    info = environment_info()
    assert info["torch"] == torch.__version__
    assert info["dali"] == nvidia.dali.__version__
    assert info["timm"] == timm.__version__
    assert info["hostname"] == socket.gethostname()
    assert info["python"] == ".".join(map(str, sys.version_info[:3]))
    assert info["cuda_devices"] == (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else []
    )
    json.dumps(info)  # saved with a run as JSON
