"""The data settings that `build_loaders` reads, with their defaults.

A sample `conf/data/*.yaml` (every field below; names are exact)::

    name: stdlib            # label used in logs and errors
    source: stdlib          # stdlib | files | hub | passkey (generated: lsys/data/passkey.py)
    path: null              # files: a file, directory, glob or a list of them; hub: the data set id
    val_path: null          # files: explicit validation files (same forms as path) instead of a hash split
    text_field: text        # column that holds the text (jsonl, json, parquet, hub)
    hub_config: null        # hub: the data set's configuration (subset) name
    split: train            # hub: the training split
    val_split: null         # hub: the validation split; null turns validation off
    val_fraction: 0.05      # stdlib/files: share of documents held out for validation (0 turns it off)
    shuffle_buffer: 10000   # hub: documents in the streaming shuffle buffer (0 turns shuffling off)
    num_proc: 1             # processes for loading and tokenizing map-style data
    num_documents: 20000    # passkey: documents generated for training (validation: val_fraction of that)
    doc_isolation: false    # true: every batch is (inputs, targets, segment_ids), each document seen alone
    rope_restart: null      # positions restart at each document start; null: the same as doc_isolation
"""

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from lsys.data.errors import DataError


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
