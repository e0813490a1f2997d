"""A model's size at a glance: parameters, FLOPs per token, decoding cache per sequence."""

import torch

from lsys.models.config import ModelConfig
from lsys.models.lm import build_model


def describe_model(cfg: ModelConfig, seq_len: int, cache_dtype: torch.dtype = torch.bfloat16) -> str:
    """Lines describing `cfg` built on the meta device (no memory): parameters, FLOPs, cache bytes at seq_len."""
    model = build_model(cfg, device="meta").to(cache_dtype)
    caches = model.init_caches(1, seq_len)
    cache_bytes = sum(cache.nbytes() for cache in caches)
    kinds = [cfg.mixer_of(layer) for layer in range(cfg.n_layers)]
    layers = ", ".join(f"{kinds.count(name)} {name}" for name in dict.fromkeys(kinds))
    return "\n".join(
        [
            f"model {cfg.name}: {model.num_params():,} parameters ({model.num_params(exclude_embedding=True):,} without embeddings)",
            f"layers: {cfg.n_layers} ({layers}), d_model {cfg.d_model}, {cfg.n_heads} heads of {cfg.head_dim}",
            f"training FLOPs per token at seq_len {seq_len}: {model.flops_per_token(seq_len):.4g}",
            f"decoding cache per sequence at {seq_len} tokens ({str(cache_dtype).removeprefix('torch.')}): "
            f"{cache_bytes / 2**20:,.1f} MiB",
        ]
    )
