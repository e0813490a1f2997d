"""Benchmarks: `python launch/bench.py train` measures CPU quick-start throughput and writes docs/perf.md."""

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

from lsys.bench import REPO, machine_line, measure_training, training_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("what", choices=["train"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=REPO / "docs/perf.md")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides passed to every run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work_dir:
        results = [
            measure_training(model, nproc, args.steps, Path(work_dir), args.overrides)
            for model in ("rat_tiny", "attn_tiny")
            for nproc in (1, 2)
        ]
    command = shlex.join(["python", "launch/bench.py", *sys.argv[1:]])
    section = (
        "## Training throughput, CPU quick start\n\n"
        f"Measured on {machine_line()} with `{command}`: the default quick-start settings "
        f"(stdlib text, byte tokenizer, seq_len 256, 8 windows per process per step), {args.steps} steps, "
        "one intra-op thread per process, tokens/s averaged over the logged intervals after the first.\n\n"
        f"{training_table(results)}\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("# Performance\n\nEach table is written by the command shown with it.\n\n" + section)
    print(section)


if __name__ == "__main__":
    main()
