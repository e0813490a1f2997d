"""Document sources: the text training reads, as Hugging Face `datasets` objects.

- `stdlib`: the `.py` files of the running Python's standard library (site-/dist-packages left
  out): real text that every machine has, for CPU runs and tests.
- `files`: local files: a file, a directory (searched recursively, hidden entries left out), a
  glob, or a list of these. `.txt`/`.md`/`.py` give one document per file (the `text` builder);
  `.jsonl`/`.json` (the `json` builder) and `.parquet` give one document per row, read from the
  `text_field` column.
- `hub`: a data set on the Hugging Face hub, streamed (`streaming=True`) as `IterableDataset`s.
- `passkey`: generated needle-retrieval documents, each one training window long
  (`lsys/data/passkey.py`): `num_documents` for training, `val_fraction` of that for validation.

`stdlib` and `files` give map-style `Dataset`s with one column, `text`, one row per non-empty
document, cached by `datasets` in its default cache. Text files (everything but parquet, whose
strings Arrow already holds as UTF-8) are checked in full on every load: a file that is not
valid UTF-8 is skipped, and one logged warning names the skipped files and counts them. The
check runs before `datasets` reads anything, so the warning shows on every run, cached or not.

Validation split (`stdlib`, and `files` without `val_path`): a document is held out when a
BLAKE2b hash of its text falls below `val_fraction`. The split is the same on every machine and
rank, whatever the file order or mount point, and exact duplicates always land on the same side.
"""

import codecs
import glob
import hashlib
import logging
import sysconfig
from pathlib import Path

import datasets
import pyarrow.parquet as pq

from lsys.data.config import DataConfig
from lsys.data.errors import DataError
from lsys.data.passkey import passkey_documents
from lsys.data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# File extension -> the `datasets` builder that reads it.
BUILDER_BY_EXTENSION = {
    ".txt": "text",
    ".md": "text",
    ".py": "text",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
}
_GLOB_CHARS = "*?["
_HASH_RANGE = 2**64


# (train, validation) documents; validation is None when it is turned off.
MapSplits = tuple[datasets.Dataset, datasets.Dataset | None]
StreamSplits = tuple[datasets.IterableDataset, datasets.IterableDataset | None]


def load_source(cfg: DataConfig, *, seq_len: int, tokenizer: Tokenizer) -> MapSplits | StreamSplits:
    """The (train, validation) documents that `cfg.source` names; validation is None when turned off.

    `seq_len` and `tokenizer` shape the generated sources (passkey) and are ignored by the others.
    """
    if cfg.source == "passkey":
        if cfg.num_documents < 1:
            raise DataError(f"data.num_documents must be positive for source 'passkey', got {cfg.num_documents}")
        train = passkey_documents(count=cfg.num_documents, seq_len=seq_len, tokenizer=tokenizer, seed="train")
        num_val = round(cfg.num_documents * cfg.val_fraction)
        val = passkey_documents(count=num_val, seq_len=seq_len, tokenizer=tokenizer, seed="val") if num_val else None
        return train, val
    if cfg.source == "stdlib":
        return load_stdlib(val_fraction=cfg.val_fraction, num_proc=cfg.num_proc)
    if cfg.source == "files":
        if cfg.path is None:
            raise DataError("data.path is required for source 'files'")
        return load_files(
            cfg.path,
            val_path=cfg.val_path,
            text_field=cfg.text_field,
            val_fraction=cfg.val_fraction,
            num_proc=cfg.num_proc,
            name=cfg.name,
        )
    if cfg.source == "hub":
        if cfg.path is None:
            raise DataError("data.path is required for source 'hub': the data set id, e.g. 'HuggingFaceFW/fineweb-edu'")
        return load_hub(cfg.path, hub_config=cfg.hub_config, split=cfg.split, val_split=cfg.val_split)
    raise DataError(f"data.source '{cfg.source}' is unknown; expected 'stdlib', 'files', 'hub' or 'passkey'")


def stdlib_files() -> list[Path]:
    """The standard library's `.py` files, sorted, without site-packages/dist-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    excluded = {"site-packages", "dist-packages"}
    return sorted(p for p in root.rglob("*.py") if excluded.isdisjoint(p.relative_to(root).parts) and p.is_file())


def load_stdlib(*, val_fraction: float, num_proc: int = 1) -> MapSplits:
    """The standard library's source files as (train, validation) documents."""
    documents = load_documents(stdlib_files(), text_field="text", num_proc=num_proc, name="stdlib")
    return split_documents(documents, val_fraction=val_fraction, name="stdlib")


def load_files(
    path: str | list[str],
    *,
    val_path: str | list[str] | None = None,
    text_field: str = "text",
    val_fraction: float = 0.05,
    num_proc: int = 1,
    name: str = "files",
) -> MapSplits:
    """Local files as (train, validation) documents: `val_path` if given, else a hash split of `path`."""
    files = resolve_files(path, field="data.path")
    documents = load_documents(files, text_field=text_field, num_proc=num_proc, name=name)
    if val_path is None:
        return split_documents(documents, val_fraction=val_fraction, name=name)
    val_files = resolve_files(val_path, field="data.val_path")
    return documents, load_documents(val_files, text_field=text_field, num_proc=num_proc, name=f"{name} (val_path)")


def load_hub(path: str, *, hub_config: str | None, split: str, val_split: str | None) -> StreamSplits:
    """A hub data set's (train, validation) splits, streamed; validation is None without `val_split`."""
    try:
        train = datasets.load_dataset(path, hub_config, split=split, streaming=True)
        val = datasets.load_dataset(path, hub_config, split=val_split, streaming=True) if val_split else None
    except (OSError, ValueError) as error:  # ConnectionError, DatasetNotFoundError, unknown split or config
        raise DataError(f"data.path '{path}' (config {hub_config}) cannot be opened from the hub: {error}") from None
    return train, val


def resolve_files(path: str | list[str], *, field: str) -> list[Path]:
    """The readable files a path setting names (file, directory, glob or a list), sorted and unique."""
    entries = [path] if isinstance(path, str) else list(path)
    files: set[Path] = set()
    for entry in entries:
        if any(c in entry for c in _GLOB_CHARS):
            matches = glob.glob(str(Path(entry).expanduser()), recursive=True)
            if not matches:
                raise DataError(f"{field} glob '{entry}' matches no files")
            for match in map(Path, matches):
                # A wide glob may match other kinds of files too: keep the ones we can read.
                if match.is_dir():
                    files.update(_files_in_directory(match))
                elif _is_supported(match):
                    files.add(match)
        else:
            target = Path(entry).expanduser()
            if not target.exists():
                raise DataError(f"{field} '{entry}' does not exist")
            if target.is_dir():
                files.update(_files_in_directory(target))
            elif _is_supported(target):
                files.add(target)
            else:
                raise DataError(f"{field} '{entry}' has an unsupported extension; expected one of {_extensions()}")
    if not files:
        raise DataError(f"{field} '{path}' holds no {_extensions()} files")
    return sorted(files)


def load_documents(files: list[Path], *, text_field: str, num_proc: int, name: str) -> datasets.Dataset:
    """One `text` column with a row per non-empty document of `files`, non-UTF-8 files skipped."""
    by_builder: dict[str, list[str]] = {}
    for file in _drop_non_utf8(files, name=name):
        by_builder.setdefault(BUILDER_BY_EXTENSION[file.suffix.lower()], []).append(str(file))
    parts = []
    if "text" in by_builder:
        parts.append(
            datasets.load_dataset(
                "text", data_files=by_builder["text"], sample_by="document", split="train", num_proc=num_proc
            )
        )
    if "json" in by_builder:
        rows = datasets.load_dataset("json", data_files=by_builder["json"], split="train", num_proc=num_proc)
        parts.append(_as_text_column(rows, text_field, kind="jsonl/json", name=name))
    if "parquet" in by_builder:
        _check_parquet_columns(by_builder["parquet"], text_field)
        rows = datasets.load_dataset(
            "parquet", data_files=by_builder["parquet"], columns=[text_field], split="train", num_proc=num_proc
        )
        parts.append(_as_text_column(rows, text_field, kind="parquet", name=name))
    if not parts:
        raise DataError(f"data set '{name}' is empty: none of its {len(files)} file(s) is UTF-8 text")
    documents = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    documents = documents.filter(_has_text, batched=True, input_columns="text", desc=f"dropping empty {name} documents")
    if len(documents) == 0:
        raise DataError(f"data set '{name}' is empty: its {len(files)} file(s) hold no text")
    return documents


def split_documents(documents: datasets.Dataset, *, val_fraction: float, name: str) -> MapSplits:
    """(train, validation) by a hash of each document's text; validation is None if it gets nothing."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"data.val_fraction {val_fraction} must be in [0, 1)")
    if val_fraction == 0.0:
        return documents, None
    split_kwargs = {"batched": True, "input_columns": "text", "desc": f"splitting {name}"}
    train = documents.filter(_in_split, fn_kwargs={"val_fraction": val_fraction, "validation": False}, **split_kwargs)
    val = documents.filter(_in_split, fn_kwargs={"val_fraction": val_fraction, "validation": True}, **split_kwargs)
    if len(train) == 0:
        raise DataError(
            f"data set '{name}' has no training documents: all {len(val)} fell in the validation split; "
            "lower data.val_fraction or give data.val_path"
        )
    if len(val) == 0:
        logger.warning(
            "data set '%s': none of its %d documents fell in the validation split (val_fraction %s); "
            "validation is off. Raise data.val_fraction or give data.val_path.",
            name, len(train), val_fraction,
        )
        return train, None
    return train, val


def in_validation_split(text: str, val_fraction: float) -> bool:
    """Whether a document is held out: the hash of its text, read as a number in [0, 1), is below val_fraction."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < val_fraction * _HASH_RANGE


def _in_split(texts: list[str], val_fraction: float, validation: bool) -> list[bool]:
    return [in_validation_split(text, val_fraction) == validation for text in texts]


def _has_text(texts: list[str | None]) -> list[bool]:
    return [bool(text) for text in texts]


def _as_text_column(rows: datasets.Dataset, text_field: str, *, kind: str, name: str) -> datasets.Dataset:
    if text_field not in rows.column_names:
        raise DataError(
            f"data.text_field '{text_field}' is not a column of the {kind} files of '{name}' "
            f"(columns: {', '.join(rows.column_names)})"
        )
    rows = rows.select_columns([text_field])
    return rows if text_field == "text" else rows.rename_column(text_field, "text")


def _check_parquet_columns(files: list[str], text_field: str) -> None:
    # Reading a footer is cheap, and it names the file, which a failed column projection would not.
    for file in files:
        columns = pq.read_schema(file).names
        if text_field not in columns:
            raise DataError(
                f"data.text_field '{text_field}' is not a column of '{file}' (columns: {', '.join(columns)})"
            )


def _drop_non_utf8(files: list[Path], *, name: str) -> list[Path]:
    skipped = [f for f in files if BUILDER_BY_EXTENSION[f.suffix.lower()] != "parquet" and not _is_utf8(f)]
    if skipped:
        shown = ", ".join(str(f) for f in skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        logger.warning("data set '%s': skipped %d file(s) that are not UTF-8 text: %s", name, len(skipped), shown)
    skipped_set = set(skipped)
    return [f for f in files if f not in skipped_set]


def _is_utf8(path: Path) -> bool:
    # Decode in chunks so a large jsonl file is never held in memory whole.
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                decoder.decode(chunk)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _files_in_directory(directory: Path) -> list[Path]:
    return [
        p
        for p in directory.rglob("*")
        if p.is_file() and _is_supported(p) and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    ]


def _is_supported(path: Path) -> bool:
    return path.suffix.lower() in BUILDER_BY_EXTENSION


def _extensions() -> str:
    return "/".join(BUILDER_BY_EXTENSION)
