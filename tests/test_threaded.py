"""The background-thread loader: the same batches, state and errors as the loader it wraps, on
the synthetic set's real files (CPU here; the CUDA stream hand-over is checked on a GPU)."""

from __future__ import annotations

import math

import pytest
import torch

from dali_pipelines.loader import DaliLoader
from dali_pipelines.threaded import ThreadedLoader
from equiav.data.index import read_dataset, read_label_csv
from tests.test_loader import collect, small_config
from tests.test_train import run, tiny_config


def loader_for(info, mode="pretrain", state=None, device="cpu") -> DaliLoader:
    entries = read_dataset(info.root / "train.json")
    return DaliLoader(
        entries, read_label_csv(info.label_csv), small_config(mode), None, device, state
    )


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key].cpu(), y[key].cpu()), key


@pytest.mark.parametrize("depth", [1, 3])
def test_threaded_batches_equal_the_plain_loaders_over_two_epochs(synth_small, depth):
    plain, threaded = loader_for(synth_small), ThreadedLoader(loader_for(synth_small), depth)
    assert threaded.steps_per_epoch == plain.steps_per_epoch and len(threaded) == len(plain)
    for epoch in range(2):
        assert threaded.epoch == plain.epoch == epoch
        assert_same_batches(collect(plain), collect(threaded))
        assert threaded.state_dict() == plain.state_dict()
    assert threaded.epoch == 2 and threaded.skipped == plain.skipped == {}


def test_state_after_an_early_stop_is_the_consumers_position(synth_small):
    """The thread has made batches ahead when the consumer stops; the saved state must point at
    the first batch not taken, and a loader resumed from it yields exactly that batch."""
    plain = loader_for(synth_small)
    expected = collect(plain)
    threaded = ThreadedLoader(loader_for(synth_small), depth=2)
    taken = []
    for batch in threaded:
        # As the plain loader: the state is after the batch just handed out.
        assert threaded.state_dict()["global_position"] == (len(taken) + 1) * 2
        taken.append({k: v.clone() for k, v in batch.items()})
        if len(taken) == 1:
            break
    assert_same_batches(taken, expected[:1])
    state = threaded.state_dict()
    assert state["epoch"] == 0 and state["global_position"] == 2  # one batch of 2 taken
    resumed = collect(loader_for(synth_small, state=state))
    assert_same_batches(resumed, expected[1:])
    with pytest.raises(RuntimeError, match="left unfinished"):
        next(iter(threaded))


def test_an_error_in_the_thread_is_raised_in_the_consumer(synth_small, monkeypatch):
    loader = loader_for(synth_small)
    calls = {"n": 0}
    stage = loader._device_stage

    def failing(out):
        calls["n"] += 1
        if calls["n"] == 2:
            raise ValueError("bad batch in the device stage")
        return stage(out)

    monkeypatch.setattr(loader, "_device_stage", failing)
    threaded = ThreadedLoader(loader)
    got = []
    with pytest.raises(ValueError, match="bad batch in the device stage"):
        for batch in threaded:
            got.append(batch)
    assert len(got) == 1


def test_training_with_the_thread_equals_training_without(synth_small, tmp_path):
    """The same losses step for step, and a checkpoint at the same loader position."""
    summaries = []
    for depth in (0, 2):
        cfg = tiny_config(
            synth_small,
            tmp_path / f"depth{depth}",
            **{"train.max_steps": 5, "data.thread_prefetch": depth},
        )
        summary, _ = run(cfg)
        summaries.append(summary)
    plain, threaded = summaries
    assert [h["loss"] for h in plain["history"]] == [h["loss"] for h in threaded["history"]]
    assert all(math.isfinite(h["loss"]) for h in threaded["history"])
    from equiav.train.checkpoint import load

    saved = [load(s["checkpoint"])["loader"] for s in summaries]
    assert saved[0] == saved[1]


@pytest.mark.cuda
def test_threaded_gpu_batches_equal_the_plain_gpu_loaders(synth_small):
    """On a GPU the batches are made on the thread's own stream and handed over with an event."""
    plain = collect(loader_for(synth_small, device="cuda"))
    threaded = collect(ThreadedLoader(loader_for(synth_small, device="cuda"), depth=2))
    assert_same_batches(plain, threaded)
