"""Batches for training and validation, sharded over data-parallel ranks, and `build_loaders`.

Map-style data (stdlib, files) is tokenized once (cached by `datasets`), its documents shuffled
with the seed and laid end to end in memory (4 bytes a token; use a hub/streaming source for
corpora beyond RAM, or a shard set: `data=shards`, `lsys.data.shards`, read from disk window by window),
then cut into windows (see `lsys.data.packing`). Each epoch visits the
windows in a fresh order drawn from `seed + epoch`, the same on every rank; at each step rank r
takes windows `[r*B, (r+1)*B)` of the step's `dp_size*B`, so the dp ranks never share a window.
An epoch ends when fewer than `dp_size*B` windows are left; those are skipped that epoch.

`PackedLoader.state_dict()` is `{epoch, step_in_epoch}` plus the layout it belongs to: the same
for every rank, so one JSON file resumes all of them at the exact next batch.

With `data.doc_isolation` every loader's batches are `(inputs, targets, segment_ids)`
(`lsys.data.packing.segment_ids`); the ids are a function of the inputs, so resuming is unchanged.

SFT formats (`data.format` messages or prompt_response) go through the same two loaders over
windows of whole, loss-masked examples (`lsys.data.sft`, made in memory like the token stream):
every batch is `(inputs, targets, segment_ids)`, and sharding, shuffling and resuming are as above.
"""

import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

import datasets
import numpy as np
import torch
import torch.distributed as dist

from lsys.data.chat import ChatTemplate, load_chat_template
from lsys.data.config import DataConfig
from lsys.data.errors import DataError
from lsys.data.packing import Batch, TokenWindows, check_batch_layout, token_stream, tokenize_documents
from lsys.data.sft import ExampleWindows, windows_of_examples
from lsys.data.shards import ShardWindows, check_tokenizer, read_manifest, tokenizer_identity
from lsys.data.sources import load_examples, load_source
from lsys.data.streaming import StreamingLoader, StreamingValLoader
from lsys.data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

Result = TypeVar("Result")


class Windows(Protocol):
    """Windows that the loaders shard: `packing.TokenWindows`, `sft.ExampleWindows` or `shards.ShardWindows`."""

    count: int
    seq_len: int

    def batch(self, window_ids: torch.Tensor) -> Batch:
        """The batch of these windows, int64 `[len(window_ids), seq_len]` each."""


class PackedLoader:
    """Endless training batches `(inputs, targets)`, int64 `[B, T]`, of one rank, epoch after epoch.

    `tokens`: a token stream, cut into `TokenWindows`, or windows already made (SFT `ExampleWindows`,
    whose batches are triples). With `eos_id` (document isolation; a stream only) each batch also
    carries its `segment_ids`, documents ending at that id.
    """

    def __init__(
        self,
        tokens: np.ndarray | Windows,
        *,
        seq_len: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        name: str = "data",
        eos_id: int | None = None,
    ):
        check_batch_layout(seq_len=seq_len, micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size)
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.seed = seed
        self._windows = as_windows(tokens, seq_len=seq_len, eos_id=eos_id)
        self._windows_per_step = dp_size * micro_batch_size
        self.batches_per_epoch = self._windows.count // self._windows_per_step
        if self.batches_per_epoch == 0:
            made = f"{len(tokens)} tokens make" if isinstance(tokens, np.ndarray) else "its examples make"
            raise DataError(
                f"data set '{name}' is too small: {made} {self._windows.count} window(s) of "
                f"seq_len {seq_len}, and one step needs {self._windows_per_step} "
                f"(dp_size {dp_size} x micro_batch_size {micro_batch_size}); use more data or a shorter seq_len"
            )
        self.epoch = 0
        self.step_in_epoch = 0
        self._order_epoch = -1
        self._order = torch.empty(0, dtype=torch.long)

    @property
    def tokens_per_batch(self) -> int:
        """Input tokens in one batch of this rank (B*T); multiply by dp_size for the global batch."""
        return self.micro_batch_size * self._windows.seq_len

    def __iter__(self) -> "PackedLoader":
        return self

    def __next__(self) -> Batch:
        if self.step_in_epoch == self.batches_per_epoch:
            self.epoch += 1
            self.step_in_epoch = 0
        first = self.step_in_epoch * self._windows_per_step + self.dp_rank * self.micro_batch_size
        window_ids = self._epoch_order()[first : first + self.micro_batch_size]
        self.step_in_epoch += 1
        return self._windows.batch(window_ids)

    def state_dict(self) -> dict[str, int]:
        """Where the next batch starts, plus the layout it is valid for; identical on every dp rank."""
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "num_windows": self._windows.count,
            "windows_per_step": self._windows_per_step,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continues at the batch after the one the state was saved at."""
        layout = {key: self.state_dict()[key] for key in ("num_windows", "windows_per_step", "seed")}
        saved_layout = {key: state[key] for key in layout}
        if saved_layout != layout:
            raise DataError(
                f"loader state was saved for {saved_layout}, but this loader has {layout}: "
                "the data, seq_len, global batch or seed changed since the checkpoint"
            )
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])

    def close(self) -> None:
        """Nothing runs in the background here (`lsys.data.prefetch.PrefetchingLoader` adds a thread)."""

    def _epoch_order(self) -> torch.Tensor:
        if self._order_epoch != self.epoch:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            self._order = torch.randperm(self._windows.count, generator=generator)
            self._order_epoch = self.epoch
        return self._order


class ValLoader:
    """The validation stream's windows in order, sharded over dp ranks like training; no shuffle.

    `tokens` and `eos_id`: as in `PackedLoader`.
    """

    def __init__(
        self,
        tokens: np.ndarray | Windows,
        *,
        seq_len: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        eos_id: int | None = None,
    ):
        check_batch_layout(seq_len=seq_len, micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size)
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self._windows = as_windows(tokens, seq_len=seq_len, eos_id=eos_id)
        self._windows_per_step = dp_size * micro_batch_size
        self.num_batches = self._windows.count // self._windows_per_step

    @property
    def tokens_per_batch(self) -> int:
        """Input tokens in one batch of this rank (B*T)."""
        return self.micro_batch_size * self._windows.seq_len

    def batches(self, n: int) -> Iterator[Batch]:
        """The first min(n, num_batches) batches; the same ones on every call."""
        for step in range(min(n, self.num_batches)):
            first = step * self._windows_per_step + self.dp_rank * self.micro_batch_size
            yield self._windows.batch(torch.arange(first, first + self.micro_batch_size))


def as_windows(tokens: np.ndarray | Windows, *, seq_len: int, eos_id: int | None) -> Windows:
    """A token stream cut into `TokenWindows`, or windows already made, checked against seq_len."""
    if isinstance(tokens, np.ndarray):
        return TokenWindows(tokens, seq_len, eos_id=eos_id)
    if tokens.seq_len != seq_len:
        raise DataError(f"the windows are {tokens.seq_len} tokens long, but the loader's seq_len is {seq_len}")
    if eos_id is not None:
        raise DataError("eos_id cuts a token stream into documents; windows already made carry their own segment_ids")
    return tokens


def build_loaders(
    data_cfg: Any,
    *,
    seq_len: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    seed: int,
    tokenizer: Tokenizer,
) -> tuple[PackedLoader | StreamingLoader, ValLoader | StreamingValLoader | None]:
    """The (train, validation) loaders of this dp rank for a data config (fields: `lsys.data.config`).

    `data.format` text: documents, packed as a token stream (map-style) or streamed (hub). SFT formats:
    `PackedLoader`/`ValLoader` over `lsys.data.sft` windows; with an HF tokenizer, `data_cfg.tokenizer`
    (the settings it was built from: path, eos_token) finds its own chat template and its EOS text.
    """
    cfg = DataConfig.from_attrs(data_cfg)
    layout = {"seq_len": seq_len, "micro_batch_size": micro_batch_size, "dp_rank": dp_rank, "dp_size": dp_size}
    check_batch_layout(**layout)
    if cfg.is_sft:
        return _example_loaders(cfg, data_cfg, seed=seed, tokenizer=tokenizer, layout=layout)
    if cfg.source == "shards":
        return _shard_loaders(cfg, seed=seed, tokenizer=tokenizer, layout=layout)
    eos_id = document_end_id(cfg, tokenizer)
    train_documents, val_documents = _rank_zero_first(lambda: load_source(cfg, seq_len=seq_len, tokenizer=tokenizer))

    if isinstance(train_documents, datasets.IterableDataset):
        stream_kwargs = {
            "tokenizer": tokenizer, "text_field": cfg.text_field, "name": cfg.name,
            "doc_isolation": cfg.doc_isolation, **layout,
        }
        train = StreamingLoader(train_documents, seed=seed, shuffle_buffer=cfg.shuffle_buffer, **stream_kwargs)
        val = StreamingValLoader(val_documents, **stream_kwargs) if val_documents is not None else None
        return train, val

    def tokens_of(documents: datasets.Dataset, split: str, shuffle_seed: int | None) -> np.ndarray:
        desc = f"tokenizing {cfg.name} ({split})"
        tokenized = tokenize_documents(documents, tokenizer, num_proc=cfg.num_proc, desc=desc)
        return token_stream(tokenized, shuffle_seed=shuffle_seed)

    train_tokens = _rank_zero_first(lambda: tokens_of(train_documents, "train", seed))
    train = PackedLoader(train_tokens, seed=seed, name=cfg.name, eos_id=eos_id, **layout)
    logger.info(
        "data '%s': %d training tokens, %d batches of %d tokens per rank per epoch",
        cfg.name, len(train_tokens), train.batches_per_epoch, train.tokens_per_batch,
    )
    if val_documents is None:
        return train, None
    val = ValLoader(_rank_zero_first(lambda: tokens_of(val_documents, "validation", None)), eos_id=eos_id, **layout)
    return train, _usable_validation(val, name=cfg.name, layout=layout)


def _example_loaders(
    cfg: DataConfig, data_cfg: Any, *, seed: int, tokenizer: Tokenizer, layout: dict[str, int]
) -> tuple[PackedLoader, ValLoader | None]:
    """`build_loaders` for SFT examples: loss-masked windows of whole examples (`lsys.data.sft`)."""
    template = chat_template_of(data_cfg, tokenizer)
    logger.info("data '%s': %s examples, rendered with the chat template '%s'", cfg.name, cfg.format, template.name)
    train_examples, val_examples = _rank_zero_first(lambda: load_examples(cfg, seq_len=layout["seq_len"]))

    def windows_of(examples: datasets.Dataset, split: str) -> ExampleWindows:
        return windows_of_examples(
            examples, cfg=cfg, template=template, tokenizer=tokenizer, seq_len=layout["seq_len"], split=split
        )

    train_windows = _rank_zero_first(lambda: windows_of(train_examples, "train"))
    train = PackedLoader(train_windows, seed=seed, name=cfg.name, **layout)
    logger.info(
        "data '%s': %d batches of %d tokens per rank per epoch",
        cfg.name, train.batches_per_epoch, train.tokens_per_batch,
    )
    if val_examples is None:
        return train, None
    val = ValLoader(_rank_zero_first(lambda: windows_of(val_examples, "validation")), **layout)
    return train, _usable_validation(val, name=cfg.name, layout=layout)


def _shard_loaders(
    cfg: DataConfig, *, seed: int, tokenizer: Tokenizer, layout: dict[str, int]
) -> tuple[PackedLoader, ValLoader | None]:
    """`build_loaders` for a shard set (`lsys.data.shards`): the windows of the in-memory path, read from disk."""
    if not isinstance(cfg.path, str):
        raise DataError(
            f"data.path must be the folder launch/prepare_data.py wrote for source 'shards', got {cfg.path!r}"
        )
    directory = Path(cfg.path)
    manifest = read_manifest(directory)
    check_tokenizer(manifest, directory, identity=tokenizer_identity(cfg.tokenizer), eos_id=tokenizer.eos_id)
    # The windows make their own segment_ids, so the loaders get no eos_id.
    windows = {"seq_len": layout["seq_len"], "eos_id": document_end_id(cfg, tokenizer), "manifest": manifest}
    train = PackedLoader(ShardWindows(directory, "train", seed=seed, **windows), seed=seed, name=cfg.name, **layout)
    logger.info(
        "data '%s': shards in %s, %d training tokens, %d batches of %d tokens per rank per epoch",
        cfg.name, directory, manifest["splits"]["train"]["tokens"], train.batches_per_epoch, train.tokens_per_batch,
    )
    if "val" not in manifest["splits"]:
        return train, None
    val = ValLoader(ShardWindows(directory, "val", seed=None, **windows), **layout)
    return train, _usable_validation(val, name=cfg.name, layout=layout)


def _usable_validation(val: ValLoader, *, name: str, layout: dict[str, int]) -> ValLoader | None:
    """The validation loader, or None (with a warning) when it cannot fill one global batch."""
    if val.num_batches > 0:
        return val
    logger.warning(
        "data '%s': the validation split is shorter than one global batch (%d windows of seq_len %d); "
        "validation is off. Raise data.val_fraction or give data.val_path.",
        name, layout["dp_size"] * layout["micro_batch_size"], layout["seq_len"],
    )
    return None


def chat_template_of(data_cfg: Any, tokenizer: Tokenizer) -> ChatTemplate:
    """The chat template SFT examples of `data_cfg` are rendered with (`lsys.data.chat.load_chat_template`).

    With an HF tokenizer, `data_cfg.tokenizer` (the settings it was built from: path, eos_token) finds its
    own template and its EOS text.
    """
    cfg = DataConfig.from_attrs(data_cfg)
    eos_id = getattr(tokenizer, "eos_id", None)
    if eos_id is None:
        raise DataError(
            f"data.format '{cfg.format}' needs a tokenizer with an EOS id to end answers and pad windows, "
            f"and {type(tokenizer).__name__} has none"
        )
    tokenizer_path, eos_token = _hf_tokenizer_settings(data_cfg)
    if eos_token is not None and tokenizer.encode(eos_token) != [eos_id]:
        raise DataError(
            f"data.tokenizer.eos_token '{eos_token}' does not encode to the tokenizer's EOS id {eos_id}, "
            "so chat templates could not end answers with it; data.tokenizer must be the tokenizer's own settings"
        )
    return load_chat_template(cfg.chat_template, tokenizer_path=tokenizer_path, eos_id=eos_id, eos_token=eos_token)


def _hf_tokenizer_settings(data_cfg: Any) -> tuple[str | None, str | None]:
    """(path, eos_token) of `data_cfg.tokenizer` when it names an HF tokenizer, else (None, None)."""
    settings = _setting(data_cfg, "tokenizer")
    if settings is None or _setting(settings, "kind") != "hf":
        return None, None
    return _setting(settings, "path"), _setting(settings, "eos_token")


def _setting(cfg: Any, key: str) -> Any:
    # A mapping (dict, OmegaConf DictConfig) or an attribute-access object, as `DataConfig.from_attrs` reads.
    if isinstance(cfg, Mapping):
        return cfg[key] if key in cfg else None
    return getattr(cfg, key, None)


def document_end_id(cfg: DataConfig, tokenizer: Tokenizer) -> int | None:
    """The id that ends each document, for segment_ids: the tokenizer's EOS with data.doc_isolation, else None.

    Every source gets EOS after each of its documents in the stream (`packing.tokenize_documents`,
    `StreamingLoader`), passkey included (with byte tokens one document fills a window, its EOS
    last, so its ids are all 0), so every source can be isolated; only a tokenizer without EOS cannot.
    """
    if not cfg.doc_isolation:
        return None
    eos_id = getattr(tokenizer, "eos_id", None)
    if eos_id is None:
        raise DataError(
            f"data.doc_isolation=true needs a tokenizer with an EOS id to find the documents of '{cfg.name}', "
            f"and {type(tokenizer).__name__} has none; give it one or set data.doc_isolation=false"
        )
    return eos_id


def _rank_zero_first(prepare: Callable[[], Result]) -> Result:
    """Runs `prepare` on global rank 0 first, so the other ranks read the `datasets` cache it wrote."""
    if not (dist.is_available() and dist.is_initialized()):
        return prepare()
    if dist.get_rank() == 0:
        try:
            return prepare()
        finally:
            # Release the others even on error: they then hit the same error instead of hanging.
            dist.barrier()
    dist.barrier()
    return prepare()


class SequenceSlices:
    """A sequence-parallel rank's view of a loader: every batch cut to this rank's token positions.

    All sp ranks of one data-parallel replica read the same windows (same dp rank) and keep
    the positions the sequence layout gives them, of every tensor of the batch (segment_ids too,
    which keep their window-wide values, so all ranks agree on each token's document); state is
    the wrapped loader's.
    """

    def __init__(self, loader: PackedLoader | ValLoader | StreamingLoader | StreamingValLoader, positions: torch.Tensor):
        self.loader = loader
        self.positions = positions

    def _slice(self, batch: Batch) -> Batch:
        return tuple(part[:, self.positions] for part in batch)

    def __iter__(self) -> "SequenceSlices":
        return self

    def __next__(self) -> Batch:
        return self._slice(next(self.loader))

    def batches(self, n: int) -> Iterator[Batch]:
        """The wrapped validation loader's first n batches, sliced."""
        return map(self._slice, self.loader.batches(n))

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)

    def close(self) -> None:
        """Stops the wrapped loader's background thread, if it has one."""
        if hasattr(self.loader, "close"):
            self.loader.close()
