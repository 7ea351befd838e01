"""The container returned by every single-layer quantizer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .entropy import column_entropies, pooled_entropy

#: Bits charged per stored fp16 scale and per dead-column index (algorithm.md 2.2 step 8).
SIDE_BITS = 16


@dataclass
class QuantizedWeight:
    """A quantized linear weight ``Ŵ = diag(row_scale) · codes · diag(col_scale)``, times
    ``group_scale[r, j // group_size]`` entrywise when it has group scales (standard GPTQ).

    Attributes:
        codes (`torch.Tensor` of shape `(out_features, in_features)`, int32): integer codes;
            the columns listed in ``dead_columns`` are all zero.
        col_scale (`torch.Tensor` of shape `(in_features,)`, float32): per-column scale
            (``α_j · Γ_j`` for WaterSIC, ``Δ·γ_j`` or ``Δ`` for GPTQ); 0 for dead columns. Every
            value is exactly representable in fp16.
        row_scale (`torch.Tensor` of shape `(out_features,)`, float32): per-row scale (``t``
            for WaterSIC, a power of two for GPTQ, the row step for RTN); fp16-exact.
        dead_columns (`torch.Tensor` of shape `(n_dead,)`, int64): dead input features.
        step (`float`): the step used: WaterSIC's ``c`` (Y domain), GPTQ's ``Δ``, or RTN's
            global multiplier of the row RMS.
        method (`str`): ``"watersic"``, ``"gptq"`` (standard GPTQ), ``"gptq_entropy"`` or
            ``"rtn"``.
        target_bits (`float`): the requested ``bits``.
        target (`str`): ``"original"`` or ``"live"`` (how ``bits`` was turned into an entropy
            target).
        entropy_target (`float`): the pooled-entropy target H* of the live codes.
        search_evals (`int`): entropy evaluations spent by the rate search (0 when ``step``
            was given).
        search_history (`list[tuple[float, float]]`): the (nominal rate ρ, entropy) pairs tried.
        gamma (`torch.Tensor` of shape `(in_features,)`, float32, *optional*): LMMSE gains of
            the ZSIC loop (1 when off, 0 for all-zero and dead columns).
        rescaler_losses (`list[float]`): rescaler objective J after each accepted iteration
            (empty when the rescalers are off).
        group_scale (`torch.Tensor` of shape `(out_features, ceil(in_features / group_size))`,
            float32, *optional*): per-row, per-column-group scale (fp16-exact); None when the
            weight has none.
        group_size (`int`): input columns per group scale (0 when ``group_scale`` is None).
        code_bits (`int`, *optional*): fixed code width of a grid quantizer (standard GPTQ); the
            rate then charges these bits per live code instead of the pooled entropy.
        act_order (`bool`): the columns were processed in act-order (informational).
    """

    codes: torch.Tensor
    col_scale: torch.Tensor
    row_scale: torch.Tensor
    dead_columns: torch.Tensor
    step: float
    method: str
    target_bits: float
    target: str = "original"
    entropy_target: float = float("nan")
    search_evals: int = 0
    search_history: list[tuple[float, float]] = field(default_factory=list)
    gamma: torch.Tensor | None = None
    rescaler_losses: list[float] = field(default_factory=list)
    group_scale: torch.Tensor | None = None
    group_size: int = 0
    code_bits: int | None = None
    act_order: bool = False

    def __post_init__(self) -> None:
        if self.group_scale is not None:
            a, n = self.codes.shape
            g = self.group_size
            if g < 1 or tuple(self.group_scale.shape) != (a, -(-n // g)):
                raise ValueError(
                    f"group_scale has shape {tuple(self.group_scale.shape)} with group_size={g}; "
                    f"codes {(a, n)} need group_size >= 1 and shape (a, ceil(n / group_size))")

    @property
    def out_features(self) -> int:
        return int(self.codes.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.codes.shape[1])

    @property
    def n_dead(self) -> int:
        return int(self.dead_columns.numel())

    @property
    def live_columns(self) -> torch.Tensor:
        """`torch.Tensor` of shape `(n_live,)`, int64: indices of the live input features."""
        mask = torch.ones(self.in_features, dtype=torch.bool, device=self.codes.device)
        mask[self.dead_columns.to(self.codes.device)] = False
        return mask.nonzero().flatten()

    def dequantize(self) -> torch.Tensor:
        """`torch.Tensor` of shape `(out, in)`, float32: ``row_scale[:, None]·codes·col_scale``
        (times the expanded ``group_scale`` when there is one)."""
        w = self.row_scale[:, None] * self.codes.to(torch.float32) * self.col_scale[None, :]
        if self.group_scale is not None:
            w = w * expand_groups(self.group_scale, self.group_size, self.in_features)
        return w

    def entropy_bits(self, per_column: bool = False) -> float:
        """Empirical entropy in bits per entry of the codes of the LIVE columns.

        Args:
            per_column (`bool`, *optional*, defaults to False): False gives the pooled entropy of
                one histogram (the paper's accounting, used by ``rate_bits``); True gives the
                mean of each live column's own entropy (what per-column coding achieves).
        """
        live = self.codes[:, self.live_columns]
        if per_column:
            return float(column_entropies(live).mean()) if live.numel() else 0.0
        return pooled_entropy(live)

    @property
    def rate_bits(self) -> float:
        """Bits per ORIGINAL weight entry, paper accounting (algorithm.md 2.2 step 8).

        ``[H_pool·a·n_live + 16a + 16 n_live + 16 n_dead] / (a · n_orig)``: pooled entropy of
        the live codes, one fp16 scale per row and per live column, 16 bits per dead index.
        A grid quantizer (``code_bits`` set, standard GPTQ) is charged its fixed width instead of
        the entropy, plus 16 bits per group scale: the bits it occupies with fixed-width codes.
        """
        a, n = self.codes.shape
        n_dead = self.n_dead
        n_live = n - n_dead
        h = float(self.code_bits) if self.code_bits is not None else self.entropy_bits()
        n_group = 0 if self.group_scale is None else self.group_scale.numel()
        return (h * a * n_live + SIDE_BITS * (a + n_live + n_dead + n_group)) / (a * n)

    def to(self, device: torch.device | str) -> QuantizedWeight:
        """A copy with every tensor moved to ``device``."""
        out = QuantizedWeight(**{k: getattr(self, k) for k in self.__dataclass_fields__})
        for name in ("codes", "col_scale", "row_scale", "dead_columns", "gamma", "group_scale"):
            val = getattr(out, name)
            if val is not None:
                setattr(out, name, val.to(device))
        return out


def expand_groups(group_scale: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """``group_scale[r, j // group_size]`` for every column ``j``.

    Args:
        group_scale (`torch.Tensor` of shape `(out, ceil(in_features / group_size))`).

    Returns:
        `torch.Tensor` of shape `(out, in_features)`, same dtype.
    """
    return group_scale.repeat_interleave(group_size, dim=1)[:, :in_features]
