"""Memory model of the calibration engine: peak bytes per group of Linears and per block.

Counted from the code (every term names the tensors it stands for); checked against the measured
peak RSS of a CPU calibration by ``tests/test_engine.py`` (a mid-size block, within 25%) and by
``benchmarks/bench_memory.py`` (an 8B-shaped block), and used to project larger models.

Group state, for a group with ``n`` inputs whose largest Linear has ``a`` rows (fp64 = 8 bytes):

* statistics: ``k`` fp64 ``n × n`` sums — ``k = 3`` with drift (``Σ_X``, ``Σ_X̂``, ``Σ_XX̂``),
  else 1 (normalised and symmetrised in place, so they are the matrices the quantizer uses);
  ``Σ_ΔR`` (``h × n`` fp64) for a residual-writing Linear;
* the damped Cholesky factor ``L`` (one ``n × n``, factored in place);
* the rescaler fit: ``F3 = Σ_X̂ ∘ Ŵ0ᵀdiag(t²)Ŵ0``, its factor and the column-major copy that
  ``cholesky_solve`` makes of it (three ``n × n``), plus the Gram matrix's first row block
  (``n/8 × n``);
* per Linear, ``PER_LAYER_AN`` fp64 ``a × n`` arrays at the rescaler peak (weight, target ``Y``,
  codes, ``Ŵ0``, cross term and its temporary, scaled copies).

So ``group bytes ≈ 8·(k + 4)·n² + n² + 8·PER_LAYER_AN·a·n + 8·h·n`` (with the residual term).

Activations of a block with ``N`` calibration tokens (``s`` bytes per activation): the block
inputs of both paths and the next float cache (``N·h`` each), the float inputs of the groups
not yet quantized (``N·n_g`` each), the float attention output (``N·h``) and the kept outputs of
the Linears of finished groups (``N·rows``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GroupShape", "block_peak", "group_bytes", "llama_groups"]

#: fp64 (a, n) arrays alive at the per-Linear peak (see the module docstring).
PER_LAYER_AN = 8
#: (n, n) fp64 matrices besides the statistics: the Cholesky factor, F3, F3's factor and the
#: solver's copy of it.
EXTRA_NN = 4


@dataclass(frozen=True)
class GroupShape:
    """One group of Linears that share an input.

    Attributes:
        name (`str`): e.g. ``"down_proj"``.
        n (`int`): in-features.
        rows (`tuple[int, ...]`): out-features of each Linear.
        residual (`bool`): writes into the residual stream (has ``Σ_ΔR``).
    """

    name: str
    n: int
    rows: tuple[int, ...]
    residual: bool = False


def llama_groups(hidden: int, intermediate: int, heads: int, kv_heads: int,
                 head_dim: int | None = None) -> list[GroupShape]:
    """The four groups of a Llama-style block (q/k/v, o, gate/up, down)."""
    hd = head_dim or hidden // heads
    q, kv = heads * hd, kv_heads * hd
    return [
        GroupShape("q/k/v", hidden, (q, kv, kv)),
        GroupShape("o_proj", q, (hidden,), residual=True),
        GroupShape("gate/up", hidden, (intermediate, intermediate)),
        GroupShape("down_proj", intermediate, (hidden,), residual=True),
    ]


def group_bytes(n: int, rows: int, hidden: int, *, drift: bool = True,
                residual: bool = False) -> int:
    """Peak bytes of the statistics and quantization of one group (on the compute device).

    Args:
        n (`int`): in-features of the group.
        rows (`int`): out-features of its largest Linear.
        hidden (`int`): rows of ``Σ_ΔR`` (the residual stream width).
        drift (`bool`): three ``n × n`` statistics instead of one.
        residual (`bool`): the group has a ``Σ_ΔR`` term.
    """
    k = 3 if drift else 1
    total = 8 * (k + EXTRA_NN) * n * n + n * n + 8 * PER_LAYER_AN * rows * n
    if residual:
        total += 8 * hidden * n
    return total


def block_peak(groups: list[GroupShape], hidden: int, tokens: int, *, act_bytes: int = 4,
               drift: bool = True, separate_paths: bool = True) -> dict[str, int]:
    """Peak bytes while one block is calibrated, and which group reaches it.

    Args:
        groups: the block's groups in call order.
        hidden (`int`): residual stream width.
        tokens (`int`): calibration tokens ``N``.
        act_bytes (`int`): bytes per activation (4 for an fp32 model).
        drift (`bool`): drift statistics (and hence the float pass) on.
        separate_paths (`bool`): the float and quantized block inputs are different tensors
            (False only for the first block, whose two caches are the same embeddings).

    Returns:
        ``{"peak": bytes, "group": index, "stats": group bytes, "activations": bytes}``.
    """
    s, N = act_bytes, tokens
    best = {"peak": -1, "group": -1, "stats": 0, "activations": 0}
    caches = (2 if separate_paths else 1) * N * hidden * s + N * hidden * s  # inputs + next float
    for i, g in enumerate(groups):
        float_inputs = N * s * sum(x.n for x in groups[i:]) if drift else 0
        attn_out = N * hidden * s if drift else 0
        kept = N * s * sum(sum(x.rows) for x in groups[:i])
        acts = caches + float_inputs + attn_out + kept
        stats = group_bytes(g.n, max(g.rows), hidden, drift=drift, residual=g.residual)
        if acts + stats > best["peak"]:
            best = {"peak": acts + stats, "group": i, "stats": stats, "activations": acts}
    return best
