"""``train.step_stream``: the training step on a CUDA stream of the highest priority, so that the
loader's kernels (on streams of the lowest) take only what the step leaves idle. On a CPU it
changes nothing; the trainer's wiring and the GPU's stream are checked here, the effect on the
step's speed by ``bench.end_to_end --step-stream default,high-priority`` on a GPU."""

from __future__ import annotations

import math

import pytest
import torch

import equiav.train.loop as loop
from equiav.config import ConfigError, apply_overrides, default_config
from equiav.train.dist import DistInfo
from equiav.train.step import STEP_STREAMS, step_stream
from tests.test_train import run, tiny_config
from train import pretrain_task


def test_the_config_takes_only_the_known_step_streams():
    cfg = default_config("pretrain")
    assert cfg.train.step_stream == "default"
    cfg = apply_overrides(cfg, {"train.step_stream": "high-priority"})
    assert cfg.train.step_stream == "high-priority"
    with pytest.raises(ConfigError, match="train.step_stream"):
        apply_overrides(cfg, {"train.step_stream": "fast"})
    with pytest.raises(ValueError, match="train.step_stream must be one of"):
        with step_stream("fast", torch.device("cpu")):
            pass


@pytest.mark.parametrize("setting", STEP_STREAMS)
def test_on_a_cpu_no_stream_is_made(setting):
    with step_stream(setting, torch.device("cpu")) as stream:
        assert stream is None


def test_the_trainer_runs_its_steps_inside_the_configured_stream(
    synth_small, tmp_path, monkeypatch
):
    """Every optimiser step runs inside ``step_stream(train.step_stream, device)``."""
    seen: list[tuple[str, torch.device]] = []
    inside = {"now": False, "steps": 0}
    real_stream = loop.step_stream
    real_step = loop.optimizer_step

    class Recording:
        def __init__(self, setting, device):
            seen.append((setting, device))
            self.inner = real_stream(setting, device)

        def __enter__(self):
            inside["now"] = True
            return self.inner.__enter__()

        def __exit__(self, *exc):
            inside["now"] = False
            return self.inner.__exit__(*exc)

    def counted_step(*args, **kwargs):
        assert inside["now"], "a step ran outside the step stream"
        inside["steps"] += 1
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "step_stream", Recording)
    monkeypatch.setattr(loop, "optimizer_step", counted_step)
    cfg = tiny_config(
        synth_small, tmp_path, **{"train.max_steps": 3, "train.step_stream": "high-priority"}
    )
    summary, _ = run(cfg)
    assert seen == [("high-priority", torch.device("cpu"))]
    assert inside["steps"] == summary["steps"] == 3 and not inside["now"]


@pytest.mark.cuda
def test_the_high_priority_stream_is_the_devices_highest_and_ordered_with_the_outer_one():
    device = torch.device("cuda", torch.cuda.current_device())
    outer = torch.cuda.current_stream(device)
    # torch maps a request beyond its range to its highest priority (lower numbers are higher)
    highest = torch.cuda.Stream(device, priority=-1000).priority
    x = torch.randn(2048, 2048, device=device)
    with step_stream("high-priority", device) as stream:
        assert stream is not None and torch.cuda.current_stream(device) == stream
        assert stream.priority == highest < outer.priority == 0
        # x was made on the outer stream, the product is read there afterwards: both orders
        # come from the stream's waits, not from a host synchronisation.
        y = x
        for _ in range(20):
            y = torch.tanh(y @ x / 64)
    assert torch.cuda.current_stream(device) == outer
    expected = x
    for _ in range(20):
        expected = torch.tanh(expected @ x / 64)
    assert torch.allclose(y, expected, rtol=1e-4, atol=1e-5)
    with step_stream("default", device) as stream:
        assert stream is None and torch.cuda.current_stream(device) == outer


@pytest.mark.cuda
def test_training_on_the_high_priority_stream_equals_the_default_on_a_gpu(synth_small, tmp_path):
    """The same losses step for step with the loader's batches made on its thread's stream and
    handed over to the step's stream of either priority (fp32, no TF32: only the order of
    floating-point sums may differ between runs)."""
    device = torch.device("cuda", torch.cuda.current_device())
    gpu = DistInfo(0, 1, 0, device)
    losses = []
    for setting in STEP_STREAMS:
        cfg = tiny_config(
            synth_small,
            tmp_path / setting,
            **{
                "train.max_steps": 6,
                "train.step_stream": setting,
                "train.tf32": False,
                "data.thread_prefetch": 2,
            },
        )
        torch.manual_seed(cfg.train.seed)
        summary = loop.train(cfg, pretrain_task(cfg), gpu)
        losses.append([h["loss"] for h in summary["history"]])
    default, high = losses
    assert len(default) == len(high) == 6 and all(math.isfinite(x) for x in high)
    assert high == pytest.approx(default, rel=1e-4, abs=1e-5)
