"""Batches made ahead on a background thread: `BatchProducer`, and `PrefetchingLoader`, which wraps a loader.

The training thread only takes ready batches from a bounded queue; reading windows (from shard
files, say), slicing them for sequence parallelism and pinning host memory happen on the producer
thread, which spends most of its time in file reads and tensor copies that release the GIL.
(`StreamingLoader` tokenizes on a `BatchProducer` of its own.)

Each batch travels with the loader state right after it, so a state saved at any moment is the
position after the last batch the training thread took, whatever the thread has read ahead since:
resuming stays exact.
"""

import copy
import queue
import threading
import weakref
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

from lsys.data.errors import DataError
from lsys.data.packing import Batch


class BatchProducer:
    """A daemon thread that puts `(batch, state after it)` into a bounded queue, then its end or error.

    `next_batch` makes the next batch (None: the data ended) and `state` tells the position after it;
    both run on the thread only. With `pin_memory` each batch is copied into page-locked host memory
    there, so that `.to("cuda", non_blocking=True)` on the training thread is an asynchronous copy.
    """

    _END = object()  # put after the last batch of data that does not repeat

    def __init__(
        self,
        next_batch: Callable[[], Batch | None],
        state: Callable[[], Any],
        *,
        prefetch_batches: int,
        thread_name: str,
        pin_memory: bool = False,
    ):
        if prefetch_batches < 1:
            raise DataError(f"prefetch_batches must be at least 1, got {prefetch_batches}")
        self._next_batch = next_batch
        self._state = state
        self._pin_memory = pin_memory
        self._ready: queue.Queue = queue.Queue(maxsize=prefetch_batches)
        self.stopping = threading.Event()
        self._thread = threading.Thread(target=self._produce, name=thread_name, daemon=True)
        self._thread.start()

    def take(self) -> tuple[Batch, Any] | None:
        """The next ready batch and the state after it; None at the end; the producer's error is raised here."""
        item = self._ready.get()
        if item is BatchProducer._END:
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def stop(self) -> None:
        """Stops the thread and waits for it (at most the batch it is making)."""
        self.stopping.set()
        self._thread.join()

    def _produce(self) -> None:
        try:
            while not self.stopping.is_set():
                batch = self._next_batch()
                if batch is None:
                    self._put(BatchProducer._END)
                    return
                if self._pin_memory:
                    batch = tuple(tensor.pin_memory() for tensor in batch)
                self._put((batch, self._state()))
        except BaseException as error:  # handed to the consumer, which raises it with its own message
            self._put(error)

    def _put(self, item: Any) -> None:
        # A short timeout, so a full queue nobody takes from any more does not keep the thread past stop().
        while not self.stopping.is_set():
            try:
                self._ready.put(item, timeout=0.1)
                return
            except queue.Full:
                continue


class StatefulLoader(Protocol):
    """An iterator of batches whose position is a state dict: `PackedLoader`, `StreamingLoader`, `SequenceSlices`."""

    def __next__(self) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class BackgroundLoader:
    """Batches taken from a `BatchProducer` that starts at the first batch asked for, with the state after each.

    `state_dict()` is the position after the last batch handed out, whatever the thread has read
    ahead. `close()` stops the thread (read-ahead batches are dropped, the position is kept); the
    next batch asked for starts a new one there. Subclasses say how a producer starts from a state.
    """

    def __init__(self, state: dict[str, Any]):
        self._state = state
        self._producer: BatchProducer | None = None
        self._stop_when_dropped: weakref.finalize | None = None

    def __iter__(self) -> "BackgroundLoader":
        return self

    def __next__(self) -> Batch:
        if self._producer is None:
            self._producer = self._producer_from(self._state)
            # A loader dropped without close() still lets its thread end (without waiting for it).
            self._stop_when_dropped = weakref.finalize(self, self._producer.stopping.set)
        try:
            ready = self._producer.take()
        except BaseException:
            self.close()  # the thread has ended; the next call starts afresh after the last batch handed out
            raise
        if ready is None:
            self.close()
            raise StopIteration
        batch, self._state = ready
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The position after the batches handed out."""
        return copy.deepcopy(self._state)

    def close(self) -> None:
        """Stops the background thread, if one runs; batches read ahead are dropped, the position is kept."""
        if self._producer is None:
            return
        self._stop_when_dropped.detach()
        self._producer.stop()
        self._producer = None
        self._stopped()

    def _producer_from(self, state: dict[str, Any]) -> BatchProducer:
        """A producer whose first batch is the one after `state` (it must not hold on to `self`)."""
        raise NotImplementedError

    def _stopped(self) -> None:
        """Called once the thread has stopped."""


class PrefetchingLoader(BackgroundLoader):
    """A `StatefulLoader` whose next `prefetch_batches` batches are made (and pinned) on a background thread.

    It yields the loader's batches in the same order, and its `state_dict()` is the loader's state
    after the last batch handed out, so it resumes exactly like the loader itself. `close()` also
    puts the loader back after the batches handed out, and closes it.
    """

    def __init__(self, loader: StatefulLoader, *, prefetch_batches: int, pin_memory: bool, name: str = "data"):
        if prefetch_batches < 1:
            raise DataError(f"data.prefetch_batches must be at least 1 to prefetch, got {prefetch_batches}")
        super().__init__(loader.state_dict())
        self.loader = loader
        self.prefetch_batches = prefetch_batches
        self.pin_memory = pin_memory
        self.name = name

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues after the batch the state was saved at (the loader checks that the state fits it)."""
        self.close()
        self.loader.load_state_dict(state)
        self._state = self.loader.state_dict()

    def close(self) -> None:
        """Stops the background thread and the loader's own, if it has one; the position is kept."""
        super().close()
        self.loader.close()

    def _producer_from(self, state: dict[str, Any]) -> BatchProducer:
        # The loader stands at `state`: at the start, after load_state_dict, or put back by _stopped.
        loader = self.loader
        return BatchProducer(
            partial(next, loader, None),
            loader.state_dict,
            prefetch_batches=self.prefetch_batches,
            thread_name=f"lsys-prefetch-{self.name}",
            pin_memory=self.pin_memory,
        )

    def _stopped(self) -> None:
        self.loader.load_state_dict(self._state)  # drop what the thread read ahead
