"""transformers integration: calibration data, decoder-block plumbing, statistics, rate control,
module replacement and the sequential calibration loop."""

from .calibrate import CalibrationResult, LayerReport, calibrate_model
from .rate_control import RateController
from .stats import MomentAccumulator, attention_importance

__all__ = [
    "CalibrationResult",
    "LayerReport",
    "MomentAccumulator",
    "RateController",
    "attention_importance",
    "calibrate_model",
]
