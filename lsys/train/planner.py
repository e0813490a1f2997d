"""The memory planner behind launch/plan.py: what one rank holds at the peak of a training step, before any GPU is rented.

- Training state (weights, gradients, optimizer state) comes from the formulas of
  lsys/train/memory.py, exact for DDP and every ZeRO stage.
- Activations come from running one forward+backward of the model itself on fake tensors
  (torch's FakeTensorMode: shapes, no memory, no arithmetic) under torch's MemTracker, which sees
  every tensor the step creates and frees, including recomputation, tiled loss and MLP slices.
  A trace of the full depth and length would take long, so the step is traced with one and two
  periods of the model's layer pattern, at up to TRACE_TOKENS tokens per rank, and every quantity
  is extended bilinearly in (layers, tokens): each block adds the same, and every mixer's torch
  path keeps memory linear in T (flash-style blocks; what the Triton kernels keep too).
- Sequence parallelism: a rank traces its T / sp tokens; the buffers its collectives hold and the
  bytes it sends per step come from formulas (one layer's exchange at a time).
What is traced is lsys's torch path on the CPU in the dtypes the run uses; on a GPU the Triton
kernels keep about the same, and allocator fragmentation comes on top.
"""

import math
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

from lsys.config import sequence_parallel_multiple
from lsys.models import ActivationPlan, ModelConfig, build_model
from lsys.train.memory import TrainingState, training_state

TRACE_TOKENS = 8192  # longest sequence per rank traced; longer ones are extended from TRACE_TOKENS / 2 and this
# DeepSpeed's defaults for the buffers it allocates (lsys does not change them).
DEEPSPEED_REDUCE_BUCKET = 500_000_000  # elements: ZeRO-1/2/3 gradient reduction bucket
DEEPSPEED_PREFETCH_BUCKET = 50_000_000  # elements: ZeRO-3 parameters gathered ahead of use
NOT_ACTIVATIONS = ("Parameter", "Buffer", "Gradient", "Optstate")  # MemTracker's other categories


@dataclass(frozen=True)
class Setup:
    """One training configuration to plan for: the model, its sequences, the mesh and what a step keeps."""

    model: ModelConfig
    seq_len: int
    micro_batch: int
    world_size: int
    sp: int = 1
    sp_mode: str = "ring"
    ulysses: int | None = None
    engine: str = "ddp"
    zero_stage: int = 0
    offload: str = "none"
    activations: ActivationPlan = ActivationPlan()
    precision: str = "bf16"  # bf16 (a GPU run: DDP's autocast, or DeepSpeed's bf16 weights) | fp32 (a CPU run)
    grad_accum: int = 1

    @property
    def dp(self) -> int:
        return self.world_size // self.sp

    @property
    def local_tokens(self) -> int:
        return self.seq_len // self.sp

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"

    @property
    def trace_precision(self) -> str:
        """How the step runs: "fp32", "autocast" (DDP: fp32 weights, bf16 matmuls) or "bf16" (DeepSpeed's bf16 weights)."""
        if not self.bf16:
            return "fp32"
        return "bf16" if self.engine == "deepspeed" else "autocast"

    @property
    def activation_bytes(self) -> int:
        return 2 if self.bf16 else 4

    @property
    def residual_bytes(self) -> int:
        """Bytes of one element of the residual stream (a block's input): fp32 under autocast."""
        return 2 if self.trace_precision == "bf16" else 4


@dataclass(frozen=True)
class Trace:
    """One traced step: bytes beyond weights and gradients at its peak, and what its forward left for backward."""

    peak: float
    kept: dict[str, float]  # per layer kind (mixer name) over all its layers, and "head" (final norm, loss)


@dataclass
class Plan:
    setup: Setup
    state: TrainingState
    kept: dict[str, float]  # activations kept for backward, per layer kind and "head"
    working_set: float  # what the peak holds beyond kept activations: backward's gradients, recomputation, slices
    offloaded_activations: float  # block inputs kept in host memory (trainer.offload_activations)
    buffers: dict[str, float]  # communication buffers at their largest
    sent: dict[str, float]  # bytes this rank sends per step
    layers: dict[str, int] = field(default_factory=dict)

    @property
    def activations(self) -> float:
        """Activations and temporaries at the step's peak, on the device."""
        return sum(self.kept.values()) + self.working_set

    @property
    def peak(self) -> float:
        return self.state.device_total + self.activations + sum(self.buffers.values())

    @property
    def host(self) -> float:
        return self.state.offloaded + self.offloaded_activations


def trace_step(model: ModelConfig, activations: ActivationPlan, *, seq_len: int, micro_batch: int,
               precision: str) -> Trace:
    """Trace one forward+backward of `micro_batch` windows of `seq_len` tokens on fake tensors.

    precision (Setup.trace_precision): "fp32"; "autocast", fp32 weights under bf16 autocast as DDP
    trains on a GPU; "bf16", bf16 weights as DeepSpeed's bf16 keeps them.
    """
    model = replace(model, max_seq_len=max(model.max_seq_len, seq_len))
    with FakeTensorMode():
        lm = build_model(model, activations=activations)
        if precision == "bf16":  # Module.to cannot swap fake parameters; their data can be replaced
            for param in lm.parameters():
                param.data = param.data.to(torch.bfloat16)
        tokens = torch.zeros(micro_batch, seq_len + 1, dtype=torch.long)
        tracker = MemTracker()
        tracker.track_external(lm)
        live = []  # (label, activation bytes alive) at each block boundary of the forward

        def activation_bytes() -> float:
            return _activation_total(tracker.get_tracker_snapshot("current"))

        # From before the embedding: its output is the first block's input, kept by that block.
        hooks = [lm.register_forward_pre_hook(lambda *_: live.append(("start", activation_bytes())))]
        for layer, block in enumerate(lm.blocks):
            kind = model.mixer_of(layer)
            hooks.append(block.register_forward_hook(lambda *_, kind=kind: live.append((kind, activation_bytes()))))
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "autocast" else nullcontext()
        with tracker:
            with autocast:
                loss = lm(tokens[:, :-1], targets=tokens[:, 1:])
            after_forward = activation_bytes()
            loss.backward()
        for hook in hooks:
            hook.remove()
        peak = tracker.get_tracker_snapshot("peak")
    kept = defaultdict(float)
    for (_, before), (kind, after) in zip(live, live[1:]):
        kept[kind] += after - before
    kept["head"] = after_forward - live[-1][1]
    return Trace(peak=_activation_total(peak), kept=dict(kept))


def _activation_total(snapshot: dict) -> float:
    """Bytes of activations and temporaries in a MemTracker snapshot {device: {kind: bytes, "Total": bytes}}."""
    return sum(value for stats in snapshot.values() for kind, value in stats.items()
               if kind != "Total" and kind.value not in NOT_ACTIVATIONS)


TraceCache = dict[tuple, Trace]


def _traced(setup: Setup, periods: int, tokens: int, cache: TraceCache) -> Trace:
    pattern = len(setup.model.layers)
    model = replace(setup.model, n_layers=periods * pattern)
    activations = replace(setup.activations, offload=False)  # offload moves kept bytes to the host: see plan()
    key = (repr(model), activations, tokens, setup.micro_batch, setup.trace_precision)
    if key not in cache:
        cache[key] = trace_step(model, activations, seq_len=tokens, micro_batch=setup.micro_batch,
                                precision=setup.trace_precision)
    return cache[key]


def _extend(values: dict[tuple[int, int], float], periods: float, tokens: int) -> float:
    """A quantity traced at (1 or 2 periods) x (one or two lengths), extended bilinearly to (periods, tokens)."""
    lengths = sorted({length for _, length in values})

    def at_length(length: int) -> float:
        one, two = values[(1, length)], values[(2, length)]
        return (2 * one - two) + (two - one) * periods  # intercept + per-period slope x periods

    if len(lengths) == 1:
        return at_length(lengths[0])
    short, long = lengths
    return at_length(short) + (at_length(long) - at_length(short)) * (tokens - short) / (long - short)


def activation_estimate(setup: Setup, cache: TraceCache | None = None) -> tuple[dict[str, float], float]:
    """(kept activations per layer kind and "head", peak activations and temporaries) of one rank's step."""
    cache = {} if cache is None else cache
    local = setup.local_tokens
    lengths = [local] if local <= TRACE_TOKENS else [TRACE_TOKENS // 2, TRACE_TOKENS]
    traces = {(periods, length): _traced(setup, periods, length, cache) for periods in (1, 2) for length in lengths}
    periods = setup.model.n_layers / len(setup.model.layers)
    kinds = next(iter(traces.values())).kept
    kept = {kind: _extend({key: trace.kept[kind] for key, trace in traces.items()}, periods, local) for kind in kinds}
    peak = _extend({key: trace.peak for key, trace in traces.items()}, periods, local)
    return kept, peak


def layer_counts(model: ModelConfig) -> dict[str, int]:
    counts = defaultdict(int)
    for layer in range(model.n_layers):
        counts[model.mixer_of(layer)] += 1
    return dict(counts)


def sequence_parallel_ops(setup: Setup) -> dict[str, str]:
    """Layer kind -> the op that carries it across the sp ranks."""
    attention_op = {"ring": "ring_attention", "ulysses": "ulysses_attention", "hybrid": "hybrid"}[setup.sp_mode]
    ops = {"attention": attention_op, "local": attention_op, "s2": "ulysses_attention", "rat": "rat_sp",
           "lightning": "lasp"}
    return {kind: ops[kind] for kind in layer_counts(setup.model)}


# Sequence-parallel ops, and what one rank sends for one layer's forward pass.
SP_OPS = ("ring_attention", "ulysses_attention", "rat_sp", "lasp")


def forward_bytes(op: str, seq_len: int, sp: int, *, heads: int, head_dim: int, chunk_size: int, element_size: int) -> int:
    """Forward bytes one rank sends per layer and sequence (causal, zigzag layout; LASP states in fp32)."""
    local_kv = 2 * (seq_len // sp) * heads * head_dim * element_size  # this rank's K and V
    if op == "ring_attention":
        return (sp - 1) * local_kv  # every rank's K/V visits every other rank
    if op == "ulysses_attention":
        return 2 * (sp - 1) * local_kv // sp  # q, k, v out and the output back: 4 tensors, (P-1)/P of each
    if op == "rat_sp":
        return (sp - 1) * local_kv // chunk_size  # one k~, v~ summary per chunk
    if op == "lasp":
        return (sp - 1) * 2 * heads * head_dim * head_dim * 4  # one D x D state per head per piece (2 pieces)
    raise ValueError(f"unknown op {op!r}")


def _sp_bytes(setup: Setup, op: str) -> tuple[float, float, float]:
    """(buffers held at once, bytes sent in forward, bytes sent in backward) by one layer's exchange on one rank."""
    model, sp = setup.model, setup.sp
    if sp == 1:
        return 0.0, 0.0, 0.0
    if op == "hybrid":
        ulysses = setup.ulysses or 1
        ring = replace(setup, sp=sp // ulysses, seq_len=setup.seq_len // ulysses)  # rings of head-sharded blocks
        parts = [_sp_bytes(replace(setup, sp=ulysses), "ulysses_attention"), _sp_bytes(ring, "ring_attention")]
        return max(p[0] for p in parts), sum(p[1] for p in parts), sum(p[2] for p in parts)
    chunk = model.mixer_options.get("rat", {}).get("chunk_size", 16)
    element = 4 if op == "rat_sp" else setup.activation_bytes  # RAT's summaries are fp32
    sent = setup.micro_batch * forward_bytes(op, setup.seq_len, sp, heads=model.n_heads, head_dim=model.head_dim,
                                             chunk_size=chunk, element_size=element)
    block = setup.micro_batch * setup.local_tokens * model.d_model * setup.activation_bytes  # one [B, T/sp, d]
    if op == "ring_attention":  # K and V travel the ring; in backward dK and dV travel with them (send and receive)
        return 8 * block, sent, 2 * sent
    if op == "ulysses_attention":  # all-to-all of q, k, v in and the output back; the gradients likewise
        return 3 * block, sent, sent
    if op == "rat_sp":  # every rank's chunk summaries gathered, their gradients scattered back
        return 2 * sp * sent / (sp - 1), sent, sent
    if op == "lasp":  # fp32 D x D states
        return 2 * setup.micro_batch * model.n_heads * model.head_dim**2 * 4, sent, sent
    raise ValueError(f"unknown sequence-parallel op {op!r}")


def _gradient_sync(setup: Setup, parameters: int, largest_block: int) -> tuple[dict[str, float], float]:
    """(buffers, bytes sent per step) of the data-parallel gradient reduction over all ranks."""
    world, share = setup.world_size, (setup.world_size - 1) / setup.world_size
    if world == 1:
        return {}, 0.0
    if setup.engine != "deepspeed":  # DDP: fp32 gradient buckets beside .grad, ring all-reduce
        return {"DDP gradient buckets": parameters * 4.0}, 2 * share * parameters * 4
    element = 2 if setup.bf16 else 4
    buffers = {"ZeRO reduction bucket": min(DEEPSPEED_REDUCE_BUCKET, parameters) * element}
    sent = share * parameters * element  # reduce-scatter of the gradients
    if setup.zero_stage == 3:  # weights gathered before each use: forward, backward, and recomputation
        gathers = 3 if setup.activations.checkpointing != "none" else 2
        buffers["ZeRO-3 gathered weights"] = (largest_block + DEEPSPEED_PREFETCH_BUCKET) * element
        sent += gathers * share * parameters * element
    elif setup.zero_stage >= 1:  # the updated weight shards gathered after the step
        sent += share * parameters * element
    return buffers, sent


def plan(setup: Setup, cache: TraceCache | None = None) -> Plan:
    """What one rank of `setup` holds at the peak of a training step, and what it sends."""
    meta = build_model(setup.model, device="meta")
    parameters = meta.num_params()
    largest_block = max(sum(p.numel() for p in block.parameters()) for block in meta.blocks)
    state = training_state(parameters, engine=setup.engine, zero_stage=setup.zero_stage, offload=setup.offload,
                           world_size=setup.world_size, bf16=setup.bf16)
    kept, peak = activation_estimate(setup, cache)
    counts = layer_counts(setup.model)
    offloaded = 0.0
    if setup.activations.offload:
        recomputed = sum(setup.activations.recompute(layer) != "none" for layer in range(setup.model.n_layers))
        offloaded = recomputed * setup.micro_batch * setup.local_tokens * setup.model.d_model * setup.residual_bytes
        blocks_kept = sum(value for kind, value in kept.items() if kind != "head")
        for kind in counts:  # each kind gives up its share of the block inputs
            kept[kind] -= offloaded * kept[kind] / blocks_kept if blocks_kept else 0.0
        peak -= offloaded
    buffers, sent = {}, {}
    if setup.sp > 1:
        recomputed_layers = defaultdict(int)
        for layer in range(setup.model.n_layers):
            if setup.activations.recompute(layer) != "none":
                recomputed_layers[setup.model.mixer_of(layer)] += 1
        sp_buffer = 0.0
        for kind, op in sequence_parallel_ops(setup).items():
            held, forward, backward = _sp_bytes(setup, op)
            sp_buffer = max(sp_buffer, held)
            # A recomputed layer exchanges its forward again in backward.
            per_micro_step = (counts[kind] + recomputed_layers[kind]) * forward + counts[kind] * backward
            sent[f"{kind} ({op})"] = per_micro_step * setup.grad_accum
        buffers["sequence-parallel exchange"] = sp_buffer
    sync_buffers, sync_sent = _gradient_sync(setup, parameters, largest_block)
    buffers.update(sync_buffers)
    if sync_sent:
        sent["gradient sync"] = sync_sent
    return Plan(
        setup=setup, state=state, kept=kept, working_set=peak - sum(kept.values()),
        offloaded_activations=offloaded, buffers=buffers, sent=sent, layers=counts,
    )


def sequence_unit(setup: Setup) -> int:
    """What every planned sequence length is a multiple of: whole RAT chunks and S2 blocks per layout piece, 1K."""
    pieces = 2 * setup.sp if setup.sp > 1 else 1  # the zigzag layout cuts a sequence in 2 sp pieces
    unit = math.lcm(sequence_parallel_multiple(setup.model, pieces), 1024)
    if "s2" in setup.model.layers:
        unit = math.lcm(unit, pieces * setup.model.mixer_options.get("s2", {}).get("block_size", 64))
    return unit


def longest_sequence(setup: Setup, budget: float, cache: TraceCache | None = None,
                     limit: int = 1 << 32) -> tuple[int, Plan | None]:
    """The longest seq_len (a multiple of sequence_unit) whose planned peak fits in `budget` bytes, and its plan.

    (0, None) when not even one unit fits. The peak grows with the length, so bisection finds it.
    """
    cache = {} if cache is None else cache
    unit = sequence_unit(setup)

    def fits(units: int) -> Plan | None:
        candidate = plan(replace(setup, seq_len=units * unit), cache)
        return candidate if candidate.peak <= budget else None

    best = fits(1)
    if best is None:
        return 0, None
    low, high = 1, 2
    while high * unit <= limit and (found := fits(high)) is not None:
        low, best, high = high, found, 2 * high
    while high - low > 1:  # fits(low), not fits(high)
        middle = (low + high) // 2
        found = fits(middle)
        if found is not None:
            low, best = middle, found
        else:
            high = middle
    return low * unit, best
