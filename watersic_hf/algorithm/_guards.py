"""Numerical guards: a pseudo-inverse fallback for solves, and the final check of every output.

The inputs of the quantizers are validated (``_validate``), but finite inputs can still break down
inside: a rank-deficient ``Σ`` met with ``damp=0``, a nearly singular rescaler system, an
intermediate that overflows. The rule here is that such a case either falls back to a safe
answer (the minimum-norm least-squares solution, in float64) or raises an error that names the
layer and the setting to change; it never writes NaN into a checkpoint.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

INT32_MAX = 2**31 - 1


def pinv_solve(mat: torch.Tensor, rhs: torch.Tensor, *, hermitian: bool = False) -> torch.Tensor:
    """Minimum-norm least-squares solution of ``mat x = rhs`` via the pseudo-inverse, in float64.

    Used when a factorisation or a plain solve fails (or returns non-finite values) on a
    singular or numerically singular ``mat``: the pseudo-inverse drops the null space instead of
    dividing by ~0. ``torch.linalg.pinv`` works on every device (``lstsq``'s rank-revealing
    drivers are CPU only).

    Args:
        mat (`torch.Tensor` of shape `(n, n)`): the system matrix.
        rhs (`torch.Tensor` of shape `(n,)` or `(n, k)`): right-hand side(s).
        hermitian (`bool`, *optional*, defaults to False): ``mat`` is symmetric (faster, and
            uses its eigendecomposition).

    Returns:
        `torch.Tensor` shaped like ``rhs``, in ``rhs.dtype``.
    """
    pinv = torch.linalg.pinv(mat.to(torch.float64), hermitian=hermitian)
    out = pinv @ rhs.to(torch.float64)
    return out.to(rhs.dtype)


def checked_codes(z: torch.Tensor, method: str, shape: tuple[int, int], hint: str) -> torch.Tensor:
    """``z`` as int32 after checking it is finite and within int32.

    Args:
        z (`torch.Tensor` of shape `(a, n_live)`): integer-valued float codes.
        method (`str`): quantizer name, for the message.
        shape (`tuple[int, int]`): the layer's ``(out_features, in_features)``, for the message.
        hint (`str`): what the caller can change, appended to the message.

    Returns:
        `torch.Tensor` of shape `(a, n_live)`, int32.
    """
    if z.numel() == 0:
        return z.to(torch.int32)
    if not bool(torch.isfinite(z).all()):
        bad = int((~torch.isfinite(z)).sum())
        raise ValueError(f"{method} quantization of a {shape[0]}x{shape[1]} layer produced {bad} "
                         f"non-finite code(s) from finite inputs; {hint}")
    top = float(z.abs().max())
    if top > INT32_MAX:
        raise ValueError(f"{method} quantization of a {shape[0]}x{shape[1]} layer produced codes "
                         f"beyond int32 (max |code| {top:.3g}): the step is far too small for "
                         "this weight; pass a larger step (or lower bits)")
    return z.to(torch.int32)


def check_finite_output(
    method: str, shape: tuple[int, int], hint: str, **tensors: torch.Tensor | float | None
) -> None:
    """Raise ``ValueError`` if any of ``tensors`` (scales, gains, the step) is not finite.

    Args:
        method (`str`), shape (`tuple[int, int]`), hint (`str`): as in :func:`checked_codes`.
        **tensors: name → tensor or float to check (None entries are skipped).
    """
    for name, val in tensors.items():
        if val is None:
            continue
        t = val if isinstance(val, torch.Tensor) else torch.tensor(float(val), dtype=torch.float64)
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            raise ValueError(f"{method} quantization of a {shape[0]}x{shape[1]} layer produced "
                             f"{int((~finite).sum())} non-finite value(s) in {name} from finite "
                             f"inputs; {hint}")
