"""The background-thread loader: the same batches, state and errors as the loader it wraps, on
the synthetic set's real files (CPU here; the CUDA stream hand-over is checked on a GPU)."""

from __future__ import annotations

import gc
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from dali_pipelines.loader import DaliLoader
from dali_pipelines.threaded import ThreadedLoader
from equiav.data.index import read_dataset, read_label_csv
from tests.test_loader import collect, small_config
from tests.test_train import run, tiny_config

REPO = Path(__file__).resolve().parent.parent


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


def _wait_until(condition, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "equiav-loader"]


def test_the_thread_starts_the_next_epoch_before_it_is_asked_for(synth_small):
    """After the consumer's last batch of an epoch the thread goes on into the next (depth
    batches ahead) while the state still says "start of the next epoch"; close() then sets the
    wrapped loader back, and a loader resumed from that state yields the next epoch's batches."""
    plain = loader_for(synth_small)
    first, second = collect(plain), collect(plain)
    threaded = ThreadedLoader(loader_for(synth_small), depth=2)
    assert_same_batches(collect(threaded), first)
    state = threaded.state_dict()
    assert threaded.epoch == 1 and state == loader_for(synth_small, state=state).state_dict()
    assert state["epoch"] == 1 and state["global_position"] == 0
    inner = threaded.loader
    _wait_until(lambda: inner.epoch == 1 and inner.steps_done >= 2)  # made ahead, not taken
    assert threaded.state_dict() == state
    threaded.close()
    assert (inner.epoch, inner.steps_done) == (1, 0) and threaded.state_dict() == state
    assert not _loader_threads()
    with pytest.raises(RuntimeError, match="left unfinished"):
        next(iter(threaded))
    assert_same_batches(collect(loader_for(synth_small, state=state)), second)


def test_the_thread_ends_with_its_loader(synth_small):
    """A thread running ahead into the next epoch ends when its loader is collected."""
    threaded = ThreadedLoader(loader_for(synth_small), depth=1)
    collect(threaded)
    assert len(_loader_threads()) == 1
    del threaded
    gc.collect()
    _wait_until(lambda: not _loader_threads(), seconds=30)


def test_stopping_a_stuck_thread_gives_up_after_its_time_limit():
    """At exit (or collection) the stop waits a bounded time: a thread stuck inside the loader
    must not hold the process."""
    from dali_pipelines.threaded import _Producer

    release = threading.Event()

    class Stuck:
        device = torch.device("cpu")

        def __iter__(self):
            release.wait()
            return iter(())

    producer = _Producer(Stuck(), depth=1)
    start = time.monotonic()
    stopper = threading.Thread(target=producer.stop, args=(0.3,))
    stopper.start()
    stopper.join(5)  # a stop that ignored its limit fails here instead of hanging the suite
    gave_up = not stopper.is_alive()
    release.set()  # let the thread go: it sees the stop request and ends
    assert gave_up and 0.3 <= time.monotonic() - start < 5
    producer.stop()
    assert not producer.thread.is_alive()


def test_a_process_exits_cleanly_with_a_thread_running_ahead(synth_small):
    """The interpreter's exit ends a thread blocked with batches of an epoch nobody will take
    (no hang, no crash in DALI's teardown)."""
    script = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
from pathlib import Path
from types import SimpleNamespace
from tests.test_threaded import ThreadedLoader, loader_for
root, labels = Path({str(synth_small.root)!r}), {str(synth_small.label_csv)!r}
loader = ThreadedLoader(loader_for(SimpleNamespace(root=root, label_csv=labels)), depth=2)
print(sum(len(b["index"]) for b in loader), flush=True)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "8"


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
    """On a GPU the batches are made on the thread's own stream and handed over with an event,
    over two epochs (the second's first batches made while the first is consumed)."""
    plain_loader = loader_for(synth_small, device="cuda")
    threaded_loader = ThreadedLoader(loader_for(synth_small, device="cuda"), depth=2)
    for _ in range(2):
        assert_same_batches(collect(plain_loader), collect(threaded_loader))
        assert threaded_loader.state_dict() == plain_loader.state_dict()
