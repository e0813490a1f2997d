"""SFT examples to loss-masked training windows: check, render, tokenize, pack.

An example is a chat (`data.format: messages`, a list of `{role, content}` turns, roles system,
user and assistant) or a prompt/response pair (`prompt_response`, read as the chat [user: prompt,
assistant: response]). A chat template (`lsys.data.chat`) renders it into pieces, each tokenized
on its own, so the example becomes `ids` and `answer` (same length): True for the tokens that carry
loss, every assistant turn's content and the token(s) that end the turn.

An example of n tokens takes n - 1 window positions: inputs `ids[:-1]`, and target j is
`ids[j+1]` if `answer[j+1]`, else -100 (no loss). So no target is ever a token of another example.
An example over seq_len positions is an error, cut from the left (`data.truncation: left`, kept
only if an answer token is left) or skipped (`skip`).

With `data.packing`, whole examples are laid into windows in stored order, each going into the
current window while it fits, else opening the next one; without it each example gets a window
of its own. Free positions are padding: input EOS, target -100. `segment_ids` number the examples
of a window from 0, and the padding takes the next id, so every example sees only itself.

Every batch is `(inputs, targets, segment_ids)`, int64 `[B, T]`. A bad example is a DataError
that names the data set, the split and the example: its row, counted from 0 in the order the
source read the records (files sorted by path), before any validation split.
"""

import logging
from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
import torch

from lsys.data.chat import ROLES, ChatTemplate, Piece
from lsys.data.errors import DataError
from lsys.data.packing import Batch
from lsys.data.splits import ROW_COLUMN
from lsys.data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the target the model's cross-entropy skips
_EXAMPLE_FEATURES = datasets.Features(
    {
        "ids": datasets.List(datasets.Value("int32")),
        "answer": datasets.List(datasets.Value("bool")),
        ROW_COLUMN: datasets.Value("int64"),
    }
)


class ExampleWindows:
    """Packed SFT windows, held whole: inputs, targets and segment_ids, int32 `[count, seq_len]` each."""

    def __init__(self, inputs: np.ndarray, targets: np.ndarray, segment_ids: np.ndarray):
        self.inputs = torch.from_numpy(inputs)
        self.targets = torch.from_numpy(targets)
        self.segment_ids = torch.from_numpy(segment_ids)
        self.count, self.seq_len = inputs.shape

    def batch(self, window_ids: torch.Tensor) -> Batch:
        """The batch `(inputs, targets, segment_ids)`, int64 `[len(window_ids), seq_len]` each, of these windows."""
        return tuple(part[window_ids].long() for part in (self.inputs, self.targets, self.segment_ids))


def read_conversation(
    values: Sequence[Any], *, format: str, fields: Sequence[str], where: str
) -> list[dict[str, str]]:
    """The checked chat of one record: `values` are its `fields`; a DataError names `where` (the example) if bad."""
    if format == "prompt_response":
        prompt, response = (_string_field(value, field, where) for value, field in zip(values, fields))
        if not response.strip():
            raise DataError(f"{where}: field '{fields[1]}' is empty; every example needs an answer")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    (turns,), (field,) = values, fields
    if turns is None:
        raise DataError(f"{where}: field '{field}' is missing")
    if not isinstance(turns, list):
        kind = type(turns).__name__
        raise DataError(f"{where}: field '{field}' must be a list of {{role, content}} turns, got {kind}")
    messages = [_checked_turn(turn, f"{where}: field '{field}' turn {i}") for i, turn in enumerate(turns)]
    if not any(turn["role"] == "assistant" for turn in messages):
        raise DataError(f"{where}: field '{field}' has no assistant turn, so nothing to learn")
    return messages


def tokenize_examples(
    examples: datasets.Dataset,
    *,
    format: str,
    fields: Sequence[str],
    template: ChatTemplate,
    tokenizer: Tokenizer,
    num_proc: int,
    where: str,
) -> datasets.Dataset:
    """`ids`, `answer` and the row of each example; cached by `datasets`. `where` names the data set and split."""
    # Only what shapes the result goes into fn_kwargs: `datasets` hashes them into the cache key.
    kwargs = {"format": format, "fields": list(fields), "template": template, "tokenizer": tokenizer, "where": where}
    return examples.map(
        _tokenize_batch,
        batched=True,
        input_columns=[*fields, ROW_COLUMN],
        remove_columns=examples.column_names,
        fn_kwargs=kwargs,
        features=_EXAMPLE_FEATURES,
        num_proc=num_proc if num_proc > 1 else None,
        desc=f"tokenizing {where}",
    )


def example_windows(
    tokenized: datasets.Dataset, *, seq_len: int, packing: bool, truncation: str, pad_id: int, where: str
) -> ExampleWindows:
    """The windows of tokenized examples (see the module docstring); logs truncation and packing counts."""
    table = tokenized.with_format("arrow")[:]
    lengths = pc.list_value_length(table["ids"]).to_numpy().astype(np.int64)
    ids = pc.list_flatten(table["ids"]).to_numpy()
    answer = np.asarray(pc.list_flatten(table["answer"]).to_numpy(), dtype=bool)
    rows = table[ROW_COLUMN].to_numpy()
    starts = np.cumsum(lengths) - lengths

    over = lengths - 1 > seq_len
    if truncation == "error" and over.any():
        k = int(np.flatnonzero(over)[0])
        raise DataError(
            f"{where} example {rows[k]} has {lengths[k]} tokens, {lengths[k] - 1} window positions, more than "
            f"data.seq_len {seq_len}; set data.truncation=left to drop its oldest tokens, or skip to leave it out"
        )
    keep = ~over if truncation == "skip" else np.ones(len(lengths), dtype=bool)
    if truncation == "left":
        starts = np.where(over, starts + lengths - (seq_len + 1), starts)
        lengths = np.minimum(lengths, seq_len + 1)
    # An example carries loss only through answer tokens after its first (which is never a target).
    answer_before = np.concatenate([[0], np.cumsum(answer)])
    keep &= answer_before[starts + lengths] - answer_before[starts + 1] > 0
    cut, skipped = int((over & keep).sum()) if truncation == "left" else 0, int((~keep).sum())
    if truncation != "error" or skipped:
        (logger.warning if skipped else logger.info)(
            "%s: %d example(s) cut from the left to %d positions, %d skipped (too long, or no answer token left); "
            "data.truncation=%s",
            where, cut, seq_len, skipped, truncation,
        )

    windows = _lay_out(ids, answer, starts[keep], lengths[keep], seq_len=seq_len, packing=packing, pad_id=pad_id)
    real = int(lengths[keep].sum() - keep.sum())
    logger.info(
        "%s: %d examples in %d windows of %d, %d answer tokens, %.1f%% of positions real (not padding)",
        where, int(keep.sum()), windows.count, seq_len, int((windows.targets != IGNORE_INDEX).sum()),
        100.0 * real / max(1, windows.count * seq_len),
    )
    return windows


def windows_of_examples(
    examples: datasets.Dataset, *, cfg: Any, template: ChatTemplate, tokenizer: Tokenizer, seq_len: int, split: str
) -> ExampleWindows:
    """The windows of one split's records under a data config (`DataConfig`): tokenized, then laid out."""
    where = f"data set '{cfg.name}' ({split})"
    tokenized = tokenize_examples(
        examples, format=cfg.format, fields=list(cfg.example_fields.values()), template=template,
        tokenizer=tokenizer, num_proc=cfg.num_proc, where=where,
    )
    return example_windows(
        tokenized, seq_len=seq_len, packing=cfg.packing, truncation=cfg.truncation, pad_id=tokenizer.eos_id,
        where=where,
    )


def _lay_out(
    ids: np.ndarray, answer: np.ndarray, starts: np.ndarray, lengths: np.ndarray, *, seq_len: int, packing: bool,
    pad_id: int,
) -> ExampleWindows:
    """Examples `ids[starts[k] : starts[k] + lengths[k]]` (each at most seq_len + 1 tokens) into windows."""
    positions = lengths - 1
    window = np.empty(len(positions), dtype=np.int64)
    offset = np.empty(len(positions), dtype=np.int64)
    current, filled = -1, seq_len  # no window is open yet
    for k, size in enumerate(positions.tolist()):  # greedy, in stored order: a plain loop over ints
        if not packing or filled + size > seq_len:
            current, filled = current + 1, 0
        window[k], offset[k] = current, filled
        filled += size
    count = current + 1
    per_window = np.bincount(window, minlength=count)
    first_in_window = np.cumsum(per_window) - per_window
    segment = np.arange(len(positions)) - first_in_window[window]

    inputs = np.full((count, seq_len), pad_id, dtype=np.int32)
    targets = np.full((count, seq_len), IGNORE_INDEX, dtype=np.int32)
    # Padding gets the id after the window's last example, so ids never decrease along a row.
    segment_ids = np.repeat(per_window.astype(np.int32)[:, None], seq_len, axis=1)
    example = np.repeat(np.arange(len(positions)), positions)
    step = np.arange(len(example)) - np.repeat(np.cumsum(positions) - positions, positions)
    source = starts[example] + step
    row, column = window[example], offset[example] + step
    inputs[row, column] = ids[source]
    targets[row, column] = np.where(answer[source + 1], ids[source + 1], IGNORE_INDEX)
    segment_ids[row, column] = segment[example]
    return ExampleWindows(inputs, targets, segment_ids)


def _tokenize_batch(
    *columns: list[Any], format: str, fields: list[str], template: ChatTemplate, tokenizer: Tokenizer, where: str
) -> dict[str, list[Any]]:
    *values, rows = columns
    examples: list[list[Piece]] = []
    for row, record in zip(rows, zip(*values)):
        example = f"{where} example {row}"
        messages = read_conversation(record, format=format, fields=fields, where=example)
        try:
            examples.append(template.pieces(messages))
        except DataError as error:
            raise DataError(f"{example}: {error}") from None
    # One batch call for all text pieces: the HF tokenizer encodes them in parallel.
    texts = [piece for pieces in examples for piece, _ in pieces if isinstance(piece, str)]
    encoded = iter(tokenizer.encode_batch(texts))
    ids, answer = [], []
    for pieces in examples:
        example_ids: list[int] = []
        example_answer: list[bool] = []
        for piece, is_answer in pieces:
            piece_ids = next(encoded) if isinstance(piece, str) else [piece]
            example_ids += piece_ids
            example_answer += [is_answer] * len(piece_ids)
        ids.append(example_ids)
        answer.append(example_answer)
    return {"ids": ids, "answer": answer, ROW_COLUMN: rows}


def _string_field(value: Any, field: str, where: str) -> str:
    if value is None:
        raise DataError(f"{where}: field '{field}' is missing")
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
    return value


def _checked_turn(turn: Any, where: str) -> dict[str, str]:
    if not isinstance(turn, dict):
        raise DataError(f"{where} must be a {{role, content}} object, got {type(turn).__name__}")
    role, content = (turn.get(key) for key in ("role", "content"))
    for key, value in (("role", role), ("content", content)):
        if value is None:
            raise DataError(f"{where} has no '{key}'")
        if not isinstance(value, str):
            raise DataError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    if role not in ROLES:
        raise DataError(f"{where}: role {role!r} is unknown; expected 'system', 'user' or 'assistant'")
    if role == "assistant" and not content.strip():
        raise DataError(f"{where}: the assistant's answer is empty")
    return {"role": role, "content": content}
