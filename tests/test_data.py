"""Tests of lsys.data: tokenizers, sources, packing, dp sharding, resume, streaming, the stdlib corpus."""

import json
import logging
import re
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lsys.data import (
    ByteTokenizer,
    DataConfig,
    DataError,
    PackedLoader,
    SequenceSlices,
    StreamingLoader,
    StreamingValLoader,
    ValLoader,
    build_loaders,
    build_tokenizer,
    segment_ids,
)
from lsys.data.packing import token_stream, tokenize_documents
from lsys.data.sources import load_files, load_hub, load_stdlib
from lsys.data.splits import in_validation_split
from parallel.layout import SequenceLayout
from tests.conftest import CONF_DIR, compose_config

EOS = ByteTokenizer.eos_id
LAYOUT = {"micro_batch_size": 2, "dp_rank": 0, "dp_size": 1, "seed": 0}


@pytest.fixture(scope="session", autouse=True)
def isolated_datasets_cache(tmp_path_factory):
    """Keeps the test corpora (new tmp paths every run) out of the user's datasets cache."""
    # datasets reads HF_DATASETS_CACHE at import, so the env var cannot be patched; its config value can.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_datasets_cache"))
        yield


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    return write(path, "".join(json.dumps(row) + "\n" for row in rows))


def files_cfg(path, **overrides) -> DataConfig:
    return DataConfig(**{"name": "test", "source": "files", "path": path, "val_fraction": 0.0, **overrides})


def split_at_eos(stream: np.ndarray) -> list[str]:
    """The documents of a byte-token stream that ends with EOS."""
    assert stream[-1] == EOS
    cuts = np.flatnonzero(stream == EOS)
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [bytes(stream[a:b].astype(np.uint8)).decode() for a, b in zip(starts, cuts)]


@pytest.fixture
def corpus(tmp_path) -> Path:
    """Forty numbered text documents, each long enough to span several short windows."""
    for i in range(40):
        write(tmp_path / "corpus" / f"doc{i:02d}.txt", f"<{i}> " + "text of a document. " * (i % 5 + 1))
    return tmp_path / "corpus"


# --- tokenizers -----------------------------------------------------------------------------


def test_byte_tokenizer_round_trip():
    tokenizer = build_tokenizer(SimpleNamespace(kind="byte"))
    text = "héllo, wörld → ✓"
    ids = tokenizer.encode(text)
    assert (tokenizer.vocab_size, tokenizer.eos_id) == (257, 256)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert tokenizer.decode(ids + [tokenizer.eos_id]) == text
    assert tokenizer.encode_batch([text, "ab"]) == [ids, [97, 98]]


def test_hf_tokenizer_from_trained_json(tmp_path):
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50, trainer)
    path = tmp_path / "tokenizer.json"
    bpe.save(str(path))

    tokenizer = build_tokenizer(SimpleNamespace(kind="hf", path=str(path), eos_token="<|endoftext|>"))
    text = "the lazy fox, quickly!"
    ids = tokenizer.encode(text)
    assert tokenizer.eos_id == bpe.token_to_id("<|endoftext|>")
    assert tokenizer.eos_id not in ids and len(ids) < len(text)  # merges were learned and used
    assert tokenizer.decode(ids + [tokenizer.eos_id]) == text
    assert tokenizer.encode_batch([text, "dog"]) == [ids, tokenizer.encode("dog")]
    assert tokenizer.vocab_size == bpe.get_vocab_size(with_added_tokens=True) > tokenizer.eos_id

    with pytest.raises(DataError, match="not in the vocabulary"):
        build_tokenizer(SimpleNamespace(kind="hf", path=str(path), eos_token="</s>"))
    with pytest.raises(DataError, match="does not exist"):
        build_tokenizer(SimpleNamespace(kind="hf", path=str(tmp_path / "missing.json"), eos_token="</s>"))
    with pytest.raises(DataError, match="tokenizer.kind 'sentencepiece' is unknown"):
        build_tokenizer(SimpleNamespace(kind="sentencepiece"))


# --- sources --------------------------------------------------------------------------------


def test_files_source_reads_txt_md_jsonl_parquet(tmp_path):
    write(tmp_path / "a.txt", "plain text\nover two lines\n")
    write(tmp_path / "sub" / "b.md", "# markdown")
    write(tmp_path / "sub" / ".hidden" / "c.txt", "hidden files are left out")
    write_jsonl(tmp_path / "rows.jsonl", [{"body": "json row one", "id": 1}, {"body": "json row two", "id": 2}])
    pq.write_table(pa.table({"body": ["parquet row"], "n": [3]}), tmp_path / "rows.parquet")
    write(tmp_path / "notes.csv", "unsupported files in a directory are ignored")

    train, val = load_files(str(tmp_path), text_field="body", val_fraction=0.0)
    assert val is None
    assert sorted(train["text"]) == sorted(
        ["plain text\nover two lines\n", "# markdown", "json row one", "json row two", "parquet row"]
    )


def test_files_source_glob_and_list(tmp_path):
    for name in ("x1.txt", "x2.txt", "y1.txt"):
        write(tmp_path / name, f"document {name}")
    train, _ = load_files(str(tmp_path / "x*.txt"), val_fraction=0.0)
    assert sorted(train["text"]) == ["document x1.txt", "document x2.txt"]
    train, _ = load_files([str(tmp_path / "y1.txt"), str(tmp_path / "x*.txt")], val_fraction=0.0)
    assert sorted(train["text"]) == ["document x1.txt", "document x2.txt", "document y1.txt"]


def test_non_utf8_file_is_skipped_with_a_warning(tmp_path, caplog):
    write(tmp_path / "good.txt", "fine text")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    with caplog.at_level(logging.WARNING, logger="lsys.data.sources"):
        train, _ = load_files(str(tmp_path), val_fraction=0.0)
    assert list(train["text"]) == ["fine text"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 1 file(s)" in warnings[0] and "latin1.txt" in warnings[0]


def test_val_path_replaces_the_hash_split(tmp_path):
    write(tmp_path / "train" / "a.txt", "training text")
    write(tmp_path / "val" / "b.txt", "validation text")
    train, val = load_files(str(tmp_path / "train"), val_path=str(tmp_path / "val"), val_fraction=0.5)
    assert list(train["text"]) == ["training text"] and list(val["text"]) == ["validation text"]


@pytest.mark.parametrize(
    ("make_cfg", "message"),
    [
        (lambda d: files_cfg(str(d / "nope")), r"data.path '.*nope' does not exist"),
        (lambda d: files_cfg(str(d / "*.md")), r"glob '.*\*.md' matches no files"),
        (lambda d: files_cfg(str(d / "empty.txt")), r"'test' is empty"),
        (lambda d: files_cfg(str(d / "latin1.txt")), r"'test' is empty: none of its 1 file"),
        (lambda d: files_cfg(str(d / "rows.jsonl")), r"text_field 'text' is not a column .*columns: body"),
        (lambda d: files_cfg(str(d / "rows.parquet")), r"text_field 'text' is not a column of '.*rows.parquet'"),
        (lambda d: files_cfg(str(d / "short.txt")), r"'test' is too small: 9 tokens make 0 window"),
        (lambda d: files_cfg(str(d / "short.txt"), val_fraction=1.5), r"val_fraction 1.5 must be in \[0, 1\)"),
        (lambda d: DataConfig(source="ftp"), r"data.source 'ftp' is unknown"),
        (lambda d: DataConfig(source="files"), r"data.path is required"),
    ],
)
def test_data_errors(tmp_path, make_cfg, message):
    write(tmp_path / "empty.txt", "")
    (tmp_path / "latin1.txt").write_bytes(b"\xe9t\xe9")
    write_jsonl(tmp_path / "rows.jsonl", [{"body": "x"}])
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "rows.parquet")
    write(tmp_path / "short.txt", "12345678")  # 8 bytes + EOS
    with pytest.raises(DataError, match=message):
        build_loaders(make_cfg(tmp_path), seq_len=16, tokenizer=ByteTokenizer(), **LAYOUT)


def test_too_few_windows_for_one_global_batch(corpus):
    cfg = files_cfg(str(corpus / "doc00.txt"))  # 25 tokens: 3 windows of 8, fewer than dp_size * B = 4
    with pytest.raises(DataError, match="make 3 window.*one step needs 4"):
        build_loaders(cfg, seq_len=8, micro_batch_size=2, dp_rank=0, dp_size=2, seed=0, tokenizer=ByteTokenizer())


# --- packing --------------------------------------------------------------------------------


def test_stream_puts_eos_after_every_document():
    documents = datasets.Dataset.from_dict({"text": ["ab", "cde", "f"]})
    tokenized = tokenize_documents(documents, ByteTokenizer(), num_proc=1, desc="test")
    stream = token_stream(tokenized, shuffle_seed=None)
    assert stream.tolist() == [97, 98, EOS, 99, 100, 101, EOS, 102, EOS]

    val = ValLoader(stream, seq_len=2, micro_batch_size=4, dp_rank=0, dp_size=1)
    (inputs, targets), = val.batches(5)
    assert inputs.dtype == targets.dtype == torch.int64
    assert inputs.tolist() == [[97, 98], [EOS, 99], [100, 101], [EOS, 102]]
    assert targets.tolist() == [[98, EOS], [99, 100], [101, EOS], [102, EOS]]

    shuffled = token_stream(tokenized, shuffle_seed=3)
    assert sorted(split_at_eos(shuffled)) == ["ab", "cde", "f"]
    assert shuffled.tolist() == token_stream(tokenized, shuffle_seed=3).tolist()


def test_build_loaders_packs_shuffled_documents_with_eos(corpus):
    train, _ = build_loaders(files_cfg(str(corpus)), seq_len=16, tokenizer=ByteTokenizer(), **LAYOUT)
    assert train.tokens_per_batch == 32
    rows = []
    for _ in range(train.batches_per_epoch):
        inputs, targets = next(train)
        assert inputs.shape == targets.shape == (2, 16)
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        rows += torch.cat([inputs, targets[:, -1:]], dim=1).tolist()
    documents = {p.read_text() for p in corpus.iterdir()}
    # Each window is a piece of documents joined by EOS: between two EOS lies exactly one whole document.
    for row in rows:
        cuts = [i for i, token in enumerate(row) if token == EOS]
        for a, b in zip(cuts, cuts[1:]):
            assert bytes(row[a + 1 : b]).decode() in documents
    assert sum(row.count(EOS) for row in rows) >= 30


def window_ids(inputs: torch.Tensor, seq_len: int) -> list[int]:
    """Window indices of batches cut from the stream 0, 1, 2, ... (each token is its own position)."""
    return (inputs[:, 0] // seq_len).tolist()


def test_dp_ranks_take_disjoint_windows_of_the_global_batch():
    seq_len, micro_batch_size, dp_size = 4, 2, 3
    stream = np.arange(seq_len * 50 + 1, dtype=np.int32)  # 50 windows, 8 steps of 6 per epoch
    ranks = [
        PackedLoader(stream, seq_len=seq_len, micro_batch_size=micro_batch_size, dp_rank=r, dp_size=dp_size, seed=7)
        for r in range(dp_size)
    ]
    # One rank taking the whole global batch sees the same order: the ranks' shares must tile it.
    whole = PackedLoader(stream, seq_len=seq_len, micro_batch_size=dp_size * micro_batch_size, dp_rank=0, dp_size=1,
                         seed=7)
    seen = []
    for _ in range(whole.batches_per_epoch):
        per_rank = [window_ids(next(loader)[0], seq_len) for loader in ranks]
        global_batch = window_ids(next(whole)[0], seq_len)
        assert sum(per_rank, []) == global_batch and len(set(global_batch)) == 6
        seen += global_batch
    assert len(set(seen)) == 48 and set(seen) <= set(range(50))  # 2 windows are left over in this epoch
    assert {json.dumps(loader.state_dict()) for loader in ranks} == {json.dumps(ranks[0].state_dict())}
    next_epoch = window_ids(next(whole)[0], seq_len)
    assert whole.epoch == 1 and next_epoch != seen[:6]  # a fresh order each epoch


@pytest.mark.parametrize("taken", [2, 3, 4, 8])  # mid-epoch, at the boundary, just after, two epochs later
def test_packed_loader_resumes_at_the_exact_next_batch(corpus, taken):
    cfg = files_cfg(str(corpus))
    layout = {**LAYOUT, "micro_batch_size": 4}
    build = lambda: build_loaders(cfg, seq_len=200, tokenizer=ByteTokenizer(), **layout)[0]  # noqa: E731
    uninterrupted = build()
    assert uninterrupted.batches_per_epoch == 3  # 2630 tokens: 13 windows of 200, 3 steps of 4
    expected = [next(uninterrupted) for _ in range(taken + 5)][taken:]

    interrupted = build()
    for _ in range(taken):
        next(interrupted)
    state = json.loads(json.dumps(interrupted.state_dict()))
    resumed = build()
    resumed.load_state_dict(state)
    for want in expected:
        got = next(resumed)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_packed_loader_rejects_a_state_of_another_layout(corpus):
    train, _ = build_loaders(files_cfg(str(corpus)), seq_len=64, tokenizer=ByteTokenizer(), **LAYOUT)
    other, _ = build_loaders(files_cfg(str(corpus)), seq_len=32, tokenizer=ByteTokenizer(), **LAYOUT)
    with pytest.raises(DataError, match="seq_len, global batch or seed changed"):
        other.load_state_dict(train.state_dict())


def test_hash_split_is_disjoint_and_the_validation_loader_fixed(corpus):
    train_docs, val_docs = load_files(str(corpus), val_fraction=0.3)
    train_texts, val_texts = set(train_docs["text"]), set(val_docs["text"])
    assert train_texts and val_texts and not train_texts & val_texts
    assert train_texts | val_texts == {p.read_text() for p in corpus.iterdir()}
    assert all(in_validation_split(text, 0.3) for text in val_texts)
    assert not any(in_validation_split(text, 0.3) for text in train_texts)

    _, val = build_loaders(files_cfg(str(corpus), val_fraction=0.3), seq_len=16, tokenizer=ByteTokenizer(), **LAYOUT)
    first, again = list(val.batches(3)), list(val.batches(3))
    assert len(first) == 3 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    first_document = ByteTokenizer().decode(first[0][0][0].tolist())
    assert any(text.startswith(first_document) for text in val_texts)  # stored order, not shuffled
    assert len(list(val.batches(10**6))) == val.num_batches


def test_data_config_from_omegaconf():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"name": "mine", "source": "files", "path": ["a.txt", "b/"], "val_fraction": 0.1})
    data = DataConfig.from_attrs(cfg)
    assert data == DataConfig(name="mine", source="files", path=["a.txt", "b/"], val_fraction=0.1)
    assert DataConfig.from_attrs(SimpleNamespace(source="hub", path="org/set")).split == "train"


# --- streaming ------------------------------------------------------------------------------


@pytest.fixture
def jsonl_corpus(tmp_path) -> Path:
    """Two jsonl shards of numbered documents, plus a validation file, laid out like a hub data set."""
    rows = [{"text": f"<{i}> " + "streamed words " * (i % 3 + 1), "n": i} for i in range(30)]
    write_jsonl(tmp_path / "hub" / "data" / "train-00000-of-00002.jsonl", rows[:15])
    write_jsonl(tmp_path / "hub" / "data" / "train-00001-of-00002.jsonl", rows[15:])
    write_jsonl(tmp_path / "hub" / "data" / "validation-00000-of-00001.jsonl", [{"text": "held out " * 20, "n": -1}])
    return tmp_path / "hub"


def stream_of(jsonl_corpus: Path) -> datasets.IterableDataset:
    files = sorted(str(p) for p in (jsonl_corpus / "data").glob("train-*.jsonl"))
    return datasets.load_dataset("json", data_files=files, split="train", streaming=True)


def streaming_loader(jsonl_corpus: Path, **overrides) -> StreamingLoader:
    kwargs = {"tokenizer": ByteTokenizer(), "text_field": "text", "seq_len": 16, "shuffle_buffer": 0, **LAYOUT}
    return StreamingLoader(stream_of(jsonl_corpus), **{**kwargs, **overrides})


def test_streaming_packs_documents_in_stream_order(jsonl_corpus):
    loader = streaming_loader(jsonl_corpus, micro_batch_size=1)
    inputs, targets = zip(*(next(loader) for _ in range(20)))
    inputs, targets = torch.cat(inputs), torch.cat(targets)
    assert torch.equal(inputs[:, 1:], targets[:, :-1]) and torch.equal(inputs[1:, 0], targets[:-1, -1])
    expected = [t for row in stream_of(jsonl_corpus) for t in list(row["text"].encode()) + [EOS]]
    assert inputs.flatten().tolist() == expected[: 20 * 16]


@pytest.mark.parametrize("taken", [3, 40])  # mid-epoch; past the end of the first epoch
def test_streaming_resumes_exactly_without_shuffle(jsonl_corpus, taken):
    uninterrupted = streaming_loader(jsonl_corpus)
    expected = [next(uninterrupted) for _ in range(taken + 4)][taken:]
    interrupted = streaming_loader(jsonl_corpus)
    for _ in range(taken):
        next(interrupted)
    state = json.loads(json.dumps(interrupted.state_dict()))
    assert (state["epoch"] > 0) == (taken == 40)
    resumed = streaming_loader(jsonl_corpus)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state  # saving again before reading keeps the position
    for want in expected:
        got = next(resumed)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_streaming_shuffle_is_seeded_and_resumable(jsonl_corpus):
    first = [next(streaming_loader(jsonl_corpus, shuffle_buffer=8, seed=1))[0] for _ in range(2)]
    other_seed = next(streaming_loader(jsonl_corpus, shuffle_buffer=8, seed=2))[0]
    in_order = next(streaming_loader(jsonl_corpus))[0]
    assert torch.equal(first[0], first[1]) and not torch.equal(first[0], other_seed)
    assert not torch.equal(first[0], in_order)
    loader = streaming_loader(jsonl_corpus, shuffle_buffer=8, seed=1)
    next(loader)
    resumed = streaming_loader(jsonl_corpus, shuffle_buffer=8, seed=1)
    resumed.load_state_dict(json.loads(json.dumps(loader.state_dict())))
    assert next(resumed)[0].shape == (2, 16)  # not bitwise: datasets does not save the shuffle buffer


def test_streaming_dp_ranks_read_disjoint_documents(jsonl_corpus):
    numbers = []
    for rank in range(2):
        loader = streaming_loader(jsonl_corpus, dp_rank=rank, dp_size=2, shuffle_buffer=4)
        text = ByteTokenizer().decode(torch.cat([next(loader)[0] for _ in range(6)]).flatten().tolist())
        numbers.append({int(n) for n in re.findall(r"<(\d+)>", text)})
    assert numbers[0] and numbers[1] and not numbers[0] & numbers[1]


def test_streaming_missing_text_field(jsonl_corpus):
    with pytest.raises(DataError, match="text_field 'body' is not a column .*columns: text, n"):
        next(streaming_loader(jsonl_corpus, text_field="body"))


def test_hub_source_streams_a_dataset_directory(jsonl_corpus):
    cfg = DataConfig(name="hub-test", source="hub", path=str(jsonl_corpus), val_split="validation", shuffle_buffer=8)
    train, val = build_loaders(cfg, seq_len=16, tokenizer=ByteTokenizer(), **LAYOUT)
    assert isinstance(train, StreamingLoader) and isinstance(val, StreamingValLoader)
    inputs, targets = next(train)
    assert inputs.shape == (2, 16) and torch.equal(inputs[:, 1:], targets[:, :-1])
    first, again = list(val.batches(2)), list(val.batches(2))
    assert len(first) == 2 and all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    assert ByteTokenizer().decode(first[0][0][0].tolist()) == "held out held ou"
    assert len(list(val.batches(100))) == 5  # 180 tokens + EOS: 11 windows of 16, 5 batches of 2, then it stops
    no_val_cfg = DataConfig(source="hub", path=str(jsonl_corpus), val_fraction=0.0)
    _, no_val = build_loaders(no_val_cfg, seq_len=16, tokenizer=ByteTokenizer(), **LAYOUT)
    assert no_val is None


def pack_by_hand(texts: list[str], *, seq_len: int, micro_batch_size: int) -> list[tuple[torch.Tensor, ...]]:
    """The reference batches: the texts' bytes, EOS after each, end to end, cut into windows (+1 target) in order."""
    stream = [t for text in texts for t in list(text.encode()) + [EOS]]
    rows = torch.tensor([stream[w * seq_len : w * seq_len + seq_len + 1] for w in range((len(stream) - 1) // seq_len)])
    starts = range(0, len(rows) - micro_batch_size + 1, micro_batch_size)
    return [(rows[b : b + micro_batch_size, :-1], rows[b : b + micro_batch_size, 1:]) for b in starts]


@pytest.fixture
def hub_without_validation(tmp_path) -> tuple[Path, list[list[str]]]:
    """A hub-like directory of two parquet shards of the train split only, and the texts of each shard."""
    texts = [f"<{i}> " + "held or not " * (i % 4 + 1) for i in range(600)]
    shards = [texts[:300], texts[300:]]
    for s, shard in enumerate(shards):
        (tmp_path / "hub" / "data").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"text": shard}), tmp_path / "hub" / "data" / f"train-0000{s}-of-00002.parquet")
    return tmp_path / "hub", shards


def test_hub_without_val_split_holds_out_a_hash_share(hub_without_validation):
    path, shards = hub_without_validation
    documents = shards[0] + shards[1]
    train, val = load_hub(str(path), hub_config=None, split="train", val_split=None, val_fraction=0.2, name="t")
    train_texts, val_texts = [row["text"] for row in train], [row["text"] for row in val]
    assert val_texts == [text for text in documents if in_validation_split(text, 0.2)]  # the map-style rule
    assert not set(train_texts) & set(val_texts) and sorted(train_texts + val_texts) == sorted(documents)
    assert abs(len(val_texts) / len(documents) - 0.2) < 0.05
    _, no_val = load_hub(str(path), hub_config=None, split="train", val_split=None, val_fraction=0.0)
    assert no_val is None
    misnamed, _ = load_hub(
        str(path), hub_config=None, split="train", val_split=None, text_field="body", val_fraction=0.2
    )
    with pytest.raises(DataError, match="data.text_field 'body' is not a column of data set 'hub'"):
        next(iter(misnamed))


@pytest.mark.parametrize("dp_size", [1, 2])
def test_hub_hash_validation_is_fixed_per_dp_layout(hub_without_validation, dp_size):
    path, shards = hub_without_validation
    cfg = DataConfig(name="hub-hash", source="hub", path=str(path), val_fraction=0.2, shuffle_buffer=0)
    # Two shards: with dp 2 each rank streams one whole shard, with dp 1 the one rank both, in order.
    rank_documents = [shards[0] + shards[1]] if dp_size == 1 else shards
    for rank in range(dp_size):
        layout = {**LAYOUT, "dp_rank": rank, "dp_size": dp_size}
        _, val = build_loaders(cfg, seq_len=16, tokenizer=ByteTokenizer(), **layout)
        held_out = [text for text in rank_documents[rank] if in_validation_split(text, 0.2)]
        expected = pack_by_hand(held_out, seq_len=16, micro_batch_size=2)
        assert_same_batches(list(val.batches(10**6)), expected)  # finite: all the held-out windows, then it stops
        assert_same_batches(list(val.batches(5)), expected[:5])  # the same first batches on every evaluation


def test_background_loader_gives_the_batches_packed_by_hand(jsonl_corpus):
    loader = streaming_loader(jsonl_corpus)
    texts = [row["text"] for row in stream_of(jsonl_corpus)]
    expected = pack_by_hand(texts * 3, seq_len=16, micro_batch_size=2)[:60]  # into the third epoch
    assert_same_batches([next(loader) for _ in range(60)], expected)
    loader.close()


def test_streaming_resume_ignores_batches_the_producer_read_ahead(jsonl_corpus):
    expected = pack_by_hand([row["text"] for row in stream_of(jsonl_corpus)], seq_len=16, micro_batch_size=2)
    interrupted = streaming_loader(jsonl_corpus)
    taken = [next(interrupted) for _ in range(3)]
    deadline = time.monotonic() + 10
    while not interrupted._producer._ready.full():  # the producer is prefetch_batches ahead of the trainer
        assert time.monotonic() < deadline, "the producer never filled its queue"
        time.sleep(0.01)
    state = json.loads(json.dumps(interrupted.state_dict()))
    interrupted.close()
    resumed = streaming_loader(jsonl_corpus)
    resumed.load_state_dict(state)
    assert_same_batches(taken + [next(resumed) for _ in range(4)], expected[:7])
    resumed.close()


class FailingTokenizer(ByteTokenizer):
    """Bytes, except that document <7> cannot be tokenized."""

    def encode_batch(self, texts):
        for text in texts:
            if text.startswith("<7>"):
                raise DataError("bad document <7>")
        return super().encode_batch(texts)


def streaming_threads() -> list:
    return [thread for thread in threading.enumerate() if thread.name.startswith("lsys-streaming-")]


def test_producer_error_is_raised_on_the_consumer_thread(jsonl_corpus):
    loader = streaming_loader(jsonl_corpus, tokenizer=FailingTokenizer(), name="failing")
    with pytest.raises(DataError, match="bad document <7>"):
        for _ in range(100):
            next(loader)
    assert not streaming_threads()


def test_close_stops_the_producer_and_iteration_goes_on_after_it(jsonl_corpus):
    expected = pack_by_hand([row["text"] for row in stream_of(jsonl_corpus)], seq_len=16, micro_batch_size=2)
    loader = streaming_loader(jsonl_corpus, name="closing")
    got = [next(loader) for _ in range(2)]
    assert [thread.name for thread in streaming_threads()] == ["lsys-streaming-closing-rank0"]
    loader.close()
    assert not streaming_threads()
    got += [next(loader) for _ in range(3)]  # a new producer, from the last batch handed out
    loader.close()
    assert_same_batches(got, expected[:5])
    val = StreamingValLoader(stream_of(jsonl_corpus), tokenizer=ByteTokenizer(), text_field="text", seq_len=16,
                             micro_batch_size=2, dp_rank=0, dp_size=1)
    assert_same_batches(list(val.batches(3)), expected[:3])
    assert not streaming_threads()  # validation closes its one-pass loader after its batches


# --- document isolation -------------------------------------------------------------------


def assert_same_batches(got: list[tuple[torch.Tensor, ...]], want: list[tuple[torch.Tensor, ...]]) -> None:
    assert len(got) == len(want)
    for got_batch, want_batch in zip(got, want):
        assert len(got_batch) == len(want_batch)
        assert all(torch.equal(a, b) for a, b in zip(got_batch, want_batch))


def test_segment_ids_count_the_eos_tokens_before_each_position():
    inputs = torch.tensor([[7, 8, EOS, 9, EOS, EOS, 5], [EOS, 1, 2, 3, 4, 5, EOS]])
    ids = segment_ids(inputs, EOS)
    assert ids.dtype == torch.int64 and ids.shape == inputs.shape
    # An EOS belongs to the document it closes; the next token starts a new one.
    assert ids.tolist() == [[0, 0, 0, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]]


def test_segment_ids_change_exactly_after_each_document():
    lengths = [1, 4, 2, 13, 3, 1, 6, 2, 9]  # one document spans three windows, some fit several in one
    documents = datasets.Dataset.from_dict({"text": [chr(ord("a") + i) * n for i, n in enumerate(lengths)]})
    stream = token_stream(tokenize_documents(documents, ByteTokenizer(), num_proc=1, desc="test"), shuffle_seed=None)
    document_of = np.repeat(np.arange(len(lengths)), [n + 1 for n in lengths])  # each document's ids and its EOS
    assert len(stream) == len(document_of) == 50

    seq_len = 5
    val = ValLoader(stream, seq_len=seq_len, micro_batch_size=1, dp_rank=0, dp_size=1, eos_id=EOS)
    windows = list(val.batches(10**6))
    assert len(windows) == 9
    for w, (inputs, targets, ids) in enumerate(windows):
        window_documents = torch.from_numpy(document_of[w * seq_len : (w + 1) * seq_len])
        assert torch.equal(ids[0], window_documents - window_documents[0])  # from 0, one step per document
        assert bool((ids.diff(dim=1) >= 0).all())
        assert torch.equal(inputs[:, 1:], targets[:, :-1])  # targets are not changed


def test_every_loader_kind_emits_triples_with_isolation(corpus, jsonl_corpus):
    map_cfg = files_cfg(str(corpus), val_fraction=0.3)
    hub_cfg = DataConfig(name="hub", source="hub", path=str(jsonl_corpus), val_split="validation", shuffle_buffer=0)
    kinds = set()
    for cfg in (map_cfg, hub_cfg):
        plain_train, plain_val = build_loaders(cfg, seq_len=16, tokenizer=ByteTokenizer(), **LAYOUT)
        train, val = build_loaders(replace(cfg, doc_isolation=True), seq_len=16, tokenizer=ByteTokenizer(), **LAYOUT)
        kinds |= {type(train), type(val)}
        pairs = [next(plain_train) for _ in range(3)] + list(plain_val.batches(2))
        triples = [next(train) for _ in range(3)] + list(val.batches(2))
        assert_same_batches([triple[:2] for triple in triples], pairs)  # isolation only adds the ids
        for inputs, _, ids in triples:
            assert ids.dtype == torch.int64 and ids.shape == inputs.shape == (2, 16)
            assert torch.equal(ids, segment_ids(inputs, EOS))
        assert max(int(ids.max()) for _, _, ids in triples) > 0  # some windows hold several documents
    assert kinds == {PackedLoader, ValLoader, StreamingLoader, StreamingValLoader}


def test_streaming_and_map_style_cut_the_same_segment_ids(jsonl_corpus):
    streamed = streaming_loader(jsonl_corpus, micro_batch_size=1, doc_isolation=True)
    expected = [t for row in stream_of(jsonl_corpus) for t in list(row["text"].encode()) + [EOS]]
    mapped = ValLoader(
        np.array(expected, dtype=np.int32), seq_len=16, micro_batch_size=1, dp_rank=0, dp_size=1, eos_id=EOS
    )
    assert_same_batches([next(streamed) for _ in range(20)], list(mapped.batches(20)))


def test_passkey_windows_hold_one_document_each():
    cfg = DataConfig(name="passkey", source="passkey", num_documents=12, val_fraction=0.25, doc_isolation=True)
    train, val = build_loaders(cfg, seq_len=160, tokenizer=ByteTokenizer(), **LAYOUT)
    for inputs, _, ids in [next(train) for _ in range(4)] + list(val.batches(1)):
        # The document's EOS closes the window, so the whole window is document 0.
        assert bool(inputs[:, -1].eq(EOS).all()) and bool(ids.eq(0).all())


@pytest.mark.parametrize("doc_isolation", [False, True])
def test_sequence_slices_cut_every_tensor_of_the_batch(doc_isolation):
    seq_len, layout = 8, SequenceLayout("zigzag", 2)
    rng = np.random.default_rng(0)
    size = 20 * seq_len + 1
    stream = np.where(rng.random(size) < 0.2, EOS, rng.integers(0, EOS, size)).astype(np.int32)
    eos_id = EOS if doc_isolation else None
    loaders = {
        "train": lambda: PackedLoader(stream, seq_len=seq_len, eos_id=eos_id, **LAYOUT),
        "val": lambda: ValLoader(stream, seq_len=seq_len, micro_batch_size=2, dp_rank=0, dp_size=1, eos_id=eos_id),
    }
    first_batch = {"train": lambda loader: next(loader), "val": lambda loader: next(iter(loader.batches(1)))}
    for kind, build in loaders.items():
        whole = first_batch[kind](build())
        parts = [first_batch[kind](SequenceSlices(build(), layout.positions(r, seq_len))) for r in range(2)]
        assert len(whole) == len(parts[0]) == len(parts[1]) == (3 if doc_isolation else 2)
        for i, tensor in enumerate(whole):
            assert parts[0][i].shape == (2, seq_len // 2)
            assert torch.equal(layout.unshard([part[i] for part in parts]), tensor)


def test_isolated_loaders_resume_with_identical_triples(corpus, jsonl_corpus):
    layout = {**LAYOUT, "micro_batch_size": 4}
    map_cfg = files_cfg(str(corpus), doc_isolation=True)
    builds = [
        lambda: build_loaders(map_cfg, seq_len=200, tokenizer=ByteTokenizer(), **layout)[0],  # 3 steps an epoch
        lambda: streaming_loader(jsonl_corpus, doc_isolation=True),
    ]
    for build in builds:
        taken = 2  # mid-epoch
        uninterrupted = build()
        expected = [next(uninterrupted) for _ in range(taken + 4)][taken:]  # into the next epoch for map-style
        interrupted = build()
        for _ in range(taken):
            next(interrupted)
        resumed = build()
        resumed.load_state_dict(json.loads(json.dumps(interrupted.state_dict())))
        got = [next(resumed) for _ in range(4)]
        assert all(len(batch) == 3 for batch in got)
        assert_same_batches(got, expected)


def test_rope_restart_follows_doc_isolation_unless_set():
    from omegaconf import OmegaConf

    assert DataConfig().restarts_positions is False
    assert DataConfig(doc_isolation=True).restarts_positions is True
    assert DataConfig(doc_isolation=True, rope_restart=False).restarts_positions is False
    assert DataConfig(doc_isolation=False, rope_restart=False).restarts_positions is False
    cfg = OmegaConf.create({"doc_isolation": True, "rope_restart": None})
    assert DataConfig.from_attrs(cfg).restarts_positions is True


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"rope_restart": True},
            r"^data.rope_restart=true but data.doc_isolation=false: positions can only restart at document "
            r"boundaries the loader emits; set data.doc_isolation=true$",
        ),
        ({"doc_isolation": "false"}, r"^data.doc_isolation must be true or false, got 'false'$"),
        ({"doc_isolation": True, "rope_restart": "yes"}, r"^data.rope_restart must be true, false or null, got 'yes'$"),
    ],
)
def test_isolation_settings_errors(settings, message):
    with pytest.raises(DataError, match=message):
        build_loaders(settings, seq_len=16, tokenizer=ByteTokenizer(), **LAYOUT)


class TokenizerWithoutEos(ByteTokenizer):
    eos_id = None


def test_isolation_needs_a_tokenizer_with_eos(corpus):
    cfg = files_cfg(str(corpus), doc_isolation=True)
    with pytest.raises(DataError, match=r"needs a tokenizer with an EOS id .* TokenizerWithoutEos has none"):
        build_loaders(cfg, seq_len=16, tokenizer=TokenizerWithoutEos(), **LAYOUT)


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml")))
def test_every_data_config_sets_the_isolation_keys(option):
    data = compose_config([f"data={option}"]).data
    assert "doc_isolation" in data and "rope_restart" in data  # in the yaml, not only the dataclass default
    # Pretraining text keeps documents apart only when asked; SFT packs whole examples, always apart.
    assert data.doc_isolation is (data.get("format", "text") != "text") and data.rope_restart is None


# --- the stdlib corpus ----------------------------------------------------------------------


def test_stdlib_split_is_disjoint_and_deterministic():
    train, val = load_stdlib(val_fraction=0.05)
    train_again, val_again = load_stdlib(val_fraction=0.05)
    assert list(train["text"]) == list(train_again["text"]) and list(val["text"]) == list(val_again["text"])
    train_docs, val_docs = set(train["text"]), set(val["text"])
    assert not train_docs & val_docs
    assert len(train) > 500 and 0.02 < len(val) / (len(train) + len(val)) < 0.09
    assert all(in_validation_split(doc, 0.05) for doc in val_docs)
    assert any("def " in doc for doc in val_docs)


def test_stdlib_loaders_end_to_end():
    cfg = SimpleNamespace(**{**DataConfig().__dict__, "name": "stdlib"})  # any attribute-access config works
    train, val = build_loaders(cfg, seq_len=32, tokenizer=ByteTokenizer(), **LAYOUT)
    inputs, targets = next(train)
    assert inputs.shape == (2, 32) and torch.equal(inputs[:, 1:], targets[:, :-1])
    assert int(inputs.max()) <= EOS and int(inputs.min()) >= 0
    assert train.batches_per_epoch * train.tokens_per_batch > 10_000_000  # tens of millions of bytes of Python
    assert torch.equal(next(iter(val.batches(1)))[0], next(iter(val.batches(1)))[0])


# --- distributed ----------------------------------------------------------------------------


def _two_rank_worker(rank: int, corpus: str, out_dir: str, cache_dir: str) -> None:
    datasets.config.HF_DATASETS_CACHE = cache_dir  # a spawned process does not inherit the test's patch
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=2)
    train, _ = build_loaders(
        files_cfg(corpus), seq_len=16, micro_batch_size=2, dp_rank=rank, dp_size=2, seed=5, tokenizer=ByteTokenizer()
    )
    batches = [next(train)[0] for _ in range(3)]
    torch.save({"batches": batches, "state": train.state_dict()}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_prepare_once_and_read_disjoint_windows(corpus, tmp_path):
    mp.spawn(_two_rank_worker, args=(str(corpus), str(tmp_path), str(datasets.config.HF_DATASETS_CACHE)), nprocs=2)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert results[0]["state"] == results[1]["state"]
    for a, b in zip(results[0]["batches"], results[1]["batches"]):
        rows_a, rows_b = {tuple(r) for r in a.tolist()}, {tuple(r) for r in b.tolist()}
        assert len(rows_a) == len(rows_b) == 2 and not rows_a & rows_b


def test_hub_data_set_that_cannot_be_opened_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="cannot be opened from the hub"):
        load_hub(str(tmp_path / "no-such-data-set"), hub_config=None, split="train", val_split=None)
