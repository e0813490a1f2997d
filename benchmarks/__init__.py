"""The measurements `python launch/bench.py` writes to docs/perf.md; part of the repository, not of the installed packages."""
