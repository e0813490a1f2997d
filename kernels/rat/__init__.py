"""The fused RAT layer core: `rat(q, k, v, g, chunk_size=...)`.

`naive.py` is its definition (a loop over the L steps of each chunk); `chunk.py` is the
loop-free torch form that the torch backend runs; `triton.py` holds the fused kernels.
With the environment variable LSYS_DEBUG=1 the gate's range is checked on every call
(a device sync, so it is off by default).
"""

import os

import torch
from torch import Tensor

from kernels.backend import BACKENDS, pick_backend
from kernels.rat.chunk import chunk_summaries_chunk, rat_chunk, rat_one_token_chunks
from kernels.rat.documents import rat_documents
from kernels.segments import check_segment_ids
from kernels.self_check import Comparison, compare_with_reference, needs_self_check, random_inputs, self_check

__all__ = ["rat", "chunk_summaries", "rat_self_check", "chunk_summaries_self_check"]

TRITON_HEAD_DIMS = (32, 64, 128)  # rotate-half RoPE splits D in two, and tl.dot needs halves of >= 16
TRITON_CHUNK_SIZES = (8, 16, 32, 64)  # query tiles of 64 or 128 tokens hold whole chunks
# The self-checks' problem: two heads of 4 chunks and 3 tokens of a fifth (two 64-row query tiles at L = 16).
SELF_CHECK_HEADS, SELF_CHECK_CHUNKS, SELF_CHECK_TAIL = 2, 4, 3


def rat(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    *,
    chunk_size: int,
    rope_base: float | None = 10000.0,
    prefix_k: Tensor | None = None,
    prefix_v: Tensor | None = None,
    chunk_start: int = 0,
    segment_ids: Tensor | None = None,
    document_offset: Tensor | None = None,
    initial_state: tuple[Tensor, Tensor] | None = None,
    return_lse: bool = False,
    return_summaries: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, ...]:
    """RAT core on `[B, T, H, D]` tensors (g: forget gate in (0, 1)); see kernels/rat/naive.py.

    Returns out `[B, T, H, D]` in v's dtype, followed by what is asked for, in this order:
    `return_lse`: lse `[B, H, T]`, the log of each token's softmax denominator (summaries and
    own state) in fp32 (float64 for float64 inputs), for merging with attention over more
    summaries; `return_summaries`: the rotated summaries `(k~, v~) [B, T // L, H, D]` of the
    complete chunks, as `chunk_summaries` gives them, from the same scan. All are differentiable.

    `segment_ids [B, T]` (kernels/segments.py): each document runs as if alone, its chunks
    counted from its own first token (kernels/rat/documents.py); summaries then come in the
    slots of `documents.chunk_end_slots`. For a piece of a longer sequence, `document_offset
    [B]` is how many tokens of the first document came before it and `initial_state` (k~, v~)
    `[B, H, D]` the running state there; prefixes and chunk_start do not apply. The Triton backend
    runs the documents realigned to its chunk grid (kernels/rat/realign.py), at one host sync a call.
    """
    if backend not in BACKENDS:
        raise ValueError(f"rat: unknown backend {backend!r}; choose one of {BACKENDS}")
    if chunk_size <= 0:
        raise ValueError(f"rat: chunk_size must be positive, got {chunk_size}")
    if not (q.shape == k.shape == v.shape == g.shape) or q.dim() != 4:
        raise ValueError(
            f"rat: q, k, v, g must share one [B, T, H, D] shape, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, {tuple(g.shape)}"
        )
    if os.environ.get("LSYS_DEBUG") == "1" and not ((g > 0) & (g < 1)).all():
        raise ValueError(
            f"rat: the forget gate g must lie in (0, 1), got values in [{g.min().item()}, {g.max().item()}]"
        )
    if (prefix_k is None) != (prefix_v is None):
        raise ValueError("rat: pass prefix_k and prefix_v together")
    if prefix_k is not None:
        batch, _, heads, head_dim = q.shape
        if not (prefix_k.shape == prefix_v.shape and prefix_k.dim() == 4
                and (prefix_k.shape[0], prefix_k.shape[2], prefix_k.shape[3]) == (batch, heads, head_dim)):
            raise ValueError(
                f"rat: prefix_k and prefix_v must share one [B, C0, H, D] shape with B, H, D = {batch}, {heads}, "
                f"{head_dim} of q, got {tuple(prefix_k.shape)}, {tuple(prefix_v.shape)}"
            )

    if segment_ids is not None:
        check_segment_ids(segment_ids, q.shape[0], q.shape[1], "rat", device=q.device)
        if prefix_k is not None or chunk_start:
            raise ValueError("rat: with segment_ids, chunks count from each document's start; "
                             "pass document_offset and initial_state, not prefix_k/prefix_v/chunk_start")
        _check_piece(q, document_offset, initial_state)
        documents = dict(chunk_size=chunk_size, rope_base=rope_base, segment_ids=segment_ids,
                         document_offset=document_offset, initial_state=initial_state)
        initial_k, initial_v = (None, None) if initial_state is None else initial_state
        tensors = {"q": q, "k": k, "v": v, "g": g, "initial_k": initial_k, "initial_v": initial_v}
        if _pick("rat", backend, tensors, chunk_size) == "triton":
            if needs_self_check(q.device):
                rat_self_check(q.device, q.dtype, q.shape[-1], chunk_size)
            from kernels.rat.triton import rat_documents_triton  # lazy, as below

            out, lse, summary_k, summary_v = rat_documents_triton(q, k, v, g, **documents)
        else:
            out, lse, summary_k, summary_v = rat_documents(q, k, v, g, **documents)
        extra = ((lse,) if return_lse else ()) + ((summary_k, summary_v) if return_summaries else ())
        return (out, *extra) if extra else out
    if document_offset is not None or initial_state is not None:
        raise ValueError("rat: document_offset and initial_state go with segment_ids")

    tensors = {"q": q, "k": k, "v": v, "g": g, "prefix_k": prefix_k, "prefix_v": prefix_v}
    options = dict(chunk_size=chunk_size, rope_base=rope_base, prefix_k=prefix_k, prefix_v=prefix_v,
                   chunk_start=chunk_start)
    if _pick("rat", backend, tensors, chunk_size) == "triton":
        if needs_self_check(q.device):
            rat_self_check(q.device, q.dtype, q.shape[-1], chunk_size)
        from kernels.rat.triton import rat_triton  # lazy: Triton picks interpreter or compiler at import

        out, lse, summary_k, summary_v = rat_triton(q, k, v, g, **options)
    elif chunk_size == 1 and prefix_k is None and not return_lse:
        out, summary_k, summary_v = rat_one_token_chunks(q, k, v, g, rope_base=rope_base, chunk_start=chunk_start)
    else:
        out, lse, summary_k, summary_v = rat_chunk(q, k, v, g, **options)
    extra = ((lse,) if return_lse else ()) + ((summary_k, summary_v) if return_summaries else ())
    return (out, *extra) if extra else out


def chunk_summaries(
    k: Tensor,
    v: Tensor,
    g: Tensor,
    *,
    chunk_size: int,
    rope_base: float | None = 10000.0,
    chunk_start: int = 0,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Rotated final states `(k~, v~) [B, C, H, D]` of the complete chunks; see kernels/rat/naive.py."""
    if backend not in BACKENDS:
        raise ValueError(f"chunk_summaries: unknown backend {backend!r}; choose one of {BACKENDS}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_summaries: chunk_size must be positive, got {chunk_size}")
    if not (k.shape == v.shape == g.shape) or k.dim() != 4:
        raise ValueError(
            f"chunk_summaries: k, v, g must share one [B, T, H, D] shape, got "
            f"{tuple(k.shape)}, {tuple(v.shape)}, {tuple(g.shape)}"
        )
    if _pick("chunk_summaries", backend, {"k": k, "v": v, "g": g}, chunk_size) == "triton":
        if needs_self_check(k.device):
            chunk_summaries_self_check(k.device, k.dtype, k.shape[-1], chunk_size)
        from kernels.rat.triton import chunk_summaries_triton  # lazy, as in rat()

        return chunk_summaries_triton(k, v, g, chunk_size=chunk_size, rope_base=rope_base, chunk_start=chunk_start)
    return chunk_summaries_chunk(k, v, g, chunk_size=chunk_size, rope_base=rope_base, chunk_start=chunk_start)


def rat_self_check(
    device: torch.device, dtype: torch.dtype = torch.float32, head_dim: int = 32, chunk_size: int = 16
) -> None:
    """Check the fused kernels of `rat` against rat_chunk once per process and device type (kernels/self_check.py)."""
    from kernels.rat import triton as rat_kernels  # lazy, as in rat()

    def comparisons() -> list[Comparison]:
        # No prefix, no documents: those are the same kernels compiled with other flags. The gate is
        # fp32, as the model computes it.
        options = dict(chunk_size=chunk_size, rope_base=10000.0)
        return compare_with_reference(
            lambda q, k, v, g: rat_kernels.rat_triton(q, k, v, g, **options),
            lambda q, k, v, g: rat_chunk(q, k, v, g, **options),
            _self_check_inputs("qkv", device, dtype, head_dim, chunk_size),
            ("out", "lse", "summary_k", "summary_v"),
        )

    self_check("rat", device, dtype, comparisons, rat_kernels)


def chunk_summaries_self_check(
    device: torch.device, dtype: torch.dtype = torch.float32, head_dim: int = 32, chunk_size: int = 16
) -> None:
    """Check the Triton `chunk_summaries` against the torch one once per process and device type."""
    from kernels.rat import triton as rat_kernels  # lazy, as in rat()

    def comparisons() -> list[Comparison]:
        options = dict(chunk_size=chunk_size, rope_base=10000.0)
        return compare_with_reference(
            lambda k, v, g: rat_kernels.chunk_summaries_triton(k, v, g, **options),
            lambda k, v, g: chunk_summaries_chunk(k, v, g, **options),
            _self_check_inputs("kv", device, dtype, head_dim, chunk_size),
            ("summary_k", "summary_v"),
        )

    self_check("chunk_summaries", device, dtype, comparisons, rat_kernels)


def _self_check_inputs(
    names: str, device: torch.device, dtype: torch.dtype, head_dim: int, chunk_size: int
) -> dict[str, Tensor]:
    """The self-checks' tensors `names` in `dtype` and the forget gate g, fp32 in [0.05, 0.95]."""
    shape = (1, SELF_CHECK_CHUNKS * chunk_size + SELF_CHECK_TAIL, SELF_CHECK_HEADS, head_dim)
    inputs = random_inputs(dict.fromkeys(names + "g", shape), device, torch.float32)
    inputs["g"] = torch.sigmoid(inputs["g"]).clamp(0.05, 0.95)
    return {name: x if name == "g" else x.to(dtype) for name, x in inputs.items()}


def _check_piece(q: Tensor, document_offset: Tensor | None, initial_state: tuple[Tensor, Tensor] | None) -> None:
    """Raise a one-line ValueError unless the offset is `[B]` and the state a pair of `[B, H, D]` tensors."""
    batch, _, heads, head_dim = q.shape
    if document_offset is not None and tuple(document_offset.shape) != (batch,):
        raise ValueError(f"rat: document_offset must be [B] = [{batch}], got {tuple(document_offset.shape)}")
    if initial_state is not None:
        shapes = [tuple(x.shape) for x in initial_state] if len(initial_state) == 2 else None
        if shapes != [(batch, heads, head_dim)] * 2:
            raise ValueError(
                f"rat: initial_state must be (k~, v~), each [B, H, D] = [{batch}, {heads}, {head_dim}], got {shapes}"
            )


def _pick(op: str, backend: str, tensors: dict[str, Tensor | None], chunk_size: int) -> str:
    """pick_backend, plus the chunk sizes the kernels are built for: "auto" falls back to torch for others."""
    problem = None
    if chunk_size not in TRITON_CHUNK_SIZES:
        problem = f"chunk_size {chunk_size} is not supported; the Triton kernels take {TRITON_CHUNK_SIZES}"
    return pick_backend(op, backend, tensors, head_dims=TRITON_HEAD_DIMS, op_problem=problem)
