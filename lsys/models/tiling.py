"""Sequence tiling for long inputs: cross-entropy through the head, and the MLP, a slice of tokens at a time.

`tiled_cross_entropy` equals `F.cross_entropy(F.linear(hidden, weight).float(), targets)` without
ever holding more than `chunk` rows of logits: each slice's logits are formed, reduced to its loss
and turned into its gradients at once (the loss is the last op of a step, so its backward is known
in forward, as Liger-Kernel's fused linear cross-entropy and DeepSpeed's TiledFusedLogitsLoss do
it). Backward then only scales the stored gradients; it touches no weight, which ZeRO-3 may have
released by then. `tiled_mlp` runs a module over slices of the sequence, each recomputed in
backward (ALST's TiledMLP), through plain non-reentrant checkpoints, so DDP and ZeRO see one
gradient per weight as usual.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


class _TiledCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int, ignore_index: int, reduction: str
    ) -> Tensor:
        needs_hidden, needs_weight = ctx.needs_input_grad[:2]
        counted = targets != ignore_index
        # The mean divides by the count of targets (nan when there is none, as F.cross_entropy's).
        count = counted.sum() if reduction == "mean" else torch.ones((), dtype=torch.long, device=targets.device)
        wide = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)  # fp32 or float64
        loss = torch.zeros((), dtype=wide, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=wide, device=weight.device) if needs_weight else None
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            h, keep = hidden[rows], counted[rows]
            logits = F.linear(h, weight)  # under the caller's autocast, as the plain head
            logits32 = logits.to(wide)
            safe_targets = torch.where(keep, targets[rows], 0)[:, None]
            log_probs = logits32.log_softmax(dim=-1)
            loss -= (log_probs.gather(1, safe_targets)[:, 0] * keep).sum()
            if needs_hidden or needs_weight:
                # d(loss)/d logits = (softmax - onehot) / count, zero on ignored rows
                grad_logits = log_probs.exp_()
                grad_logits.scatter_add_(1, safe_targets, torch.full_like(safe_targets, -1, dtype=grad_logits.dtype))
                grad_logits.mul_((keep.to(wide) / count)[:, None])
                grad_logits = grad_logits.to(logits.dtype)
                if needs_hidden:
                    grad_hidden[rows] = grad_logits @ weight.to(logits.dtype)
                if needs_weight:
                    grad_weight += grad_logits.t() @ h.to(logits.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss / count

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight * grad_loss
        return grad_hidden, grad_weight, None, None, None, None


def tiled_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, *, chunk: int, ignore_index: int = -100, reduction: str = "mean"
) -> Tensor:
    """Cross-entropy (mean or sum) of the logits `hidden [N, d] @ weight [V, d]^T` against `targets [N]`,
    `chunk` rows at a time.

    Equals `F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=ignore_index,
    reduction=reduction)` in value and gradients (the logits in fp32, under whatever autocast is active).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"tiled_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    if chunk <= 0:
        raise ValueError(f"tiled_cross_entropy: chunk must be positive, got {chunk}")
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1] or weight.shape[1:] != hidden.shape[1:]:
        raise ValueError(
            f"tiled_cross_entropy: expected hidden [N, d], weight [V, d], targets [N], got "
            f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}"
        )
    return _TiledCrossEntropy.apply(hidden, weight, targets, chunk, ignore_index, reduction)


def tiled_mlp(mlp: nn.Module, x: Tensor, *, chunk: int) -> Tensor:
    """`mlp(x)` for `x [B, T, d]`, over `chunk` tokens at a time, each slice recomputed in backward."""
    if x.shape[1] <= chunk:
        return mlp(x)
    return torch.cat(
        [checkpoint(mlp, part, use_reentrant=False) for part in x.split(chunk, dim=1)], dim=1
    )
