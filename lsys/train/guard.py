"""Stop a diverging run before the bad step is applied or saved.

Each step's loss must be finite and stay under `spike_factor` times the median of the last
`window` steps; its gradient norm must be finite and under `max_grad_norm` (when set). Both
are the same on every rank, so every rank decides alike. After the update, the weights' norm
may grow at most `max_weight_growth` times in the step: an update that blows the weights up
(lr 1e6) can leave the loss finite, even unchanged, and would otherwise be saved as the last
good checkpoint. The engines check the loss and gradient norm before applying a step where
they can (DDP); DeepSpeed knows the gradient norm only once its step is applied, so there a
bad gradient norm stops the run before that step is saved.
"""

import math
import statistics
from collections import deque


class DivergenceError(RuntimeError):
    """The training signal left its healthy range; the step that showed it was not saved."""


class DivergenceGuard:
    def __init__(
        self, *, spike_factor: float | None, window: int, max_grad_norm: float | None, max_weight_growth: float | None
    ):
        self.spike_factor, self.max_grad_norm, self.max_weight_growth = spike_factor, max_grad_norm, max_weight_growth
        self.recent_losses: deque[float] = deque(maxlen=window)
        self.weight_norm: float | None = None

    def check_loss(self, loss: float) -> None:
        """Raise DivergenceError for a non-finite or spiking loss; remember it otherwise."""
        if not math.isfinite(loss):
            raise DivergenceError(f"non-finite loss {loss}")
        if self.spike_factor is not None and self.recent_losses:
            median = statistics.median(self.recent_losses)
            if loss > self.spike_factor * median:
                raise DivergenceError(
                    f"loss {loss:.4g} is {loss / median:.3g} times the median of the last {len(self.recent_losses)} "
                    f"steps ({median:.4g}), above trainer.spike_factor ({self.spike_factor:g})"
                )
        self.recent_losses.append(loss)

    def check_grad_norm(self, grad_norm: float) -> None:
        """Raise DivergenceError for a non-finite gradient norm or one above trainer.max_grad_norm_abort."""
        if not math.isfinite(grad_norm):
            raise DivergenceError(f"non-finite grad norm {grad_norm}")
        if self.max_grad_norm is not None and grad_norm > self.max_grad_norm:
            raise DivergenceError(
                f"grad norm {grad_norm:.4g} is above trainer.max_grad_norm_abort ({self.max_grad_norm:g})"
            )

    def check_weights(self, weight_norm: float) -> None:
        """Raise DivergenceError if the weights' norm grew too much since the last call; remember it."""
        previous, self.weight_norm = self.weight_norm, weight_norm
        if previous is None or self.max_weight_growth is None:
            return
        if not weight_norm <= self.max_weight_growth * previous:  # catches NaN too
            raise DivergenceError(
                f"the update took the weights' norm from {previous:.4g} to {weight_norm:.4g}, more than "
                f"trainer.max_weight_growth ({self.max_weight_growth:g}) times"
            )
