"""File checksums, as the manifests of checkpoints, exports and token shards record them."""

import hashlib
from pathlib import Path


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in 8 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 23):
            digest.update(block)
    return digest.hexdigest()
