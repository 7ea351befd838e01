"""Checks and defaults decided before any calibration work; shared by the Python API and the CLI.

* :func:`check_architecture` refuses models WaterSIC cannot quantize (encoder-decoder models,
  GPT-2 style ``Conv1D`` blocks, no list of decoder blocks) while the model is still an empty
  skeleton, i.e. before any weight is read.
* :func:`plan_calibration` fills in the device-aware calibration size (``nsamples`` / ``seqlen``
  left at ``None``), logs the expected CPU time, and warns when the calibration set is small for
  the widest quantized layer. :func:`~watersic_hf.integration.calibrate.calibrate_model` calls it
  first; ``watersic-quantize`` uses the same defaults and estimate.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .blocks import find_decoder_blocks

logger = logging.getLogger(__name__)

__all__ = [
    "CALIBRATION_DEFAULTS",
    "MIN_TOKENS_PER_INPUT",
    "SUPPORTED_MODELS",
    "CalibrationPlan",
    "calibration_device",
    "check_architecture",
    "default_calibration_size",
    "expected_minutes",
    "plan_calibration",
]

SUPPORTED_MODELS = (
    "decoder-only causal language models whose decoder blocks hold nn.Linear layers (tested: "
    "Llama, Qwen2, Qwen3, Mistral, Phi-3, Gemma 2/3, OPT, SmolLM2)"
)

# (nsamples, seqlen) per device. GPU runs use the paper-style 128 x 2048 tokens; on a laptop-class
# CPU that takes hours even for SmolLM2-135M, so CPU uses 32 x 512 (about 27 min for SmolLM2 on
# 2 cores, see README).
CALIBRATION_DEFAULTS = {"cuda": (128, 2048), "cpu": (32, 512)}

# Below this many calibration tokens per input feature of the widest quantized layer, its n x n
# input statistics are poorly estimated and WaterSIC over-fits with the default damp of 1e-4:
# SmolLM2-135M (widest input 1536) lost perplexity badly with 8 x 256 tokens (1.3 per input) and
# was fine with 32 x 512 (10.7 per input); see docs/guide.md, "Calibration size and damping".
MIN_TOKENS_PER_INPUT = 10

# CPU time model, measured on the project's 2-core CPU host while other jobs ran (load ~8,
# OMP_NUM_THREADS=1): one SmolLM2-135M block (3.5M weights) took 19.7 s / 31 s / 47.5 s at
# 4k / 8k / 16k calibration tokens, i.e. about 10.5 s + 2.25 s per 1k tokens (statistics and block
# forwards grow with the tokens). Other models are scaled by their parameter count.
SMOLLM2_PARAMS, SMOLLM2_BLOCKS = 134.5e6, 30
SMOLLM2_BLOCK_FIXED_S, SMOLLM2_BLOCK_PER_KTOK_S = 10.5, 2.25
# calibration time with the adaptive (eps_q, eps_a) search over time without it (SmolLM2-135M,
# 64 x 512 tokens: 1.50, 1.61 and 1.59 at 2, 3 and 4 bits; docs/benchmarks.md "ablation")
ADAPTIVE_EPS_TIME_FACTOR = 1.55


def calibration_device(device: str | torch.device | None) -> str:
    """The calibration compute device: ``device``, or ``"cuda"`` when available, else ``"cpu"``."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def default_calibration_size(device: str) -> tuple[int, int]:
    """``(nsamples, seqlen)`` used when the user sets neither, for the calibration ``device``."""
    return CALIBRATION_DEFAULTS["cuda" if str(device).startswith("cuda") else "cpu"]


def expected_minutes(n_params: int, nsamples: int, seqlen: int, device: str) -> float | None:
    """Rough minutes of a calibration on the CPU (``None`` on other devices: not measured yet)."""
    if device != "cpu":
        return None
    block_seconds = SMOLLM2_BLOCK_FIXED_S + SMOLLM2_BLOCK_PER_KTOK_S * nsamples * seqlen / 1000
    return SMOLLM2_BLOCKS * block_seconds * (n_params / SMOLLM2_PARAMS) / 60


def check_architecture(model: nn.Module) -> None:
    """Refuse models WaterSIC does not support; cheap, works on a meta-device skeleton.

    Raises:
        ValueError: an encoder-decoder model, or no decoder blocks holding ``nn.Linear`` (see
            :func:`~watersic_hf.integration.blocks.find_decoder_blocks`); the message says what is
            supported.
    """
    config = getattr(model, "config", None)
    name = type(model).__name__
    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"WaterSIC does not support encoder-decoder models such as {name} (model_type "
            f"{model_type!r}): it quantizes {SUPPORTED_MODELS}. Nothing was loaded or quantized; "
            "load this model without quantization_config"
        )
    try:
        find_decoder_blocks(model)
    except ValueError as err:
        raise ValueError(
            f"WaterSIC cannot quantize {name} (model_type {model_type!r}): {err}. Supported: "
            f"{SUPPORTED_MODELS}. Nothing was loaded or quantized"
        ) from err


@dataclass
class CalibrationPlan:
    """What :func:`plan_calibration` decided.

    Attributes:
        device (`str`): calibration compute device.
        nsamples (`int`), seqlen (`int`): calibration windows and tokens per window.
        tokens (`int`): calibration tokens at most (fewer when the data runs out).
        widest_layer (`str`), widest_inputs (`int`): the quantized Linear with the most inputs.
        minutes (`float` or `None`): expected calibration time (CPU only).
    """

    device: str
    nsamples: int
    seqlen: int
    tokens: int
    widest_layer: str
    widest_inputs: int
    minutes: float | None


def _token_id_lengths(dataset: Any) -> list[int] | None:
    """Lengths of the samples when ``dataset`` is token ids (``None`` for texts or paths)."""
    from .data import _as_ids

    if dataset is None or isinstance(dataset, str) or not isinstance(
        dataset, (Sequence, torch.Tensor)
    ):
        return None
    if isinstance(dataset, torch.Tensor):
        return [dataset.shape[-1]] * (dataset.shape[0] if dataset.dim() == 2 else 1)
    if len(dataset) == 0 or all(isinstance(d, str) for d in dataset):
        return None
    try:
        ids = [_as_ids(d) for d in dataset]
    except (TypeError, ValueError):
        return None  # calibration reports bad samples with its own message
    return None if any(i is None for i in ids) else [i.numel() for i in ids]


def plan_calibration(
    model: nn.Module, config: Any, skip: Sequence[str] = ()
) -> CalibrationPlan:
    """Resolve the calibration size, log the time estimate, warn about a small calibration set.

    ``config.nsamples`` / ``config.seqlen`` left at ``None`` are set to the device's defaults
    (:data:`CALIBRATION_DEFAULTS`), so that config.json records what calibration used.

    Args:
        model (`PreTrainedModel`): the float model about to be calibrated.
        config (`WaterSICConfig`): its quantization config (modified in place, see above).
        skip (`Sequence[str]`): modules kept in float (``modules_to_not_convert``).
    """
    from .replace import quantizable_linears

    device = calibration_device(config.device)
    default_n, default_len = default_calibration_size(device)
    if config.nsamples is None:
        config.nsamples = default_n
    if config.seqlen is None:
        config.seqlen = default_len
    lengths = _token_id_lengths(config.dataset)
    if lengths is not None:
        tokens = sum(min(n, config.seqlen) for n in lengths[: config.nsamples])
    else:
        tokens = config.nsamples * config.seqlen

    prefix, blocks = find_decoder_blocks(model)
    widest_layer, widest = "", 0
    for i, block in enumerate(blocks):
        for name, linear in quantizable_linears(block, f"{prefix}.{i}", list(skip)).items():
            if linear.in_features > widest:
                widest_layer, widest = f"{prefix}.{i}.{name}", linear.in_features
    n_params = sum(p.numel() for p in model.parameters())
    uses_data = config.method != "rtn"
    minutes = expected_minutes(n_params, config.nsamples, config.seqlen, device)
    if minutes is not None and config.adaptive_eps_on:
        minutes *= ADAPTIVE_EPS_TIME_FACTOR
    plan = CalibrationPlan(
        device, config.nsamples, config.seqlen, tokens, widest_layer, widest, minutes
    )
    if not uses_data:
        return plan  # round-to-nearest reads no calibration data and takes seconds

    if minutes is not None:
        logger.log(
            logging.WARNING if minutes >= 1 else logging.INFO,
            "WaterSIC: calibrating %s (%.1fM parameters) on the CPU with %d x %d tokens; expect "
            "roughly %.1f min (scaled from SmolLM2-135M on 2 CPU cores; longer when other jobs "
            "share the CPU). Lower nsamples/seqlen to trade quality for time, or calibrate on a "
            "GPU (device='cuda')",
            type(model).__name__,
            n_params / 1e6,
            config.nsamples,
            config.seqlen,
            max(minutes, 0.1),
        )
    else:
        logger.info(
            "WaterSIC: calibrating on %s with %d x %d tokens",
            device,
            config.nsamples,
            config.seqlen,
        )
    if widest and tokens < MIN_TOKENS_PER_INPUT * widest:
        logger.warning(
            "WaterSIC: the calibration set has %d tokens, fewer than %d x the %d inputs of the "
            "widest quantized layer (%s): its input statistics are poorly estimated and the "
            "quantizer over-fits them. Use at least %d tokens (nsamples x seqlen)%s",
            tokens,
            MIN_TOKENS_PER_INPUT,
            widest,
            widest_layer,
            MIN_TOKENS_PER_INPUT * widest,
            "; automatic damping (damp=None) limits the damage" if config.auto_damp
            else f" or leave damp=None for automatic damping (now damp={config.effective_damp:g})",
        )
    return plan
