"""Batches made ahead on a background thread (lsys/data/prefetch.py): same batches, exact state, errors, pinning."""

from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from lsys.data import ByteTokenizer, DataConfig, DataError, PackedLoader, PrefetchingLoader, SequenceSlices
from lsys.data.prepare import prepare
from lsys.data.shards import ShardWindows
from lsys.data.streaming import StreamingLoader

LAYOUT = {"seq_len": 32, "micro_batch_size": 3, "dp_rank": 1, "dp_size": 2}


def packed_loader(seed: int = 5) -> PackedLoader:
    """A loader over 40 windows of random tokens: 6 batches an epoch, so a few epochs roll over in a test."""
    tokens = np.random.default_rng(seed).integers(0, 256, size=40 * 32 + 1, dtype=np.int64)
    return PackedLoader(tokens, seed=seed, **LAYOUT)


def assert_same_batches(got: list[tuple[torch.Tensor, ...]], expected: list[tuple[torch.Tensor, ...]]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("prefetch_batches", [1, 4])
def test_prefetching_hands_out_the_loaders_batches_and_its_state(prefetch_batches: int):
    """The same batches as the loader across epochs, and after each one the loader's own state, though the thread
    has read ahead; close() mid-epoch and a fresh loader from a saved state both continue at the next batch."""
    plain = packed_loader()
    expected = [next(plain) for _ in range(20)]
    states = []
    plain = packed_loader()
    for _ in range(20):
        next(plain)
        states.append(plain.state_dict())

    prefetching = PrefetchingLoader(packed_loader(), prefetch_batches=prefetch_batches, pin_memory=False)
    got = []
    for i in range(8):
        got.append(next(prefetching))
        assert prefetching.state_dict() == states[i]
    assert prefetching.loader.state_dict() != states[7]  # the thread is ahead of what was handed out
    prefetching.close()
    assert prefetching.loader.state_dict() == states[7]  # close() put the loader back
    got += [next(prefetching) for _ in range(4)]  # a new thread continues after batch 8
    saved = prefetching.state_dict()
    prefetching.close()

    resumed = PrefetchingLoader(packed_loader(), prefetch_batches=prefetch_batches, pin_memory=False)
    resumed.load_state_dict(saved)
    got += [next(resumed) for _ in range(8)]
    resumed.close()
    assert_same_batches(got, expected)


def test_prefetching_a_sliced_stream_keeps_the_streams_state(tmp_path: Path):
    """Over SequenceSlices of a StreamingLoader (the sp > 1 hub case): sliced batches of the stream, in order, and
    after each the stream's state (its position, its leftover tokens); closing stops the stream's thread too."""
    texts = [f"<{i}> " + "a document of the stream " * (i % 5 + 1) for i in range(200)]
    documents = datasets.Dataset.from_dict({"text": texts}).to_iterable_dataset(num_shards=2)
    stream = {"tokenizer": ByteTokenizer(), "text_field": "text", "seed": 0, "shuffle_buffer": 0, **LAYOUT}
    positions = torch.arange(0, LAYOUT["seq_len"], 2)  # every other position: one sp rank's share, say

    plain = SequenceSlices(StreamingLoader(documents, **stream), positions)
    expected, states = [], []
    for _ in range(6):
        expected.append(next(plain))
        states.append(plain.state_dict())
    plain.close()

    inner = StreamingLoader(documents, **stream)
    prefetching = PrefetchingLoader(SequenceSlices(inner, positions), prefetch_batches=2, pin_memory=False)
    got = []
    for i in range(6):
        got.append(next(prefetching))
        assert prefetching.state_dict() == states[i]
    assert got[0][0].shape == (LAYOUT["micro_batch_size"], len(positions))
    prefetching.close()
    assert inner._producer is None  # the stream's own thread was stopped too
    assert_same_batches(got, expected)


def test_an_error_on_the_thread_is_raised_on_the_training_thread(tmp_path: Path):
    """A shard file lost after the loader opened the set: the read fails on the thread and next() raises it; the
    position stays after the last good batch."""
    out = tmp_path / "shards"
    prepare(DataConfig(source="stdlib", val_fraction=0.0), out, workers=1, shard_tokens=2**22, progress_bar=False)
    windows = ShardWindows(out, "train", seq_len=64, seed=3)
    prefetching = PrefetchingLoader(
        PackedLoader(windows, seed=3, seq_len=64, micro_batch_size=2, dp_rank=0, dp_size=1),
        prefetch_batches=2,
        pin_memory=False,
    )
    next(prefetching)
    saved = prefetching.state_dict()
    prefetching.close()
    for shard in out.glob("train-*.bin"):
        shard.unlink()
    with pytest.raises(OSError):  # whichever shard the next window lives in is gone
        next(prefetching)
    assert prefetching.state_dict() == saved


def test_a_negative_prefetch_count_is_refused():
    with pytest.raises(DataError, match="prefetch_batches must be a count of batches, 0 or more, got -1"):
        DataConfig(prefetch_batches=-1)
    with pytest.raises(DataError, match="at least 1"):
        PrefetchingLoader(packed_loader(), prefetch_batches=0, pin_memory=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pinned host memory)")
def test_batches_are_pinned_for_the_gpu():
    prefetching = PrefetchingLoader(packed_loader(), prefetch_batches=2, pin_memory=True)
    batch = next(prefetching)
    prefetching.close()
    assert all(tensor.is_pinned() for tensor in batch)
    expected = next(packed_loader())
    assert all(torch.equal(a.cuda(non_blocking=True).cpu(), b) for a, b in zip(batch, expected, strict=True))
