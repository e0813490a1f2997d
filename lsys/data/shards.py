"""Prepared token shards: the on-disk format, its writer, and `ShardWindows`, which reads windows from it.

A shard set is a directory:

    manifest.json          written last: format, dtype, vocab_size, eos_id, tokenizer identity, the source
                           settings it was made from, and per split its shards (names, documents, tokens,
                           sha256 of each file) and totals
    train-00000.bin        the tokens of whole documents end to end, each document's EOS included, a flat
                           little-endian array of `dtype` (uint16 when vocab_size <= 65536, else uint32)
    train-00000.idx        int64 little-endian: each document's token count (EOS included), in stored order
    train-00000.done.json  the shard's record (what the manifest lists for it), written once it is complete
    val-00000.bin ...      the same for the validation split, when there is one

A document never spans two shards: a shard closes at the first document boundary at or past
`shard_tokens`, so shard boundaries follow from the documents alone.

`ShardWindows` lays the documents out as the in-memory path does (`lsys.data.packing`): training
documents in the order `torch.randperm(num_documents, generator=torch.Generator().manual_seed(seed))`
over all of them (shards in order), validation in stored order; window w is tokens [w*T, w*T+T+1) of
that virtual stream, so the windows are those of `TokenWindows(token_stream(...))`.
"""

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lsys.checksums import file_sha256
from lsys.data.errors import DataError
from lsys.data.packing import Batch, window_batch

FORMAT = "lsys-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
INDEX_DTYPE = np.dtype("<i8")
_UINT16_VOCAB = 2**16  # ids 0..65535 fit uint16


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest little-endian dtype that holds every id of a vocabulary: uint16 or uint32."""
    return np.dtype("<u2") if vocab_size <= _UINT16_VOCAB else np.dtype("<u4")


def tokenizer_identity(tokenizer_cfg: Any) -> dict[str, str]:
    """What makes two tokenizers the same (fields of `data.tokenizer`): byte, or hf's JSON sha256 and EOS token."""
    kind = getattr(tokenizer_cfg, "kind", None)
    if kind == "byte":
        return {"kind": "byte"}
    if kind == "hf":
        path = Path(tokenizer_cfg.path)
        if not path.is_file():
            raise DataError(f"tokenizer.path '{path}' does not exist")
        return {"kind": "hf", "sha256": file_sha256(path), "eos_token": str(tokenizer_cfg.eos_token)}
    raise DataError(f"tokenizer.kind '{kind}' is unknown; expected 'byte' or 'hf'")


def write_json_atomically(path: Path, value: Any) -> None:
    """Writes `value` as JSON to a temporary name, fsyncs it and renames it to `path`."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shard_name(split: str, index: int) -> str:
    """The file stem of a split's shard: `train-00003`."""
    return f"{split}-{index:05d}"


@dataclass
class ShardRecord:
    """One complete shard: its stem, documents, tokens and the sha256 of its .bin and .idx files."""

    name: str
    documents: int
    tokens: int
    bin_sha256: str
    idx_sha256: str


def read_records(directory: Path, split: str) -> list[ShardRecord]:
    """The complete shards of a split (those with a record), from index 0 up to the first missing one."""
    records = []
    while (path := Path(directory) / f"{shard_name(split, len(records))}.done.json").is_file():
        records.append(ShardRecord(**json.loads(path.read_text())))
    return records


def verify_record(directory: Path, record: ShardRecord) -> None:
    """Raises DataError unless the shard's .bin and .idx files have the sha256 its record holds."""
    for suffix, expected in ((".bin", record.bin_sha256), (".idx", record.idx_sha256)):
        path = Path(directory) / f"{record.name}{suffix}"
        if not path.is_file() or file_sha256(path) != expected:
            raise DataError(
                f"shard file '{path}' is missing or its sha256 differs from its record: the shard set is "
                "damaged; delete the directory and prepare it again"
            )


class ShardWriter:
    """Writes one split's documents into shards, each closed at the first document boundary past shard_tokens.

    Each shard is written under a temporary name, fsynced and renamed, then its `.done.json` record;
    `start` (the records of shards already complete) continues after them. `on_shard` is called with
    each shard's name once it is complete.
    """

    def __init__(
        self,
        directory: Path,
        split: str,
        *,
        vocab_size: int,
        dtype: np.dtype,
        shard_tokens: int,
        start: list[ShardRecord] | None = None,
        on_shard: Callable[[str], None] | None = None,
    ):
        dtype = np.dtype(dtype)
        if dtype not in (np.dtype("<u2"), np.dtype("<u4")):
            raise DataError(f"shard dtype {dtype} is unsupported; expected uint16 or uint32")
        if vocab_size > np.iinfo(dtype).max + 1:
            raise DataError(
                f"a vocabulary of {vocab_size} ids does not fit {dtype.name} tokens; use {token_dtype(vocab_size).name}"
            )
        if shard_tokens < 1:
            raise DataError(f"prepare.shard_tokens must be positive, got {shard_tokens}")
        self.directory = Path(directory)
        self.split = split
        self.vocab_size = vocab_size
        self.dtype = dtype
        self.shard_tokens = shard_tokens
        self.records = list(start or [])
        self.on_shard = on_shard
        self._lengths: list[int] = []  # of the open shard's documents
        self._tokens = 0  # in the open shard
        self._bin = None
        self._bin_sha256 = hashlib.sha256()

    def add(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        """Appends documents: `ids` their tokens end to end (EOS included), `lengths` each one's token count."""
        ids, lengths = np.asarray(ids), np.asarray(lengths, dtype=np.int64)
        if lengths.sum() != len(ids) or (lengths < 1).any():
            raise DataError(
                f"document lengths must be positive and add up to the {len(ids)} ids, got sum {lengths.sum()}"
            )
        if len(ids) and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise DataError(
                f"a token id outside [0, {self.vocab_size}) came from the tokenizer: ids {ids.min()}..{ids.max()}"
            )
        ids = ids.astype(self.dtype, copy=False)
        offset = 0
        for length in lengths.tolist():
            if self._bin is None:
                self._open()
            document = ids[offset : offset + length].tobytes()
            self._bin.write(document)
            self._bin_sha256.update(document)
            self._lengths.append(int(length))
            self._tokens += int(length)
            offset += length
            if self._tokens >= self.shard_tokens:
                self._close()

    def finish(self) -> list[ShardRecord]:
        """Closes the last shard (if it holds documents); returns the records of all the split's shards."""
        if self._bin is not None:
            self._close()
        return self.records

    def _paths(self) -> tuple[Path, Path]:
        stem = self.directory / shard_name(self.split, len(self.records))
        return stem.with_name(stem.name + ".bin"), stem.with_name(stem.name + ".idx")

    def _open(self) -> None:
        bin_path, _ = self._paths()
        # Open across add() calls until the shard is full: _close() closes it.
        self._bin = open(bin_path.with_name(bin_path.name + ".tmp"), "wb")  # noqa: SIM115
        self._bin_sha256 = hashlib.sha256()
        self._lengths = []
        self._tokens = 0

    def _close(self) -> None:
        bin_path, idx_path = self._paths()
        index = np.asarray(self._lengths, dtype=INDEX_DTYPE).tobytes()
        with open(idx_path.with_name(idx_path.name + ".tmp"), "wb") as idx:
            idx.write(index)
            idx.flush()
            os.fsync(idx.fileno())
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        self._bin = None
        for path in (bin_path, idx_path):
            os.replace(path.with_name(path.name + ".tmp"), path)
        stem = bin_path.name.removesuffix(".bin")
        record = ShardRecord(
            stem, len(self._lengths), self._tokens, self._bin_sha256.hexdigest(), hashlib.sha256(index).hexdigest()
        )
        write_json_atomically(self.directory / f"{stem}.done.json", record.__dict__)
        self.records.append(record)
        if self.on_shard is not None:
            self.on_shard(stem)


def split_summary(records: list[ShardRecord]) -> dict[str, Any]:
    """A split's entry in the manifest: its shards and totals."""
    return {
        "shards": [record.__dict__ for record in records],
        "documents": sum(r.documents for r in records),
        "tokens": sum(r.tokens for r in records),
    }


def read_manifest(directory: Path) -> dict[str, Any]:
    """The checked manifest of a shard set: format, dtype against vocab_size, and every file's size."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise DataError(
            f"'{directory}' holds no {MANIFEST}: it is not a complete shard set; "
            "make one with `python launch/prepare_data.py out=...` (a killed run: run it again)"
        )
    try:
        manifest = json.loads(path.read_text())
        if manifest["format"] != FORMAT or manifest["format_version"] != FORMAT_VERSION:
            raise ValueError(f"format {manifest['format']} version {manifest['format_version']}")
        dtype = np.dtype(manifest["dtype"]).newbyteorder("<")  # the format is little-endian on every machine
        vocab_size, splits = int(manifest["vocab_size"]), manifest["splits"]
        shards = {split: [ShardRecord(**s) for s in splits[split]["shards"]] for split in splits}
        if not isinstance(manifest["eos_id"], int) or "kind" not in manifest["tokenizer"]:
            raise ValueError(f"eos_id {manifest['eos_id']!r}, tokenizer {manifest['tokenizer']!r}")
        if "train" not in shards or not all(shards.values()):
            raise ValueError(f"splits {sorted(shards)}: a train split is required, and every split needs a shard")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(
            f"'{path}' is not an {FORMAT} version {FORMAT_VERSION} manifest ({type(error).__name__}: {error}); "
            "prepare the shard set again"
        ) from None
    if dtype not in (np.dtype("<u2"), np.dtype("<u4")) or vocab_size > np.iinfo(dtype).max + 1:
        raise DataError(
            f"'{path}' claims vocab_size {vocab_size} in {dtype.name} tokens, which cannot hold it; "
            "the shard set is damaged: prepare it again"
        )
    for records in shards.values():
        for record in records:
            for suffix, size in (
                (".bin", record.tokens * dtype.itemsize),
                (".idx", record.documents * INDEX_DTYPE.itemsize),
            ):
                file = directory / f"{record.name}{suffix}"
                if not file.is_file() or file.stat().st_size != size:
                    found = f"{file.stat().st_size} bytes" if file.is_file() else "missing"
                    raise DataError(
                        f"shard file '{file}' is {found}, but {MANIFEST} says {size} bytes: "
                        "the shard set is incomplete or damaged; prepare it again"
                    )
    return manifest


def check_tokenizer(manifest: dict[str, Any], directory: Path, *, identity: dict[str, str], eos_id: int) -> None:
    """Raises DataError unless the run's tokenizer (its identity and EOS id) is the one the shards were made with."""
    made_with = manifest["tokenizer"]
    if made_with != identity or int(manifest["eos_id"]) != eos_id:
        raise DataError(
            f"the shards in '{directory}' were made with tokenizer {made_with} (eos_id {manifest['eos_id']}), "
            f"but data.tokenizer is {identity} (eos_id {eos_id}); use the tokenizer they were made with"
        )


def verify(directory: Path) -> dict[str, Any]:
    """The manifest of a shard set whose every file has the sha256 the manifest lists; raises DataError otherwise."""
    manifest = read_manifest(directory)
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            verify_record(directory, ShardRecord(**shard))
    return manifest


class ShardWindows:
    """A split of a shard set as windows of seq_len inputs (+1 target), read from disk window by window.

    Only per-document int64 arrays live in memory. Tokens are read with `np.fromfile` at an offset,
    not through a long-lived memmap: a memmap's touched pages count in the process's RSS until
    unmapped, so an epoch over a memmapped set would look as large as the set; a read keeps only
    the window (the page cache still holds what the OS can spare).
    """

    def __init__(
        self,
        directory: Path,
        split: str,
        *,
        seq_len: int,
        seed: int | None,
        eos_id: int | None = None,
        manifest: dict[str, Any] | None = None,
    ):
        self.directory = Path(directory)
        manifest = manifest if manifest is not None else read_manifest(self.directory)
        if split not in manifest["splits"]:
            raise DataError(f"the shard set '{directory}' has no '{split}' split (it has {sorted(manifest['splits'])})")
        self.seq_len = seq_len
        self.eos_id = eos_id  # given: batches carry segment_ids (document isolation)
        self._dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
        records = [ShardRecord(**s) for s in manifest["splits"][split]["shards"]]
        self._files = [self.directory / f"{r.name}.bin" for r in records]
        lengths = [np.fromfile(self.directory / f"{r.name}.idx", dtype=INDEX_DTYPE) for r in records]
        for record, shard_lengths in zip(records, lengths, strict=True):
            if shard_lengths.sum() != record.tokens or (shard_lengths < 1).any():
                raise DataError(
                    f"'{self.directory / record.name}.idx' does not hold {record.documents} positive document "
                    f"lengths adding up to its {record.tokens} tokens: the shard set is damaged; prepare it again"
                )
        # Where each stored document lives: its shard and its first token's offset there.
        self._doc_shard = np.concatenate([np.full(len(l), i, dtype=np.int64) for i, l in enumerate(lengths)])
        self._doc_offset = np.concatenate([np.cumsum(l) - l for l in lengths])
        stored_lengths = np.concatenate(lengths)
        num_documents = len(stored_lengths)
        if seed is None:
            self._order = np.arange(num_documents, dtype=np.int64)
        else:
            self._order = torch.randperm(num_documents, generator=torch.Generator().manual_seed(seed)).numpy()
        # The virtual stream: document k of it is stored document _order[k], ending at _stream_ends[k].
        self._lengths = stored_lengths[self._order]
        self._stream_ends = np.cumsum(self._lengths)
        total = int(self._stream_ends[-1]) if num_documents else 0
        self.count = max(0, (total - 1) // seq_len)

    def batch(self, window_ids: torch.Tensor) -> Batch:
        """The batch (int64 `[len(window_ids), seq_len]` each) of the given windows; see `packing.window_batch`."""
        rows = (
            np.stack([self._window(int(w)) for w in window_ids]) if len(window_ids) else np.empty((0, self.seq_len + 1))
        )
        return window_batch(torch.from_numpy(rows.astype(np.int64)), self.eos_id)

    def _window(self, window: int) -> np.ndarray:
        """Tokens [w*T, w*T+T+1) of the virtual stream, read document piece by document piece."""
        start, end = window * self.seq_len, window * self.seq_len + self.seq_len + 1
        k = int(np.searchsorted(self._stream_ends, start, side="right"))  # the document holding token `start`
        pieces = []
        while start < end:
            doc_end = int(self._stream_ends[k])
            doc_start = doc_end - int(self._lengths[k])
            stored = self._order[k]
            count = min(end, doc_end) - start
            offset = int(self._doc_offset[stored]) + (start - doc_start)
            pieces.append(
                np.fromfile(
                    self._files[self._doc_shard[stored]],
                    dtype=self._dtype,
                    count=count,
                    offset=offset * self._dtype.itemsize,
                )
            )
            start += count
            k += 1
        return np.concatenate(pieces)
