"""The decoder LM: embedding, blocks of pre-norm mixer and MLP, final norm, tied head."""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lsys.models.config import ModelConfig
from lsys.models.registry import MIXERS


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.down = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        name = cfg.mixer_of(layer)
        self.mixer_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer = MIXERS[name](cfg, **cfg.mixer_options.get(name, {}))
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.mixer(self.mixer_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class LM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layers))
        self.final_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, 0.02), output projections scaled by 1/sqrt(2 * n_layers)."""
        for name, param in self.named_parameters():
            if param.dim() < 2:
                continue  # norms keep weight 1; gate biases keep 0
            std = self.cfg.init_std
            if name.endswith(("out.weight", "down.weight")):
                std /= math.sqrt(2 * self.cfg.n_layers)
            nn.init.normal_(param, mean=0.0, std=std)

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits `[B, T, vocab]` (fp32) for token ids `[B, T]`."""
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        # Tied head: the embedding matrix maps back to the vocabulary.
        return F.linear(self.final_norm(x), self.embed.weight).float()

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


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> LM:
    """Build the LM on `device` (use "meta" to size a large model without memory)."""
    with torch.device(device):
        return LM(cfg)
