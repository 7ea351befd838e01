"""`WaterSICConfig`: the quantization config that transformers stores in ``config.json``.

The same object drives both directions:

* **quantize on load** — ``from_pretrained(path, quantization_config=WaterSICConfig(bits=3))``
calibrates
  the float model (see :mod:`watersic_hf.integration.calibrate`) and fills in ``layers``,
  ``achieved_bits`` and the other result fields;
* **load a saved checkpoint** — transformers rebuilds the config from ``config.json`` with
  ``WaterSICConfig.from_dict(d)``; ``layers`` then tells the quantizer which modules to replace and
  which tensor shapes to expect.

``to_dict()`` is plain JSON: the calibration ``dataset`` and ``tokenizer`` are runtime-only and are
kept only when they are strings (a dataset name or path, a tokenizer path).
"""

from __future__ import annotations

import copy
import difflib
import inspect
import logging
import math
import os
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from ._version import __version__

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
"""Version of the checkpoint layout described by ``layers``; bumped on incompatible changes."""

QUANT_METHOD = "watersic"
METHODS = ("watersic", "gptq", "gptq_entropy", "rtn")
STORAGES = ("entropy", "packed")
MIN_BITS, MAX_BITS = 0.25, 16.0
# WaterSIC's damping is automatic by default (WaterSICConfig.auto_damp); its entry here is only
# the fallback when no calibration batch can be held out.
DEFAULT_DAMP = {"watersic": 0.01, "gptq": 0.01, "gptq_entropy": 0.01, "rtn": 0.0}
# adaptive_eps=None turns the (eps_q, eps_a) search on below this rate: on SmolLM2-135M it lowered
# perplexity by 5.9% at 2 bits and changed it by under 0.3% at 3 and 4 bits, for 1.5x the time
# (docs/benchmarks.md, "ablation" sections).
ADAPTIVE_EPS_BELOW_BITS = 2.5
GPTQ_BITS = (2, 8)
"""Whole-number code widths standard GPTQ (``method="gptq"``) accepts."""

# Fields that hold live Python objects during calibration and never reach config.json as such.
_RUNTIME_FIELDS = ("dataset", "tokenizer")
# Fields filled in by calibration or saving (listed in config.json, not user options).
_RESULT_FIELDS = (
    "layers",
    "achieved_bits",
    "calibration_tokens",
    "calibration_data",
    "format_version",
    "watersic_version",
    "report",
    "checksums",
    "finetune_report",
    "quant_method",
)

# How a run is executed, not what it produces: never written to config.json, so that a resumed
# run saves the same checkpoint as an uninterrupted one.
_RUN_OPTIONS = ("resume", "work_dir")

__all__ = ["FORMAT_VERSION", "QUANT_METHOD", "WaterSICConfig"]


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"WaterSICConfig.{name} must be True or False, got {value!r}")
    return value


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"WaterSICConfig.{name} must be an int, got {value!r} ({type(value).__name__})"
        )
    if value < minimum:
        raise ValueError(f"WaterSICConfig.{name} must be >= {minimum}, got {value}")
    return value


def _check_float(
    name: str, value: Any, low: float, high: float, *, open_low: bool = False
) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"WaterSICConfig.{name} must be a number, got {value!r} ({type(value).__name__})"
        )
    value = float(value)
    bad_low = value <= low if open_low else value < low
    if not math.isfinite(value) or bad_low or value > high:
        bracket = "(" if open_low else "["
        raise ValueError(f"WaterSICConfig.{name} must lie in {bracket}{low}, {high}], got {value}")
    return value


def _init_parameters() -> tuple[str, ...]:
    """Keyword arguments ``WaterSICConfig(...)`` accepts (``quant_method`` included)."""
    params = inspect.signature(WaterSICConfig.__init__).parameters
    names = [n for n, p in params.items() if n != "self" and p.kind is p.POSITIONAL_OR_KEYWORD]
    return (*names, "quant_method")


def _unexpected_keywords_message(kwargs: dict[str, Any]) -> str:
    """``TypeError`` text for unknown keyword arguments, with a did-you-mean per key."""
    known = _init_parameters()
    parts, guessed = [], 0
    for key in sorted(kwargs):
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        guessed += bool(close)
        parts.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
    noun = "argument" if len(kwargs) == 1 else "arguments"
    message = f"WaterSICConfig got unexpected keyword {noun} {', '.join(parts)}"
    if guessed < len(kwargs):
        options = [n for n in known if n not in _RESULT_FIELDS]
        message += f"; the options are: {', '.join(options)}"
    return message


class WaterSICConfig(QuantizationConfigMixin):
    """Configuration of WaterSIC quantization (``quant_method="watersic"``).

    ``WaterSICConfig(bits=3)`` alone is enough: calibration then uses the shipped corpus
    (:func:`watersic_hf.assets.default_calibration_texts`) and the model's own tokenizer.

    Args:
        bits (`float`, *optional*, defaults to 3.0):
            Target rate in bits per quantized weight, averaged over all quantized layers, with the
            paper's accounting (pooled entropy of the integer codes plus 16 bits per row and per
            column scale and per dead column). Fractional values are fine. Must lie in [0.25, 16].
        dataset (`str`, `list[str]`, `list[list[int]]` or `list[torch.Tensor]`, *optional*):
            Calibration data: a list of texts, a list of token-id sequences (each used as one
            sample, truncated to ``seqlen``), a path to a ``.txt`` file or to a folder of ``.txt``
            files, or the name ``"wikitext2"`` / ``"c4"`` (needs ``pip install
            'watersic-hf[datasets]'`` and the network). ``None`` uses the shipped State-of-the-Union
            corpus (1934-1999). Never written to ``config.json`` unless it is a string.
        tokenizer (`PreTrainedTokenizerBase` or `str`, *optional*):
            Tokenizer object or path for text datasets. ``None`` loads the tokenizer from the
            model's own folder (``model.config._name_or_path``). The tokenizer used for
            calibration is saved with the quantized model by ``save_pretrained`` /
            ``push_to_hub``.
        nsamples (`int`, *optional*):
            Number of calibration windows. ``None`` picks by calibration device: 128 on CUDA, 32
            on the CPU (where 128 x 2048 tokens would take hours); the value used is stored here.
        seqlen (`int`, *optional*):
            Tokens per calibration window; texts are concatenated and cut into windows this long.
            ``None`` picks by device: 2048 on CUDA, 512 on the CPU. Before calibrating, the CPU
            time estimate is logged, and a warning when ``nsamples x seqlen`` is below 10x the
            input width of the widest quantized layer (see
            :mod:`watersic_hf.integration.plan`).
        modules_to_not_convert (`list[str]`, *optional*):
            Extra module names (prefix, suffix or regex, as transformers matches them) to keep in
            float. Tied embeddings and ``lm_head`` are always kept.
        method (`str`, *optional*, defaults to `"watersic"`):
            ``"watersic"``, or a baseline run through the same pipeline:

            * ``"gptq"``: standard GPTQ as AutoGPTQ / GPTQModel ship it (``sym=True``): ``bits``-bit
              signed codes (``bits`` a whole number in [2, 8]) on a fixed grid, one fp16 scale per
              ``gptq_group_size`` input columns and row, optional act-order. Its rate is fixed
              (``bits`` per code plus 16 bits per stored scale); the rate controller's per-layer
              targets are ignored and that fixed rate is what it is charged, so
              ``achieved_bits`` is above ``bits`` by the scale overhead (about 0.13 at g128).
              Grouped layers run a plain-torch forward (no fused kernels) and are not served by
              the vLLM plugin; per-channel layers (``gptq_group_size=0``) keep the fused kernels.
            * ``"gptq_entropy"``: entropy-coded single-step GPTQ (one common step, no grid, no
              clipping) with the same rate accounting as WaterSIC (pooled entropy), so that rates
              are directly comparable. Checkpoints written before the rename say ``"gptq"``:
              ``method`` is informational when a checkpoint loads, so they load unchanged.
            * ``"rtn"``: entropy-coded round-to-nearest with a per-row step.
        gptq_group_size (`int`, *optional*, defaults to 128):
            Input columns per scale for ``method="gptq"``; ``0`` or ``-1`` for one scale per
            output channel (a group size of at least the layer's in-features is per-channel too).
            Ignored by the other methods.
        gptq_act_order (`bool`, *optional*, defaults to `False`):
            ``desc_act`` for ``method="gptq"``: quantize the columns in order of decreasing input
            second moment. Group scales then come from the original weights before the loop
            (AutoGPTQ's ``static_groups``), so column ``j`` keeps group ``j // gptq_group_size``
            and dequantization needs no ``g_idx``. Ignored by the other methods.
        damp (`float`, *optional*):
            Relative damping of the second-moment matrix (fraction of its mean diagonal). ``None``
            (the default) means **automatic damping** for WaterSIC: a share ``holdout_fraction``
            of the calibration windows is held out, and each group of Linears gets the damping
            (from 1e-5 to 10, a decade grid refined by half decades) whose quantized weights have
            the smallest output error on the held-out windows; the group is then quantized from
            all windows. The held-out error of each layer is written to ``config.json``
            (``layers[name]["heldout_rel_err"]``, next to the in-sample ``rel_err`` and the
            chosen ``damp``). A given value turns this off and is used everywhere. For both GPTQs
            ``None`` means 0.01 (the textbook value); RTN has no damping.
        holdout_fraction (`float`, *optional*, defaults to 0.25):
            Share of the calibration batches held out by automatic damping (evenly spread; at
            least one batch, and one is always kept). In (0, 0.5].
        lmmse (`bool`, *optional*, defaults to `True`):
            Per-column LMMSE gains inside the successive-rounding loop (WaterSIC only).
        rescale (`bool`, *optional*, defaults to `True`):
            Fit the diagonal row/column rescalers after rounding (WaterSIC only).
        drift (`bool`, *optional*, defaults to `True`):
            Qronos-style drift correction: target the float model's output ``W x`` while the layer
            receives the partially quantized model's input ``x̂`` (statistics Σ_X, Σ_X̂, Σ_XX̂).
            Needs a float copy of one block at a time and one extra forward of it. When off, only
            the quantized path's Σ_X̂ is used.
        residual_compensation (`bool`, *optional*, defaults to `True`):
            For the two layers that write into the residual stream (``o_proj``/``down_proj`` style),
            also correct the residual error ``r − r̂`` already present (statistic Σ_ΔR). Used only
            when the block is a plain pre-norm residual block (checked numerically; off for e.g.
            Gemma2's post-norms).
        attention_weighted (`bool`, *optional*, defaults to `True`):
            Weight each token's contribution to the statistics of the attention-input layers (q/k/v)
            by the attention it receives in the float model, mixed as ``(1 − attn_eps)·Σ^w +
            attn_eps·Σ``. Costs an explicit attention-probability computation (memory ``batch ·
            heads · seqlen²``) in the float pass.
        attn_eps (`float`, *optional*, defaults to 0.01):
            Mixing weight of the unweighted statistics in the attention-weighted ones, in [0, 1].
        adaptive_eps (`bool`, *optional*):
            Choose the drift blend ε_q and the attention-weight blend ε_a per block by
            golden-section search on the relative error of the attention output, measured on the
            held-out calibration batches (``holdout_fraction``; all batches when none can be held
            out). Each evaluation quantizes q, k and v without rescalers (the chosen point is then
            quantized with them) and re-runs the attention of the block on the held-out batches:
            at most ``2·adaptive_eps_steps + 9`` evaluations per block (19 with the default).
            With automatic damping the damping is chosen first, at the fixed mix. ``None`` (the
            default) turns it on below ``ADAPTIVE_EPS_BELOW_BITS`` = 2.5 bits, where it was
            measured to pay for its ~1.5× calibration time (the ``ablation`` sections of
            docs/benchmarks.md); :attr:`adaptive_eps_on` is the resolved choice.
        adaptive_eps_steps (`int`, *optional*, defaults to 5):
            Golden-section steps for each of ε_q and ε_a when ``adaptive_eps`` is on.
        rate_control (`bool`, *optional*, defaults to `True`):
            Global rate control: each layer gets the bits left in the model budget divided by the
            weights left, so the whole model hits ``bits`` and savings (dead columns, rounding) flow
            to later layers. When off, every layer targets ``bits`` on its own.
        dead_threshold (`float`, *optional*, defaults to 1e-3):
            An input feature whose second moment is below this fraction of the median is "dead": its
            weight column is dropped (stored as zeros). In [0, 0.5].
        device (`str`, *optional*):
            Compute device for calibration. ``None`` picks ``"cuda"`` when available, else
            ``"cpu"``. The float model stays where it was loaded (CPU by default); one block at a
            time moves here.
        seed (`int`, *optional*, defaults to 0):
            Seed for the choice of calibration windows and for the algorithm's row subsampling.
        batch_size (`int`, *optional*, defaults to 1):
            Calibration windows per block forward. Speed/memory only; results do not depend on it
            beyond floating-point rounding.
        storage (`str`, *optional*, defaults to `"entropy"`):
            On-disk format of the codes: ``"entropy"`` (entropy-coded stream) or ``"packed"`` (the
            fixed-width in-memory packing).
        backend (`str`, *optional*):
            Forward kernel for :class:`watersic_hf.nn.WaterSICLinear` (``"torch"``, ``"triton"`` or
            ``"cpu"``); ``None`` lets the module choose per device (Triton on CUDA, the numba
            kernels on CPU).
        resume (`bool`, *optional*, defaults to `False`):
            Persist every finished block to ``work_dir`` (atomically, with a manifest) and, when
            the folder already holds blocks of the same model, data and settings, continue after
            the last finished one. The checkpoint is the same as that of an uninterrupted run. The
            folder is removed when calibration completes. Not written to ``config.json``.
        work_dir (`str`, *optional*):
            Folder for ``resume``; defaults to ``$WATERSIC_CACHE/resume/<fingerprint>``
            (``~/.cache/watersic_hf/...``), keyed by the model, the calibration data and the
            settings.
        finetune (`bool`, *optional*, defaults to `False`):
            WaterSIC-FT (algorithm.md §3.10): after calibration, fine-tune the fp16 per-row and
            per-column scales of every quantized layer to minimise the token KL divergence from
            the float model on the calibration windows (AdamW, weight decay 0, gradient clip 1.0,
            cosine decay to ``finetune_lr / 100``). The integer codes, hence the rate, do not
            change. The teacher is the float output of the last block, kept by the calibration
            (so ``method`` must be ``"watersic"``). To fine-tune a saved checkpoint use
            :func:`watersic_hf.finetune_scales` with the float model as teacher.
        finetune_steps (`int`, *optional*):
            Optimiser steps. ``None`` picks by device: 10 epochs over the calibration windows on
            CUDA (the paper's schedule), 2 on the CPU (one epoch over 32 x 512 tokens of a 135M
            model already takes minutes there); the value used is stored here.
        finetune_lr (`float`, *optional*, defaults to 5e-4):
            Peak learning rate (the paper's; it used 5e-5 for 70B models). In (0, 1].
        finetune_batch_size (`int`, *optional*, defaults to 8):
            Calibration windows per optimiser step (the paper's 8); gradients are accumulated one
            window at a time, so memory does not grow with it.

    Result fields (filled in by calibration, stored in ``config.json``; do not set them by hand):
        layers (`dict[str, dict]`): per replaced module ``{"in", "out", "bias", "layout", "bits",
            ...}``; what the loader needs to rebuild the skeleton, plus per-layer statistics.
        achieved_bits (`float`): the rate actually reached, over all quantized weights.
        calibration_tokens (`int`): number of calibration tokens used.
        calibration_data (`str`): what the calibration set was, in words (for the model card).
        format_version (`int`): checkpoint layout version (:data:`FORMAT_VERSION`).
        watersic_version (`str`): version of watersic_hf that wrote the checkpoint.
        report (`dict`): rate summary written at save time (:func:`watersic_hf.report` without
            ``layers``): entropy, on-disk, in-memory and accounted bits per weight.
        checksums (`dict`): ``{"algorithm": "xxh3_64", "tensors": {name: digest}}`` of every
            tensor in the saved files (format version 2), verified when the checkpoint loads.
        finetune_report (`dict`): with ``finetune``, the KL before and after, steps, epochs,
            windows, tokens and seconds (:class:`watersic_hf.integration.finetune.FinetuneReport`).
    """

    def __init__(
        self,
        bits: float = 3.0,
        dataset: Any = None,
        tokenizer: Any = None,
        nsamples: int | None = None,
        seqlen: int | None = None,
        modules_to_not_convert: list[str] | None = None,
        method: str = "watersic",
        gptq_group_size: int = 128,
        gptq_act_order: bool = False,
        damp: float | None = None,
        holdout_fraction: float = 0.25,
        lmmse: bool = True,
        rescale: bool = True,
        drift: bool = True,
        residual_compensation: bool = True,
        attention_weighted: bool = True,
        attn_eps: float = 0.01,
        adaptive_eps: bool | None = None,
        adaptive_eps_steps: int = 5,
        rate_control: bool = True,
        dead_threshold: float = 1e-3,
        device: str | None = None,
        seed: int = 0,
        batch_size: int = 1,
        storage: str = "entropy",
        backend: str | None = None,
        resume: bool = False,
        work_dir: str | None = None,
        finetune: bool = False,
        finetune_steps: int | None = None,
        finetune_lr: float = 5e-4,
        finetune_batch_size: int = 8,
        layers: dict[str, dict[str, Any]] | None = None,
        achieved_bits: float | None = None,
        calibration_tokens: int | None = None,
        calibration_data: str | None = None,
        format_version: int = FORMAT_VERSION,
        watersic_version: str | None = None,
        report: dict[str, Any] | None = None,
        checksums: dict[str, Any] | None = None,
        finetune_report: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD
        method_key = kwargs.pop("quant_method", QUANT_METHOD)
        if str(method_key) != QUANT_METHOD:
            raise ValueError(
                f"WaterSICConfig got quant_method={method_key!r}; it only describes 'watersic'"
            )
        self.bits = bits
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.nsamples = nsamples
        self.seqlen = seqlen
        self.modules_to_not_convert = modules_to_not_convert
        self.method = method
        self.gptq_group_size = gptq_group_size
        self.gptq_act_order = gptq_act_order
        self.damp = damp
        self.holdout_fraction = holdout_fraction
        self.lmmse = lmmse
        self.rescale = rescale
        self.drift = drift
        self.residual_compensation = residual_compensation
        self.attention_weighted = attention_weighted
        self.attn_eps = attn_eps
        self.adaptive_eps = adaptive_eps
        self.adaptive_eps_steps = adaptive_eps_steps
        self.rate_control = rate_control
        self.dead_threshold = dead_threshold
        self.device = device
        self.seed = seed
        self.batch_size = batch_size
        self.storage = storage
        self.backend = backend
        self.resume = resume
        self.work_dir = work_dir
        self.finetune = finetune
        self.finetune_steps = finetune_steps
        self.finetune_lr = finetune_lr
        self.finetune_batch_size = finetune_batch_size
        self.layers = dict(layers) if layers else {}
        self.achieved_bits = achieved_bits
        self.calibration_tokens = calibration_tokens
        self.calibration_data = calibration_data
        self.format_version = format_version
        self.watersic_version = watersic_version
        self.report = dict(report) if report else None
        self.checksums = dict(checksums) if checksums else None
        self.finetune_report = dict(finetune_report) if finetune_report else None
        if kwargs:
            # A typo must not silently fall back to a default (``bit=2`` quantizing at 3 bits).
            # Keys from a saved config.json that this version does not know go through from_dict.
            raise TypeError(_unexpected_keywords_message(kwargs))
        # Keys of a saved config written by a newer watersic_hf (set by from_dict): kept so that a
        # re-save does not drop them.
        self._unknown: dict[str, Any] = {}
        self.post_init()

    @classmethod
    def from_dict(
        cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any
    ) -> WaterSICConfig | tuple[WaterSICConfig, dict[str, Any]]:
        """Build the config from a dict, e.g. ``config.json["quantization_config"]``.

        Unlike the constructor, keys this version does not know are accepted (forward
        compatibility: a checkpoint written by a newer watersic_hf still loads): they are logged as
        a warning and kept, so that ``to_dict()`` writes them back. ``kwargs`` that name an
        attribute override it, as in transformers' ``QuantizationConfigMixin.from_dict``.
        """
        known = _init_parameters()
        data = dict(config_dict)
        unknown = {key: data.pop(key) for key in list(data) if key not in known}
        config = cls(**data)
        if unknown:
            logger.warning(
                "WaterSICConfig: ignoring unknown keys %s (written by a newer watersic_hf?); "
                "upgrade with `pip install -U watersic-hf` if loading misbehaves",
                sorted(unknown),
            )
            config._unknown = unknown
        unused = {}
        for key, value in kwargs.items():
            if hasattr(config, key):
                setattr(config, key, value)
            else:
                unused[key] = value
        return (config, unused) if return_unused_kwargs else config

    # ------------------------------------------------------------------ validation
    def post_init(self) -> None:
        """Check every field; raise `TypeError` / `ValueError` naming the bad value and the fix."""
        if isinstance(self.format_version, bool) or not isinstance(self.format_version, int):
            raise TypeError(
                f"WaterSICConfig.format_version must be an int, got {self.format_version!r}"
            )
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"this checkpoint uses WaterSIC format_version {self.format_version}, but the "
                f"installed watersic_hf {__version__} reads format_version <= {FORMAT_VERSION}; "
                "upgrade it with `pip install -U watersic-hf`"
            )
        self.bits = _check_float("bits", self.bits, MIN_BITS, MAX_BITS)
        if self.method not in METHODS:
            raise ValueError(f"WaterSICConfig.method must be one of {METHODS}, got {self.method!r}")
        if isinstance(self.gptq_group_size, bool) or not isinstance(self.gptq_group_size, int) \
                or self.gptq_group_size < -1:
            raise ValueError(
                f"WaterSICConfig.gptq_group_size must be a positive int (e.g. 128) or 0 / -1 for "
                f"per-channel scales, got {self.gptq_group_size!r}")
        _check_bool("gptq_act_order", self.gptq_act_order)
        # A saved checkpoint (layers filled in) is never re-quantized: its method and bits are
        # informational, and checkpoints from before the "gptq" -> "gptq_entropy" rename say
        # method="gptq" with fractional bits. Only a config that will quantize is checked.
        if self.method == "gptq" and not self.layers:
            low, high = GPTQ_BITS
            if not float(self.bits).is_integer() or not low <= self.bits <= high:
                raise ValueError(
                    f"WaterSICConfig.bits={self.bits:g} with method='gptq': standard GPTQ uses a "
                    f"fixed-width integer grid and needs a whole number of bits in [{low}, "
                    f"{high}]; pass e.g. bits=4, or method='gptq_entropy' for fractional rates")
        if self.storage not in STORAGES:
            raise ValueError(
                f"WaterSICConfig.storage must be one of {STORAGES}, got {self.storage!r}"
            )
        # None: chosen by the calibration device when calibration starts (see
        # watersic_hf.integration.plan.CALIBRATION_DEFAULTS) and then stored here.
        if self.nsamples is not None:
            self.nsamples = _check_int("nsamples", self.nsamples, 1)
        if self.seqlen is not None:
            self.seqlen = _check_int("seqlen", self.seqlen, 2)
        self.batch_size = _check_int("batch_size", self.batch_size, 1)
        self.seed = _check_int("seed", self.seed, 0)
        self.adaptive_eps_steps = _check_int("adaptive_eps_steps", self.adaptive_eps_steps, 0)
        for name in (
            "lmmse",
            "rescale",
            "drift",
            "residual_compensation",
            "attention_weighted",
            "rate_control",
            "resume",
            "finetune",
        ):
            _check_bool(name, getattr(self, name))
        if self.adaptive_eps is not None and not isinstance(self.adaptive_eps, bool):
            raise TypeError(
                f"WaterSICConfig.adaptive_eps must be True, False or None (None: on below "
                f"{ADAPTIVE_EPS_BELOW_BITS:g} bits), got {self.adaptive_eps!r}"
            )
        if self.finetune_steps is not None:
            self.finetune_steps = _check_int("finetune_steps", self.finetune_steps, 1)
        self.finetune_lr = _check_float("finetune_lr", self.finetune_lr, 0.0, 1.0, open_low=True)
        self.finetune_batch_size = _check_int("finetune_batch_size", self.finetune_batch_size, 1)
        if self.finetune and self.method != "watersic":
            raise ValueError(
                f"WaterSICConfig(finetune=True) needs method='watersic' (got {self.method!r}): "
                "its calibration keeps the float model's outputs as the fine-tuning teacher. "
                "Quantize without finetune and fine-tune the saved checkpoint with "
                "watersic_hf.finetune_scales(model, windows, teacher=float_model)"
            )
        if self.work_dir is not None:
            if not isinstance(self.work_dir, (str, os.PathLike)):
                raise TypeError(
                    f"WaterSICConfig.work_dir must be a folder path, got {self.work_dir!r}"
                )
            self.work_dir = os.fspath(self.work_dir)
        self.attn_eps = _check_float("attn_eps", self.attn_eps, 0.0, 1.0)
        self.dead_threshold = _check_float("dead_threshold", self.dead_threshold, 0.0, 0.5)
        if self.damp is not None:
            self.damp = _check_float("damp", self.damp, 0.0, 10.0)
        self.holdout_fraction = _check_float(
            "holdout_fraction", self.holdout_fraction, 0.0, 0.5, open_low=True
        )
        if self.modules_to_not_convert is not None:
            if isinstance(self.modules_to_not_convert, str) or not all(
                isinstance(m, str) for m in self.modules_to_not_convert
            ):
                raise TypeError(
                    "WaterSICConfig.modules_to_not_convert must be a list of module names, got "
                    f"{self.modules_to_not_convert!r}"
                )
            self.modules_to_not_convert = list(self.modules_to_not_convert)
        if self.device is not None and not isinstance(self.device, str):
            # torch.device objects are accepted but stored as strings so that to_dict() stays JSON.
            self.device = str(self.device)
        if self.backend is not None and not isinstance(self.backend, str):
            raise TypeError(
                f"WaterSICConfig.backend must be a string or None, got {self.backend!r}"
            )
        if (
            self.tokenizer is not None
            and not isinstance(self.tokenizer, str)
            and not callable(self.tokenizer)
        ):
            raise TypeError(
                "WaterSICConfig.tokenizer must be a tokenizer object or a path, got "
                f"{type(self.tokenizer).__name__}"
            )
        if not isinstance(self.layers, dict):
            raise TypeError(
                f"WaterSICConfig.layers must be a dict, got {type(self.layers).__name__}"
            )

    @property
    def auto_damp(self) -> bool:
        """True when each group's damping is chosen on held-out windows (WaterSIC with
        ``damp=None``)."""
        return self.damp is None and self.method == "watersic"

    @property
    def adaptive_eps_on(self) -> bool:
        """Whether the adaptive (ε_q, ε_a) search runs: ``adaptive_eps`` when given, else WaterSIC
        below ``ADAPTIVE_EPS_BELOW_BITS`` bits."""
        if self.method != "watersic":
            return False
        if self.adaptive_eps is not None:
            return self.adaptive_eps
        return self.bits < ADAPTIVE_EPS_BELOW_BITS

    @property
    def effective_damp(self) -> float:
        """The fixed damping: ``damp``, or the method's default. With :attr:`auto_damp` it is the
        fallback used when no calibration batch can be held out (a single batch)."""
        return DEFAULT_DAMP[self.method] if self.damp is None else self.damp

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of the config (what goes into ``config.json["quantization_config"]``).

        The dataset and tokenizer are written only when they are strings; layer metadata is copied.
        """
        out: dict[str, Any] = {}
        for key, value in self.__dict__.items():
            if key.startswith("_") or key in _RUN_OPTIONS:
                continue
            if key in _RUNTIME_FIELDS:
                value = value if isinstance(value, str) else None
            out[key] = copy.deepcopy(value)
        for key, value in self._unknown.items():
            out.setdefault(key, copy.deepcopy(value))
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        """Same as :meth:`to_dict` (every field matters for loading)."""
        return self.to_dict()

    def __iter__(self):
        # The mixin's __iter__ deep-copies __dict__, tokenizer and dataset included.
        yield from self.to_dict().items()

    def __deepcopy__(self, memo: dict[int, Any]) -> WaterSICConfig:
        # from_pretrained deep-copies the config twice; calibration data and tokenizer are read-only
        # runtime objects, so the copies share them instead of duplicating a large dataset.
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            setattr(new, key, value if key in _RUNTIME_FIELDS else copy.deepcopy(value, memo))
        return new

    def get_loading_attributes(self) -> dict[str, Any]:
        """Attributes a user may override when loading a saved checkpoint (transformers >= 5.10)."""
        return {"backend": self.backend} if self.backend is not None else {}
