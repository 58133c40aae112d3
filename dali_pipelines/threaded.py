"""A loader whose batches are made in a background thread, ahead of the training step.

Why: on a GPU the training process's one Python thread was the limit of DALI-fed training (an
H100, batch 16: the step's ~2000 kernel launches and the device stage's ~700 take ~130 ms of host
time per step, the GPU's work ~40 ms; ``bench/GPU-SESSIONS.md``). PyTorch releases the GIL while
an operator dispatches and launches, so a second thread that takes DALI's next batch and runs the
device stage (filterbank, augmentation kernels) overlaps most of its host time with the step's.

The thread runs the wrapped ``DaliLoader``'s epochs one after another on its own CUDA stream and
hands each finished batch over a queue of ``depth`` batches with an event; the consumer's stream
waits for the event (no host wait) and the batch's tensors are recorded as used on it, so that
the caching allocator does not reuse their memory early. The thread goes on into the next epoch
while the consumer finishes the current one (up to ``depth`` batches ahead, as within an epoch):
a new epoch starts DALI's pipeline afresh (~100 ms before its first batch on the 2-core VM, where
a step of the benchmarks' small sets crossed an epoch every few steps), and that start now
overlaps the last steps of the epoch before.

Batches, their order, the skipped entries and the state saved for resuming are the wrapped
loader's: ``state_dict`` counts the batches the consumer took, not the ones made ahead. An error
in the thread is raised in the consumer. A consumer that stops inside an epoch (or ``close``
while the thread has made batches of an epoch not yet begun) ends the thread; the loader then
cannot be iterated again (build a new one from ``state_dict()``). The thread also ends when the
loader is garbage-collected or the interpreter exits (waited for at most ``STOP_TIMEOUT_S``: a
thread stuck in the loader does not hold the process). Off by default (``data.thread_prefetch``).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import weakref
from collections.abc import Iterator

import torch

from dali_pipelines.loader import DaliLoader

_END = object()  # the end of an epoch, in the hand-over queue
# How long a collected loader's (or the exiting interpreter's) stop waits for the thread.
STOP_TIMEOUT_S = 30.0


class _Producer:
    """The background thread: the loader's epochs one after another, each batch (with the event
    that marks it done on the thread's stream) and then ``_END`` put on a queue of ``depth``."""

    def __init__(self, loader: DaliLoader, depth: int) -> None:
        self.handoff: queue.Queue = queue.Queue(maxsize=depth)
        self.stopping = threading.Event()
        self.thread = threading.Thread(
            target=self._run, args=(loader,), name="equiav-loader", daemon=True
        )
        self.thread.start()

    def _run(self, loader: DaliLoader) -> None:
        cuda = loader.device.type == "cuda"
        stream = torch.cuda.Stream(loader.device) if cuda else None
        try:
            with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                while not self.stopping.is_set():
                    for batch in loader:
                        event = torch.cuda.Event() if cuda else None
                        if event is not None:
                            event.record(stream)
                        self.handoff.put((batch, event))
                        if self.stopping.is_set():
                            return
                    self.handoff.put((_END, None))
        except BaseException as e:  # noqa: BLE001 (handed to the consumer, raised there)
            self.handoff.put((e, None))

    def get(self) -> tuple[object, torch.cuda.Event | None]:
        return self.handoff.get()

    def stop(self, timeout: float | None = None) -> None:
        """End the thread: it stops after the batch it is making (taken off the queue here, so
        that a thread waiting to hand one over is released). ``timeout``: give up after that
        many seconds (at the interpreter's exit, where a daemon thread that is stuck must not
        hold the process)."""
        self.stopping.set()
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.thread.is_alive():
            if deadline is not None and time.monotonic() > deadline:
                return
            with contextlib.suppress(queue.Empty):
                self.handoff.get(timeout=0.05)
        self.thread.join()


class ThreadedLoader:
    """``DaliLoader`` with its batches produced ``depth`` ahead in a background thread, across
    epoch boundaries."""

    def __init__(self, loader: DaliLoader, depth: int = 1) -> None:
        if depth < 1:
            raise ValueError(f"ThreadedLoader: depth must be >= 1, got {depth}")
        self.loader, self.depth = loader, depth
        self._producer: _Producer | None = None
        self._stop_producer: weakref.finalize | None = None
        # The consumer's (epoch, batches taken) while a producer runs (the wrapped loader's own
        # position is ahead of it by the batches made ahead).
        self._position: tuple[int, int] | None = None
        self._unfinished = False  # batches were made that nobody will take: see close

    @property
    def epoch(self) -> int:
        """The epoch being consumed (the thread may already be making the next)."""
        return self._position[0] if self._position is not None else self.loader.epoch

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):
        # Anything else (entries, steps_per_epoch, skipped, cfg, device, ...) is the wrapped
        # loader's.
        if name == "loader":  # not yet set (e.g. while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)

    def state_dict(self) -> dict:
        """The wrapped loader's state after the last batch the consumer took."""
        if self._position is None:
            return self.loader.state_dict()
        return self.loader.state_at(*self._position)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._unfinished:
            raise RuntimeError(
                "ThreadedLoader: an epoch was left unfinished (its next batches were already "
                "made); build a new loader from this one's state_dict() to go on"
            )
        if self._producer is None:
            self._position = (self.loader.epoch, 0)
            self._producer = _Producer(self.loader, self.depth)
            # Ends the thread when this loader is collected or the interpreter exits.
            self._stop_producer = weakref.finalize(self, self._producer.stop, STOP_TIMEOUT_S)
        device = self.loader.device
        finished = False
        try:
            while True:
                item, event = self._producer.get()
                if item is _END:
                    finished = True
                    break
                if isinstance(item, BaseException):
                    raise item
                if event is not None:
                    current = torch.cuda.current_stream(device)
                    current.wait_event(event)
                    for value in item.values():
                        if isinstance(value, torch.Tensor) and value.is_cuda:
                            value.record_stream(current)
                epoch, taken = self._position
                self._position = (epoch, taken + 1)
                yield item
        finally:
            if finished:
                self._position = (self._position[0] + 1, 0)  # as DaliLoader at an epoch's end
            else:
                self.close()

    def close(self) -> None:
        """End the background thread. If it had made batches the consumer did not take (inside
        an epoch, or of the next one), the wrapped loader's position is set back to the
        consumer's, so that a checkpoint resumes at the first batch not trained on, and this
        loader cannot be iterated again."""
        if self._producer is None:
            return
        self._stop_producer.detach()  # stopped here, without the time limit of the finalizer
        self._producer.stop()
        self._producer = self._stop_producer = None
        position = (self.loader.epoch, self.loader.steps_done)
        if position != self._position:
            self.loader.epoch, self.loader.steps_done = self._position
            self._unfinished = True
        self._position = None
