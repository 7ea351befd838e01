"""``WaterSICLinear``: a linear layer whose weight is ``diag(row_scale) · codes · diag(col_scale)``.

The module computes ``y = row_scale · ((x · col_scale) @ codesᵀ) + bias`` with fp32 arithmetic
and returns ``x.dtype``. How the integer codes are held in memory is described by a small
JSON-able ``layout`` dict, from which the shape and dtype of every parameter follow, so that
transformers can build an identical empty skeleton on the meta device before it loads a
checkpoint (see docs/format.md for every tensor name, dtype and shape).

Formats (``layout["format"]``):

* ``"plain"``: ``weight_codes`` int32 ``(out, in)``; simple and exact, 32 bits per code.
* ``"packed"``: the bit-packed in-memory format of ``watersic_hf.packing`` (per-column-group
  widths, column permutation, escapes), read by the fused Triton kernels on CUDA and the numba
  kernels on CPU.

Either format may add per-group scales (standard GPTQ): ``layout["scale_group_size"] = g`` and a
``weight_group_scale`` (fp16, ``(out, ceil(in / g))``) with ``Ŵ[r, j] = row_scale[r] ·
col_scale[j] · group_scale[r, j // g] · codes[r, j]``; such layers use a plain-torch forward
(see ``_grouped.py``), not the fused kernels.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .. import ops, packing
from ._grouped import (
    GROUP_KEY,
    GROUP_TENSOR,
    expand_group_scale,
    group_scale_shape,
    group_size_of,
    grouped_matmul,
)

logger = logging.getLogger(__name__)

__all__ = ["WaterSICLinear"]

_FORMATS = ("plain", "packed")
_SCALE_NAMES = ("weight_col_scale", "weight_row_scale")


def _check_fp16_exact(name: str, value: torch.Tensor) -> None:
    exact = value.detach().float()
    as_half = exact.to(torch.float16).float()
    if not torch.isfinite(as_half).all() or not torch.equal(as_half, exact):
        bad = int((as_half != exact).sum())
        raise ValueError(
            f"{name} has {bad} value(s) that fp16 cannot hold exactly; WaterSICLinear stores "
            "scales as fp16. Round them with `.half().float()` (and requantize if they "
            "overflow) before calling from_quantized."
        )


class WaterSICLinear(nn.Module):
    """Linear layer with WaterSIC integer codes and fp16 per-row / per-column scales.

    Not a subclass of `nn.Linear` (transformers' ``_init_weights`` would overwrite integer
    tensors), but it keeps ``in_features`` / ``out_features`` for tools that read them.

    Args:
        in_features (`int`): size of each input sample (``K``).
        out_features (`int`): size of each output sample (``N``).
        bias (`bool`): whether the layer has an additive bias.
        layout (`dict`): JSON-able description of the weight storage, as returned by
            `layout_metadata()` (ints, strings and lists only). Every parameter's shape and dtype
            follows from ``(in_features, out_features, bias, layout)``.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): dtype of the bias.
        device (`torch.device` or `str`, *optional*): where to create the parameters (``"meta"``
            for an empty skeleton).
        backend (`str`, *optional*, defaults to ``"auto"``): ``"auto"``, ``"torch"``,
            ``"triton"`` or ``"cpu"`` (see `watersic_hf.ops.Backend`); the environment variable
            ``WATERSIC_BACKEND`` overrides it.

    Parameters (all ``nn.Parameter(requires_grad=False)``), for the ``"packed"`` format see
    docs/format.md; for ``"plain"``:

    * ``weight_codes`` (`(out, in)`, int32): integer codes.
    * ``weight_col_scale`` (`(in,)`, float16): per-input-column scale.
    * ``weight_row_scale`` (`(out,)`, float16): per-output-row scale.
    * ``weight_group_scale`` (`(out, ceil(in / g))`, float16), only when
      ``layout["scale_group_size"] = g`` is set (both formats).
    * ``bias`` (`(out,)`, ``dtype``), when ``bias=True``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        layout: dict[str, Any],
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if int(in_features) < 1 or int(out_features) < 1:
            raise ValueError(
                f"in_features={in_features} and out_features={out_features} must both be >= 1."
            )
        if not isinstance(layout, dict) or layout.get("format") not in _FORMATS:
            got = layout.get("format") if isinstance(layout, dict) else type(layout).__name__
            raise ValueError(
                f"layout['format']={got!r} is not supported; expected one of {_FORMATS}. Pass the "
                "dict returned by WaterSICLinear.layout_metadata()."
            )
        if not dtype.is_floating_point:
            raise TypeError(f"dtype={dtype} must be a floating-point dtype (it is the bias dtype).")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self._layout = dict(layout)
        self.backend = backend
        if self._layout["format"] == "plain":
            specs = {"weight_codes": ((self.out_features, self.in_features), torch.int32)}
            specs["weight_col_scale"] = ((self.in_features,), torch.float16)
            specs["weight_row_scale"] = ((self.out_features,), torch.float16)
        else:
            specs = packing.param_specs(self.in_features, self.out_features, self._layout)
        self._group_size = group_size_of(self._layout)
        if self._group_size:
            specs[GROUP_TENSOR] = (
                group_scale_shape(self.in_features, self.out_features, self._group_size),
                torch.float16)
        for name, (shape, dt) in specs.items():
            self.register_parameter(name, _frozen(torch.zeros(shape, dtype=dt, device=device)))
        if bias:
            self.bias = _frozen(torch.zeros(self.out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)
        # backs the `weight` property; a plain attribute (never saved, not a buffer) that
        # `_apply` moves and casts like a float parameter
        self._weight_view = torch.zeros((), dtype=dtype, device=device)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_quantized(
        cls,
        qw: Any,
        bias: torch.Tensor | None,
        *,
        dtype: torch.dtype = torch.float32,
        format: str = "packed",  # noqa: A002 - mirrors layout["format"]
        backend: str = "auto",
        group_size: int = packing.DEFAULT_GROUP_SIZE,
    ) -> WaterSICLinear:
        """Build the module from a quantized weight.

        Args:
            qw (`QuantizedWeight`-like): has ``codes`` (`(out, in)`, integer), ``col_scale``
                (`(in,)`, float, fp16-exact), ``row_scale`` (`(out,)`, float, fp16-exact); the
                ``dead_columns`` it may list must have all-zero codes.
            bias (`torch.Tensor` of shape `(out,)`, *optional*): the original layer's bias.
            dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): bias dtype.
            format (`str`, *optional*, defaults to ``"packed"``): ``"packed"`` or ``"plain"``.
            backend (`str`, *optional*, defaults to ``"auto"``): see the class docstring.
            group_size (`int`, *optional*, defaults to 32): columns per width group (packed).
                Group SCALES come from ``qw.group_scale`` / ``qw.group_size`` when ``qw`` has them
                (standard GPTQ); they go to ``weight_group_scale``.

        Returns:
            `WaterSICLinear` on the device of ``qw.codes``.
        """
        codes, col_scale, row_scale = qw.codes, qw.col_scale, qw.row_scale
        if codes.dim() != 2:
            raise ValueError(f"qw.codes must be 2-D (out, in); got shape {tuple(codes.shape)}.")
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise TypeError(f"qw.codes must be an integer tensor; got {codes.dtype}.")
        out_features, in_features = codes.shape
        if tuple(col_scale.shape) != (in_features,) or tuple(row_scale.shape) != (out_features,):
            raise ValueError(
                f"scale shapes {tuple(col_scale.shape)} / {tuple(row_scale.shape)} do not match "
                f"codes {tuple(codes.shape)}: expected col_scale ({in_features},) and row_scale "
                f"({out_features},)."
            )
        codes64 = codes.to(torch.int64)
        if codes64.numel() and codes64.abs().max() > 2**31 - 1:
            raise ValueError("qw.codes has values outside int32; they cannot be stored.")
        dead = getattr(qw, "dead_columns", None)
        if dead is not None and dead.numel() and codes[:, dead.to(codes.device).long()].any():
            raise ValueError("qw.codes has non-zero codes in columns listed in qw.dead_columns.")
        _check_fp16_exact("qw.col_scale", col_scale)
        _check_fp16_exact("qw.row_scale", row_scale)
        group_scale = getattr(qw, "group_scale", None)
        scale_group = 0
        if group_scale is not None:
            scale_group = int(getattr(qw, "group_size", 0) or 0)
            want = (group_scale_shape(in_features, out_features, scale_group)
                    if scale_group >= 1 else None)
            if want is None or tuple(group_scale.shape) != want:
                raise ValueError(
                    f"qw.group_scale has shape {tuple(group_scale.shape)} with qw.group_size="
                    f"{scale_group}; codes {tuple(codes.shape)} need group_size >= 1 and shape "
                    f"{want or '(out, ceil(in / group_size))'}.")
            _check_fp16_exact("qw.group_scale", group_scale)
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({out_features},).")
        device = codes.device
        codes32 = codes.to(torch.int32)
        if format == "plain":
            layout: dict[str, Any] = {"format": "plain", "version": packing.FORMAT_VERSION}
            tensors = {"weight_codes": codes32}
        elif format == "packed":
            packed = packing.pack_codes(codes32, group_size=group_size)
            layout, tensors = packed.layout, packed.tensors
        else:
            raise ValueError(f"format={format!r} is not supported; use 'packed' or 'plain'.")
        if scale_group:
            layout[GROUP_KEY] = scale_group
        module = cls(
            in_features, out_features, bias is not None, layout, dtype=dtype, device=device,
            backend=backend,
        )
        with torch.no_grad():
            for name, value in tensors.items():
                getattr(module, name).copy_(value)
            module.weight_col_scale.copy_(col_scale.to(torch.float16))
            module.weight_row_scale.copy_(row_scale.to(torch.float16))
            if scale_group:
                module.weight_group_scale.copy_(group_scale.to(torch.float16))
            if bias is not None:
                module.bias.copy_(bias.to(dtype))
        return module

    @classmethod
    def from_tensors(
        cls,
        in_features: int,
        out_features: int,
        layout: dict[str, Any],
        tensors: dict[str, torch.Tensor],
        bias: torch.Tensor | None,
        *,
        backend: str = "auto",
        device: torch.device | str | None = None,
    ) -> WaterSICLinear:
        """Build the module around existing tensors (no copy), e.g. those read from a file.

        Args:
            layout (`dict`): the layout the tensors follow (see `layout_metadata`).
            tensors (`dict[str, torch.Tensor]`): every weight parameter (codes and both scales)
                with the shape and dtype the layout prescribes; the caller has validated them.
            bias (`torch.Tensor` of shape `(out,)`, *optional*).
            device: where the tensors are (they are moved there if they are not).

        Raises:
            ValueError: a tensor is missing or has the wrong shape or dtype.
        """
        dtype = bias.dtype if bias is not None else torch.float32
        module = cls(in_features, out_features, bias is not None, layout, dtype=dtype,
                     device="meta", backend=backend)
        for name, param in list(module.named_parameters(recurse=False)):
            value = bias if name == "bias" else tensors.get(name)
            if value is None:
                raise ValueError(f"from_tensors: missing tensor {name!r}")
            if value.shape != param.shape or value.dtype != param.dtype:
                raise ValueError(
                    f"from_tensors: {name} is {value.dtype} {tuple(value.shape)}, the layout "
                    f"needs {param.dtype} {tuple(param.shape)}")
            setattr(module, name, _frozen(value.detach().to(device)))
        module._weight_view = torch.zeros((), dtype=dtype, device=device)
        return module

    def finish_loading(self) -> None:
        """After a checkpoint was read into a meta skeleton: put the ``weight`` stand-in on the
        device and dtype of the loaded tensors (it is never stored, so the loader skips it)."""
        if self._weight_view.is_meta:
            dtype = self.bias.dtype if self.bias is not None else self._weight_view.dtype
            self._weight_view = torch.zeros((), dtype=dtype, device=self.weight_col_scale.device)

    @property
    def weight(self) -> torch.Tensor:
        """A read-only stand-in for ``nn.Linear.weight``: shape ``(out, in)``, the module's
        compute dtype and device, and **no data** (an expanded zero). Model code that reads
        ``module.weight.dtype`` / ``.device`` / ``.shape`` keeps working; the real weight is
        ``dequantize().weight``."""
        return self._weight_view.expand(self.out_features, self.in_features)

    def _apply(self, fn: Any, recurse: bool = True) -> WaterSICLinear:
        # model.to(torch.bfloat16) / .half() cast every float parameter; the scales are a
        # storage format (fp16-exact values), so they follow device moves but keep their dtype
        # instead of being rounded to bf16
        names = (*_SCALE_NAMES, GROUP_TENSOR) if self._group_size else _SCALE_NAMES
        old = {name: getattr(self, name).data for name in names}
        super()._apply(fn, recurse)
        self._weight_view = fn(self._weight_view)
        for name, data in old.items():
            param = getattr(self, name)
            if param.dtype != torch.float16:
                param.data = data.to(device=param.device)
        return self

    def layout_metadata(self) -> dict[str, Any]:
        """The JSON-able ``layout`` that rebuilds this module's parameter shapes and dtypes."""
        return dict(self._layout)

    # ------------------------------------------------------------------ properties
    @property
    def backend(self) -> str:
        """``"auto"``, ``"torch"``, ``"triton"`` or ``"cpu"``; ``WATERSIC_BACKEND`` overrides
        it."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._backend = ops._parse_backend(value, "backend").value

    @property
    def format(self) -> str:
        """Storage format of the codes: ``"plain"`` or ``"packed"``."""
        return self._layout["format"]

    def _weight_params(self) -> list[torch.Tensor]:
        return [p for name, p in self.named_parameters(recurse=False) if name != "bias"]

    @property
    def bits_in_memory(self) -> float:
        """Bits per weight held in memory: every weight tensor (codes, widths, permutation,
        escapes, scales; not the bias) in bytes × 8 ÷ (in_features · out_features)."""
        nbytes = sum(p.numel() * p.element_size() for p in self._weight_params())
        return 8.0 * nbytes / (self.in_features * self.out_features)

    # ------------------------------------------------------------------ compute
    def codes(self) -> torch.Tensor:
        """Integer codes, unpacked.

        Returns:
            `torch.Tensor` of shape `(out_features, in_features)`, int32.
        """
        if self.format == "plain":
            return self.weight_codes.detach().clone()
        return packing.unpack_codes(self._packed_tensors(), self.in_features, self.out_features)

    def _packed_tensors(self) -> dict[str, torch.Tensor]:
        # straight from _parameters: nn.Module.__getattr__ costs ~1 µs per name per call
        params = self._parameters
        return {name: params[name] for name in packing.CODE_TENSOR_NAMES}

    def dequantize(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """A plain `nn.Linear` with the same function.

        Args:
            dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): dtype of the result.

        Returns:
            `nn.Linear` whose weight is ``row_scale[:, None] · codes · col_scale[None, :]``
            (times the expanded group scales of a grouped layer; computed in fp32, then cast).
        """
        codes = self.codes().float()
        weight = codes * self.weight_row_scale.float()[:, None] * self.weight_col_scale.float()
        if self._group_size:
            weight = weight * expand_group_scale(self.weight_group_scale, self._group_size,
                                                 self.in_features)
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, dtype=dtype,
            device=codes.device,
        )
        with torch.no_grad():
            linear.weight.copy_(weight.to(dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias.to(dtype))
        return linear.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer.

        Args:
            x (`torch.Tensor` of shape `(..., in_features)`): activations, any float dtype.

        Returns:
            `torch.Tensor` of shape `(..., out_features)` and dtype ``x.dtype``.
        """
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"input has {x.shape[-1]} features in its last dimension; this layer expects "
                f"{self.in_features}."
            )
        # parameters straight from _parameters: nn.Module.__getattr__ costs ~1 µs per name, and
        # a decode step of a small model calls hundreds of layers
        params = self._parameters
        if self._group_size:
            codes = params["weight_codes"] if self.format == "plain" else self.codes()
            return grouped_matmul(
                x, codes, params["weight_col_scale"], params["weight_row_scale"],
                params[GROUP_TENSOR], self._group_size, params["bias"])
        if self._layout["format"] == "plain":
            return ops.torch_plain_matmul(
                x, params["weight_codes"], params["weight_col_scale"],
                params["weight_row_scale"], params["bias"],
            )
        return ops.packed_linear(
            x, self._packed_tensors(), params["weight_col_scale"], params["weight_row_scale"],
            params["bias"], backend=self._backend,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, format={self.format}, backend={self._backend}"
            + (f", scale_group_size={self._group_size}" if self._group_size else "")
        )


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)
