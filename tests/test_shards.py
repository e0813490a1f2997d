"""Prepared shard sets (lsys/data/shards.py, lsys/data/prepare.py, launch/prepare_data.py) and training from them."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from lsys.data import ByteTokenizer, DataConfig, DataError, build_loaders, build_tokenizer
from lsys.data.config import TokenizerConfig
from lsys.data.packing import TokenWindows, token_stream, tokenize_documents
from lsys.data.prepare import PAUSE_AFTER_SHARD, prepare
from lsys.data.shards import (
    MANIFEST,
    ShardWindows,
    ShardWriter,
    read_manifest,
    split_summary,
    verify,
)
from lsys.data.sources import load_source
from lsys.data.splits import in_validation_split
from tests.conftest import REPO, TINY, run_train

SEED = 7
LAYOUT = {"seq_len": 64, "micro_batch_size": 2, "dp_size": 2, "seed": SEED, "tokenizer": ByteTokenizer()}


def shards_of(tmp_path: Path, data: DataConfig, *, workers: int = 2, shard_tokens: int = 2**22) -> Path:
    """The shard set of `data`, prepared in-process into tmp_path/shards."""
    out = tmp_path / "shards"
    prepare(data, out, workers=workers, shard_tokens=shard_tokens, progress_bar=False)
    return out


@pytest.fixture(scope="module")
def stdlib_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stdlib corpus (default val_fraction) in shards of about 4M byte tokens, so windows span shards."""
    return shards_of(tmp_path_factory.mktemp("stdlib"), DataConfig(source="stdlib"), workers=2, shard_tokens=2**22)


@pytest.mark.parametrize("doc_isolation", [False, True])
def test_shards_give_the_in_memory_batches(stdlib_shards: Path, doc_isolation: bool):
    """Training batches (both dp ranks, several steps) and validation batches equal those of source stdlib."""
    assert len(read_manifest(stdlib_shards)["splits"]["train"]["shards"]) > 3
    for rank in (0, 1):
        memory = build_loaders(DataConfig(source="stdlib", doc_isolation=doc_isolation), dp_rank=rank, **LAYOUT)
        shards = build_loaders(
            DataConfig(name="stdlib", source="shards", path=str(stdlib_shards), doc_isolation=doc_isolation),
            dp_rank=rank,
            **LAYOUT,
        )
        for _ in range(6):
            expected, got = next(memory[0]), next(shards[0])
            assert len(got) == (3 if doc_isolation else 2)
            assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
        assert shards[0].state_dict() == memory[0].state_dict()
        val_pairs = list(zip(memory[1].batches(4), shards[1].batches(4), strict=True))
        assert len(val_pairs) == 4
        assert all(torch.equal(a, b) for pair in val_pairs for a, b in zip(*pair, strict=True))


def test_shard_windows_equal_token_windows_across_shards(stdlib_shards: Path):
    """A sample of windows spread over the whole stream, with a longer seq_len, read the same as TokenWindows."""
    train, _ = load_source(DataConfig(source="stdlib"), seq_len=1000, tokenizer=ByteTokenizer())
    tokenized = tokenize_documents(train, ByteTokenizer(), num_proc=1, desc="tokenizing stdlib (train)")
    expected = TokenWindows(token_stream(tokenized, shuffle_seed=SEED), 1000, eos_id=256)
    got = ShardWindows(stdlib_shards, "train", seq_len=1000, seed=SEED, eos_id=256)
    assert got.count == expected.count
    sample = torch.cat(
        [torch.randperm(got.count, generator=torch.Generator().manual_seed(0))[:500], torch.tensor([0, got.count - 1])]
    )
    assert all(torch.equal(a, b) for a, b in zip(expected.batch(sample), got.batch(sample), strict=True))


def test_hub_documents_are_prepared_in_stream_order_with_their_hash_split(tmp_path: Path):
    """A hub data set with only a train split (a folder of parquet files, read as the hub's are): the shards hold
    its documents in stream order, each in the split its text hashes to, every one EOS-terminated."""
    hub = tmp_path / "hub"
    hub.mkdir()
    texts = [f"document {i}: " + "words " * (i % 7 + 1) for i in range(400)]
    for index in range(2):
        datasets.Dataset.from_dict({"body": texts[index::2]}).to_parquet(hub / f"train-{index:05d}.parquet")
    data = DataConfig(name="hub-test", source="hub", path=str(hub), text_field="body", val_fraction=0.2)
    out = shards_of(tmp_path, data, workers=2, shard_tokens=1000)
    manifest = read_manifest(out)
    assert manifest["source"]["source"] == "hub" and len(manifest["splits"]["train"]["shards"]) > 1

    stream_order = texts[0::2] + texts[1::2]  # the parquet files one after the other
    for split, validation in (("train", False), ("val", True)):
        expected = [t for t in stream_order if in_validation_split(t, 0.2) == validation]
        windows = ShardWindows(out, split, seq_len=8, seed=None)
        stored = np.concatenate([np.fromfile(f, dtype=np.uint16) for f in windows._files])
        ends = np.flatnonzero(stored == ByteTokenizer().eos_id)
        assert len(ends) and ends[-1] == len(stored) - 1
        documents = [ByteTokenizer().decode(stored[a:b].tolist()) for a, b in zip(np.r_[0, ends[:-1] + 1], ends)]
        assert documents == expected
    assert 40 < manifest["splits"]["val"]["documents"] < 120  # about 0.2 of 400


@pytest.fixture
def many_files(tmp_path: Path) -> Path:
    """40 of the stdlib's top-level modules as .txt files: enough documents for many small shards."""
    folder = tmp_path / "many_files"
    folder.mkdir()
    for file in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40]:
        (folder / f"{file.name}.txt").write_text(file.read_text(encoding="utf-8"))
    return folder


def prepare_command(corpus: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        str(REPO / "launch/prepare_data.py"),
        "data=files",
        f"data.path={corpus}",
        f"out={out}",
        "prepare.shard_tokens=20000",
        "prepare.workers=2",
        "prepare.progress_bar=false",
    ]


def run_prepare(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        command,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_killed_prepare_resumes_to_the_same_bytes(tmp_path: Path, many_files: Path):
    """A run killed after shard train-00004 is rerun: the done shards stay as they are, the result is byte-identical."""
    straight, resumed, marker = tmp_path / "straight", tmp_path / "resumed", tmp_path / "paused"
    assert run_prepare(prepare_command(many_files, straight)).returncode == 0
    assert len(read_manifest(straight)["splits"]["train"]["shards"]) > 8

    env = {**os.environ, "OMP_NUM_THREADS": "1", PAUSE_AFTER_SHARD: f"train-00004:{marker}"}
    killed = subprocess.Popen(
        prepare_command(many_files, resumed),
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not marker.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the run never reached shard train-00004"
    os.killpg(killed.pid, signal.SIGKILL)  # the run and its tokenizing workers, all started by this test
    killed.wait()
    assert not (resumed / MANIFEST).exists()
    done = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in resumed.glob("train-0000[0-4].*")}
    assert len(done) == 15  # .bin, .idx and .done.json of shards 0..4

    result = run_prepare(prepare_command(many_files, resumed))
    assert result.returncode == 0, result.stderr
    assert {name: (resumed / name).stat().st_ino for name in done} == {name: ino for name, (ino, _) in done.items()}
    assert {name: (resumed / name).stat().st_mtime_ns for name in done} == {n: t for n, (_, t) in done.items()}
    files = sorted(p.name for p in straight.iterdir())
    assert sorted(p.name for p in resumed.iterdir()) == files
    assert all((straight / name).read_bytes() == (resumed / name).read_bytes() for name in files)
    verify(resumed)


def test_prepare_refuses_bad_input_in_one_line(tmp_path: Path, corpus: Path):
    """A missing source (one line, exit code 2), a rerun with changed settings, and a damaged shard on a rerun."""
    missing = run_prepare(
        [
            sys.executable,
            str(REPO / "launch/prepare_data.py"),
            "data=files",
            f"data.path={tmp_path / 'nowhere'}",
            f"out={tmp_path / 'out'}",
            "prepare.progress_bar=false",
        ]
    )
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [f"lsys: error: data.path '{tmp_path / 'nowhere'}' does not exist"]

    data = DataConfig(source="files", path=str(corpus))
    out = shards_of(tmp_path, data)
    with pytest.raises(DataError, match=r"prepared with other settings \(changed: shard_tokens\)"):
        prepare(data, out, workers=1, shard_tokens=1000, progress_bar=False)

    # A rerun verifies the shards it keeps: a damaged one is named, not built on.
    shard = out / "train-00000.bin"
    shard.write_bytes(b"\0\0" + shard.read_bytes()[2:])
    (out / MANIFEST).unlink()
    with pytest.raises(DataError, match=r"train-00000.bin' is missing or its sha256 differs from its record"):
        prepare(data, out, workers=1, shard_tokens=2**22, progress_bar=False)


@pytest.fixture
def byte_shards(tmp_path: Path, corpus: Path) -> Path:
    return shards_of(tmp_path, DataConfig(source="files", path=str(corpus), val_fraction=0.0), workers=1)


def shard_loaders(path: Path, **data):
    return build_loaders(DataConfig(source="shards", path=str(path), **data), dp_rank=0, **LAYOUT)


def test_a_generated_source_is_continued_only_with_the_settings_it_was_generated_with(tmp_path: Path):
    """Passkey documents depend on num_documents, short_keys and seq_len: a rerun that changes any is refused."""
    data = DataConfig(source="passkey", num_documents=8, seq_len=256)
    out = shards_of(tmp_path, data, workers=1)
    assert read_manifest(out)["splits"]["train"]["documents"] == 8
    prepare(data, out, workers=1, shard_tokens=2**22, progress_bar=False)  # the same settings: verified, kept
    for changed in ({"num_documents": 9}, {"short_keys": 0.5}, {"seq_len": 512}):
        other = dataclasses.replace(data, **changed)
        with pytest.raises(DataError, match=r"prepared with other settings \(changed: source\)"):
            prepare(other, out, workers=1, shard_tokens=2**22, progress_bar=False)


def test_missing_and_corrupted_manifests_are_refused(byte_shards: Path, tmp_path: Path):
    with pytest.raises(DataError, match=r"holds no manifest.json: it is not a complete shard set"):
        shard_loaders(tmp_path / "empty")
    manifest = byte_shards / MANIFEST
    good = manifest.read_text()
    manifest.write_text(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"is not an lsys-shards version 1 manifest \(JSONDecodeError"):
        shard_loaders(byte_shards)
    manifest.write_text(json.dumps({**json.loads(good), "format_version": 99}))
    with pytest.raises(DataError, match=r"is not an lsys-shards version 1 manifest"):
        shard_loaders(byte_shards)
    manifest.write_text(good)
    index = byte_shards / "train-00000.idx"
    lengths = np.fromfile(index, dtype="<i8")
    index.write_bytes((lengths + 1).astype("<i8").tobytes())
    with pytest.raises(DataError, match=r"train-00000.idx' does not hold \d+ positive document lengths adding up"):
        shard_loaders(byte_shards)
    index.write_bytes(lengths.astype("<i8").tobytes())
    shard = byte_shards / "train-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"train-00000.bin' is \d+ bytes, but manifest.json says \d+ bytes"):
        shard_loaders(byte_shards)
    shard.unlink()
    with pytest.raises(DataError, match=r"train-00000.bin' is missing"):
        shard_loaders(byte_shards)


def test_another_tokenizer_is_refused_naming_both(byte_shards: Path, tmp_path: Path, corpus: Path):
    def bpe(vocab_size: int) -> Path:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
        tokenizer.train(
            [str(p) for p in corpus.iterdir()], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["</s>"])
        )
        path = tmp_path / f"bpe-{vocab_size}.json"
        tokenizer.save(str(path))
        return path

    hf = TokenizerConfig(kind="hf", path=str(bpe(300)), eos_token="</s>")
    layout = {**LAYOUT, "tokenizer": build_tokenizer(hf)}
    with pytest.raises(
        DataError,
        match=r"made with tokenizer \{'kind': 'byte'\} \(eos_id 256\), but data.tokenizer is "
        r"\{'kind': 'hf', 'sha256': '[0-9a-f]{64}', 'eos_token': '</s>'\}",
    ):
        build_loaders(DataConfig(source="shards", path=str(byte_shards), tokenizer=hf), dp_rank=0, **layout)

    hf_shards = shards_of(tmp_path / "hf", DataConfig(source="files", path=str(corpus), val_fraction=0.0, tokenizer=hf))
    other = TokenizerConfig(kind="hf", path=str(bpe(320)), eos_token="</s>")
    layout = {**LAYOUT, "tokenizer": build_tokenizer(other)}
    with pytest.raises(DataError, match=r"made with tokenizer .*'kind': 'hf'.*but data.tokenizer is .*'kind': 'hf'"):
        build_loaders(DataConfig(source="shards", path=str(hf_shards), tokenizer=other), dp_rank=0, **layout)
    with pytest.raises(DataError, match=r"made with tokenizer \{.*'hf'.*\}.*but data.tokenizer is \{'kind': 'byte'\}"):
        shard_loaders(hf_shards)


def test_a_vocabulary_beyond_uint16_is_refused(byte_shards: Path, tmp_path: Path):
    with pytest.raises(DataError, match=r"a vocabulary of 70000 ids does not fit uint16 tokens; use uint32"):
        ShardWriter(tmp_path, "train", vocab_size=70000, dtype=np.uint16, shard_tokens=100)
    manifest = json.loads((byte_shards / MANIFEST).read_text())
    (byte_shards / MANIFEST).write_text(json.dumps({**manifest, "vocab_size": 70000}))
    with pytest.raises(DataError, match=r"claims vocab_size 70000 in uint16 tokens, which cannot hold it"):
        shard_loaders(byte_shards)


# Reads every window of a shard set and prints how far the peak RSS rose above the RSS after imports.
_READ_ALL_WINDOWS = """
import resource, sys, torch
from lsys.data.shards import ShardWindows
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
windows = ShardWindows(sys.argv[1], "train", seq_len=2**16, seed=1, eos_id=0)
for first in range(0, windows.count, 8):
    windows.batch(torch.arange(first, min(first + 8, windows.count)))
print(windows.count, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_reading_every_window_keeps_the_peak_rss_flat(tmp_path: Path):
    """200 MB of uint16 shards read window by window raise the peak RSS by less than a 50 MB budget."""
    budget, out = 50_000_000, tmp_path / "big"
    out.mkdir()
    writer = ShardWriter(out, "train", vocab_size=2**16, dtype=np.uint16, shard_tokens=2**24)
    rng = np.random.default_rng(0)
    for _ in range(100):  # 100M tokens in documents of 1..8000 tokens
        lengths = rng.integers(1, 8000, size=200)  # about 800K tokens; the last document takes the rest
        lengths[-1] += 1_000_000 - lengths.sum()
        writer.add(rng.integers(0, 2**16, size=1_000_000, dtype=np.uint16), lengths)
    manifest = {
        "format": "lsys-shards",
        "format_version": 1,
        "dtype": "uint16",
        "vocab_size": 2**16,
        "eos_id": 0,
        "tokenizer": {"kind": "synthetic"},
        "splits": {"train": split_summary(writer.finish())},
    }
    (out / MANIFEST).write_text(json.dumps(manifest))
    size = sum(p.stat().st_size for p in out.glob("*.bin"))
    assert size >= 4 * budget
    try:
        result = subprocess.run(
            [sys.executable, "-c", _READ_ALL_WINDOWS, str(out)],
            check=False,
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            timeout=120,
        )
    finally:
        shutil.rmtree(out)
    assert result.returncode == 0, result.stderr
    count, rise = map(int, result.stdout.split())
    assert count == (100_000_000 - 1) // 2**16
    assert rise < budget, f"peak RSS rose {rise / 1e6:.0f} MB reading {size / 1e6:.0f} MB of shards"


def test_training_runs_from_shards(tmp_path: Path, corpus: Path):
    out = shards_of(tmp_path, DataConfig(source="files", path=str(corpus)))
    run_dir = tmp_path / "run"
    result = run_train(
        ["data=shards", f"data.path={out}", *TINY, "trainer.max_steps=2", f"run_dir={run_dir}"], cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "data 'shards': shards in" in result.stderr  # logged before train.log opens
