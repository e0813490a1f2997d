"""The data settings that `build_loaders` reads, with their defaults.

A sample `conf/data/*.yaml` (every field below; names are exact)::

    name: stdlib            # label used in logs and errors
    source: stdlib          # stdlib | files | hub | passkey (generated: lsys/data/passkey.py) | stdlib_qa (SFT, lsys/data/qa.py)
    path: null              # files: a file, directory, glob or a list of them; hub: the data set id
    val_path: null          # files: explicit validation files (same forms as path) instead of a hash split
    text_field: text        # column that holds the text (jsonl, json, parquet, hub)
    hub_config: null        # hub: the data set's configuration (subset) name
    split: train            # hub: the training split
    val_split: null         # hub: the validation split; null turns validation off (SFT formats: the hash split)
    val_fraction: 0.05      # stdlib/files (and SFT hub): share of documents held out for validation (0: off)
    shuffle_buffer: 10000   # hub: documents in the streaming shuffle buffer (0 turns shuffling off)
    num_proc: 1             # processes for loading and tokenizing map-style data
    num_documents: 20000    # passkey: documents generated for training (validation: val_fraction of that)
    doc_isolation: false    # true: every batch is (inputs, targets, segment_ids), each document seen alone
    rope_restart: null      # positions restart at each document start; null: the same as doc_isolation
    format: text            # text: pretraining documents; SFT examples (lsys/data/sft.py): messages | prompt_response
    messages_field: messages  # messages: the column of chat turns, each {role, content}, roles system/user/assistant
    prompt_field: prompt      # prompt_response: the prompt column (the user turn)
    response_field: response  # prompt_response: the response column (the assistant turn)
    packing: true           # SFT: whole examples packed into windows (needs doc_isolation); false: one per window
    truncation: error       # SFT: an example longer than a window: error | left (drop its oldest tokens) | skip
    chat_template: null     # SFT: a Jinja chat-template file; null: the HF tokenizer's own, else the plain one
"""

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from lsys.data.errors import DataError

FORMATS = ("text", "messages", "prompt_response")
TRUNCATIONS = ("error", "left", "skip")


@dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it is split; see the module docstring for each field."""

    name: str = "stdlib"
    source: str = "stdlib"
    path: str | list[str] | None = None
    val_path: str | list[str] | None = None
    text_field: str = "text"
    hub_config: str | None = None
    split: str = "train"
    val_split: str | None = None
    val_fraction: float = 0.05
    shuffle_buffer: int = 10000
    num_proc: int = 1
    num_documents: int = 20000
    doc_isolation: bool = False
    rope_restart: bool | None = None
    format: str = "text"
    messages_field: str = "messages"
    prompt_field: str = "prompt"
    response_field: str = "response"
    packing: bool = True
    truncation: str = "error"
    chat_template: str | None = None

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
        return cls(**values)
