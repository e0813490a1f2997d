"""The model's shape, as one dataclass: Hydra's schema for the `model` group (conf/model/ holds what differs)."""

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    name: str = "rat_tiny"
    vocab_size: int = 320  # the byte tokenizer's 257, padded to a multiple of 64
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    ffn_dim: int = 512
    # The mixer of layer i is layers[i % len(layers)], so [rat, local] alternates.
    layers: list[str] = field(default_factory=lambda: ["rat"])
    # Options per mixer name, passed to its constructor: {rat: {chunk_size: 16}}.
    mixer_options: dict[str, dict] = field(default_factory=dict)
    max_seq_len: int = 4096
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    # Which implementation every op of the model runs (kernels/backend.py): "auto" (Triton on CUDA tensors
    # the kernels take, torch elsewhere), "torch" (never a Triton kernel) or "triton" (raise where it cannot).
    kernel_backend: str = "auto"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def mixer_of(self, layer: int) -> str:
        return self.layers[layer % len(self.layers)]
