"""Stop a diverging run before the bad step is applied or saved.

The engine refuses a non-finite loss or gradient norm itself. Besides, before a step is
applied, its loss (the same on every rank, as is the grad norm, so every rank decides alike)
must stay under `spike_factor` times the median of the last `window` steps and the grad norm
under `max_grad_norm` (when set). After it is applied, the weights' norm may grow at most
`max_weight_growth` times in the step: an update that blows the weights up (lr 1e6) can leave
the loss finite, even unchanged, and would otherwise be saved as the last good checkpoint.
"""

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

    def check_step(self, loss: float, grad_norm: float) -> None:
        """Raise DivergenceError unless this step (finite, as the engine checked) may be applied; then remember its loss."""
        if self.max_grad_norm is not None and grad_norm > self.max_grad_norm:
            raise DivergenceError(
                f"grad norm {grad_norm:.4g} is above trainer.max_grad_norm_abort ({self.max_grad_norm:g})"
            )
        if self.spike_factor is not None and self.recent_losses:
            median = statistics.median(self.recent_losses)
            if loss > self.spike_factor * median:
                raise DivergenceError(
                    f"loss {loss:.4g} is {loss / median:.3g} times the median of the last {len(self.recent_losses)} "
                    f"steps ({median:.4g}), above trainer.spike_factor ({self.spike_factor:g})"
                )
        self.recent_losses.append(loss)

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
