"""Observers of the calibration: rate control, per-layer reports, progress.

The group quantizer announces every quantized Linear as a :class:`LayerDone` event; observers
turn the events into a budget (:class:`RateControl`), reports and log lines
(:class:`ReportCollector`) and a progress bar (:class:`ProgressBar`). Rate control is also asked
for each layer's target before it is quantized; that is its only influence on the maths.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Protocol

from ...algorithm.search import max_live_rate_bits
from ..rate_control import RateController

logger = logging.getLogger("watersic_hf.integration.calibrate")

__all__ = ["CalibrationObserver", "LayerDone", "LayerReport", "ProgressBar", "RateControl",
           "ReportCollector"]


@dataclass
class LayerReport:
    """What happened to one Linear (also written into ``WaterSICConfig.layers``)."""

    name: str
    rows: int
    cols: int
    bits: float
    target_bits: float
    dead_columns: int
    rel_err: float
    seconds: float
    #: the relative damping used (None for RTN, which has none)
    damp: float | None = None
    #: output error on held-out calibration windows (automatic damping), else None
    heldout_rel_err: float | None = None


@dataclass
class LayerDone:
    """One Linear was quantized: its report and the quantized weight."""

    report: LayerReport
    quantized: Any


class CalibrationObserver(Protocol):
    """Receives calibration events."""

    def on_layer(self, event: LayerDone) -> None:
        """A Linear was quantized (final, not a search trial)."""

    def on_block(self, index: int) -> None:
        """Block ``index`` is finished."""


class RateControl:
    """The model-wide bit budget (algorithm.md §3.8) as an observer.

    Args:
        bits (`float`): the model-wide target in bits per weight.
        total_weights (`int`): weights of all Linears that will be quantized.
        enabled (`bool`): when False every layer gets ``bits`` per original weight.
    """

    def __init__(self, bits: float, total_weights: int, enabled: bool = True) -> None:
        self.controller = RateController(bits, total_weights)
        self.enabled = enabled
        self.bits = bits

    def target(self, rows: int, cols: int, dead_cols: int) -> tuple[float, str]:
        """``(bits, target)`` for the next ``rows × cols`` layer with ``dead_cols`` dead columns."""
        if not self.enabled:
            return self.bits, "original"
        # No more than the layer's codes can carry (algorithm.search.max_live_rate_bits).
        return min(self.controller.target(rows, cols, dead_cols),
                   max_live_rate_bits(rows, cols - dead_cols)), "live"

    def charge(self, rate_bits: float, rows: int, cols: int) -> None:
        self.controller.charge(rate_bits, rows, cols)

    def trial(self) -> RateControl:
        """An independent copy for search trials (charging it leaves this one untouched)."""
        return copy.deepcopy(self)

    @property
    def achieved_bits(self) -> float:
        return self.controller.achieved_bits

    def on_layer(self, event: LayerDone) -> None:
        r = event.report
        self.charge(r.bits, r.rows, r.cols)

    def on_block(self, index: int) -> None:
        return None


class ReportCollector:
    """Keeps the :class:`LayerReport` of every Linear and logs one line per Linear."""

    def __init__(self) -> None:
        self.reports: list[LayerReport] = []

    def on_layer(self, event: LayerDone) -> None:
        r = event.report
        self.reports.append(r)
        held = ("" if r.heldout_rel_err is None
                else f" (held-out {r.heldout_rel_err:.4g} at damp {r.damp:.3g})")
        logger.info(
            "%s: %.3f bits (target %.3f), %d dead columns, relative output error %.4g%s, %.1fs",
            r.name, r.bits, r.target_bits, r.dead_columns, r.rel_err, held, r.seconds,
        )

    def on_block(self, index: int) -> None:
        return None


class ProgressBar:
    """A tqdm bar over blocks showing the rate spent so far."""

    def __init__(self, total: int, desc: str, rate: RateControl, *,
                 disable: bool = False) -> None:
        from tqdm.auto import tqdm

        self.rate = rate
        self.bar = tqdm(total=total, desc=desc, unit="block", disable=disable)

    def on_layer(self, event: LayerDone) -> None:
        return None

    def on_block(self, index: int) -> None:
        self.bar.set_postfix(bits=f"{self.rate.achieved_bits:.3f}")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
