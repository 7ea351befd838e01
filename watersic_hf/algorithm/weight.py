"""The container returned by every single-layer quantizer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .entropy import column_entropies, pooled_entropy

#: Bits charged per stored fp16 scale and per dead-column index (algorithm.md 2.2 step 8).
SIDE_BITS = 16


@dataclass
class QuantizedWeight:
    """A quantized linear weight ``Ŵ = diag(row_scale) · codes · diag(col_scale)``.

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
        method (`str`): ``"watersic"``, ``"gptq"`` or ``"rtn"``.
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
        """`torch.Tensor` of shape `(out, in)`, float32: ``row_scale[:, None]·codes·col_scale``."""
        return self.row_scale[:, None] * self.codes.to(torch.float32) * self.col_scale[None, :]

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
        """
        a, n = self.codes.shape
        n_dead = self.n_dead
        n_live = n - n_dead
        h = self.entropy_bits()
        return (h * a * n_live + SIDE_BITS * (a + n_live + n_dead)) / (a * n)

    def to(self, device: torch.device | str) -> QuantizedWeight:
        """A copy with every tensor moved to ``device``."""
        out = QuantizedWeight(**{k: getattr(self, k) for k in self.__dataclass_fields__})
        for name in ("codes", "col_scale", "row_scale", "dead_columns", "gamma"):
            val = getattr(out, name)
            if val is not None:
                setattr(out, name, val.to(device))
        return out
