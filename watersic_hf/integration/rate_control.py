"""Global rate control across layers (algorithm.md §3.8).

The model has a budget of ``B = bits · P`` bits for its ``P`` quantized weights. Layers are visited
in pipeline order; each one is asked for

    target = clip((B − used) / (P_remaining − dead_weights), 0.05, 16)    bits per *live* weight

and then charged what it actually spent (``rate · a · n`` with the rate per original weight,
dead-column indices included). Every layer thus gets about the same bits per weight, and whatever a
layer saves (dead columns, a slightly low rate) flows to the layers after it, so the whole model
lands on ``bits``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RateController"]

MIN_TARGET, MAX_TARGET = 0.05, 16.0


@dataclass
class RateController:
    """Budget bookkeeping for a whole model.

    Args:
        bits (`float`): the model-wide target in bits per quantized weight.
        total_weights (`int`): ``P``, the number of weights of all layers that will be quantized.
    """

    bits: float
    total_weights: int
    used_bits: float = 0.0
    done_weights: int = 0

    def __post_init__(self) -> None:
        if self.total_weights <= 0:
            raise ValueError(f"total_weights must be positive, got {self.total_weights}")

    @property
    def budget(self) -> float:
        return self.bits * self.total_weights

    @property
    def remaining_weights(self) -> int:
        return self.total_weights - self.done_weights

    def target(self, rows: int, cols: int, dead_cols: int = 0) -> float:
        """Bits per live weight for the next ``rows × cols`` layer (``dead_cols`` dead columns)."""
        if rows * cols > self.remaining_weights:
            raise ValueError(
                f"a {rows}x{cols} layer exceeds the {self.remaining_weights} weights left"
            )
        live_remaining = self.remaining_weights - rows * dead_cols
        if live_remaining <= 0:
            return MIN_TARGET
        target = (self.budget - self.used_bits) / live_remaining
        return min(max(target, MIN_TARGET), MAX_TARGET)

    def charge(self, rate_bits: float, rows: int, cols: int) -> None:
        """Record a quantized layer: ``rate_bits`` per original weight, ``rows × cols`` weights."""
        self.used_bits += float(rate_bits) * rows * cols
        self.done_weights += rows * cols

    @property
    def achieved_bits(self) -> float:
        """Average rate over the layers charged so far."""
        return self.used_bits / self.done_weights if self.done_weights else 0.0
