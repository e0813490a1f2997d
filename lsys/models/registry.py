"""Mixer registry: a new token mixer is one file that decorates its class with `@register_mixer`.

A mixer is an `nn.Module` built as `Mixer(cfg: ModelConfig, **cfg.mixer_options[name])`
that maps `[B, T, d_model]` to `[B, T, d_model]`, and offers a classmethod
`check(cfg, seq_len, **options) -> list[str]` naming every problem with that setting,
and `attention_flops_per_token(cfg, seq_len, **options) -> float`: the forward FLOPs per
token of its token-mixing part (everything that is not a weight matmul).
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
