"""The data settings that `build_loaders` reads: their types and defaults (Hydra's schema for the `data` group).

conf/data/*.yaml hold only what differs from these. Bad values of single settings are refused when a
DataConfig is built (`__post_init__`), before any data are read.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from lsys.data.errors import DataError

FORMATS = ("text", "messages", "prompt_response")
TRUNCATIONS = ("error", "left", "skip")


@dataclass
class TokenizerConfig:
    """The tokenizer (lsys.data.tokenizer.build_tokenizer): bytes, or a `tokenizers` JSON file and its EOS token."""

    kind: str = "byte"  # byte | hf
    path: str | None = None  # hf: a tokenizers JSON file
    eos_token: str | None = None  # hf: the token that ends a document


@dataclass  # not frozen: Hydra merges the YAML of the `data` group into an instance of it
class DataConfig:
    """Where the text comes from, how it is split into training and validation, and how it is laid out."""

    name: str = "stdlib"  # label used in logs and errors
    # stdlib | files | hub | passkey (generated: lsys/data/passkey.py) | stdlib_qa (SFT, lsys/data/qa.py)
    # | shards (a folder launch/prepare_data.py wrote: lsys/data/shards.py)
    source: str = "stdlib"
    # files: a file, directory, glob or a list of them; hub: the data set id; shards: the shard set's folder.
    # Typed Any: a string or a list.
    path: Any = None
    val_path: Any = None  # files: explicit validation files (same forms as path) instead of a hash split
    text_field: str = "text"  # column that holds the text (jsonl, json, parquet, hub)
    hub_config: str | None = None  # hub: the data set's configuration (subset) name
    split: str = "train"  # hub: the training split
    val_split: str | None = None  # hub: the validation split; null: a hash split of `split` by val_fraction
    # Share of documents held out for validation where no val_path/val_split names them: by a hash of the text
    # (hub: the stream filtered both ways; SFT: of the example's fields); passkey, stdlib_qa: of num_documents. 0: off.
    val_fraction: float = 0.05
    shuffle_buffer: int = 10000  # hub: documents in the streaming shuffle buffer (0 turns shuffling off)
    # Training batches made ahead on a background thread (pinned on GPU; lsys/data/prefetch.py); 0: made on the
    # training thread.
    prefetch_batches: int = 4
    num_proc: int = 1  # processes for loading and tokenizing map-style data
    num_documents: int = 20000  # passkey, stdlib_qa: documents generated for training (validation: val_fraction)
    short_keys: float = 0.0  # passkey: share of documents whose key has 1-4 digits instead of 5 (lsys/data/passkey.py)
    doc_isolation: bool = False  # true: every batch is (inputs, targets, segment_ids), each document seen alone
    rope_restart: bool | None = None  # positions restart at each document start; null: the same as doc_isolation
    format: str = "text"  # text: pretraining documents; SFT examples (lsys/data/sft.py): messages | prompt_response
    messages_field: str = "messages"  # messages: the column of chat turns {role, content}, system/user/assistant
    prompt_field: str = "prompt"  # prompt_response: the prompt column (the user turn)
    response_field: str = "response"  # prompt_response: the response column (the assistant turn)
    packing: bool = True  # SFT: whole examples packed into windows (needs doc_isolation); false: one per window
    truncation: str = "error"  # SFT: an example longer than a window: error | left (drop its oldest tokens) | skip
    chat_template: str | None = None  # SFT: a Jinja chat-template file; null: the HF tokenizer's own, else plain
    seq_len: int = 256  # tokens per training window
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)

    def __post_init__(self):
        # A string such as "false" would be truthy: only real booleans switch isolation.
        if not isinstance(self.doc_isolation, bool):
            raise DataError(f"data.doc_isolation must be true or false, got {self.doc_isolation!r}")
        if not (self.rope_restart is None or isinstance(self.rope_restart, bool)):
            raise DataError(f"data.rope_restart must be true, false or null, got {self.rope_restart!r}")
        if self.rope_restart and not self.doc_isolation:
            raise DataError(
                "data.rope_restart=true but data.doc_isolation=false: positions can only restart at document "
                "boundaries the loader emits; set data.doc_isolation=true"
            )
        if not isinstance(self.prefetch_batches, int) or self.prefetch_batches < 0:
            raise DataError(
                f"data.prefetch_batches must be a count of batches, 0 or more, got {self.prefetch_batches!r}"
            )
        if self.format not in FORMATS:
            raise DataError(f"data.format '{self.format}' is unknown; expected 'text', 'messages' or 'prompt_response'")
        if self.truncation not in TRUNCATIONS:
            raise DataError(f"data.truncation '{self.truncation}' is unknown; expected 'error', 'left' or 'skip'")
        if not isinstance(self.packing, bool):
            raise DataError(f"data.packing must be true or false, got {self.packing!r}")
        if self.is_sft and self.packing and not self.doc_isolation:
            # Without isolation a packed example would attend to the examples before it in its window.
            raise DataError(
                f"data.format '{self.format}' with data.packing=true puts several examples in a window, and each must "
                "see only itself: set data.doc_isolation=true, or data.packing=false for one example per window"
            )

    @property
    def is_sft(self) -> bool:
        """Whether the data are SFT examples (chat or prompt/response) rather than pretraining text."""
        return self.format != "text"

    @property
    def example_fields(self) -> dict[str, str]:
        """The record fields of an SFT example, in order, keyed by the setting that names each; {} for text."""
        settings = {"messages": ("messages_field",), "prompt_response": ("prompt_field", "response_field")}
        return {f"data.{setting}": getattr(self, setting) for setting in settings.get(self.format, ())}

    @property
    def restarts_positions(self) -> bool:
        """Whether positions (RoPE) restart at each document start: rope_restart, or doc_isolation if it is null."""
        return self.doc_isolation if self.rope_restart is None else self.rope_restart

    @classmethod
    def from_attrs(cls, cfg: Any) -> "DataConfig":
        """Reads the known fields from a mapping (dict, OmegaConf DictConfig) or an attribute-access object."""
        names = [f.name for f in fields(cls)]
        if isinstance(cfg, Mapping):
            # `in` rather than getattr: a non-struct DictConfig answers None for a missing key.
            values = {name: cfg[name] for name in names if name in cfg}
        else:
            values = {name: getattr(cfg, name) for name in names if hasattr(cfg, name)}
        for key in ("path", "val_path"):
            # OmegaConf hands lists over as ListConfig; keep plain str/list so the config hashes and prints simply.
            if values.get(key) is not None and not isinstance(values[key], str):
                values[key] = [str(p) for p in values[key]]
        if isinstance(values.get("tokenizer"), Mapping):
            values["tokenizer"] = TokenizerConfig(**values["tokenizer"])
        return cls(**values)
