"""The measurements of `launch/bench.py` train, mixers, sp and documents, and the writing of docs/perf.md.

Ratios come from runs made side by side in one call.
"""

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import kernels
import parallel
from lsys.config import model_config
from lsys.hydra_app import compose_config
from lsys.models import MIXERS, ModelConfig, build_model
from parallel import SequenceLayout, comm_stats, reset_comm_stats
from tests.local_ranks import run_local_ranks

# The checkout this file sits in: launch/train.py and conf/ are read from it, never from an installed package.
REPO = Path(__file__).resolve().parents[1]


@dataclass
class TrainThroughput:
    model: str
    nproc: int
    tokens_per_s: float
    tokens_per_s_per_device: float
    final_loss: float


def measure_training(
    model: str, nproc: int, steps: int, work_dir: Path, overrides: list[str], run_name: str | None = None
) -> TrainThroughput:
    """Run launch/train.py under torchrun and average tokens/s over the logged intervals after the first."""
    run_dir = work_dir / (run_name or f"{model}-np{nproc}")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        str(REPO / "launch/train.py"), f"model={model}", f"run_dir={run_dir}", "resume=none",
        f"trainer.max_steps={steps}", "trainer.log_every=10", f"trainer.eval_every={steps}",
        f"trainer.checkpoint_every={steps}", "trainer.progress_bar=false", *overrides,
    ]
    # One intra-op thread per process so that 1 and 2 processes use 1 and 2 cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=env, cwd=work_dir, capture_output=True, text=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "tokens_per_s" in r][2:]  # steps 1 and 2-10 include warm-up
    return TrainThroughput(
        model=model,
        nproc=nproc,
        tokens_per_s=sum(r["tokens_per_s"] for r in timed) / len(timed),
        tokens_per_s_per_device=sum(r["tokens_per_s_per_device"] for r in timed) / len(timed),
        final_loss=records[-1]["loss"],
    )


def measure_training_rounds(
    models: tuple[str, str], nprocs: tuple[int, ...], rounds: int, steps: int, work_dir: Path, overrides: list[str]
) -> list[list[TrainThroughput]]:
    """Each (model, nproc) trained once per round, the two models back to back and in turns first, so that a
    machine whose speed drifts slows both alike: per round, the results in the order models x nprocs."""
    results = []
    for round_index in range(rounds):
        order = models if round_index % 2 == 0 else models[::-1]
        measured = {}
        for nproc in nprocs:
            for model in order:
                run_name = f"{model}-np{nproc}-r{round_index}"
                measured[(model, nproc)] = measure_training(model, nproc, steps, work_dir, overrides, run_name)
        results.append([measured[(model, nproc)] for model in models for nproc in nprocs])
    return results


def training_table(rounds: list[list[TrainThroughput]]) -> str:
    """Markdown table of the median over rounds of each run's tokens/s, with each round's ratio to the first
    model's run at the same process count (the runs each round pairs)."""
    first = rounds[0]
    lines = [
        f"| model | processes | tokens/s (global, median) | tokens/s per process | vs {first[0].model}, per round "
        "| loss at end |",
        "|---|---|---|---|---|---|",
    ]
    for index, r in enumerate(first):
        runs = [results[index] for results in rounds]
        paired = [next(b for b in results if b.nproc == r.nproc) for results in rounds]  # the first model's run
        ratios = ", ".join(f"{run.tokens_per_s / base.tokens_per_s:.2f}x" for run, base in zip(runs, paired))
        lines.append(
            f"| {r.model} | {r.nproc} | {statistics.median(x.tokens_per_s for x in runs):,.0f} | "
            f"{statistics.median(x.tokens_per_s_per_device for x in runs):,.0f} | {ratios} | "
            f"{statistics.median(x.final_loss for x in runs):.3f} |"
        )
    return "\n".join(lines)


def machine_line() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return f"{device}, {platform.python_implementation()} {platform.python_version()}, torch {torch.__version__}"


NOTES_HEADING = "Reading these numbers"  # docs/perf.md's hand-written section


def write_section(path: Path, heading: str, body: str) -> None:
    """Put `## heading` + body into the markdown file at `path`, replacing that section if present; a new
    section goes before the hand-written notes (NOTES_HEADING), which stay last."""
    text = path.read_text() if path.exists() else "# Performance\n\nEach table is written by the command shown with it.\n\n"
    sections = [section.rstrip() + "\n\n" for section in re.split(r"(?m)^(?=## )", text)]
    new = f"## {heading}\n\n{body.strip()}\n\n"
    kept = [new if section.startswith(f"## {heading}\n") else section for section in sections]
    if new not in kept:
        notes = [i for i, section in enumerate(kept) if section.startswith(f"## {NOTES_HEADING}\n")]
        kept.insert(notes[0] if notes else len(kept), new)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(kept).rstrip() + "\n")


def parameter_count(model: str) -> int:
    """Parameters of conf/model/<model>.yaml, counted on the meta device (nothing allocated)."""
    cfg = compose_config(REPO / "conf", "config", [f"model={model}"])
    return build_model(model_config(cfg), device="meta").num_params()


# The mixers compared in docs/perf.md, with the options of their 1B configs.
MIXER_OPTIONS = {
    "attention": {},
    "rat": {"chunk_size": 16, "qk_groups": 2},
    "local": {"window": 1024},
    "s2": {"block_size": 64, "local_blocks": 16, "vert_stride": 8},
    "lightning": {},
}


def mixer_config(name: str, d_model: int, n_heads: int) -> ModelConfig:
    options = {name: MIXER_OPTIONS[name]} if MIXER_OPTIONS[name] else {}
    return ModelConfig(
        vocab_size=256, d_model=d_model, n_layers=1, n_heads=n_heads, ffn_dim=d_model, layers=[name],
        mixer_options=options, max_seq_len=1 << 20,
    )


def seconds_in_turns(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each function over `repeats` rounds in which every function runs once, after a
    warm-up round: a slow stretch of the machine then lands on all of them alike."""
    times = {name: [] for name in fns}
    for _ in range(repeats + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(runs[1:])[repeats // 2] for name, runs in times.items()}


def seconds(fn, repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def layer_seconds(name: str, seq_len: int, *, d_model: int, n_heads: int, repeats: int) -> float:
    """Forward + backward time of one mixer layer on `[1, seq_len, d_model]` fp32 input."""
    torch.manual_seed(0)
    cfg = mixer_config(name, d_model, n_heads)
    mixer = MIXERS[name](cfg, **cfg.mixer_options.get(name, {}))
    x = torch.randn(1, seq_len, d_model, requires_grad=True)

    def step():
        mixer(x).sum().backward()

    return seconds(step, repeats)


def decode_stats(name: str, context: int, *, d_model: int, n_heads: int, new_tokens: int) -> tuple[float, int]:
    """(tokens/s decoding one row after a `context`-token prompt, cache bytes of the layer at that point)."""
    torch.manual_seed(0)
    model = build_model(mixer_config(name, d_model, n_heads)).eval()
    caches = model.init_caches(1, context + new_tokens)
    with torch.no_grad():
        model.prefill(torch.randint(0, 256, (1, context)), caches)
        tokens = torch.randint(0, 256, (new_tokens, 1, 1))
        start = time.perf_counter()
        for token in tokens:
            model.decode(token, caches)
        elapsed = time.perf_counter() - start
    return new_tokens / elapsed, model.init_caches(1, context)[0].nbytes()


def _sp_worker(rank: int, world_size: int, seq_len: int, heads: int, head_dim: int, chunk_size: int, out_file: str) -> None:
    group = dist.group.WORLD
    layout = SequenceLayout("zigzag", world_size)
    generator = torch.Generator().manual_seed(0)
    full = [torch.randn(1, seq_len, heads, head_dim, generator=generator) for _ in range(4)]
    q, k, v, g = (layout.shard(x, rank).requires_grad_() for x in full)
    decay = torch.full((heads,), 0.99)
    ops = {
        "ring_attention": lambda: parallel.ring_attention(q, k, v, group),
        "ulysses_attention": lambda: parallel.ulysses_attention(
            q, k, v, group, attn=lambda q, k, v, head_start: kernels.attention(q, k, v, causal=True)
        ),
        "rat_sp": lambda: parallel.rat_sp(q, k, v, torch.sigmoid(g), group, chunk_size=chunk_size),
        "lasp": lambda: parallel.lasp(q, k, v, group, decay=decay),
    }
    results = {}
    for name, op in ops.items():
        op().sum().backward()  # warm-up
        dist.barrier()
        reset_comm_stats()
        start = time.perf_counter()
        op().sum().backward()
        dist.barrier()
        results[name] = {"seconds": time.perf_counter() - start, "bytes": comm_stats()[name]["bytes"]}
    if rank == 0:
        Path(out_file).write_text(json.dumps(results))


def sp_measurements(sp: int, seq_len: int, *, heads: int, head_dim: int, chunk_size: int) -> dict[str, dict]:
    """Per op: forward+backward wall seconds and forward bytes sent by rank 0, on `sp` local gloo ranks."""
    with tempfile.TemporaryDirectory() as work_dir:
        out_file = Path(work_dir) / "results.json"
        run_local_ranks(_sp_worker, sp, seq_len, heads, head_dim, chunk_size, str(out_file))
        return json.loads(out_file.read_text())


def single_device_seconds(seq_len: int, *, heads: int, head_dim: int, chunk_size: int) -> dict[str, float]:
    """Forward+backward seconds of the kernels the sp ops wrap, on the whole sequence in this process."""
    generator = torch.Generator().manual_seed(0)
    q, k, v, g = (torch.randn(1, seq_len, heads, head_dim, generator=generator, requires_grad=True) for _ in range(4))
    decay = torch.full((heads,), 0.99)
    ops = {
        "ring_attention": lambda: kernels.attention(q, k, v, causal=True),
        "ulysses_attention": lambda: kernels.attention(q, k, v, causal=True),
        "rat_sp": lambda: kernels.rat(q, k, v, torch.sigmoid(g), chunk_size=chunk_size),
        "lasp": lambda: kernels.linear_attention(q, k, v, decay=decay),
    }
    return {name: seconds(lambda op=op: op().sum().backward(), repeats=1) for name, op in ops.items()}


def chunk_size_seconds(
    seq_len: int, chunk_sizes: list[int], *, batch: int, heads: int, head_dim: int, repeats: int
) -> dict[str, float]:
    """Forward+backward seconds of the attention and RAT cores (torch backends, fp32) on one set of
    `[batch, seq_len, heads, head_dim]` inputs: causal attention, RAT at each chunk size, and RAT at L = 1
    through the general chunk path (asked for lse, as RAT-SP asks); the ops take turns (`seconds_in_turns`)."""
    generator = torch.Generator().manual_seed(0)
    shape = (batch, seq_len, heads, head_dim)
    q, k, v = (torch.randn(*shape, generator=generator, requires_grad=True) for _ in range(3))
    g = torch.rand(*shape, generator=generator).clamp(0.05, 0.95).requires_grad_()
    ops = {"attention": lambda: kernels.attention(q, k, v, causal=True)}
    for chunk_size in chunk_sizes:
        ops[f"rat L = {chunk_size}"] = lambda chunk_size=chunk_size: kernels.rat(q, k, v, g, chunk_size=chunk_size)
    if 1 in chunk_sizes:
        ops["rat L = 1, chunk path"] = lambda: kernels.rat(q, k, v, g, chunk_size=1, return_lse=True)[0]
    return seconds_in_turns({name: lambda op=op: op().sum().backward() for name, op in ops.items()}, repeats)


def document_mix(seq_len: int, *, median: int, seed: int) -> torch.Tensor:
    """Segment ids `[1, seq_len]` of documents with log-normal lengths (median `median`, sigma 1, at least 8 tokens),
    the last cut to fit: a stand-in for web text packed into long windows."""
    generator = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < seq_len:
        draw = torch.exp(torch.randn((), generator=generator) + float(torch.tensor(median).log()))
        lengths.append(max(8, int(draw)))
    lengths[-1] -= sum(lengths) - seq_len
    return torch.cat([torch.full((n,), doc) for doc, n in enumerate(lengths) if n > 0])[None]


def visited_tile_fraction(segment_ids: torch.Tensor, tile: int = 64) -> float:
    """Of the causal (query tile, key tile) pairs of one row, the fraction attention still visits when
    tiles holding only other documents are skipped (the kernels' rule: a query tile reads the keys from
    its first row's document start on)."""
    ids = segment_ids[0]
    num_tiles = -(-ids.shape[0] // tile)
    firsts = ids[::tile].contiguous()
    starts = torch.searchsorted(ids.contiguous(), firsts)  # first key of each query tile's first document
    visited = (torch.arange(num_tiles) - starts // tile + 1).sum().item()
    return visited / (num_tiles * (num_tiles + 1) // 2)


def isolation_seconds(
    seq_len: int, segment_ids: torch.Tensor, *, heads: int, head_dim: int, repeats: int
) -> dict[str, tuple[float, float]]:
    """Per op (torch backends, fp32, batch 1): forward+backward seconds of plain packing and of the same
    call with `segment_ids`, timed alternately (median of `repeats` each)."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, seq_len, heads, head_dim, generator=generator, requires_grad=True) for _ in range(3))
    g = torch.rand(1, seq_len, heads, head_dim, generator=generator).clamp(0.05, 0.95).requires_grad_()
    decay = torch.full((heads,), 0.99)
    s2 = kernels.S2Pattern(block_size=64, local_blocks=16, vert_stride=8, num_heads=heads)
    ops = {
        "attention": lambda ids: kernels.attention(q, k, v, segment_ids=ids),
        "attention, window 1024": lambda ids: kernels.attention(q, k, v, window=1024, segment_ids=ids),
        "s2": lambda ids: kernels.attention(q, k, v, s2=s2, segment_ids=ids),
        "rat (L = 16)": lambda ids: kernels.rat(q, k, v, g, chunk_size=16, segment_ids=ids),
        "linear_attention": lambda ids: kernels.linear_attention(q, k, v, decay=decay, segment_ids=ids),
    }
    results = {}
    for name, op in ops.items():
        turns = {
            "plain": lambda op=op: op(None).sum().backward(),
            "isolated": lambda op=op: op(segment_ids).sum().backward(),
        }
        timed = seconds_in_turns(turns, repeats)
        results[name] = (timed["plain"], timed["isolated"])
    return results
