"""The decoder LM: embedding, blocks of pre-norm mixer and MLP, final norm, tied head."""

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lsys.models.activations import ActivationPlan
from lsys.models.cache import Cache
from lsys.models.config import ModelConfig
from lsys.models.registry import MIXERS
from lsys.models.tiling import tiled_cross_entropy, tiled_mlp
from parallel.documents import Documents, documents


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.down = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, activations: ActivationPlan = ActivationPlan()):
        super().__init__()
        name = cfg.mixer_of(layer)
        self.mixer_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer = MIXERS[name](cfg, **cfg.mixer_options.get(name, {}))
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.recompute = activations.recompute(layer)  # "block", "mixer" or "none"
        self.offload = activations.offload
        self.mlp_chunk = activations.mlp_chunk

    def forward(
        self, x: Tensor, cache: Cache | None = None, mode: str = "train", documents: Documents | None = None
    ) -> Tensor:
        """mode "train": the whole sequence (its packed `documents` kept apart); "prefill": a prompt into an
        empty cache; "decode": one token."""
        if mode == "train":
            if self.recompute == "block" and torch.is_grad_enabled():
                return self._recomputed(self._train, x, documents)
            return self._train(x, documents)
        h = self.mixer_norm(x)
        x = x + (self.mixer.prefill(h, cache) if mode == "prefill" else self.mixer.decode(h, cache))
        return x + self.mlp(self.mlp_norm(x))

    def _train(self, x: Tensor, documents: Documents | None) -> Tensor:
        if self.recompute == "mixer" and torch.is_grad_enabled():
            x = x + self._recomputed(self._mix, x, documents)
        else:
            x = x + self._mix(x, documents)
        h = self.mlp_norm(x)
        return x + (tiled_mlp(self.mlp, h, chunk=self.mlp_chunk) if self.mlp_chunk else self.mlp(h))

    def _mix(self, x: Tensor, documents: Documents | None) -> Tensor:
        # Without packed documents a mixer is called as forward(x), so one that cannot isolate them still works.
        return self.mixer(self.mixer_norm(x)) if documents is None else self.mixer(self.mixer_norm(x), documents)

    def _recomputed(self, fn, x: Tensor, documents: Documents | None) -> Tensor:
        """fn(x, documents), keeping only x for backward (in pinned host memory with offload), recomputing the rest."""
        # The checkpoint saves its inputs through the saved-tensor hooks active here, and only them.
        offload = torch.autograd.graph.save_on_cpu(pin_memory=x.is_cuda) if self.offload else nullcontext()
        with offload:
            return checkpoint(fn, x, documents, use_reentrant=False)


class LM(nn.Module):
    def __init__(self, cfg: ModelConfig, activations: ActivationPlan = ActivationPlan()):
        """`activations` says what training keeps for backward (lsys/models/activations.py); it changes no result."""
        super().__init__()
        problems = activations.problems()
        if problems:
            raise ValueError("; ".join(problems))
        self.cfg, self.loss_chunk = cfg, activations.loss_chunk
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, layer, activations) for layer in range(cfg.n_layers))
        self.final_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, 0.02), output projections scaled by 1/sqrt(2 * n_layers); norms at 1.

        A mixer with vectors of its own to initialise (RAT's gate bias) does so in its
        `reset_parameters`, called last.
        """
        for name, param in self.named_parameters():
            if param.dim() < 2:
                continue
            std = self.cfg.init_std
            if name.endswith(("out.weight", "down.weight")):
                std /= math.sqrt(2 * self.cfg.n_layers)
            nn.init.normal_(param, mean=0.0, std=std)
        for module in self.modules():
            if isinstance(module, nn.RMSNorm):
                module.reset_parameters()
        for block in self.blocks:
            reset_own = getattr(block.mixer, "reset_parameters", None)
            if reset_own is not None:
                reset_own()

    def forward(
        self,
        tokens: Tensor,
        caches: list[Cache] | None = None,
        mode: str = "train",
        targets: Tensor | None = None,
        segment_ids: Tensor | None = None,
        restart_positions: bool = True,
        reduction: str = "mean",
    ) -> Tensor:
        """Logits `[B, T, vocab]` (fp32 or wider) for token ids `[B, T]`; with caches, `mode` is "prefill" or "decode".

        With `targets [B, T]` instead: the next-token cross-entropy over the targets that are not
        -100, their mean or (`reduction="sum"`) their sum, over `loss_chunk` tokens at a time if the
        activation plan sets one. Trainers take the sum and divide by the step's count of targets
        over every micro-batch and rank, so a token weighs the same wherever it lands.
        `segment_ids [B, T]` (this rank's tokens'; kernels/segments.py): the windows hold packed
        documents, each seeing only itself, its RoPE positions counted from its own start unless
        `restart_positions` is False.
        """
        hidden = self.hidden_states(tokens, caches, mode, segment_ids, restart_positions)
        if targets is None:
            return self.logits(hidden)
        if self.loss_chunk:
            return tiled_cross_entropy(
                hidden.flatten(0, 1), self.embed.weight, targets.flatten(), chunk=self.loss_chunk, reduction=reduction
            )
        return F.cross_entropy(self.logits(hidden).flatten(0, 1), targets.flatten(), reduction=reduction)

    def hidden_states(
        self,
        tokens: Tensor,
        caches: list[Cache] | None = None,
        mode: str = "train",
        segment_ids: Tensor | None = None,
        restart_positions: bool = True,
    ) -> Tensor:
        """The normed last-layer states `[B, T, d_model]` that `logits` maps to the vocabulary.

        Split from `forward` so that a caller who needs a few positions' logits (an eval scoring
        an answer at the end of a 100K-token prompt) need not hold `[T, vocab]` of them.
        """
        packed = None
        if segment_ids is not None:
            if mode != "train":
                raise ValueError(f"LM: segment_ids are for training on packed documents, not for {mode!r}")
            if segment_ids.shape != tokens.shape:
                raise ValueError(f"LM: segment_ids of shape {tuple(segment_ids.shape)} do not match "
                                 f"the tokens' {tuple(tokens.shape)}")
            packed = documents(segment_ids, restart_positions=restart_positions)
        x = self.embed(tokens)
        for layer, block in enumerate(self.blocks):
            x = block(x, caches[layer] if caches is not None else None, mode, packed)
        return self.final_norm(x)

    def logits(self, hidden: Tensor) -> Tensor:
        """Logits (fp32 or wider) of normed states `[..., d_model]`."""
        # Tied head: the embedding matrix maps back to the vocabulary.
        logits = F.linear(hidden, self.embed.weight)
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def init_caches(self, batch_size: int, max_len: int) -> list[Cache]:
        """Empty decoding caches, one per layer, for `batch_size` rows of up to `max_len` tokens."""
        weight = self.embed.weight
        return [block.mixer.init_cache(batch_size, max_len, weight.device, weight.dtype) for block in self.blocks]

    def prefill(self, tokens: Tensor, caches: list[Cache]) -> Tensor:
        """Logits for prompts `[B, T]` of one length, read into empty caches."""
        return self(tokens, caches, mode="prefill")

    def decode(self, tokens: Tensor, caches: list[Cache]) -> Tensor:
        """Logits `[B, 1, vocab]` for one new token per row, each at its own position."""
        return self(tokens, caches, mode="decode")

    def num_params(self, exclude_embedding: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        return total - self.embed.weight.numel() if exclude_embedding else total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * N (weights, head included) + 3 * mixing forward FLOPs (fwd + 2x bwd)."""
        cfg = self.cfg
        mixing = sum(
            MIXERS[cfg.mixer_of(layer)].attention_flops_per_token(
                cfg, seq_len, **cfg.mixer_options.get(cfg.mixer_of(layer), {})
            )
            for layer in range(cfg.n_layers)
        )
        return 6 * self.num_params() + 3 * mixing


def build_model(
    cfg: ModelConfig, device: torch.device | str = "cpu", activations: ActivationPlan = ActivationPlan()
) -> LM:
    """Build the LM on `device` (use "meta" to size a large model without memory)."""
    with torch.device(device):
        return LM(cfg, activations)
