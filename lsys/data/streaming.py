"""Loaders for streamed (`IterableDataset`) sources such as hub data sets.

Documents are shuffled in a buffer seeded with the seed (`IterableDataset.shuffle`; each epoch
`set_epoch` reshuffles shards and buffer), split over dp ranks with
`datasets.distributed.split_dataset_by_node` (whole shards per rank when the shard count divides
by dp_size, else every dp_size-th document), tokenized, and packed through a token buffer into
the same windows as map-style data: inputs `buf[:T]`, targets `buf[1:T+1]`, then the buffer moves
on by T. With `doc_isolation` each batch also carries its `segment_ids`, cut at the tokenizer's EOS
exactly as for map-style data (`lsys.data.packing.window_batch`).

Reading, tokenizing (`encode_batch`, a few documents at a time) and packing run on a background
thread (`lsys.data.prefetch.BatchProducer`) that keeps up to `prefetch_batches` ready batches in a queue, so the
training thread only takes them; an error there is raised again on the training thread.

Resuming: `state_dict()` holds the epoch, the `IterableDataset.state_dict()` and the leftover
token buffer as they stood right after the last batch the loader handed out, whatever the
producer has read ahead since (each batch travels with that state). It belongs to one dp rank
(each rank reads other documents): save one per rank. Without shuffling, resume is exact. With
shuffling it is not bitwise: `datasets` does not save the shuffle buffer, so on resume the buffer
refills from the stream and the documents that sat in it at the checkpoint are skipped.
"""

import copy
import itertools
from collections.abc import Iterator
from functools import partial
from typing import Any

import datasets
import torch
from datasets.distributed import split_dataset_by_node

from lsys.data.errors import DataError
from lsys.data.packing import Batch, check_batch_layout, window_batch
from lsys.data.prefetch import BackgroundLoader, BatchProducer
from lsys.data.tokenizer import Tokenizer

DOCUMENTS_PER_ENCODE = 16  # documents tokenized per `encode_batch` call (HF tokenizers run it without the GIL)


class StreamPacker:
    """Reads, tokenizes and packs one rank's stream into batches, on whichever thread calls `next_batch`.

    `state` is a `StreamingLoader.state_dict()`: where to start. The packer owns `documents` while it runs.
    """

    def __init__(
        self,
        documents: datasets.IterableDataset,
        state: dict[str, Any],
        *,
        tokenizer: Tokenizer,
        text_field: str,
        seq_len: int,
        micro_batch_size: int,
        dp_rank: int,
        repeat: bool,
        name: str,
        eos_id: int | None,
    ):
        self._documents = documents
        self.tokenizer = tokenizer
        self.text_field = text_field
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.repeat = repeat
        self.name = name
        self._eos_id = eos_id  # given: batches carry segment_ids
        self.epoch = int(state["epoch"])
        self._tokens = [int(t) for t in state["tokens"]]  # ids read from the stream but not yet moved past
        self._resume_state: dict[str, Any] | None = state["dataset"]  # not yet handed to datasets
        self._rows: Iterator[dict[str, Any]] | None = None

    def next_batch(self) -> Batch | None:
        """The next batch, or None when the stream has ended (only without `repeat`)."""
        rows = []
        while len(rows) < self.micro_batch_size:
            while len(self._tokens) <= self.seq_len:
                texts = self._next_texts()
                if not texts:
                    return None
                for ids in self.tokenizer.encode_batch(texts):
                    self._tokens.extend(ids)
                    self._tokens.append(self.tokenizer.eos_id)
            rows.append(self._tokens[: self.seq_len + 1])
            del self._tokens[: self.seq_len]
        return window_batch(torch.tensor(rows, dtype=torch.long), self._eos_id)

    def state(self) -> dict[str, Any]:
        """The position after everything read so far: epoch, the `IterableDataset` state, the leftover tokens."""
        dataset_state = self._resume_state if self._resume_state is not None else self._documents.state_dict()
        return {"epoch": self.epoch, "dataset": dataset_state, "tokens": list(self._tokens)}

    def _next_texts(self) -> list[str]:
        """Up to DOCUMENTS_PER_ENCODE non-empty texts of one epoch, rolling into the next ([]: the end, no repeat)."""
        texts: list[str] = []
        ends_seen = 0
        while len(texts) < DOCUMENTS_PER_ENCODE:
            if self._rows is None:
                self._rows = self._start_epoch()
            row = next(self._rows, None)
            if row is None:
                if texts or not self.repeat:
                    # Stop at the epoch's end, so a saved state never runs ahead into the next epoch.
                    return texts
                ends_seen += 1
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
            if row[self.text_field]:
                texts.append(row[self.text_field])
        return texts

    def _start_epoch(self) -> Iterator[dict[str, Any]]:
        self._documents.set_epoch(self.epoch)
        if self._resume_state is not None:
            # datasets applies it only while the epoch matches, so a state from an earlier epoch starts this one afresh.
            self._documents.load_state_dict(self._resume_state)
            self._resume_state = None
        return iter(self._documents)


class StreamingLoader(BackgroundLoader):
    """Batches `(inputs, targets)`, int64 `[B, T]`, packed on a background thread from one dp rank's share of a stream.

    With `doc_isolation` each batch also carries its `segment_ids`, documents ending at the tokenizer's EOS.
    The thread starts at the first batch asked for; `close()` stops it, and the next batch asked for
    starts a new one where the last batch handed out ended. `state_dict()`: this rank's position after
    the batches handed out (epoch, dataset state, leftover tokens), JSON-able.
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
        prefetch_batches: int = 4,
    ):
        check_batch_layout(seq_len=seq_len, micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size)
        if prefetch_batches < 1:
            raise DataError(f"prefetch_batches must be at least 1, got {prefetch_batches}")
        if shuffle_buffer > 0:
            # The same seed on every rank: split_dataset_by_node needs one shard order everywhere.
            documents = documents.shuffle(seed=seed, buffer_size=shuffle_buffer)
        self._documents = split_dataset_by_node(documents, rank=dp_rank, world_size=dp_size)
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.name = name
        self.prefetch_batches = prefetch_batches
        self._new_packer = partial(
            StreamPacker,
            self._documents,
            tokenizer=tokenizer,
            text_field=text_field,
            seq_len=seq_len,
            micro_batch_size=micro_batch_size,
            dp_rank=dp_rank,
            repeat=repeat,
            name=name,
            eos_id=tokenizer.eos_id if doc_isolation else None,
        )
        super().__init__({"epoch": 0, "dataset": self._documents.state_dict(), "tokens": []})

    @property
    def tokens_per_batch(self) -> int:
        """Input tokens in one batch of this rank (B*T); multiply by dp_size for the global batch."""
        return self.micro_batch_size * self.seq_len

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues from a state this rank saved (exact without shuffling; see the module docstring)."""
        self.close()
        self._state = {"epoch": int(state["epoch"]), "dataset": state["dataset"], "tokens": list(state["tokens"])}

    def _producer_from(self, state: dict[str, Any]) -> BatchProducer:
        packer = self._new_packer(copy.deepcopy(state))
        thread_name = f"lsys-streaming-{self.name}-rank{self.dp_rank}"
        return BatchProducer(
            packer.next_batch, packer.state, prefetch_batches=self.prefetch_batches, thread_name=thread_name
        )


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
        loader = self._one_pass()
        try:
            yield from itertools.islice(loader, n)
        finally:
            loader.close()
