"""What a training step keeps for backward: which blocks are recomputed, tiled loss and MLP, offload.

The trainer fills an ActivationPlan from `trainer.*` and builds the model with it; generation and
the needle eval build theirs with the default, and without gradients nothing is recomputed. None
of these options changes a loss or a gradient, only what is held between forward and backward
(and how much is computed twice):
- checkpointing `full` recomputes each block in backward, keeping only its input; `mixer` only
  the token mixer (with its norm); `every_n` every `every`-th block (layers 0, n, 2n, ...).
- `loss_chunk` runs the head and cross-entropy over that many tokens at a time, so `[T, vocab]`
  logits are never held (lsys/models/tiling.py).
- `mlp_chunk` runs each MLP over that many tokens at a time, recomputed in backward, so its
  `[T, ffn_dim]` intermediate is never held.
- `offload` moves the saved input of each recomputed block (or mixer) to pinned host memory
  (torch's `save_on_cpu`), so the GPU holds about one block's working set.
"""

from dataclasses import dataclass

CHECKPOINTING = ("none", "full", "mixer", "every_n")


@dataclass(frozen=True)
class ActivationPlan:
    checkpointing: str = "none"
    every: int = 1
    loss_chunk: int | None = None
    mlp_chunk: int | None = None
    offload: bool = False

    def problems(self) -> list[str]:
        """What is wrong with these settings, one line each, named as the trainer config names them."""
        problems = []
        if self.checkpointing not in CHECKPOINTING:
            problems.append(
                f"trainer.activation_checkpointing must be one of {', '.join(CHECKPOINTING)}, got {self.checkpointing!r}"
            )
        if self.every < 1:
            problems.append(f"trainer.ac_every must be at least 1, got {self.every}")
        for key, value in (("loss_chunk", self.loss_chunk), ("mlp_chunk", self.mlp_chunk)):
            if value is not None and value <= 0:
                problems.append(f"trainer.{key} must be a positive number of tokens or null, got {value}")
        if self.offload and self.checkpointing == "none":
            problems.append(
                "trainer.offload_activations moves the inputs of recomputed blocks to host memory: "
                "set trainer.activation_checkpointing too"
            )
        return problems

    def recompute(self, layer: int) -> str:
        """What layer `layer` recomputes in backward: "block", "mixer" or "none"."""
        if self.checkpointing == "full" or (self.checkpointing == "every_n" and layer % self.every == 0):
            return "block"
        return "mixer" if self.checkpointing == "mixer" else "none"
