"""Training and validation splits: their types, and the hash that decides which documents are held out."""

import hashlib

import datasets

ROW_COLUMN = "_row"  # SFT records: the row each was read from, for error messages

MapSplits = tuple[datasets.Dataset, datasets.Dataset | None]
StreamSplits = tuple[datasets.IterableDataset, datasets.IterableDataset | None]

_HASH_RANGE = 2**64


def in_validation_split(text: str, val_fraction: float) -> bool:
    """Whether a document is held out: the hash of its text, read as a number in [0, 1), is below val_fraction."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < val_fraction * _HASH_RANGE
