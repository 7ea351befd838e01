"""Public single-layer quantizers: WaterSIC, entropy-coded GPTQ, and round-to-nearest.

(Standard fixed-grid GPTQ is in :mod:`.gptq`.)

All three share the dead-feature rule, the rate accounting and the pooled-entropy rate search,
so that their rates are directly comparable.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import torch

from . import _validate as V
from ._guards import check_finite_output, checked_codes
from ._linalg import matmul_upper
from ._scales import fp16_balance, zero_codes_of_zero_scales
from .entropy import pooled_entropy
from .rescalers import fit_rescalers
from .search import (
    entropy_target,
    geometric_mean,
    max_entropy_bits,
    secant_search,
    step_for_rate,
)
from .stats import damped_cholesky, find_dead_columns, live_mask, transformed_target
from .weight import QuantizedWeight
from .zsic import DEFAULT_BLOCK, zsic

logger = logging.getLogger(__name__)

#: The rate search runs on this fraction of rows (algorithm.md 2.2 step 5) ...
SEARCH_FRACTION = 0.1
#: ... but on at least this many codes (or all rows), so the entropy estimate of small layers is
#: not dominated by plug-in bias and sampling noise.
SEARCH_MIN_ENTRIES = 16384


class _StageTimer:
    """Wall time per stage, logged at DEBUG level (synchronises CUDA only when DEBUG is on)."""

    def __init__(self, device: torch.device) -> None:
        self.enabled = logger.isEnabledFor(logging.DEBUG)
        self.device = device
        self.times: dict[str, float] = {}
        self._t = time.perf_counter()

    def mark(self, stage: str) -> None:
        if not self.enabled:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.times[stage] = now - self._t
        self._t = now

    def log(self, method: str, a: int, n: int) -> None:
        if self.enabled:
            parts = ", ".join(f"{k} {v:.3f}s" for k, v in self.times.items())
            logger.debug("%s %dx%d stage times: %s", method, a, n, parts)


def _search_rows(a: int, n: int, fraction: float, seed: int, device: torch.device) -> torch.Tensor:
    k = max(1, math.ceil(fraction * a), min(a, math.ceil(SEARCH_MIN_ENTRIES / n)))
    k = min(a, k)
    gen = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(a, generator=gen)[:k].sort().values
    return idx.to(device)


@dataclass(frozen=True)
class PreparedStatistics:
    """Validated, dead-column-reduced and factored second moments, shared by a group of layers.

    The Linears of one group (q/k/v, gate/up) read the same input, so they are quantized with
    the same ``Σ_X``, ``Σ_X̂`` and ``Σ_XX̂``; :func:`prepare_statistics` checks and factors them
    once and every layer of the group reuses the result (algorithm.md 2.2 steps 0-1). Only the
    per-layer pieces (weight, ``Σ_ΔR``, target, search) are computed per layer.

    Attributes:
        sources (`tuple`): the ``(sigma_x, sigma_xhat, sigma_x_xhat)`` tensors it was made from;
            a quantizer given other tensors refuses it.
        damp (`float`), dead_threshold (`float`): the settings it was made with.
        n (`int`): in-features before dead-column removal.
        dead (`torch.LongTensor` of shape `(n_dead,)`): dead columns.
        keep (`torch.BoolTensor` of shape `(n,)` or None): live columns; None when none is dead.
        sx (`torch.Tensor` of shape `(n_live, n_live)`, float64): symmetrised live ``Σ_X``.
        h (`torch.Tensor` of shape `(n_live, n_live)`, float64): live ``Σ_X̂`` (``sx`` in plain
            mode).
        sxxh (`torch.Tensor` of shape `(n_live, n_live)`, float64, or None): live ``Σ_XX̂``.
        chol (`torch.Tensor` of shape `(n_live, n_live)`, float64): ``L = chol(h + δ I)``.
        delta (`float`): the absolute damping ``δ``.
        has_xhat (`bool`): ``sigma_xhat`` was given.
    """

    sources: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]
    damp: float
    dead_threshold: float
    n: int
    dead: torch.Tensor
    keep: torch.Tensor | None
    sx: torch.Tensor
    h: torch.Tensor
    sxxh: torch.Tensor | None
    chol: torch.Tensor
    delta: float
    has_xhat: bool

    @property
    def n_dead(self) -> int:
        return int(self.dead.numel())

    def live(self, mat: torch.Tensor) -> torch.Tensor:
        """Columns of ``mat`` (shape ``(a, n)``) at the live features."""
        return mat if self.keep is None else mat[:, self.keep]


@torch.no_grad()
def prepare_statistics(
    sigma_x: torch.Tensor,
    *,
    sigma_xhat: torch.Tensor | None = None,
    sigma_x_xhat: torch.Tensor | None = None,
    damp: float = 1e-4,
    dead_threshold: float = 1e-3,
    device: torch.device | str | None = None,
    n: int | None = None,
) -> PreparedStatistics:
    """Validate, reduce to live features and factor a group's statistics once.

    Pass the result as ``prepared=`` to :func:`watersic_quantize` / :func:`gptq_entropy_quantize`
    together with the same ``sigma_*`` tensors; the codes are identical to calling them without
    it.

    Args:
        sigma_x (`torch.Tensor` of shape `(n, n)`): ``E[x xᵀ]`` of the unquantized model.
        sigma_xhat (`torch.Tensor` of shape `(n, n)`, *optional*): ``E[x̂ x̂ᵀ]``.
        sigma_x_xhat (`torch.Tensor` of shape `(n, n)`, *optional*): ``E[x x̂ᵀ]``.
        damp (`float`, *optional*, defaults to 1e-4): relative damping.
        dead_threshold (`float`, *optional*, defaults to 1e-3): median-rule threshold.
        device (*optional*): where to compute (defaults to ``sigma_x.device``).
        n (`int`, *optional*): the layer's in-features; the matrices must be ``(n, n)``
            (defaults to ``sigma_x.shape[1]``).

    Returns:
        [`PreparedStatistics`].
    """
    damp = V.check_positive("damp", damp, allow_zero=True)
    dead_threshold = V.check_fraction("dead_threshold", dead_threshold)
    if n is None:
        if not isinstance(sigma_x, torch.Tensor) or sigma_x.ndim != 2:
            raise TypeError("sigma_x must be an (n, n) torch.Tensor second-moment matrix")
        n = int(sigma_x.shape[1])
    if device is None:
        device = sigma_x.device if isinstance(sigma_x, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    sx = V.check_matrix("sigma_x", sigma_x, (n, n), symmetric=True, device=device)
    sxh = (None if sigma_xhat is None else
           V.check_matrix("sigma_xhat", sigma_xhat, (n, n), symmetric=True, device=device))
    sxxh = (None if sigma_x_xhat is None else
            V.check_matrix("sigma_x_xhat", sigma_x_xhat, (n, n), symmetric=False,
                           device=device))
    # 0. Dead input features, from the UNQUANTIZED Σ_X.
    dead = find_dead_columns(sx, dead_threshold)
    if dead.numel() == n:
        raise ValueError("every input feature of sigma_x is dead (non-positive or tiny diagonal); "
                         "check the calibration statistics")
    # Mask only when something is dead: boolean indexing copies each (n, n) matrix twice.
    keep = live_mask(n, dead, device) if dead.numel() else None
    if keep is not None:
        sx = sx[keep][:, keep]
        sxh = None if sxh is None else sxh[keep][:, keep]
        sxxh = None if sxxh is None else sxxh[keep][:, keep]
    h = sx if sxh is None else sxh
    # 1. Damped Cholesky factor (fp64).
    chol, delta = damped_cholesky(h, damp)
    return PreparedStatistics(
        sources=(sigma_x, sigma_xhat, sigma_x_xhat), damp=damp, dead_threshold=dead_threshold,
        n=n, dead=dead, keep=keep, sx=sx, h=h, sxxh=sxxh, chol=chol, delta=delta,
        has_xhat=sigma_xhat is not None)


def redamp(prepared: PreparedStatistics, damp: float) -> PreparedStatistics:
    """The same prepared statistics at another relative damping: only the Cholesky factor is
    recomputed (validation and dead-feature masking are reused), so a search over dampings
    costs one factorisation per candidate.

    Args:
        prepared (`PreparedStatistics`): from :func:`prepare_statistics`.
        damp (`float`): the new relative damping (>= 0).

    Returns:
        [`PreparedStatistics`] whose ``damp``, ``chol`` and ``delta`` are for ``damp``; the
        quantizers accept it with the same ``sigma_*`` tensors and ``damp=damp``.
    """
    damp = V.check_positive("damp", damp, allow_zero=True)
    if damp == prepared.damp:
        return prepared
    chol, delta = damped_cholesky(prepared.h, damp)
    return dataclasses.replace(prepared, damp=damp, chol=chol, delta=delta)


def _check_prepared(prepared: PreparedStatistics, sigma_x: torch.Tensor,
                    sigma_xhat: torch.Tensor | None, sigma_x_xhat: torch.Tensor | None,
                    damp: float, dead_threshold: float, n: int) -> None:
    if not isinstance(prepared, PreparedStatistics):
        raise TypeError(f"prepared must come from prepare_statistics(), got "
                        f"{type(prepared).__name__}")
    src = prepared.sources
    if src[0] is not sigma_x or src[1] is not sigma_xhat or src[2] is not sigma_x_xhat:
        raise ValueError("prepared was made from other statistics than the sigma_x / sigma_xhat / "
                         "sigma_x_xhat passed; call prepare_statistics() with these tensors")
    if prepared.damp != damp or prepared.dead_threshold != dead_threshold:
        raise ValueError(f"prepared was made with damp={prepared.damp}, dead_threshold="
                         f"{prepared.dead_threshold} but the call passes damp={damp}, "
                         f"dead_threshold={dead_threshold}; prepare again with the same values")
    if prepared.n != n:
        raise ValueError(f"prepared statistics have n={prepared.n} in-features but the weight has "
                         f"{n}")


def _prepared_for(prepared: PreparedStatistics | None, sigma_x: torch.Tensor,
                  sigma_xhat: torch.Tensor | None, sigma_x_xhat: torch.Tensor | None, *,
                  damp: float, dead_threshold: float, n: int,
                  device: torch.device) -> PreparedStatistics:
    """``prepared`` checked against the call's statistics and settings, or, when it is ``None``,
    :func:`prepare_statistics` of them (``n`` in-features, factored on ``device``)."""
    if prepared is None:
        return prepare_statistics(sigma_x, sigma_xhat=sigma_xhat, sigma_x_xhat=sigma_x_xhat,
                                  damp=damp, dead_threshold=dead_threshold, device=device, n=n)
    _check_prepared(prepared, sigma_x, sigma_xhat, sigma_x_xhat, damp, dead_threshold, n)
    return prepared


@torch.no_grad()
def _sic_quantize(
    method: str,
    weight: torch.Tensor,
    sigma_x: torch.Tensor,
    bits: float,
    *,
    sigma_xhat: torch.Tensor | None,
    sigma_x_xhat: torch.Tensor | None,
    sigma_residual: torch.Tensor | None,
    step: float | None,
    damp: float,
    lmmse: bool,
    rescale: bool,
    dead_threshold: float,
    seed: int,
    target: str,
    block_size: int,
    search_fraction: float,
    prepared: PreparedStatistics | None = None,
) -> QuantizedWeight:
    """Shared body of :func:`watersic_quantize` and :func:`gptq_entropy_quantize` (``method``)."""
    weight = V.check_weight(weight)
    bits = V.check_bits(bits)
    target = V.check_target(target)
    damp = V.check_positive("damp", damp, allow_zero=True)
    dead_threshold = V.check_fraction("dead_threshold", dead_threshold)
    search_fraction = V.check_fraction("search_fraction", search_fraction, closed_right=True)
    if search_fraction == 0.0:
        raise ValueError("search_fraction must be > 0")
    if step is not None:
        step = V.check_positive("step", step)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} must be a positive int")
    device = weight.device
    a, n_orig = weight.shape
    prepared = _prepared_for(prepared, sigma_x, sigma_xhat, sigma_x_xhat, damp=damp,
                             dead_threshold=dead_threshold, n=n_orig, device=device)
    sres = (None if sigma_residual is None else
            V.check_matrix("sigma_residual", sigma_residual, (a, n_orig), symmetric=False,
                           device=device))

    timer = _StageTimer(device)
    dead, n_dead = prepared.dead, prepared.n_dead
    n_live = n_orig - n_dead
    keep = prepared.keep
    w = prepared.live(weight.to(torch.float64))
    sx, h, sxxh, chol, delta = prepared.sx, prepared.h, prepared.sxxh, prepared.chol, prepared.delta
    sres = None if sres is None else prepared.live(sres)

    # 2. The transformed target (step 1, the damped Cholesky factor, is in `prepared`).
    y = transformed_target(w, chol, delta, sxxh, sres)
    ldiag = chol.diagonal()

    timer.mark("cholesky+target")
    # 3. Closed-form step for a nominal rate. All-row column moments are used for the search
    # AND the final pass, so the searched step is the one applied (algorithm.md 7).
    s = (w * w).mean(0)
    if method == "watersic":
        gm = geometric_mean(s.sqrt() * ldiag)

        def ysteps(st: float) -> torch.Tensor:
            return torch.full((n_live,), st, dtype=torch.float64, device=device)
    else:
        gm = geometric_mean(s.sqrt())

        def ysteps(st: float) -> torch.Tensor:
            return st * ldiag

    # 4-5. Entropy target and the secant search on a row subset, in float32.
    h_target = float("nan")
    history: list[tuple[float, float]] = []
    if step is None:
        h_target = entropy_target(bits, a, n_orig, n_dead, target)
        rows = _search_rows(a, n_live, search_fraction, seed, device)
        y_sub = y[rows].to(torch.float32)
        chol32 = chol.to(torch.float32)

        def evaluate(rho: float) -> float:
            z, _ = zsic(y_sub, chol32, ysteps(step_for_rate(rho, gm)).to(torch.float32),
                        lmmse=lmmse, block_size=block_size)
            return pooled_entropy(z)

        # The row subset holds fewer codes than the layer: it cannot exceed its own cap either.
        h_search = min(h_target, max_entropy_bits(int(rows.numel()), n_live))
        rho, _, history = secant_search(evaluate, h_search)
        step = step_for_rate(rho, gm)
        del evaluate, chol32, y_sub  # the fp32 factor is n × n: free it before the full pass

    timer.mark("search")
    # 6. Full ZSIC on every row, in float64.
    steps = ysteps(step)
    alpha = steps / ldiag
    z, gamma = zsic(y, chol, steps, lmmse=lmmse, block_size=block_size)
    if not lmmse:
        gamma = torch.ones_like(gamma)

    timer.mark("zsic")
    # 7. Rescalers (WaterSIC only): fitted to the undamped drift-aware objective.
    losses: list[float] = []
    t = torch.ones(a, dtype=torch.float64, device=device)
    g = gamma
    if rescale and method == "watersic":
        w0 = z * alpha[None, :]
        # C = W Σ_XX̂ + Σ_ΔR = B − δW, and B = Y Lᵀ in every mode (Y solves Y Lᵀ = B).
        cross = matmul_upper(y, chol.T) - delta * w
        plain = not prepared.has_xhat and sxxh is None and sres is None
        # tr(W Σ_X Wᵀ) only shifts J; in plain mode it is ⟨W, C⟩ for free.
        const = float((w * cross).sum()) if plain else float(((w @ sx) * w).sum())
        res = fit_rescalers(w0, h, cross, const, gamma, chol=chol, delta=delta)
        t, g, losses = res.t, res.gamma, res.losses

    timer.mark("rescalers")
    # 8. Output: fp16-exact scales, dead columns re-inserted as zeros.
    row16, col16_live, _ = fp16_balance(t, alpha * g, z)
    z = zero_codes_of_zero_scales(z, row16, col16_live)
    hint = (f"raise damp (now {damp:g}, e.g. to 1e-2), pass rescale=False/lmmse=False, or check "
            "the statistics for extreme dynamic range")
    check_finite_output(method, (a, n_orig), hint, row_scale=row16, col_scale=col16_live,
                        gamma=gamma, step=step)
    live = keep if keep is not None else slice(None)
    codes = torch.zeros((a, n_orig), dtype=torch.int32, device=device)
    codes[:, live] = checked_codes(z, method, (a, n_orig), hint)
    col16 = torch.zeros(n_orig, dtype=torch.float32, device=device)
    col16[live] = col16_live
    gamma_full = torch.zeros(n_orig, dtype=torch.float32, device=device)
    gamma_full[live] = gamma.to(torch.float32)
    timer.mark("output")
    timer.log(method, a, n_orig)
    return QuantizedWeight(
        codes=codes, col_scale=col16, row_scale=row16, dead_columns=dead, step=float(step),
        method=method, target_bits=bits, target=target, entropy_target=h_target,
        search_evals=len(history), search_history=history, gamma=gamma_full,
        rescaler_losses=losses)


@torch.no_grad()
def watersic_quantize(
    weight: torch.Tensor,
    sigma_x: torch.Tensor,
    bits: float = 3.0,
    *,
    sigma_xhat: torch.Tensor | None = None,
    sigma_x_xhat: torch.Tensor | None = None,
    sigma_residual: torch.Tensor | None = None,
    step: float | None = None,
    damp: float = 1e-4,
    lmmse: bool = True,
    rescale: bool = True,
    dead_threshold: float = 1e-3,
    seed: int = 0,
    target: str = "original",
    block_size: int = DEFAULT_BLOCK,
    search_fraction: float = SEARCH_FRACTION,
    prepared: PreparedStatistics | None = None,
) -> QuantizedWeight:
    """Quantize one linear weight with WaterSIC (arXiv 2603.04956), see docs/algorithm.md.

    Minimises ``E‖W x − Ŵ x̂‖²`` (plus the residual term) over ``Ŵ = diag(t) Z diag(α∘Γ)`` with
    integer codes ``Z``: column ``j`` gets the step ``α_j = c / L_jj`` (``L`` the Cholesky factor
    of the damped ``Σ_X̂``), columns are quantized last-to-first with successive interference
    cancellation, and ``c`` is searched so that the pooled entropy of ``Z`` meets the rate.

    Worked example (asserted by ``tests/test_algorithm.py::test_worked_3x3_example``)::

        Σ_X = [[4, 2, 0], [2, 5, 2], [0, 2, 2]]   L = chol(Σ_X) = [[2, 0, 0], [1, 2, 0], [0, 1, 1]]
        W = [[0.8, -0.3, 1.3]], c = 1  ⇒  α = c / diag(L) = [0.5, 0.5, 1], Y = W L = [1.3, 0.7, 1.3]
        column 2: z = round(1.3) = 1, ŵ = 1.0, R ← R − 1.0·L[2] = [1.3, -0.3, 0.3]
        column 1: z = round(-0.3) = 0
        column 0: z = round(1.3) = 1, ŵ = 0.5, R[0] ← 1.3 − 0.5·2 = 0.3
        codes [1, 0, 1], Ŵ = [0.5, 0, 1], (W − Ŵ) L = [0.3, -0.3, 0.3], D = tr(EΣEᵀ)/3 = 0.09
        plain RTN, same α: codes [2, -1, 1], (W − Ŵ) L = [-0.2, 0.7, 0.3], D = 0.62/3 ≈ 0.2067

        >>> q = watersic_quantize(torch.tensor([[0.8, -0.3, 1.3]]), sigma, step=1.0, damp=0.0,
        ...                       lmmse=False, rescale=False)
        >>> q.codes.tolist(), q.col_scale.tolist()
        ([[1, 0, 1]], [0.5, 0.5, 1.0])

    Args:
        weight (`torch.Tensor` of shape `(a, n)`): the weight (any float dtype; fp64 inside).
        sigma_x (`torch.Tensor` of shape `(n, n)`): ``E[x xᵀ]`` of the UNQUANTIZED model's inputs.
        bits (`float`, *optional*, defaults to 3.0): target rate in bits per weight entry,
            side information included, in [0.05, 16]; see ``target``.
        sigma_xhat (`torch.Tensor` of shape `(n, n)`, *optional*): ``E[x̂ x̂ᵀ]`` of the inputs
            the layer actually receives (defaults to ``sigma_x``).
        sigma_x_xhat (`torch.Tensor` of shape `(n, n)`, *optional*): ``E[x x̂ᵀ]``, original
            input on the left. Defaults to ``sigma_xhat`` (i.e. the target is ``W`` itself).
        sigma_residual (`torch.Tensor` of shape `(a, n)`, *optional*): ``E[(r − r̂) x̂ᵀ]`` for
            layers writing into the residual stream.
        step (`float`, *optional*): use this ``c`` and skip the rate search.
        damp (`float`, *optional*, defaults to 1e-4): relative damping of ``Σ_X̂``.
        lmmse (`bool`, *optional*, defaults to True): per-column LMMSE gains in the loop.
        rescale (`bool`, *optional*, defaults to True): fit the row/column rescalers.
        dead_threshold (`float`, *optional*, defaults to 1e-3): median-rule threshold.
        seed (`int`, *optional*, defaults to 0): seed of the search's row subset.
        target (`str`, *optional*, defaults to `"original"`): ``"original"``: ``bits`` is the
            rate per ORIGINAL entry, dead-column indices included (the code entropy is raised
            to compensate for the free dead columns). ``"live"``: plain formula
            ``H* = bits − 16/n_live − 16/a`` (for the cross-layer rate controller, which has
            already accounted for dead parameters).
        block_size (`int`, *optional*, defaults to 128): columns per ZSIC block.
        search_fraction (`float`, *optional*, defaults to 0.1): share of rows in the search.
        prepared (`PreparedStatistics`, *optional*): the result of :func:`prepare_statistics`
            for these ``sigma_*`` tensors (a group of layers sharing an input validates and
            factors them once); the codes are the same as without it.

    Returns:
        [`QuantizedWeight`]: codes, fp16-exact scales, dead columns, rate information.

    Raises:
        ValueError / TypeError: non-finite or mis-shaped inputs, non-symmetric or all-zero
            second moments, ``bits`` outside [0.05, 16].
        ValueError: a numerical breakdown from finite inputs (non-finite scales or codes, codes
            beyond int32); the message names the layer shape and the setting to change.
    """
    return _sic_quantize(
        "watersic", weight, sigma_x, bits, sigma_xhat=sigma_xhat, sigma_x_xhat=sigma_x_xhat,
        sigma_residual=sigma_residual, step=step, damp=damp, lmmse=lmmse, rescale=rescale,
        dead_threshold=dead_threshold, seed=seed, target=target, block_size=block_size,
        search_fraction=search_fraction, prepared=prepared)


@torch.no_grad()
def gptq_entropy_quantize(
    weight: torch.Tensor,
    sigma_x: torch.Tensor,
    bits: float = 3.0,
    *,
    step: float | None = None,
    damp: float = 1e-4,
    lmmse: bool = False,
    dead_threshold: float = 1e-3,
    seed: int = 0,
    target: str = "original",
    sigma_xhat: torch.Tensor | None = None,
    sigma_x_xhat: torch.Tensor | None = None,
    sigma_residual: torch.Tensor | None = None,
    block_size: int = DEFAULT_BLOCK,
    search_fraction: float = SEARCH_FRACTION,
    prepared: PreparedStatistics | None = None,
) -> QuantizedWeight:
    """Entropy-coded GPTQ without clipping: one common step ``Δ`` for all columns
    (``method="gptq_entropy"``; standard fixed-grid GPTQ is :func:`.gptq.gptq_quantize`).

    The same machinery as :func:`watersic_quantize` (dead features, damping, SIC error feedback,
    rate search on the pooled entropy, rate accounting) with ``α_j ≡ Δ``, i.e. GPTQ's error
    feedback in reversed column order (last column first). No rescalers: ``row_scale`` is a
    power of two (fp16 range balancing) and ``col_scale = Δ·γ_j`` (``Δ`` when ``lmmse=False``).

    Damping: the same default ``damp=1e-4`` as WaterSIC, so that comparisons isolate the step
    allocation; pass ``damp=0.01`` for the textbook GPTQ setting. ``lmmse`` defaults to False
    (textbook GPTQ); ``lmmse=True`` adds WaterSIC's per-column gains.

    Args:
        weight (`torch.Tensor` of shape `(a, n)`): the weight.
        sigma_x (`torch.Tensor` of shape `(n, n)`): ``E[x xᵀ]``.
        bits (`float`, *optional*, defaults to 3.0): rate per weight, as in watersic_quantize.
        step (`float`, *optional*): use this ``Δ`` and skip the search.
        damp, lmmse, dead_threshold, seed, target, sigma_xhat, sigma_x_xhat, sigma_residual,
        block_size, search_fraction, prepared: as in :func:`watersic_quantize`.

    Returns:
        [`QuantizedWeight`] with ``method="gptq_entropy"`` and ``step = Δ``.
    """
    return _sic_quantize(
        "gptq_entropy", weight, sigma_x, bits, sigma_xhat=sigma_xhat, sigma_x_xhat=sigma_x_xhat,
        sigma_residual=sigma_residual, step=step, damp=damp, lmmse=lmmse, rescale=False,
        dead_threshold=dead_threshold, seed=seed, target=target, block_size=block_size,
        search_fraction=search_fraction, prepared=prepared)


@torch.no_grad()
def rtn_quantize(
    weight: torch.Tensor,
    sigma_x: torch.Tensor | None = None,
    bits: float = 3.0,
    *,
    step: float | None = None,
    dead_threshold: float = 1e-3,
    target: str = "original",
) -> QuantizedWeight:
    """Round-to-nearest with a per-row step, entropy-coded; no error feedback.

    Row ``r`` uses the step ``m · rms_r`` (``rms_r`` = root mean square of the row's live
    entries); the global multiplier ``m`` is searched (secant on the pooled entropy of all
    codes, same accounting as WaterSIC/GPTQ) to meet ``bits``. ``sigma_x`` is optional and only
    used for the dead-feature rule; dead columns become zeros and cost 16 bits each, as for the
    other methods.

    Args:
        weight (`torch.Tensor` of shape `(a, n)`): the weight.
        sigma_x (`torch.Tensor` of shape `(n, n)`, *optional*): ``E[x xᵀ]`` (dead features only).
        bits (`float`, *optional*, defaults to 3.0): rate per weight, in [0.05, 16].
        step (`float`, *optional*): use this multiplier ``m`` and skip the search.
        dead_threshold (`float`, *optional*, defaults to 1e-3): median-rule threshold.
        target (`str`, *optional*, defaults to `"original"`): as in watersic_quantize.

    Returns:
        [`QuantizedWeight`] with ``method="rtn"``, ``row_scale = m·rms_r`` (fp16-rounded,
        range-balanced) and ``col_scale`` = 1 (a power of two after balancing; 0 when dead).
    """
    weight = V.check_weight(weight)
    bits = V.check_bits(bits)
    target = V.check_target(target)
    dead_threshold = V.check_fraction("dead_threshold", dead_threshold)
    if step is not None:
        step = V.check_positive("step", step)
    device = weight.device
    a, n_orig = weight.shape
    if sigma_x is None:
        dead = torch.zeros(0, dtype=torch.int64, device=device)
    else:
        sx = V.check_matrix("sigma_x", sigma_x, (n_orig, n_orig), symmetric=True, device=device)
        dead = find_dead_columns(sx, dead_threshold)
    n_dead = int(dead.numel())
    if n_dead == n_orig:
        raise ValueError("every input feature of sigma_x is dead; check the calibration statistics")
    keep = live_mask(n_orig, dead, device)
    w = weight.to(torch.float64)[:, keep]
    rms = (w * w).mean(1).sqrt()
    # Rows that are all zero get codes 0 whatever the step; give them a unit step to avoid 0/0.
    unit = torch.where(rms > 0, rms, torch.ones_like(rms))

    def codes_for(m: float) -> torch.Tensor:
        return torch.round(w / (m * unit)[:, None])

    h_target = float("nan")
    history: list[tuple[float, float]] = []
    if step is None:
        h_target = entropy_target(bits, a, n_orig, n_dead, target)
        rho, _, history = secant_search(lambda r: pooled_entropy(codes_for(step_for_rate(r, 1.0))),
                                        h_target)
        step = step_for_rate(rho, 1.0)
    z = codes_for(step)
    row16, col16_live, _ = fp16_balance(step * unit * (rms > 0),
                                        torch.ones(n_orig - n_dead, dtype=torch.float64,
                                                   device=device), z)
    z = zero_codes_of_zero_scales(z, row16, col16_live)
    hint = "check the weight for extreme values or pass an explicit step"
    check_finite_output("rtn", (a, n_orig), hint, row_scale=row16, col_scale=col16_live, step=step)
    codes = torch.zeros((a, n_orig), dtype=torch.int32, device=device)
    codes[:, keep] = checked_codes(z, "rtn", (a, n_orig), hint)
    col16 = torch.zeros(n_orig, dtype=torch.float32, device=device)
    col16[keep] = col16_live
    return QuantizedWeight(
        codes=codes, col_scale=col16, row_scale=row16, dead_columns=dead, step=float(step),
        method="rtn", target_bits=bits, target=target, entropy_target=h_target,
        search_evals=len(history), search_history=history, gamma=None)
