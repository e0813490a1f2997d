"""launch/prepare_data.py: a data source's documents tokenized into a shard set (`lsys.data.shards`).

The documents are those training would read (`lsys.data.sources.load_source`, the same validation
hash split), in stored order; workers tokenize batches of them and the results are written in
order. Resumable: a rerun after a kill checks the settings it was started with (`prepare.json`),
verifies the shards already complete (their `.done.json` records), skips their documents and goes
on, so the result is byte for byte that of an uninterrupted run; `manifest.json` comes last.

For tests only: with LSYS_TEST_PAUSE_AFTER_SHARD=<shard>:<path> in the environment (a shard name such
as train-00003), the run stops once that shard is complete, creates `path` and waits while `path`
exists, so a test can kill it at a known point (tests/test_shards.py).
"""

import collections
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from lsys.data.config import DataConfig, TokenizerConfig
from lsys.data.errors import DataError
from lsys.data.shards import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    ShardWriter,
    read_records,
    split_summary,
    token_dtype,
    tokenizer_identity,
    verify,
    verify_record,
    write_json_atomically,
)
from lsys.data.sources import load_source
from lsys.data.tokenizer import Tokenizer, build_tokenizer

PAUSE_AFTER_SHARD = "LSYS_TEST_PAUSE_AFTER_SHARD"  # the test seam described above
SETTINGS = "prepare.json"
DOCUMENTS_PER_BATCH = 256
# The DataConfig fields that decide which documents a shard set holds (the manifest records them), and those
# that a generated source's documents also depend on (lsys/data/sources.py::load_source).
SOURCE_FIELDS = ("name", "source", "path", "val_path", "text_field", "hub_config", "split", "val_split", "val_fraction")
GENERATED_SOURCE_FIELDS = {"passkey": ("num_documents", "short_keys", "seq_len")}

_worker_tokenizer: Tokenizer | None = None


def run(cfg: DictConfig) -> int:
    """launch/prepare_data.py: prepare `cfg.data` into `cfg.out`; returns the exit code (2: bad input)."""
    if OmegaConf.is_missing(cfg, "out"):
        print(
            "lsys: error: out is required: the folder to write shards to, e.g. out=data/stdlib-shards", file=sys.stderr
        )
        return 2
    try:
        manifest = prepare(
            DataConfig.from_attrs(cfg.data),
            Path(cfg.out),
            workers=cfg.prepare.workers,
            shard_tokens=cfg.prepare.shard_tokens,
            progress_bar=cfg.prepare.progress_bar,
        )
    except DataError as error:
        print(f"lsys: error: {error}", file=sys.stderr)
        return 2
    totals = ", ".join(
        f"{split}: {s['documents']} documents, {s['tokens']} tokens" for split, s in manifest["splits"].items()
    )
    print(f"prepared {cfg.out} ({totals})")
    return 0


def prepare(
    data: DataConfig, out: Path, *, workers: int, shard_tokens: int, progress_bar: bool = True
) -> dict[str, Any]:
    """Writes (or finishes) the shard set of `data`'s documents in `out`; returns its manifest."""
    if data.is_sft:
        raise DataError(f"data.format '{data.format}' holds SFT examples; prepare_data shards text documents only")
    if workers < 1:
        raise DataError(f"prepare.workers must be at least 1, got {workers}")
    tokenizer = build_tokenizer(data.tokenizer)
    dtype = token_dtype(tokenizer.vocab_size)
    settings = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "tokenizer": tokenizer_identity(data.tokenizer),
        "source": {key: getattr(data, key) for key in SOURCE_FIELDS + GENERATED_SOURCE_FIELDS.get(data.source, ())},
        "shard_tokens": shard_tokens,
    }
    out.mkdir(parents=True, exist_ok=True)
    _start_or_check_settings(out, settings)
    if (out / MANIFEST).is_file():
        return verify(out)
    train_documents, val_documents = load_source(data, seq_len=data.seq_len, tokenizer=tokenizer)
    splits = {}
    for split, documents in (("train", train_documents), ("val", val_documents)):
        if documents is None:
            continue
        done = read_records(out, split)
        for record in done:
            verify_record(out, record)
        writer = ShardWriter(
            out,
            split,
            vocab_size=tokenizer.vocab_size,
            dtype=dtype,
            shard_tokens=shard_tokens,
            start=done,
            on_shard=_pause_if_a_test_asks,
        )
        skip = sum(record.documents for record in done)
        text_field = "text" if isinstance(documents, datasets.Dataset) else data.text_field
        _write_split(
            writer,
            _text_batches(documents, text_field, skip=skip),
            tokenizer_cfg=data.tokenizer,
            workers=workers,
            progress=tqdm(desc=f"{split} tokens", unit="tok", unit_scale=True, disable=not progress_bar),
        )
        summary = split_summary(writer.finish())
        if summary["documents"] > 0:  # a streamed validation split may turn out empty: then there is none
            splits[split] = summary
    if "train" not in splits:
        raise DataError(f"data set '{data.name}' gave no training documents")
    manifest = {**settings, "splits": splits}
    write_json_atomically(out / MANIFEST, manifest)
    return manifest


def _start_or_check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Records the settings of a new shard set, or refuses to continue one started with other settings."""
    path = out / SETTINGS
    if not path.is_file():
        # A run killed while writing prepare.json leaves only its temporary file.
        if any(not path.name.endswith(".tmp") for path in out.iterdir()):
            raise DataError(f"out '{out}' is not empty and holds no {SETTINGS}: give a new or empty folder")
        write_json_atomically(path, settings)
        return
    started = json.loads(path.read_text())
    if started != json.loads(json.dumps(settings)):
        changed = sorted(key for key in settings if started.get(key) != json.loads(json.dumps(settings[key])))
        raise DataError(
            f"out '{out}' holds shards prepared with other settings (changed: {', '.join(changed)}); "
            "rerun with the same settings, or give a new folder"
        )


def _text_batches(
    documents: datasets.Dataset | datasets.IterableDataset, text_field: str, *, skip: int
) -> Iterator[list[str]]:
    """The documents' texts in stored order, DOCUMENTS_PER_BATCH at a time, the first `skip` left out."""
    if isinstance(documents, datasets.Dataset):
        if skip == len(documents):  # a resumed run whose split is complete (select refuses an empty range there)
            return
        documents = documents.select(range(skip, len(documents)))
    else:
        documents = documents.skip(skip)
    for batch in documents.iter(batch_size=DOCUMENTS_PER_BATCH):
        yield [text or "" for text in batch[text_field]]


def _write_split(
    writer: ShardWriter, batches: Iterator[list[str]], *, tokenizer_cfg: TokenizerConfig, workers: int, progress: tqdm
) -> None:
    """Tokenizes the batches (in `workers` processes, results in order) and hands them to the writer."""
    with progress:
        if workers == 1:
            _start_worker(tokenizer_cfg)
            for batch in batches:
                _write(writer, *_tokenize(batch), progress)
            return
        # fork: the workers need only the tokenizer, and a fork starts them without re-importing lsys.
        with multiprocessing.get_context("fork").Pool(workers, _start_worker, (tokenizer_cfg,)) as pool:
            # At most two batches a worker in flight (Pool.imap would read the whole source ahead), oldest first.
            pending = collections.deque()
            for batch in batches:
                pending.append(pool.apply_async(_tokenize, (batch,)))
                if len(pending) >= 2 * workers:
                    _write(writer, *pending.popleft().get(), progress)
            while pending:
                _write(writer, *pending.popleft().get(), progress)


def _write(writer: ShardWriter, ids: np.ndarray, lengths: np.ndarray, progress: tqdm) -> None:
    writer.add(ids, lengths)
    progress.update(len(ids))


def _start_worker(tokenizer_cfg: TokenizerConfig) -> None:
    global _worker_tokenizer
    _worker_tokenizer = build_tokenizer(tokenizer_cfg)


def _tokenize(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The batch's ids end to end, EOS after each document, and each document's token count."""
    documents = _worker_tokenizer.encode_batch(texts)
    lengths = np.array([len(ids) + 1 for ids in documents], dtype=np.int64)
    ids = np.empty(int(lengths.sum()), dtype=np.int64)
    ends = np.cumsum(lengths)
    for document, end in zip(documents, ends):
        ids[end - len(document) - 1 : end - 1] = document
        ids[end - 1] = _worker_tokenizer.eos_id
    return ids, lengths


def _pause_if_a_test_asks(shard: str) -> None:
    """Hold the run after the shard LSYS_TEST_PAUSE_AFTER_SHARD names while its file exists (tests; module doc)."""
    setting = os.environ.get(PAUSE_AFTER_SHARD)
    if setting is None:
        return
    pause_shard, marker = setting.split(":", 1)
    if pause_shard != shard:
        return
    Path(marker).touch()
    while Path(marker).exists():
        time.sleep(0.01)
