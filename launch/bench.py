"""Benchmarks that write docs/perf.md (each replaces its own section):

    python launch/bench.py train     CPU quick-start throughput, 1 and 2 processes, tiny RAT vs attention
    python launch/bench.py mixers    one layer forward+backward per mixer, decode speed and cache size
    python launch/bench.py chunks    the RAT core at each chunk size of the passkey ladder against attention
    python launch/bench.py sp        bytes each sequence-parallel op sends, and its CPU time at sp = 1, 2, 4
    python launch/bench.py kernels   Triton kernels vs SDPA flash, flex_attention and the torch references (GPU)
    python launch/bench.py memory    training state per rank under DDP and ZeRO-1/2/3, from the formulas, and the
                                     planner's longest trainable sequence per 80 GB GPU for the 1B models
    python launch/bench.py activations   peak memory of one CPU training step per activation option, measured
                                     in a fresh process per point, beside the planner's prediction
    python launch/bench.py documents what keeping packed documents apart (segment_ids) costs each op on CPU,
                                     and the share of attention tiles the kernels skip for a typical mix
    python launch/bench.py data      training windows per second of the shard, in-memory and streaming loaders,
                                     against the step rate of rat_1b on one H100
"""

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

import torch

# benchmarks/ (and the tests/ helper it spawns ranks with) ship with the checkout, not with the
# installed packages: find them in the repository this script sits in. Appended, so that lsys,
# parallel and kernels still come from where they are installed, as for launch/train.py.
sys.path.append(str(Path(__file__).resolve().parents[1]))

from benchmarks import data_bench, kernel_bench
from benchmarks.harness import (
    MIXER_OPTIONS,
    REPO,
    chunk_size_seconds,
    decode_stats,
    document_mix,
    isolation_seconds,
    layer_seconds,
    machine_line,
    measure_training_rounds,
    parameter_count,
    single_device_seconds,
    sp_measurements,
    training_table,
    visited_tile_fraction,
    write_section,
)
from benchmarks.step_memory import measure_in_fresh_process
from kernels import S2Pattern
from lsys.data import DataConfig
from lsys.hydra_app import compose_config
from lsys.models import ActivationPlan, ModelConfig
from lsys.train.memory import training_state
from lsys.train.plan_command import plan_setup
from lsys.train.planner import SP_OPS, Setup, forward_bytes, longest_sequence, plan


def bench_train(args: argparse.Namespace) -> tuple[str, str]:
    with tempfile.TemporaryDirectory() as work_dir:
        rounds = measure_training_rounds(
            ("rat_tiny", "attn_tiny"), (1, 2), args.rounds, args.steps, Path(work_dir), args.overrides
        )
    body = (
        f"Measured on {machine_line()} with `{args.command}`: the quick-start settings "
        f"(stdlib text, byte tokenizer, seq_len 256, 8 windows per process per step), {args.steps} steps, "
        "one intra-op thread per process, tokens/s averaged over steps 11 to the end (the first ten warm up). "
        f"{args.rounds} rounds, each training both models back to back at each process count (in turns first); "
        "the table gives the median over rounds, and each round's ratio to rat_tiny at the same process count."
        f"\n\n{training_table(rounds)}"
    )
    return "Training throughput, CPU quick start", body


def bench_mixers(args: argparse.Namespace) -> tuple[str, str]:
    names = list(MIXER_OPTIONS)
    shape = {"d_model": args.d_model, "n_heads": args.n_heads}
    lengths = [256, 2048, 8192, 32768]
    repeats = {256: 21, 2048: 3, 8192: 3, 32768: 1}  # short layers take milliseconds: more runs for a steady median
    layer = {(name, t): layer_seconds(name, t, repeats=repeats[t], **shape) for name in names for t in lengths}
    contexts = [4096, 16384]
    decode = {(name, c): decode_stats(name, c, new_tokens=args.new_tokens, **shape) for name in names for c in contexts}

    lines = [
        "| mixer | " + " | ".join(f"fwd+bwd T={t if t < 1024 else f'{t // 1024}K'}" for t in lengths) + " |",
        "|---|" + "---|" * len(lengths),
    ]
    for name in names:
        cells = [f"{layer[name, t]:.4f} s ({layer['attention', t] / layer[name, t]:.2f}x)" for t in lengths]
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
        "(21 at 256, 1 at 32K) after a warm-up; in brackets the speed-up over attention. Decoding: a one-layer "
        f"model prefills the context, then decodes {args.new_tokens} tokens one by one; the cache "
        "is the layer's state for that context (fp32), in brackets how many times smaller than attention's.\n\n"
        + "\n".join(lines)
    )
    return "Mixers on CPU: one layer, decoding and cache size", body


def bench_chunks(args: argparse.Namespace) -> tuple[str, str]:
    lengths, chunk_sizes = args.chunk_lengths, args.chunk_sizes
    repeats = {t: max(3, 20 * 256 // t) for t in lengths}  # short calls take milliseconds: more rounds
    torch.set_num_threads(1)  # as in a recipe run, where each of the 2 processes trains on one thread
    shape = dict(batch=args.chunk_batch, heads=args.chunk_heads, head_dim=args.chunk_head_dim)
    timings = {t: chunk_size_seconds(t, chunk_sizes, repeats=repeats[t], **shape) for t in lengths}
    lines = [
        "| core | " + " | ".join(f"fwd+bwd T={t if t < 1024 else f'{t // 1024}K'}" for t in lengths) + " |",
        "|---|" + "---|" * len(lengths),
    ]
    for name in timings[lengths[0]]:
        cells = [f"{timing[name] * 1e3:.1f} ms ({timing['attention'] / timing[name]:.2f}x)"
                 for timing in (timings[t] for t in lengths)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    body = (
        f"Measured on {machine_line()} with `{args.command}`: the cores alone (`kernels.attention`, causal; "
        f"`kernels.rat` with RoPE and its forget gate), torch backends, fp32, one thread, batch {args.chunk_batch}, "
        f"{args.chunk_heads} heads of {args.chunk_head_dim} (rat_tiny's shape and the passkey recipe's batch), "
        "forward+backward; the ops take turns, one call each per round, median over rounds after a warm-up "
        f"({', '.join(f'{repeats[t]} at {t}' for t in lengths)}). In brackets the speed-up over attention. "
        "At L = 1 the torch path runs one causal SDPA call (`kernels.rat.chunk.rat_one_token_chunks`); the "
        "chunk path row is the general path that RAT-SP takes at L = 1 (it asks for lse).\n\n" + "\n".join(lines)
    )
    return "RAT by chunk size: the core against attention", body


def bench_sp(args: argparse.Namespace) -> tuple[str, str]:
    big = dict(heads=16, head_dim=128, chunk_size=16, element_size=2)  # rat_1b's attention shape, bf16
    lengths = [8192, 32768, 131072, 524288, 1048576]
    lines = [
        f"| T | sp | " + " | ".join(SP_OPS) + " | rat_sp / ring |",
        "|---|---|" + "---|" * (len(SP_OPS) + 1),
    ]
    for sp in (4, 8):
        for t in lengths:
            sent = {op: forward_bytes(op, t, sp, **big) for op in SP_OPS}
            cells = [f"{sent[op] / 2**20:,.2f} MiB" for op in SP_OPS]
            lines.append(f"| {t // 1024}K | {sp} | " + " | ".join(cells) + f" | 1/{sent['ring_attention'] / sent['rat_sp']:.0f} |")

    small = dict(heads=args.sp_heads, head_dim=args.sp_head_dim, chunk_size=16)
    seq_len = args.sp_seq_len
    single = single_device_seconds(seq_len, **small)
    measured = {sp: sp_measurements(sp, seq_len, **small) for sp in (2, 4)}
    counted = [
        "| op | bytes counted at sp=2 / analytic | at sp=4 / analytic | fwd+bwd sp=1 | sp=2 | sp=4 |",
        "|---|---|---|---|---|---|",
    ]
    for op in SP_OPS:
        checks = [
            f"{measured[sp][op]['bytes']:,} / {forward_bytes(op, seq_len, sp, element_size=4, **small):,}"
            for sp in (2, 4)
        ]
        times = [f"{single[op]:.2f} s"] + [f"{measured[sp][op]['seconds']:.2f} s" for sp in (2, 4)]
        counted.append(f"| {op} | " + " | ".join(checks + times) + " |")
    body = (
        f"Forward bytes one rank sends per layer, from the formulas in `lsys/train/planner.py::forward_bytes` (the planner's own) "
        f"(causal, zigzag layout), at rat_1b's attention shape: 16 heads of 128, bf16, RAT chunk 16, "
        f"LASP states fp32. Backward sends the same again, plus, for ring attention, dK/dV in fp32 back to their owners.\n\n" + "\n".join(lines) + "\n\n"
        f"Counted on {machine_line()} with `{args.command}`: real gloo ranks on this machine, "
        f"T = {seq_len}, {args.sp_heads} heads of {args.sp_head_dim}, fp32, batch 1; the bytes "
        "`parallel.comm_stats()` recorded on rank 0 in one forward, against the formula at the same "
        "shape; then the wall time of one forward+backward on the whole sequence (sp=1: the kernel "
        "alone) and split over 2 and 4 processes. This machine has 2 cores, so sp=4 runs two ranks "
        "per core and its time is no guide to scaling.\n\n" + "\n".join(counted)
    )
    return "Sequence parallelism: bytes sent and CPU time", body


def bench_kernels(args: argparse.Namespace) -> tuple[str, str]:
    device = torch.device(args.device)
    if device.type == "cpu" and not args.allow_cpu:
        sys.exit(
            "bench.py kernels times Triton kernels on a CUDA device; this machine has none. "
            "--device cpu --allow-cpu runs the same code in the Triton interpreter (TRITON_INTERPRET=1), "
            "which checks the harness but measures nothing"
        )
    pattern = S2Pattern(**MIXER_OPTIONS["s2"], num_heads=args.heads)
    rows = []
    for seq_len in args.lengths:
        shape = kernel_bench.Shape(
            batch=kernel_bench.batch_for(args.tokens, seq_len), seq_len=seq_len, heads=args.heads,
            head_dim=args.head_dim, dtype=kernel_bench.DTYPES[args.dtype], device=device,
        )
        for op in args.ops:
            print(f"kernels: {op} at T={seq_len}", file=sys.stderr)
            rows += kernel_bench.bench_op(
                op, shape, chunk_size=args.chunk_size, pattern=pattern, compiled=device.type == "cuda",
                reference_max_len=args.reference_max_len, repeats=args.repeats,
            )
    baselines = {
        "attention": "torch SDPA (flash)", "s2": "lsys triton dense",
        "rat": "scan + flex_attention + merge", "linear_attention": "lsys torch reference",
    }
    sections = [
        f"### {op}\n\n" + kernel_bench.kernel_table(rows, op, baselines[op]) for op in args.ops
    ]
    body = (
        f"Measured on {machine_line()} with `{args.command}`: {args.dtype}, "
        f"B*T = {args.tokens:,} tokens, {args.heads} heads of {args.head_dim}; RAT chunk {args.chunk_size}; "
        f"S2 {pattern.block_size}-token blocks, {pattern.local_blocks} local, vert_stride {pattern.vert_stride} "
        "(the s2_1b options). Times are medians of "
        f"{args.repeats} runs after 2 warm-ups; backward = (forward+backward) - forward; peak memory is what one "
        "forward+backward allocates above its inputs. TFLOP/s counts only visible (query, key) pairs: causal pairs for "
        "attention, the kept S2 blocks, and for RAT each query's earlier chunk summaries plus its own state. "
        f"The torch references run up to T = {args.reference_max_len:,}; flex_attention is compiled.\n\n"
        + "\n\n".join(sections)
    )
    return "Kernels: Triton against SDPA, flex_attention and the torch references", body


def bench_memory(args: argparse.Namespace) -> tuple[str, str]:
    setups = [("ddp", 0, "none"), ("deepspeed", 1, "none"), ("deepspeed", 2, "none"), ("deepspeed", 3, "none"),
              ("deepspeed", 2, "optimizer"), ("deepspeed", 3, "optimizer_and_params")]
    lines = [
        "| model | setup | ranks | weights | gradients | optimizer state | on device | offloaded to host |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("rat_1b", "attn_1b"):
        parameters = parameter_count(name)
        for engine, stage, offload in setups:
            setup = "DDP (bf16 autocast)" if engine == "ddp" else f"ZeRO-{stage}" + (f", offload {offload}" if offload != "none" else "")
            for ranks in (8, 64):
                state = training_state(parameters, engine=engine, zero_stage=stage, offload=offload,
                                       world_size=ranks, bf16=True)
                cells = [state.weights, state.gradients, state.optimizer, state.device_total, state.offloaded]
                lines.append(f"| {name} | {setup} | {ranks} | " + " | ".join(f"{c / 2**30:.2f} GiB" for c in cells) + " |")
    longest = longest_sequences(args)
    body = (
        f"Written by `{args.command}` from the formulas of `lsys/train/memory.py` (which the start-up memory check "
        "uses, and tests/test_deepspeed.py checks against what DeepSpeed allocates for tiny models): bytes one rank "
        "holds for training state, GPU training in bf16. DDP keeps fp32 weights and gradients and AdamW's two "
        "moments on every rank (16 bytes a parameter); DeepSpeed's bf16 keeps bf16 weights and gradients plus fp32 "
        "master weights and moments (16 bytes a parameter before sharding), and ZeRO-1/2/3 shards the optimizer "
        "state / also the gradients / also the weights over the ranks. Activations come on top.\n\n"
        + "\n".join(lines)
        + "\n\n### Longest trainable sequence per 80 GB GPU\n\n" + longest
    )
    return "Training state per rank: DDP and ZeRO", body


def longest_sequences(args: argparse.Namespace) -> str:
    """The planner's longest trainable seq_len per 80 GB GPU for the 1B models, on 1 GPU and on 8 (sp = 8)."""
    lines = ["| model | GPUs | activation offload | longest seq_len | peak per GPU | of which kept activations |",
             "|---|---|---|---|---|---|"]
    for name in ("rat_1b", "attn_1b", "rat_swa_1b", "lightning_1b"):
        cache = {}  # traces depend on the tokens per rank only: shared by every row of a model
        for gpus in (1, 8):
            for offload in (False, True):
                overrides = [f"model={name}", f"parallel.sp={gpus}", "parallel.engine=deepspeed", "parallel.zero_stage=3",
                             "trainer.activation_checkpointing=full", f"trainer.loss_chunk={args.loss_chunk}",
                             "trainer.micro_batch_size=1", f"trainer.offload_activations={str(offload).lower()}"]
                setup = plan_setup(compose_config(REPO / "conf", "plan", overrides))
                length, best = longest_sequence(setup, 80 * 2**30, cache)
                kept = sum(best.kept.values()) if best else 0.0
                peak = best.peak if best else 0.0
                lines.append(f"| {name} | {gpus} | {'yes' if offload else 'no'} | {length:,} ({length / 2**20:.2f}M) | "
                             f"{peak / 2**30:.1f} GiB | {kept / 2**30:.1f} GiB |")
    return (
        f"From `lsys/train/planner.py` (`python launch/plan.py ... plan.mode=max_seq_len`), written by `{args.command}`: "
        "DeepSpeed ZeRO-3 in bf16, every block recomputed in backward (`trainer.activation_checkpointing=full`), "
        f"tiled loss (`trainer.loss_chunk={args.loss_chunk}`), micro batch 1, 80 GiB per GPU; on 8 GPUs the sequence "
        "is split over sp = 8 ranks (ring attention for attention layers, RAT-SP, LASP). With offload the inputs of "
        "the recomputed blocks live in pinned host memory (`trainer.offload_activations=true`). Predicted, not yet "
        "measured on a GPU (tests/test_activations.py has the GPU check of offload for the first GPU run).\n\n"
        + "\n".join(lines)
    )


# The small model and options whose CPU step memory is measured against the planner.
ACTIVATION_MODEL = dict(vocab_size=2048, d_model=128, n_layers=4, n_heads=4, ffn_dim=512, max_seq_len=32768)
ACTIVATION_MIXERS = {"rat": {"rat": {"chunk_size": 16}}, "lightning": {}, "local": {"local": {"window": 1024}}}
ACTIVATION_OPTIONS = {
    "plain": ActivationPlan(),
    "AC full": ActivationPlan("full"),
    "AC mixer": ActivationPlan("mixer"),
    "tiled loss": ActivationPlan(loss_chunk=1024),
    "tiled MLP": ActivationPlan(mlp_chunk=1024),
    "AC full + tiled loss": ActivationPlan("full", loss_chunk=1024),
}


def bench_activations(args: argparse.Namespace) -> tuple[str, str]:
    lengths = args.activation_lengths
    measured, planned = {}, {}
    for mixer, options in ACTIVATION_MIXERS.items():
        model = ModelConfig(name=f"{mixer}_small", layers=[mixer], mixer_options=options, **ACTIVATION_MODEL)
        cache = {}
        for label, activations in ACTIVATION_OPTIONS.items():
            for length in lengths:
                point = (mixer, label, length)
                measured[point] = measure_in_fresh_process(model, activations, seq_len=length, micro_batch=1)["step_peak"]
                setup = Setup(model=model, seq_len=length, micro_batch=1, world_size=1, activations=activations,
                              precision="fp32")
                result = plan(setup, cache)
                # What the measured step holds: activations and the gradients backward creates (weights are in the baseline).
                planned[point] = result.activations + result.state.gradients
                print(f"{mixer} {label} T={length}: measured {measured[point] / 2**20:.0f} MiB, "
                      f"planned {planned[point] / 2**20:.0f} MiB", flush=True)
    header = "| mixer | T | " + " | ".join(ACTIVATION_OPTIONS) + " |"
    lines = [header, "|---|---|" + "---|" * len(ACTIVATION_OPTIONS)]
    for mixer in ACTIVATION_MIXERS:
        for length in lengths:
            cells = []
            for label in ACTIVATION_OPTIONS:
                real, predicted = measured[(mixer, label, length)], planned[(mixer, label, length)]
                cells.append(f"{real / 2**20:,.0f} / {predicted / 2**20:,.0f} ({100 * (predicted - real) / real:+.0f}%)")
            lines.append(f"| {mixer} | {length // 1024}K | " + " | ".join(cells) + " |")
    best = "AC full + tiled loss"
    short, long = lengths[-2], lengths[-1]
    summary = ["| mixer | slope with AC + tiled loss | plain / AC + tiled loss at "
               f"{long // 1024}K | worst planner error |", "|---|---|---|---|"]
    for mixer in ACTIVATION_MIXERS:
        slope = (measured[(mixer, best, long)] - measured[(mixer, best, short)]) / (long - short)
        ratio = measured[(mixer, "plain", long)] / measured[(mixer, best, long)]
        worst = max(abs(planned[p] - measured[p]) / measured[p] for p in measured if p[0] == mixer)
        summary.append(f"| {mixer} | {slope / 1024:.1f} KiB per token | {ratio:.1f}x | {100 * worst:.0f}% |")
    shape = ", ".join(f"{key} {value}" for key, value in ACTIVATION_MODEL.items() if key != "max_seq_len")
    body = (
        f"Measured on {machine_line()} with `{args.command}`: one forward+backward of a small model ({shape}; "
        "RAT chunk 16, local window 1024, fp32, batch 1) per cell, each in a fresh process (`benchmarks/step_memory.py`: "
        "one warm-up step, then the kernel's high-water mark of resident memory reset through /proc/self/clear_refs, "
        "and the second step's peak over the resident memory before it; glibc told to map every block of 64 KiB or "
        "more on its own, `MALLOC_MMAP_THRESHOLD_=65536`, so that freed tensors leave resident memory). Weights are "
        "in the baseline; the peak holds activations, temporaries and the gradients. Each cell: measured / planned "
        "MiB (the planner's error), the planner being `lsys/train/planner.py` run for the same setup "
        "(activations + gradients). Loss and MLP tiles of 1024 tokens.\n\n" + "\n".join(lines) + "\n\n"
        f"The slope is the measured growth per token from {short // 1024}K to {long // 1024}K.\n\n" + "\n".join(summary)
    )
    return "Activation memory per training step: measured and planned", body


def bench_documents(args: argparse.Namespace) -> tuple[str, str]:
    lengths = args.document_lengths
    mixes = {t: document_mix(t, median=args.document_median, seed=t) for t in lengths}
    heads, head_dim = 8, 32  # 8 heads: the 1B S2 pattern's stride, so its heads cover every block
    timings = {t: isolation_seconds(t, mixes[t], heads=heads, head_dim=head_dim, repeats=3) for t in lengths}
    names = list(timings[lengths[0]])
    lines = [
        "| op | " + " | ".join(f"T={t // 1024}K: plain / isolated (ratio)" for t in lengths) + " |",
        "|---|" + "---|" * len(lengths),
    ]
    for name in names:
        cells = [f"{plain:.3f} s / {isolated:.3f} s ({isolated / plain:.2f}x)"
                 for plain, isolated in (timings[t][name] for t in lengths)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    documents = ", ".join(f"{int(mixes[t].max()) + 1} at {t // 1024}K" for t in lengths)
    visited = ", ".join(f"{visited_tile_fraction(mixes[t]):.1%} at {t // 1024}K" for t in lengths)
    body = (
        f"Measured on {machine_line()} with `{args.command}`: torch backends, fp32, batch 1, {heads} heads "
        f"of {head_dim}, forward+backward of the op alone with and without `segment_ids` (median of 3 each, "
        "timed alternately after a warm-up). The documents: log-normal lengths, median "
        f"{args.document_median} tokens (sigma 1, at least 8; `benchmarks/harness.py::document_mix`): {documents} documents. "
        "S2 uses the 1B pattern (blocks of 64, 16 local blocks, stride 8).\n\n" + "\n".join(lines) + "\n\n"
        f"Causal 64 x 64 attention tiles a kernel still visits when it skips tiles that hold only other documents "
        f"(`visited_tile_fraction`): {visited} of the causal tiles."
    )
    return "Document isolation: cost per op on CPU", body


def bench_data(args: argparse.Namespace) -> tuple[str, str]:
    seq_len, batch = args.data_seq_len, args.data_micro_batch
    with tempfile.TemporaryDirectory() as work_dir:
        rates = data_bench.measure_loaders(
            Path(work_dir), seq_len=seq_len, micro_batch_size=batch, seconds=args.data_seconds,
            vocab_size=args.data_vocab,
        )
    needed, flops_per_token = data_bench.h100_windows_per_s(args.data_model, seq_len=seq_len, mfu=args.data_mfu)
    lines = [
        f"| loader | windows/s at {seq_len // 1024}K | x {args.data_model}'s H100 step rate | before the first batch |",
        "|---|---|---|---|",
        *(f"| {r.name} | {r.windows_per_s:,.0f} | {r.windows_per_s / needed:,.0f}x | {r.setup_s:.1f} s |" for r in rates),
    ]
    setups = {
        "shards": "preparing the shard set (2 workers)",
        "in-memory": "tokenizing the corpus in `build_loaders`",
        "streaming": "writing the parquet files",
    }
    body = (
        f"Measured on {machine_line()} with `{args.command}`: the stdlib corpus, tokenized by a byte-level BPE of "
        f"{args.data_vocab} tokens trained on it, windows of {seq_len} tokens in batches of {batch}, one rank, "
        f"each loader as `build_loaders` makes it and wrapped as the trainer wraps it (`PrefetchingLoader`, "
        f"{DataConfig().prefetch_batches} batches ahead); a loop that only takes batches for {args.data_seconds:.0f} s "
        "after two warm-up batches (`benchmarks/data_bench.py`). Streaming reads the same documents from 8 local "
        "parquet files as `data=hub` reads a hub data set, tokenizing on its thread. Before the first batch: "
        + "; ".join(f"{name}, {what}" for name, what in setups.items()) + ".\n\n" + "\n".join(lines) + "\n\n"
        f"The step rate it is measured against is an estimate: {args.data_model} costs {flops_per_token / 1e9:.2f} "
        f"GFLOP per token at {seq_len} tokens (`LM.flops_per_token`: 6 x parameters + 3 x the mixers' forward "
        f"FLOPs), and one H100 SXM at {args.data_mfu:.0%} MFU of its {data_bench.PEAK_BF16_FLOPS[data_bench.H100] / 1e12:.1f} "
        f"TFLOP/s dense bf16 trains {needed:.1f} windows of {seq_len} a second (an MFU above what is usually "
        "reached, so the bar is if anything high). The shard files were in the page cache, as they are after the "
        f"first epoch or on a machine whose RAM holds the set; a cold read fetches {seq_len * 2 // 1024} KB of "
        "uint16 tokens per window, so a disk that delivers even 1 MB/s per rank keeps pace."
    )
    return "Data loaders: windows per second", body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "what", choices=["train", "mixers", "chunks", "sp", "kernels", "memory", "activations", "documents", "data"]
    )
    parser.add_argument("--steps", type=int, default=60, help="train: steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="train: rounds of paired runs (median reported)")
    parser.add_argument("--d-model", type=int, default=256, help="mixers: model width")
    parser.add_argument("--n-heads", type=int, default=8, help="mixers: heads (>= 8 so that S2 covers the context)")
    parser.add_argument("--new-tokens", type=int, default=64, help="mixers: tokens decoded per measurement")
    parser.add_argument("--chunk-sizes", nargs="+", type=int, default=[1, 4, 8, 16], help="chunks: RAT chunk sizes")
    parser.add_argument("--chunk-lengths", nargs="+", type=int, default=[256, 1024, 4096],
                        help="chunks: sequence lengths")
    parser.add_argument("--chunk-batch", type=int, default=8, help="chunks: batch")
    parser.add_argument("--chunk-heads", type=int, default=4, help="chunks: heads")
    parser.add_argument("--chunk-head-dim", type=int, default=32, help="chunks: head dim")
    parser.add_argument("--sp-seq-len", type=int, default=8192, help="sp: sequence length measured on this machine")
    parser.add_argument("--sp-heads", type=int, default=4, help="sp: heads")
    parser.add_argument("--sp-head-dim", type=int, default=32, help="sp: head dim")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="kernels: device")
    parser.add_argument("--allow-cpu", action="store_true", help="kernels: run on CPU (interpreter; checks only)")
    parser.add_argument("--ops", nargs="+", default=["attention", "s2", "rat", "linear_attention"],
                        choices=["attention", "s2", "rat", "linear_attention"], help="kernels: ops to time")
    parser.add_argument("--lengths", nargs="+", type=int, default=kernel_bench.default_lengths(),
                        help="kernels: sequence lengths (default 2K ... 128K)")
    parser.add_argument("--tokens", type=int, default=131072, help="kernels: B*T, fixed across lengths")
    parser.add_argument("--heads", type=int, default=16, help="kernels: heads")
    parser.add_argument("--head-dim", type=int, default=128, help="kernels: head dim")
    parser.add_argument("--dtype", choices=list(kernel_bench.DTYPES), default="bf16", help="kernels: input dtype")
    parser.add_argument("--chunk-size", type=int, default=16, help="kernels: RAT chunk size")
    parser.add_argument("--repeats", type=int, default=10, help="kernels: timed runs per measurement")
    parser.add_argument("--reference-max-len", type=int, default=32768,
                        help="kernels: longest T for the (slow, memory-hungry) torch references")
    parser.add_argument("--loss-chunk", type=int, default=4096, help="memory: trainer.loss_chunk of the 1B plans")
    parser.add_argument("--activation-lengths", nargs="+", type=int, default=[2048, 8192, 32768],
                        help="activations: sequence lengths measured")
    parser.add_argument("--document-lengths", nargs="+", type=int, default=[2048, 8192],
                        help="documents: window lengths measured")
    parser.add_argument("--document-median", type=int, default=512, help="documents: median document length")
    parser.add_argument("--data-seq-len", type=int, default=4096, help="data: window length")
    parser.add_argument("--data-micro-batch", type=int, default=8, help="data: windows per batch")
    parser.add_argument("--data-seconds", type=float, default=10.0, help="data: seconds each loader is timed")
    parser.add_argument("--data-vocab", type=int, default=16384, help="data: BPE vocabulary trained for the run")
    parser.add_argument("--data-model", default="rat_1b", help="data: model whose H100 step rate is the bar")
    parser.add_argument("--data-mfu", type=float, default=0.5, help="data: MFU assumed for that step rate")
    parser.add_argument("--out", type=Path, default=REPO / "docs/perf.md")
    parser.add_argument("overrides", nargs="*", help="train: Hydra overrides passed to every run")
    args = parser.parse_args()
    args.command = shlex.join(["python", "launch/bench.py", *sys.argv[1:]])
    benches = {
        "train": bench_train, "mixers": bench_mixers, "chunks": bench_chunks, "sp": bench_sp, "kernels": bench_kernels,
        "memory": bench_memory, "activations": bench_activations, "documents": bench_documents, "data": bench_data,
    }
    heading, body = benches[args.what](args)
    write_section(args.out, heading, body)
    print(body)


if __name__ == "__main__":
    main()
