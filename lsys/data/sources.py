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

Validation split (`stdlib`, `files` without `val_path`, `hub` without `val_split`): a document is
held out when a BLAKE2b hash of its text falls below `val_fraction` (a hub stream is filtered by it
both ways: training gets the documents not held out). The split is the same on every machine and
rank, whatever the file order or mount point, and exact duplicates always land on the same side.

SFT examples (`data.format` messages or prompt_response; `load_examples`) are whole records:
`files` reads `.jsonl`/`.json`/`.parquet` files, `hub` the map-style (downloaded, not streamed)
split. They keep the format's fields, plus `ROW_COLUMN`: each record's row, counted from 0 in read
order, so an error can name the example. Validation: `val_path` (files), `val_split` (hub), else
the hash split above over a canonical JSON dump of the fields (`example_key`). `stdlib_qa`
(messages only) generates them: questions about a constant of a standard-library file, asked after
a long piece of it, each filling a window of seq_len byte tokens (`lsys/data/qa.py`):
`num_documents` for training, `val_fraction` of that for validation, from held-out files.
"""

import codecs
import glob
import json
import logging
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq

from lsys.data.config import DataConfig
from lsys.data.errors import DataError
from lsys.data.passkey import passkey_documents
from lsys.data.qa import stdlib_qa_examples
from lsys.data.splits import ROW_COLUMN, MapSplits, StreamSplits, in_validation_split
from lsys.data.stdlib import stdlib_files
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
RECORD_BUILDERS = ("json", "parquet")  # the builders whose rows are records: what SFT examples are read from


def load_source(cfg: DataConfig, *, seq_len: int, tokenizer: Tokenizer) -> MapSplits | StreamSplits:
    """The (train, validation) documents that `cfg.source` names; validation is None when turned off.

    `seq_len` and `tokenizer` shape the generated sources (passkey) and are ignored by the others.
    """
    if cfg.source == "passkey":
        if cfg.num_documents < 1:
            raise DataError(f"data.num_documents must be positive for source 'passkey', got {cfg.num_documents}")
        documents = dict(seq_len=seq_len, tokenizer=tokenizer, short_keys=cfg.short_keys)
        train = passkey_documents(count=cfg.num_documents, seed="train", **documents)
        num_val = round(cfg.num_documents * cfg.val_fraction)
        val = passkey_documents(count=num_val, seed="val", **documents) if num_val else None
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
        return load_hub(
            cfg.path, hub_config=cfg.hub_config, split=cfg.split, val_split=cfg.val_split, text_field=cfg.text_field,
            val_fraction=cfg.val_fraction, name=cfg.name,
        )
    raise DataError(f"data.source '{cfg.source}' is unknown; expected 'stdlib', 'files', 'hub' or 'passkey'")


def load_examples(cfg: DataConfig, *, seq_len: int) -> MapSplits:
    """The (train, validation) SFT records of an SFT `cfg.format`: its fields plus ROW_COLUMN, map-style.

    `seq_len` shapes the generated source (stdlib_qa) and is ignored by the others.
    """
    fields = cfg.example_fields
    if cfg.source == "stdlib_qa":
        if cfg.format != "messages":
            raise DataError(f"data.source 'stdlib_qa' generates chats: set data.format=messages, not '{cfg.format}'")
        return stdlib_qa_examples(
            num_documents=cfg.num_documents, val_fraction=cfg.val_fraction, seq_len=seq_len, name=cfg.name,
            column=cfg.messages_field,
        )
    if cfg.source == "files":
        if cfg.path is None:
            raise DataError("data.path is required for source 'files'")
        files = resolve_files(cfg.path, field="data.path")
        train = load_records(files, fields=fields, num_proc=cfg.num_proc, name=cfg.name)
        if cfg.val_path is not None:
            val_files = resolve_files(cfg.val_path, field="data.val_path")
            return train, load_records(val_files, fields=fields, num_proc=cfg.num_proc, name=f"{cfg.name} (val_path)")
    elif cfg.source == "hub":
        if cfg.path is None:
            raise DataError("data.path is required for source 'hub': the data set id, e.g. 'HuggingFaceH4/no_robots'")
        hub_kwargs = {"hub_config": cfg.hub_config, "fields": fields, "num_proc": cfg.num_proc, "name": cfg.name}
        train = load_hub_records(cfg.path, split=cfg.split, **hub_kwargs)
        if cfg.val_split is not None:
            return train, load_hub_records(cfg.path, split=cfg.val_split, **hub_kwargs)
    else:
        raise DataError(
            f"data.format '{cfg.format}' reads examples from source 'files', 'hub' or 'stdlib_qa', not '{cfg.source}'"
        )
    return split_examples(train, fields=list(fields.values()), val_fraction=cfg.val_fraction, name=cfg.name)


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


def load_hub(
    path: str,
    *,
    hub_config: str | None,
    split: str,
    val_split: str | None,
    text_field: str = "text",
    val_fraction: float = 0.0,
    name: str = "hub",
) -> StreamSplits:
    """A hub data set's (train, validation) documents, streamed: `val_split`, else a hash split of `split`.

    Without `val_split` the documents whose `text_field` hashes below `val_fraction` (`in_validation_split`, the
    rule map-style data use) are validation and the rest training: one stream, filtered both ways, so each
    held-out document is read (and hashed) by both. Validation is None when `val_fraction` is 0.
    """
    if val_split is None and not 0.0 <= val_fraction < 1.0:
        raise DataError(f"data.val_fraction {val_fraction} must be in [0, 1)")
    try:
        documents = datasets.load_dataset(path, hub_config, split=split, streaming=True)
        val = datasets.load_dataset(path, hub_config, split=val_split, streaming=True) if val_split else None
    except (OSError, ValueError) as error:  # ConnectionError, DatasetNotFoundError, unknown split or config
        raise DataError(f"data.path '{path}' (config {hub_config}) cannot be opened from the hub: {error}") from None
    if val_split is not None or val_fraction == 0.0:
        return documents, val
    split_kwargs = {"text_field": text_field, "val_fraction": val_fraction, "name": name}
    train = documents.filter(_row_in_split, fn_kwargs={**split_kwargs, "validation": False})
    val = documents.filter(_row_in_split, fn_kwargs={**split_kwargs, "validation": True})
    return train, val


def load_records(files: list[Path], *, fields: dict[str, str], num_proc: int, name: str) -> datasets.Dataset:
    """The `fields` columns (keyed by their settings) of every row of jsonl/json/parquet files, plus ROW_COLUMN."""
    for file in files:
        if BUILDER_BY_EXTENSION[file.suffix.lower()] not in RECORD_BUILDERS:
            raise DataError(
                f"data set '{name}': SFT examples are read from .jsonl/.json/.parquet records, and '{file}' is a "
                f"{file.suffix} file; name the record files (e.g. a glob such as 'dir/*.jsonl')"
            )
    by_builder: dict[str, list[str]] = {}
    for file in _drop_non_utf8(files, name=name):
        by_builder.setdefault(BUILDER_BY_EXTENSION[file.suffix.lower()], []).append(str(file))
    parts = []
    if "json" in by_builder:
        rows = datasets.load_dataset("json", data_files=by_builder["json"], split="train", num_proc=num_proc)
        _check_columns(rows.column_names, fields, where=f"the jsonl/json files of '{name}'")
        parts.append(rows.select_columns(list(fields.values())))
    if "parquet" in by_builder:
        _check_parquet_columns(by_builder["parquet"], fields)
        parts.append(
            datasets.load_dataset(
                "parquet", data_files=by_builder["parquet"], columns=list(fields.values()), split="train",
                num_proc=num_proc,
            )
        )
    if not parts:
        raise DataError(f"data set '{name}' is empty: none of its {len(files)} file(s) is UTF-8 text")
    try:
        records = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    except ValueError:  # the features differ
        raise DataError(
            f"data set '{name}': its jsonl/json and parquet files hold the fields in different types "
            f"({parts[0].features} and {parts[1].features}); convert them to one format"
        ) from None
    return _numbered(records, name=name)


def load_hub_records(
    path: str, *, hub_config: str | None, split: str, fields: dict[str, str], num_proc: int, name: str
) -> datasets.Dataset:
    """One split of a hub data set, downloaded (map-style): its `fields` columns plus ROW_COLUMN."""
    try:
        rows = datasets.load_dataset(path, name=hub_config, split=split, num_proc=num_proc)
    except (OSError, ValueError) as error:  # ConnectionError, DatasetNotFoundError, unknown split or config
        raise DataError(
            f"data.path '{path}' (config {hub_config}, split {split}) cannot be opened from the hub: {_one_line(error)}"
        ) from None
    _check_columns(rows.column_names, fields, where=f"split '{split}' of '{path}'")
    return _numbered(rows.select_columns(list(fields.values())), name=name)


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
        _check_parquet_columns(by_builder["parquet"], {"data.text_field": text_field})
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
    return _checked_split(train, val, val_fraction=val_fraction, name=name, unit="documents")


def split_examples(records: datasets.Dataset, *, fields: list[str], val_fraction: float, name: str) -> MapSplits:
    """(train, validation) by a hash of each record's `fields` (`example_key`); validation None if it gets nothing."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"data.val_fraction {val_fraction} must be in [0, 1)")
    if val_fraction == 0.0:
        return records, None
    split_kwargs = {"batched": True, "input_columns": fields, "desc": f"splitting {name}"}
    split = {"fields": fields, "val_fraction": val_fraction}
    train = records.filter(_example_in_split, fn_kwargs={**split, "validation": False}, **split_kwargs)
    val = records.filter(_example_in_split, fn_kwargs={**split, "validation": True}, **split_kwargs)
    return _checked_split(train, val, val_fraction=val_fraction, name=name, unit="examples")


def example_key(values: dict[str, object]) -> str:
    """The text an SFT record is hashed by for the validation split: its fields as canonical JSON."""
    return json.dumps(values, sort_keys=True, ensure_ascii=False, default=str)


def _row_in_split(row: dict, *, text_field: str, val_fraction: float, validation: bool, name: str) -> bool:
    _check_columns(list(row), {"data.text_field": text_field}, where=f"data set '{name}'")
    return in_validation_split(row[text_field] or "", val_fraction) == validation


def _in_split(texts: list[str], val_fraction: float, validation: bool) -> list[bool]:
    return [in_validation_split(text, val_fraction) == validation for text in texts]


def _example_in_split(*columns: list, fields: list[str], val_fraction: float, validation: bool) -> list[bool]:
    keys = (example_key(dict(zip(fields, values))) for values in zip(*columns))
    return [in_validation_split(key, val_fraction) == validation for key in keys]


def _checked_split(
    train: datasets.Dataset, val: datasets.Dataset, *, val_fraction: float, name: str, unit: str
) -> MapSplits:
    if len(train) == 0:
        raise DataError(
            f"data set '{name}' has no training {unit}: all {len(val)} fell in the validation split; "
            "lower data.val_fraction or give data.val_path"
        )
    if len(val) == 0:
        logger.warning(
            "data set '%s': none of its %d %s fell in the validation split (val_fraction %s); "
            "validation is off. Raise data.val_fraction or give data.val_path.",
            name, len(train), unit, val_fraction,
        )
        return train, None
    return train, val


def _has_text(texts: list[str | None]) -> list[bool]:
    return [bool(text) for text in texts]


def _as_text_column(rows: datasets.Dataset, text_field: str, *, kind: str, name: str) -> datasets.Dataset:
    _check_columns(rows.column_names, {"data.text_field": text_field}, where=f"the {kind} files of '{name}'")
    rows = rows.select_columns([text_field])
    return rows if text_field == "text" else rows.rename_column(text_field, "text")


def _check_parquet_columns(files: list[str], fields: dict[str, str]) -> None:
    # Reading a footer is cheap, and it names the file, which a failed column projection would not.
    for file in files:
        _check_columns(pq.read_schema(file).names, fields, where=f"'{file}'")


def _check_columns(columns: list[str], fields: dict[str, str], *, where: str) -> None:
    """Raises DataError unless every field (keyed by the setting that names it) is one of `columns`."""
    for setting, field in fields.items():
        if field not in columns:
            raise DataError(f"{setting} '{field}' is not a column of {where} (columns: {', '.join(columns)})")


def _numbered(records: datasets.Dataset, *, name: str) -> datasets.Dataset:
    if len(records) == 0:
        raise DataError(f"data set '{name}' is empty: it holds no records")
    return records.add_column(ROW_COLUMN, np.arange(len(records), dtype=np.int64))


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


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
