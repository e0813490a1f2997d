"""Loaders for streamed (`IterableDataset`) sources such as hub data sets.

Documents are shuffled in a buffer seeded with the seed (`IterableDataset.shuffle`; each epoch
`set_epoch` reshuffles shards and buffer), split over dp ranks with
`datasets.distributed.split_dataset_by_node` (whole shards per rank when the shard count divides
by dp_size, else every dp_size-th document), tokenized as they arrive, and packed through a token
buffer into the same windows as map-style data: inputs `buf[:T]`, targets `buf[1:T+1]`, then the
buffer moves on by T. With `doc_isolation` each batch also carries its `segment_ids`, cut at the
tokenizer's EOS exactly as for map-style data (`lsys.data.packing.window_batch`).

Resuming: `state_dict()` holds the epoch, the `IterableDataset.state_dict()` and the leftover
token buffer. It belongs to one dp rank (each rank reads other documents): save one per rank.
Without shuffling, resume is exact. With shuffling it is not bitwise: `datasets` does not save
the shuffle buffer, so on resume the buffer refills from the stream and the documents that sat
in it at the checkpoint are skipped.
"""

import itertools
from collections.abc import Iterator
from functools import partial
from typing import Any

import datasets
import torch
from datasets.distributed import split_dataset_by_node

from lsys.data.errors import DataError
from lsys.data.packing import Batch, check_batch_layout, window_batch
from lsys.data.tokenizer import Tokenizer


class StreamingLoader:
    """Batches `(inputs, targets)`, int64 `[B, T]`, packed on the fly from one dp rank's share of a stream.

    With `doc_isolation` each batch also carries its `segment_ids`, documents ending at the tokenizer's EOS.
    """

    def __init__(
        self,
        documents: datasets.IterableDataset,
        *,
        tokenizer: Tokenizer,
        text_field: str,
        seq_len: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        shuffle_buffer: int,
        repeat: bool = True,
        name: str = "data",
        doc_isolation: bool = False,
    ):
        check_batch_layout(seq_len=seq_len, micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size)
        if shuffle_buffer > 0:
            # The same seed on every rank: split_dataset_by_node needs one shard order everywhere.
            documents = documents.shuffle(seed=seed, buffer_size=shuffle_buffer)
        self._documents = split_dataset_by_node(documents, rank=dp_rank, world_size=dp_size)
        self.tokenizer = tokenizer
        self.text_field = text_field
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.repeat = repeat
        self.name = name
        self._eos_id = tokenizer.eos_id if doc_isolation else None  # given: batches carry segment_ids
        self.epoch = 0
        self._tokens: list[int] = []  # ids read from the stream but not yet moved past
        self._rows: Iterator[dict[str, Any]] | None = None
        self._resume_state: dict[str, Any] | None = None  # a loaded dataset state not yet handed to datasets

    @property
    def tokens_per_batch(self) -> int:
        """Input tokens in one batch of this rank (B*T); multiply by dp_size for the global batch."""
        return self.micro_batch_size * self.seq_len

    def __iter__(self) -> "StreamingLoader":
        return self

    def __next__(self) -> Batch:
        rows = []
        while len(rows) < self.micro_batch_size:
            while len(self._tokens) <= self.seq_len:
                document = self._next_document()
                if document is None:
                    raise StopIteration
                self._tokens.extend(document)
            rows.append(self._tokens[: self.seq_len + 1])
            del self._tokens[: self.seq_len]
        return window_batch(torch.tensor(rows, dtype=torch.long), self._eos_id)

    def state_dict(self) -> dict[str, Any]:
        """This rank's position: epoch, the `IterableDataset` state and the leftover tokens (JSON-able)."""
        dataset_state = self._resume_state if self._resume_state is not None else self._documents.state_dict()
        return {"epoch": self.epoch, "dataset": dataset_state, "tokens": list(self._tokens)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues from a state this rank saved (exact without shuffling; see the module docstring)."""
        self.epoch = int(state["epoch"])
        self._tokens = [int(t) for t in state["tokens"]]
        self._resume_state = state["dataset"]
        self._rows = None

    def _next_document(self) -> list[int] | None:
        """The next non-empty document's ids plus EOS, rolling into the next epoch (None when not repeating)."""
        ends_seen = 0
        while True:
            if self._rows is None:
                self._rows = self._start_epoch()
            row = next(self._rows, None)
            if row is None:
                ends_seen += 1
                if not self.repeat:
                    return None
                # The first end may close a resumed, nearly finished epoch; a second means a whole epoch was empty.
                if ends_seen == 2:
                    raise DataError(f"data set '{self.name}' is empty: dp rank {self.dp_rank} got no text from it")
                self.epoch += 1
                self._rows = None
                continue
            if self.text_field not in row:
                raise DataError(
                    f"data.text_field '{self.text_field}' is not a column of data set '{self.name}' "
                    f"(columns: {', '.join(row)})"
                )
            text = row[self.text_field]
            if text:
                return self.tokenizer.encode(text) + [self.tokenizer.eos_id]

    def _start_epoch(self) -> Iterator[dict[str, Any]]:
        self._documents.set_epoch(self.epoch)
        if self._resume_state is not None:
            # datasets applies it only while the epoch matches, so a state from an earlier epoch starts this one afresh.
            self._documents.load_state_dict(self._resume_state)
            self._resume_state = None
        return iter(self._documents)


class StreamingValLoader:
    """The first batches of a streamed validation split, in stream order, sharded over dp ranks."""

    def __init__(
        self,
        documents: datasets.IterableDataset,
        *,
        tokenizer: Tokenizer,
        text_field: str,
        seq_len: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        name: str = "data",
        doc_isolation: bool = False,
    ):
        self.tokens_per_batch = micro_batch_size * seq_len
        self._one_pass = partial(
            StreamingLoader,
            documents,
            tokenizer=tokenizer,
            text_field=text_field,
            seq_len=seq_len,
            micro_batch_size=micro_batch_size,
            dp_rank=dp_rank,
            dp_size=dp_size,
            seed=0,
            shuffle_buffer=0,
            repeat=False,
            name=name,
            doc_isolation=doc_isolation,
        )

    def batches(self, n: int) -> Iterator[Batch]:
        """The first n batches (fewer if the split ends first), read afresh; the same on every call."""
        return itertools.islice(self._one_pass(), n)
