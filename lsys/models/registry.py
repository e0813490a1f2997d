"""Mixer registry: a new token mixer is one file in lsys/models that decorates its class with `@register_mixer`.

A mixer is an `nn.Module` built as `Mixer(cfg: ModelConfig, **cfg.mixer_options[name])` with
- `forward(x)`: `[B, T, d_model]` to `[B, T, d_model]`, causal; for windows of packed documents
  (`data.doc_isolation`) also `forward(x, documents)` with parallel.Documents, each document alone;
  every op it calls (kernels/, parallel/), in forward and in prefill, gets `backend=cfg.kernel_backend`;
- classmethod `check(cfg, seq_len, **options) -> list[str]`: every problem with that setting;
- classmethod `sequence_multiple(cfg, **options) -> int`: what each rank's piece of a sequence split for
  sequence parallelism must hold a multiple of (1: any length; RAT: its chunk size);
- classmethod `attention_flops_per_token(cfg, seq_len, **options) -> float`: the forward FLOPs
  per token of its token-mixing part (everything that is not a weight matmul);
- decoding: `init_cache(batch_size, max_len, device, dtype) -> Cache` (lsys/models/cache.py),
  `prefill(x, cache)` (a prompt from position 0, same output as forward) and
  `decode(x, cache)` (one token per row at each row's own position).
"""

from torch import nn

MIXERS: dict[str, type[nn.Module]] = {}


def register_mixer(name: str):
    """Class decorator adding a mixer under `name` (used in `model.layers`)."""

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        if name in MIXERS:
            raise ValueError(f"mixer {name!r} is registered twice ({MIXERS[name].__name__}, {cls.__name__})")
        MIXERS[name] = cls
        return cls

    return add
