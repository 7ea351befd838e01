"""The staged calibration engine (see docs/guide.md, "Calibration engine").

* :mod:`.context` — per-block context and the group plan;
* :mod:`.runner` — the paired float/quantized forward passes, with cached Linear outputs;
* :mod:`.policy` — statistics policies (fixed mix, adaptive ε) over fp64 moment sums;
* :mod:`.group_quantizer` — one validation and Cholesky per group, then each Linear;
* :mod:`.observers` — rate control, reports and progress as observers;
* :mod:`.executor` — where blocks run (single device today).
"""

from .context import BlockContext, BlockPlan, GroupStep, LayerStats, make_plan
from .executor import Executor, SingleDeviceExecutor
from .group_quantizer import GroupQuantizer, relative_output_error
from .observers import LayerDone, LayerReport, ProgressBar, RateControl, ReportCollector
from .policy import AdaptiveEpsPolicy, FixedMixPolicy, StatisticsPolicy, golden_section, make_policy
from .runner import PairedBatch, PairedRunner, probed_attention

__all__ = [
    "AdaptiveEpsPolicy",
    "BlockContext",
    "BlockPlan",
    "Executor",
    "FixedMixPolicy",
    "GroupQuantizer",
    "GroupStep",
    "LayerDone",
    "LayerReport",
    "LayerStats",
    "PairedBatch",
    "PairedRunner",
    "ProgressBar",
    "RateControl",
    "ReportCollector",
    "SingleDeviceExecutor",
    "StatisticsPolicy",
    "golden_section",
    "make_plan",
    "make_policy",
    "probed_attention",
    "relative_output_error",
]
