"""Benchmarks that write docs/perf.md (each replaces its own section):

    python launch/bench.py train     CPU quick-start throughput, 1 and 2 processes, tiny RAT vs attention
    python launch/bench.py mixers    one layer forward+backward per mixer, decode speed and cache size
"""

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

from lsys.bench import (
    MIXER_OPTIONS,
    REPO,
    decode_stats,
    layer_seconds,
    machine_line,
    measure_training,
    training_table,
    write_section,
)


def bench_train(args: argparse.Namespace) -> tuple[str, str]:
    with tempfile.TemporaryDirectory() as work_dir:
        results = [
            measure_training(model, nproc, args.steps, Path(work_dir), args.overrides)
            for model in ("rat_tiny", "attn_tiny")
            for nproc in (1, 2)
        ]
    body = (
        f"Measured on {machine_line()} with `{args.command}`: the quick-start settings "
        f"(stdlib text, byte tokenizer, seq_len 256, 8 windows per process per step), {args.steps} steps, "
        "one intra-op thread per process, tokens/s averaged over steps 11 to the end (the first ten warm up).\n\n"
        f"{training_table(results)}"
    )
    return "Training throughput, CPU quick start", body


def bench_mixers(args: argparse.Namespace) -> tuple[str, str]:
    names = list(MIXER_OPTIONS)
    shape = {"d_model": args.d_model, "n_heads": args.n_heads}
    lengths = [2048, 8192, 32768]
    layer = {(name, t): layer_seconds(name, t, repeats=1 if t > 8192 else 3, **shape) for name in names for t in lengths}
    contexts = [4096, 16384]
    decode = {(name, c): decode_stats(name, c, new_tokens=args.new_tokens, **shape) for name in names for c in contexts}

    lines = [
        "| mixer | " + " | ".join(f"fwd+bwd T={t // 1024}K" for t in lengths) + " |",
        "|---|" + "---|" * len(lengths),
    ]
    for name in names:
        cells = [f"{layer[name, t]:.3f} s ({layer['attention', t] / layer[name, t]:.2f}x)" for t in lengths]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| mixer | " + " | ".join(f"decode tok/s at {c // 1024}K | cache at {c // 1024}K" for c in contexts) + " |",
        "|---|" + "---|---|" * len(contexts),
    ]
    for name in names:
        cells = []
        for c in contexts:
            rate, nbytes = decode[name, c]
            base_rate, base_bytes = decode["attention", c]
            cells += [f"{rate:,.0f} ({rate / base_rate:.2f}x)", f"{nbytes / 2**20:.2f} MiB ({base_bytes / nbytes:.1f}x smaller)"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    options = ", ".join(f"{name} {opts}" for name, opts in MIXER_OPTIONS.items() if opts)
    body = (
        f"Measured on {machine_line()} with `{args.command}`: torch backends, fp32, batch 1, "
        f"d_model {args.d_model}, {args.n_heads} heads, options of the 1B configs ({options}). "
        "A layer is the mixer alone (projections included, no MLP); time is the median of 3 runs "
        "(1 at 32K) after a warm-up; in brackets the speed-up over attention. Decoding: a one-layer "
        f"model prefills the context, then decodes {args.new_tokens} tokens one by one; the cache "
        "is the layer's state for that context (fp32), in brackets how many times smaller than attention's.\n\n"
        + "\n".join(lines)
    )
    return "Mixers on CPU: one layer, decoding and cache size", body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["train", "mixers"])
    parser.add_argument("--steps", type=int, default=60, help="train: steps per run")
    parser.add_argument("--d-model", type=int, default=256, help="mixers: model width")
    parser.add_argument("--n-heads", type=int, default=8, help="mixers: heads (>= 8 so that S2 covers the context)")
    parser.add_argument("--new-tokens", type=int, default=64, help="mixers: tokens decoded per measurement")
    parser.add_argument("--out", type=Path, default=REPO / "docs/perf.md")
    parser.add_argument("overrides", nargs="*", help="train: Hydra overrides passed to every run")
    args = parser.parse_args()
    args.command = shlex.join(["python", "launch/bench.py", *sys.argv[1:]])
    heading, body = {"train": bench_train, "mixers": bench_mixers}[args.what](args)
    write_section(args.out, heading, body)
    print(body)


if __name__ == "__main__":
    main()
