"""The optimiser step that never waits for the device, and the host's record of skipped steps.

The on-device skip runs on the CPU too (torch's fused AdamW has a CPU kernel that honours
``found_inf``), so its semantics are tested here against torch's own unfused AdamW; a CUDA test
checks that a whole training step and the loader's device stage make no host synchronisation.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from equiav.train.step import SkippedSteps, StopTraining, optimizer_step, skips_on_device


def model_and_data(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3))
    return model, torch.randn(5, 6), torch.randn(5, 3)


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor, poison: bool = False):
    loss = ((model(x) - y) ** 2).mean()
    return loss * float("nan") if poison else loss


def adamw(model: nn.Module, fused: bool) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1, fused=fused or None)


def state_of(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    return {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict())}


def assert_same_state(a: dict, b: dict) -> None:
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for i, s in a["opt"]["state"].items():
        for key, value in s.items():
            assert torch.equal(value, b["opt"]["state"][i][key]), (i, key)


@pytest.mark.parametrize("fused", [True, False])
def test_finite_steps_equal_torch_adamw_and_skips_change_nothing(fused):
    """A run with poisoned steps in it equals the same run without them (fused: skipped inside
    the kernel, step counts included; unfused: skipped before the backward pass), and its finite
    steps equal a plain torch AdamW loop with clipping."""
    model, x, y = model_and_data()
    ref_model = copy.deepcopy(model)
    opt, ref_opt = adamw(model, fused), adamw(ref_model, fused)
    assert skips_on_device(opt, None) is fused
    params = list(model.parameters())
    poisoned = {1, 2, 4}
    for i in range(6):
        before = state_of(model, opt)
        outcome = optimizer_step(loss_of(model, x, y, i in poisoned), params, opt, None, 0.5)
        assert float(outcome.nonfinite) == float(i in poisoned)
        if i in poisoned:
            assert_same_state(before, state_of(model, opt))
            continue
        ref_opt.zero_grad()
        loss_of(ref_model, x, y).backward()
        norm = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.5)
        ref_opt.step()
        assert float(outcome.grad_norm) == pytest.approx(float(norm), rel=1e-6)
        for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    steps = [float(s["step"]) for s in opt.state_dict()["state"].values()]
    assert steps == [3.0] * len(steps)  # six calls, three updates


def test_a_non_finite_gradient_with_a_finite_loss_is_skipped_on_the_device():
    model, x, y = model_and_data()
    opt = adamw(model, fused=True)
    before = state_of(model, opt)
    loss = loss_of(model, x, y)
    model[0].weight.register_hook(lambda g: g * float("inf"))
    outcome = optimizer_step(loss, list(model.parameters()), opt, None, 1.0)
    assert float(outcome.nonfinite) == 1.0 and not torch.isfinite(outcome.grad_norm)
    assert_same_state(before, state_of(model, opt))
    assert getattr(opt, "found_inf", None) is None  # not left behind for the next step


def test_skipped_steps_counts_warns_and_stops(caplog):
    record = SkippedSteps(max_in_row=3)
    with caplog.at_level(logging.WARNING):
        for step, flag in enumerate([0, 1, 1, 0, 1, 1], start=1):
            record.add(step, torch.tensor(float(flag)))
            record.poll()
    assert (record.total, record.in_row, record.last_skipped) == (4, 2, True)
    assert sum("update skipped" in r.message for r in caplog.records) == 4
    assert "step 6" in caplog.records[-1].message
    record.add(7, torch.tensor(1.0))
    with pytest.raises(StopTraining, match="3 non-finite losses in a row at step 7"):
        record.poll(wait=True)
    with pytest.raises(ValueError, match="max_in_row"):
        SkippedSteps(0)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["pretrain", "finetune"])
def test_a_training_step_makes_no_host_synchronisation(mode):
    """Forward, loss and optimizer_step of the smoke-size model in bf16 with fused AdamW under
    torch's sync debug mode: any blocking copy or read of a device value raises."""
    from bench.step import StepSetup, run_config, synthetic_batch
    from equiav.train.optim import build_optimizer
    from train import finetune_task, pretrain_task

    device = torch.device("cuda")
    cfg = run_config(StepSetup(mode, "bf16", True, False), smoke=True)
    task = (pretrain_task if mode == "pretrain" else finetune_task)(cfg, load_weights=False)
    model = task.model.to(device)
    opt = build_optimizer(model, cfg.optim, device, task.new_parameters)
    assert skips_on_device(opt, None)
    params = [p for p in model.parameters() if p.requires_grad]
    batch = synthetic_batch(mode, cfg, 4, device)
    for debug in ("default", "error"):  # the first step fills lazy caches
        torch.cuda.set_sync_debug_mode(debug)
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _ = task.loss(model, batch)
            outcome = optimizer_step(loss, params, opt, None, cfg.optim.grad_clip)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert float(outcome.nonfinite) == 0.0
