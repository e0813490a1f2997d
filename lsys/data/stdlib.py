"""The standard library's `.py` files: real text that every machine has, read by data sources and needle prompts."""

import sysconfig
from pathlib import Path


def stdlib_files() -> list[Path]:
    """The standard library's `.py` files, sorted, without site-packages/dist-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    excluded = {"site-packages", "dist-packages"}
    return sorted(p for p in root.rglob("*.py") if excluded.isdisjoint(p.relative_to(root).parts) and p.is_file())
