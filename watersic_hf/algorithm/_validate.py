"""Input checks shared by the single-layer quantizers.

Every check raises ``ValueError``/``TypeError`` that names the offending argument and says how to
fix it, because these functions sit at the boundary between user code (or the calibration
pipeline) and the numerics, where a silent NaN would only show up layers later.
"""

from __future__ import annotations

import math

import torch

#: Smallest and largest accepted ``bits`` (rate per weight entry, side information included).
#: 0.05 and 16 are the clip range of the cross-layer rate controller (algorithm.md 3.8).
MIN_BITS, MAX_BITS = 0.05, 16.0


def check_weight(weight: object) -> torch.Tensor:
    """Return ``weight`` after checking it is a finite, non-empty, floating 2-D tensor."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor of shape (out_features, in_features), got "
                        f"{type(weight).__name__}")
    if weight.ndim != 2 or weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"weight must be a non-empty 2-D tensor (out_features, in_features), got "
                         f"shape {tuple(weight.shape)}; pass nn.Linear.weight")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating tensor, got dtype {weight.dtype}; cast it with "
                        ".float()")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight contains NaN or Inf entries; fix the checkpoint (or the layer "
                         "that produced it) before quantizing")
    return weight


def check_matrix(
    name: str,
    mat: object,
    shape: tuple[int, int],
    *,
    symmetric: bool,
    device: torch.device,
) -> torch.Tensor:
    """Check a statistics matrix and return it as float64 on ``device``.

    Args:
        name (`str`): argument name used in error messages.
        mat (`torch.Tensor`): the matrix to check.
        shape (`tuple[int, int]`): required shape.
        symmetric (`bool`): require symmetry (second-moment matrices); the result is then
            symmetrised exactly, since fp32 accumulation leaves ~1e-7 relative asymmetry.
        device (`torch.device`): where the result must live (the weight's device).

    Returns:
        `torch.Tensor`: float64 tensor of ``shape`` on ``device``.
    """
    if not isinstance(mat, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape}, got {type(mat).__name__}")
    if tuple(mat.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(mat.shape)} but the weight needs {shape}; "
                         f"statistics must match the layer's (out_features, in_features)")
    if not mat.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {mat.dtype}")
    out = mat.to(device=device, dtype=torch.float64)
    # The checks run on row blocks, so that an (n, n) matrix costs no (n, n) temporaries (for
    # n = 28672 each would be 6.6 GB in fp64).
    rows = _row_blocks(out.shape[0], out.shape[1])
    if not all(bool(torch.isfinite(out[i:j]).all()) for i, j in rows):
        raise ValueError(f"{name} contains NaN or Inf entries; recollect the calibration "
                         "statistics (an activation overflowed, e.g. fp16 inputs)")
    if symmetric:
        scale = max(float(out[i:j].abs().max()) for i, j in rows)
        if scale == 0.0:
            raise ValueError(f"{name} is all zeros; the layer saw no (non-zero) calibration "
                             "inputs, so there is nothing to fit — check the calibration hooks")
        asym = max(float((out[i:j] - out[:, i:j].T).abs().max()) for i, j in rows)
        if asym > 1e-4 * scale:
            raise ValueError(f"{name} is not symmetric (max |S - S^T| = {asym:.3g}, max |S| = "
                             f"{scale:.3g}); pass a second-moment matrix E[x x^T]")
        if asym > 0.0:
            # (S + Sᵀ)/2 as a new tensor (the caller's matrix is not modified). An exactly
            # symmetric S (the calibration engine symmetrises its own sums in place) is its own
            # symmetrisation, so it is returned without a copy.
            out = 0.5 * (out + out.T)
    return out


def _row_blocks(n_rows: int, n_cols: int, budget: int = 1 << 20) -> list[tuple[int, int]]:
    """Row ranges of about ``budget`` entries each (at least one row)."""
    step = max(1, budget // max(1, n_cols))
    return [(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


def check_bits(bits: object) -> float:
    """Check the target rate and return it as a float."""
    if isinstance(bits, bool) or not isinstance(bits, (int, float)):
        raise TypeError(f"bits must be a number of bits per weight, got {type(bits).__name__}")
    bits = float(bits)
    if not math.isfinite(bits) or not (MIN_BITS <= bits <= MAX_BITS):
        raise ValueError(f"bits={bits} is outside the supported range [{MIN_BITS}, {MAX_BITS}] "
                         "bits per weight (side information included)")
    return bits


def check_positive(name: str, value: object, *, allow_zero: bool = False) -> float:
    """Check a finite positive (or non-negative) scalar hyper-parameter."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    ok = value >= 0 if allow_zero else value > 0
    if not math.isfinite(value) or not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}={value} is invalid; it must be finite and {bound}")
    return value


def check_fraction(name: str, value: object, *, closed_right: bool = False) -> float:
    """Check a scalar in [0, 1) (or [0, 1])."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    ok = 0.0 <= value <= 1.0 if closed_right else 0.0 <= value < 1.0
    if not math.isfinite(value) or not ok:
        rng = "[0, 1]" if closed_right else "[0, 1)"
        raise ValueError(f"{name}={value} is outside {rng}")
    return value


def check_target(target: object) -> str:
    """Check the rate-target convention (``"original"`` or ``"live"``)."""
    if target not in ("original", "live"):
        raise ValueError(f"target={target!r} is not supported; use 'original' (bits per original "
                         "weight, side information and dead columns included) or 'live' (the plain "
                         "formula used by the cross-layer rate controller)")
    return str(target)
