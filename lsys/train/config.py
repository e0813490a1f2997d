"""The `trainer`, `optim` and `parallel` settings: their types and defaults (Hydra's schemas for those groups).

conf/trainer/, conf/optim/ and conf/parallel/ hold only what differs from these; the checks that
weigh several settings together are in lsys/config.py.
"""

from dataclasses import dataclass, field

from lsys.eval.needle_settings import NeedleSettings


def _in_training_needle_grid() -> NeedleSettings:
    # Short enough to score every few hundred steps: three depths at the trained length, filler haystack.
    return NeedleSettings(lengths=None, depths=[0.0, 50.0, 100.0], haystack="filler")


@dataclass
class TrainerConfig:
    """How long a run trains, on what batches, what it logs and keeps, and what stops it."""

    max_steps: int = 400
    # End this session after this many steps (the schedule still follows max_steps), e.g. for time-limited jobs.
    stop_after_steps: int | None = None
    micro_batch_size: int = 8  # windows per rank per micro-step
    grad_accum: int = 1
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    # Every N steps (and at the end) score a small needle grid and log its mean as needle_accuracy; null: off.
    eval_needle_every: int | None = None
    needle: NeedleSettings = field(default_factory=_in_training_needle_grid)  # lengths null: [data.seq_len]
    # Memory for long sequences (lsys/models/activations.py, README "Long sequences"); none of these changes
    # a loss or a gradient, only what a step holds between forward and backward.
    activation_checkpointing: str = "none"  # none | full (each block recomputed) | mixer (token mixers only) | every_n
    ac_every: int = 2  # every_n: blocks 0, n, 2n, ... are recomputed
    loss_chunk: int | None = None  # head + cross-entropy over this many tokens at a time ([T, vocab] never held)
    mlp_chunk: int | None = None  # each MLP over this many tokens at a time, recomputed in backward
    offload_activations: bool = False  # recomputed blocks keep their inputs in pinned host memory (needs a GPU)
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    progress_bar: bool = True
    tensorboard: bool = False
    # Divergence guard (besides a non-finite loss or grad norm, which always stops the run): a loss above
    # spike_factor x the median of the last spike_window steps, or a grad norm above max_grad_norm_abort,
    # stops the run before that step is applied; an update that grows the weights' norm more than
    # max_weight_growth times stops it before that step is saved. null turns a test off.
    spike_factor: float | None = 10.0
    spike_window: int = 100
    max_grad_norm_abort: float | None = None
    max_weight_growth: float | None = 2.0
    # Refuse at start-up a run whose weights, gradients and AdamW state (16 bytes a parameter) exceed this
    # rank's share of memory; true skips the check.
    skip_memory_check: bool = False
    # The device's dense bf16 peak in TFLOP/s, for MFU; null: looked up by device model (lsys/train/metrics.py).
    peak_tflops: float | None = None


@dataclass
class OptimConfig:
    """AdamW with linear warmup and a cosine schedule (the RAT paper's 1.3B settings, lr scaled for tiny models)."""

    lr: float = 1.0e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1.0e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"  # cosine | wsd (warmup, the peak lr held, a linear decay over the last steps)
    decay_fraction: float = 0.2  # wsd: the share of max_steps spent decaying to min_lr_ratio


@dataclass
class ParallelConfig:
    """Data parallel over world_size / sp replicas (DDP or DeepSpeed ZeRO); each sequence split over sp ranks.

    torchrun --nproc_per_node=4 launch/train.py parallel.sp=2    (dp 2 x sp 2)
    """

    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    timeout_s: int = 600  # a collective that waits this long (a rank died or hangs) ends the job with an error
    engine: str = "ddp"  # ddp | deepspeed (ZeRO; lsys/train/deepspeed_engine.py)
    zero_stage: int = 2  # deepspeed: 0 (DDP-like), 1 (optimizer state sharded), 2 (+ gradients), 3 (+ parameters)
    # deepspeed: none | optimizer (ZeRO 1-3, DeepSpeed's CPU Adam) | optimizer_and_params (ZeRO-3)
    offload: str = "none"
    deepspeed_config: str | None = None  # a DeepSpeed JSON merged in (may not contradict lsys's settings)
    sp: int = 1  # sequence-parallel degree: ranks that share one sequence
    # Attention layers: ring | ulysses | hybrid (Ulysses inside ring); rat uses RAT-SP, lightning LASP, s2 Ulysses.
    sp_mode: str = "ring"
    ulysses: int | None = None  # hybrid: the Ulysses degree (divides sp); the ring degree is sp / ulysses
    # zigzag (rank r holds chunks r and 2sp-1-r: balanced causal work) | contiguous
    layout: str = "zigzag"


@dataclass
class PlanSettings:
    """What launch/plan.py predicts (lsys/train/planner.py), beside the training config it plans for."""

    mode: str = "peak"  # peak | max_seq_len (the longest data.seq_len whose peak fits in gpu_mem_gib)
    world_size: int | None = None  # ranks (GPUs) in all; null: parallel.sp (one data-parallel replica)
    gpu_mem_gib: float = 80.0  # memory per GPU the plan must fit in
    device: str = "gpu"  # gpu: bf16 as trainer.precision=auto trains there | cpu: fp32, as a CPU run
