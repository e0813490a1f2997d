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
"""

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any


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
