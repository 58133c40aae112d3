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

from equiav.train.optim import MasterWeights
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


def test_master_weight_steps_equal_adamw_on_float32_copies_and_skips_change_nothing():
    """bf16-master: each update is torch's AdamW (with clipping) applied to float32 parameters
    with the bfloat16 model's gradients; the model then holds the result rounded to bfloat16.
    Poisoned steps change nothing (skipped inside the fused kernel)."""
    model, x, y = model_and_data()
    ref = [nn.Parameter(p.detach().clone()) for p in model.parameters()]
    master = MasterWeights(model)
    opt = torch.optim.AdamW(master.master, lr=0.05, weight_decay=0.1, fused=True)
    ref_opt = torch.optim.AdamW(ref, lr=0.05, weight_decay=0.1, fused=True)
    x16, y16 = x.bfloat16(), y.bfloat16()
    for i in range(5):
        poisoned = i == 2
        shadow = copy.deepcopy(model)  # the same bfloat16 forward, for the reference gradients
        loss_of(shadow, x16, y16).backward()
        before = [m.detach().clone() for m in master.master]
        outcome = optimizer_step(loss_of(model, x16, y16, poisoned), [], opt, None, 0.5, master)
        assert float(outcome.nonfinite) == float(poisoned)
        assert all(p.grad is None for p in model.parameters())  # moved to the copies
        if poisoned:
            assert all(torch.equal(a, b) for a, b in zip(before, master.master, strict=True))
        else:
            for r, p in zip(ref, shadow.parameters(), strict=True):
                r.grad = p.grad.float()
            norm = torch.nn.utils.clip_grad_norm_(ref, 0.5)
            ref_opt.step()
            assert float(outcome.grad_norm) == pytest.approx(float(norm), rel=1e-6)
        for m, r, p in zip(master.master, ref, model.parameters(), strict=True):
            torch.testing.assert_close(m, r, rtol=1e-6, atol=1e-7)
            assert p.dtype == torch.bfloat16 and torch.equal(p, m.detach().bfloat16())


def test_master_weights_keep_the_updates_bfloat16_parameters_lose():
    """The reason for the copies: Adam moves a weight by about lr per step; at 1.0, where
    bfloat16's spacing is 2^-7, steps of 1e-3 round away in a bfloat16 parameter, while the
    float32 copy accumulates them and the model follows once they add up."""
    x = torch.ones(4, 3)

    def run(use_master: bool) -> tuple[nn.Linear, MasterWeights | None]:
        layer = nn.Linear(3, 1, bias=False)
        nn.init.ones_(layer.weight)
        master = MasterWeights(layer) if use_master else None
        if master is None:
            layer.bfloat16()
        params = master.master if master is not None else list(layer.parameters())
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
        for _ in range(10):
            optimizer_step(layer(x.bfloat16()).sum(), params, opt, None, 0.0, master)
        return layer, master

    plain, _ = run(use_master=False)
    assert torch.equal(plain.weight, torch.ones(1, 3, dtype=torch.bfloat16))  # never moved
    layer, master = run(use_master=True)
    torch.testing.assert_close(master.master[0], torch.full((1, 3), 0.99), rtol=0, atol=1e-6)
    assert torch.equal(layer.weight, torch.full((1, 3), 0.99).bfloat16())  # 0.9921875


def test_master_weights_leave_a_parameter_without_gradient_alone():
    """A parameter the loss does not use gets no gradient, so AdamW (weight decay included)
    leaves its copy as it was, as it would leave the parameter itself."""
    model, x, y = model_and_data()
    model.append(nn.Linear(3, 3))  # after the loss: never used
    unused = model[3].weight.detach().clone()
    master = MasterWeights(model)
    opt = torch.optim.AdamW(master.master, lr=0.05, weight_decay=0.1)
    for _ in range(2):
        loss = ((model[:3](x.bfloat16()) - y.bfloat16()) ** 2).mean()
        optimizer_step(loss, [], opt, None, 0.0, master)
    assert master.master_of(model[3].weight).grad is None
    assert torch.equal(master.master_of(model[3].weight), unused)
    assert not torch.equal(master.master_of(model[0].weight), model_and_data()[0][0].weight)


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
@pytest.mark.parametrize(
    ("mode", "precision"),
    [("pretrain", "bf16"), ("finetune", "bf16"), ("pretrain", "bf16-master")],
)
def test_a_training_step_makes_no_host_synchronisation(mode, precision):
    """Forward, loss and optimizer_step of the smoke-size model in bf16 (or bf16-master) with
    fused AdamW under torch's sync debug mode: any blocking copy or read of a device value
    raises."""
    from bench.step import StepSetup, run_config, synthetic_batch
    from equiav.train.optim import autocast, build_optimizer, master_weights
    from train import finetune_task, pretrain_task

    device = torch.device("cuda")
    cfg = run_config(StepSetup(mode, precision, True, False), smoke=True)
    task = (pretrain_task if mode == "pretrain" else finetune_task)(cfg, load_weights=False)
    model = task.model.to(device)
    master = master_weights(model, precision)
    opt = build_optimizer(model, cfg.optim, device, task.new_parameters, master)
    assert skips_on_device(opt, None)
    params = [p for p in model.parameters() if p.requires_grad]
    batch = synthetic_batch(mode, cfg, 4, device)
    for debug in ("default", "error"):  # the first step fills lazy caches
        torch.cuda.set_sync_debug_mode(debug)
        try:
            with autocast(precision, device):
                loss, _ = task.loss(model, batch)
            outcome = optimizer_step(loss, params, opt, None, cfg.optim.grad_clip, master)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert float(outcome.nonfinite) == 0.0
