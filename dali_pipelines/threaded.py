"""A loader whose batches are made in a background thread, ahead of the training step.

Why: on a GPU the training process's one Python thread was the limit of DALI-fed training (an
H100, batch 16: the step's ~2000 kernel launches and the device stage's ~700 take ~130 ms of host
time per step, the GPU's work ~40 ms; ``bench/GPU-SESSIONS.md``). PyTorch releases the GIL while
an operator dispatches and launches, so a second thread that takes DALI's next batch and runs the
device stage (filterbank, augmentation kernels) overlaps most of its host time with the step's.

The thread runs the wrapped ``DaliLoader``'s epoch on its own CUDA stream and hands each finished
batch over a queue of ``depth`` batches with an event; the consumer's stream waits for the event
(no host wait) and the batch's tensors are recorded as used on it, so that the caching allocator
does not reuse their memory early. Batches, their order, the skipped entries and the state saved
for resuming are the wrapped loader's: ``state_dict`` counts the batches the consumer took, not
the ones made ahead. An error in the thread is raised in the consumer. Off by default
(``data.thread_prefetch``); not yet measured on a GPU.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator

import torch

from dali_pipelines.loader import DaliLoader

_END = object()


class ThreadedLoader:
    """``DaliLoader`` with its epochs produced ``depth`` batches ahead in a background thread."""

    def __init__(self, loader: DaliLoader, depth: int = 1) -> None:
        if depth < 1:
            raise ValueError(f"ThreadedLoader: depth must be >= 1, got {depth}")
        self.loader, self.depth = loader, depth
        self._running: tuple[int, int] | None = None  # (epoch, consumed) while an epoch runs
        self._unfinished = False  # an epoch was stopped early: see __iter__

    @property
    def epoch(self) -> int:
        """The epoch being consumed (the thread may already have finished it)."""
        return self._running[0] if self._running is not None else self.loader.epoch

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
        if self._running is None:
            return self.loader.state_dict()
        return self.loader.state_at(*self._running)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        device = self.loader.device
        cuda = device.type == "cuda"
        handoff: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def produce() -> None:
            stream = torch.cuda.Stream(device) if cuda else None
            try:
                with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                    for batch in self.loader:
                        event = torch.cuda.Event() if cuda else None
                        if event is not None:
                            event.record(stream)
                        handoff.put((batch, event))
                        if stop.is_set():
                            return
                handoff.put((_END, None))
            except BaseException as e:  # noqa: BLE001 (handed to the consumer, raised there)
                handoff.put((e, None))

        if self._unfinished:
            raise RuntimeError(
                "ThreadedLoader: an epoch was left unfinished (its next batches were already "
                "made); build a new loader from this one's state_dict() to go on"
            )
        self._running = (self.loader.epoch, 0)
        finished = False
        thread = threading.Thread(target=produce, name="equiav-loader", daemon=True)
        thread.start()
        try:
            while True:
                item, event = handoff.get()
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
                epoch, consumed = self._running
                self._running = (epoch, consumed + 1)
                yield item
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting to hand over a batch
                with contextlib.suppress(queue.Empty):
                    handoff.get(timeout=0.05)
            thread.join()
            if not finished:
                # The thread made batches nobody took: the wrapped loader's position must be the
                # consumer's, so that a checkpoint resumes at the first batch not trained on.
                self.loader.epoch, self.loader.steps_done = self._running
                self._unfinished = True
            self._running = None
