"""Benchmarks: `python launch/bench.py train` measures CPU quick-start throughput and writes docs/perf.md."""

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

from lsys.bench import REPO, machine_line, measure_training, training_table, write_section


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
    body = (
        f"Measured on {machine_line()} with `{command}`: the quick-start settings "
        f"(stdlib text, byte tokenizer, seq_len 256, 8 windows per process per step), {args.steps} steps, "
        "one intra-op thread per process, tokens/s averaged over steps 11 to the end (the first ten warm up).\n\n"
        f"{training_table(results)}"
    )
    write_section(args.out, "Training throughput, CPU quick start", body)
    print(body)


if __name__ == "__main__":
    main()
