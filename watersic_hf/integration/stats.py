"""Second-moment statistics for calibration, accumulated in fp64.

All matrices are raw (non-centred) second moments normalised by the **token count**, as the official
WaterSIC code does (algorithm.md §3.1, §3.5):

* ``Σ_X  = (1/N) Σ_t x_t x_tᵀ``   — inputs of the float model,
* ``Σ_X̂  = (1/N) Σ_t x̂_t x̂_tᵀ``   — inputs of the partially quantized model,
* ``Σ_XX̂ = (1/N) Σ_t x_t x̂_tᵀ``   — cross moment (float on the left),
* ``Σ_ΔR = (1/N) Σ_t (r_t − r̂_t) x̂_tᵀ`` — residual-stream error against the quantized input.

With per-token weights ``w_t`` (attention-weighted statistics) each term is multiplied by ``w_t``;
the normalisation stays ``1/N``.
"""

from __future__ import annotations

import torch

__all__ = [
    "MomentAccumulator",
    "symmetrize_",
    "attention_importance",
    "flatten_tokens",
    "importance_from_received",
]


def flatten_tokens(x: torch.Tensor) -> torch.Tensor:
    """View an activation of shape ``(..., n)`` as ``(tokens, n)``."""
    return x.reshape(-1, x.shape[-1])


class MomentAccumulator:
    """Running sum of ``Σ_t w_t u_t v_tᵀ`` in fp64, divided by the token count on :meth:`get`.

    Each batch's product is one GEMM in ``product_dtype`` (fp32 by default, on every device) whose
    result is added to the fp64 sum in place: fp64 GEMMs run at a fraction of the fp32 speed (less
    than half on the CPU, 1/30 or less on consumer GPUs), and one batch's rounding error (about
    1e-7 relative) is far below the damping the quantizer adds; the sum over batches, where
    errors would accumulate, stays fp64 (algorithm.md §2.4 "statistics accumulation").

    Memory: the fp64 sum (``8·rows·cols`` bytes) plus, per :meth:`add`, one ``rows × cols`` product
    in ``product_dtype``; :meth:`take` normalises in place, so no second fp64 matrix is made.

    Args:
        rows (`int`): size of ``u``.
        cols (`int`): size of ``v``.
        device (`torch.device`): where the fp64 sum lives (the compute device).
        product_dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): dtype of the
            per-batch GEMM.
    """

    def __init__(
        self,
        rows: int,
        cols: int,
        device: torch.device | str,
        product_dtype: torch.dtype | None = None,
    ) -> None:
        self.sum = torch.zeros(rows, cols, dtype=torch.float64, device=device)
        self.tokens = 0
        self.product_dtype = torch.float32 if product_dtype is None else product_dtype

    def add(
        self, u: torch.Tensor, v: torch.Tensor | None = None, weight: torch.Tensor | None = None
    ) -> None:
        """Add a batch of tokens.

        Args:
            u (`torch.Tensor` of shape ``(..., rows)``): left factor, any float dtype.
            v (`torch.Tensor` of shape ``(..., cols)``, *optional*): right factor; ``None`` means
                ``u``.
            weight (`torch.Tensor` of shape ``(...)``, *optional*): per-token weights ``w_t >= 0``.
        """
        dt = self.product_dtype
        uu = flatten_tokens(u).to(self.sum.device, dt)
        vv = uu if v is None else flatten_tokens(v).to(self.sum.device, dt)
        if uu.shape[0] != vv.shape[0]:
            raise ValueError(f"token counts differ: {uu.shape[0]} vs {vv.shape[0]}")
        left = uu
        if weight is not None:
            w = weight.reshape(-1).to(self.sum.device, dt)
            if w.shape[0] != uu.shape[0]:
                raise ValueError(f"{w.shape[0]} weights for {uu.shape[0]} tokens")
            left = uu * w[:, None]
        # (rows, N) @ (N, cols): one GEMM per batch, added to the fp64 running sum in place (the
        # widening is exact, so this equals adding an fp64 copy of the product).
        self.sum.add_(left.T @ vv)
        self.tokens += uu.shape[0]

    def get(self) -> torch.Tensor:
        """The normalised moment, `torch.float64` of shape ``(rows, cols)`` (a new tensor)."""
        if self.tokens == 0:
            raise RuntimeError("no tokens were accumulated")
        return self.sum / self.tokens

    def take(self, symmetrize: bool = False) -> torch.Tensor:
        """The normalised moment, computed in place in the sum (the accumulator is spent).

        Args:
            symmetrize (`bool`, *optional*): also replace ``S`` by ``(S + Sᵀ)/2`` in place (a
                second moment ``E[u uᵀ]`` is symmetric; fp32 products leave ~1e-7 asymmetry).

        Returns:
            `torch.float64` tensor of shape ``(rows, cols)``; the same values as :meth:`get`.
        """
        if self.tokens <= 0:
            raise RuntimeError("no tokens were accumulated (or take() was already called)")
        out = self.sum.div_(self.tokens)
        self.sum = torch.empty(0, dtype=torch.float64)
        self.tokens = -1  # spent: a later add/get must not see a stale sum
        if symmetrize:
            symmetrize_(out)
        return out


def symmetrize_(mat: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Replace a square ``mat`` by ``(mat + matᵀ) · 0.5`` in place, one tile pair at a time.

    Every entry is computed as ``(a_ij + a_ji) * 0.5`` — the same operations, hence the same
    bits, as ``0.5 * (mat + mat.T)`` — but the only temporary is one ``block × block`` tile.

    Args:
        mat (`torch.Tensor` of shape ``(n, n)``): modified in place and returned.
        block (`int`, *optional*): tile size.
    """
    n = mat.shape[0]
    if mat.ndim != 2 or mat.shape[1] != n:
        raise ValueError(f"symmetrize_ needs a square matrix, got shape {tuple(mat.shape)}")
    for i in range(0, n, block):
        ie = min(i + block, n)
        for j in range(i, n, block):
            je = min(j + block, n)
            upper = mat[i:ie, j:je]
            avg = (upper + mat[j:je, i:ie].T) * 0.5
            upper.copy_(avg)
            mat[j:je, i:ie].copy_(avg.T)
    return mat


def attention_importance(probs: torch.Tensor) -> torch.Tensor:
    """Attention each key position receives, averaged over the causal queries that can see it.

    ``p_j = (1/H) Σ_h (1/(T − j)) Σ_{i ≥ j} A_h[i, j]`` (algorithm.md §3.5).

    Args:
        probs (`torch.Tensor` of shape ``(B, H, T, T)``): attention probabilities (rows sum to 1;
            causal, so ``A[i, j] = 0`` for ``j > i``).

    Returns:
        `torch.Tensor` of shape ``(B, T)``, float32.
    """
    return importance_from_received(probs.float().sum(dim=-2).sum(dim=1), probs.shape[1])


def importance_from_received(received: torch.Tensor, num_heads: int) -> torch.Tensor:
    """:func:`attention_importance` from the attention received, summed over queries and heads.

    Args:
        received (`torch.Tensor` of shape ``(B, T)``): ``Σ_h Σ_i A_h[i, j]``.
        num_heads (`int`): number of query heads ``H``.

    Returns:
        `torch.Tensor` of shape ``(B, T)``, float32.
    """
    t = received.shape[-1]
    visible = torch.arange(t, 0, -1, device=received.device, dtype=torch.float32)  # T − j
    return received.float() / (visible * num_heads)
