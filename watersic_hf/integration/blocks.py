"""Decoder blocks: discovery, capture of their inputs, running them, finding their Linear groups.

Everything here is generic over decoder-only transformers 5.x models whose blocks hold ``nn.Linear``
layers (Llama, Qwen2/3, Mistral, Phi-3, Gemma 1/2/3, OPT, ...). No module names are hard-coded:

* the blocks are the ``nn.ModuleList`` whose length is ``num_hidden_layers``;
* Linears that consume the *same input tensor* in one forward form a group (q/k/v, gate/up, or a
fused
  ``qkv_proj`` alone) and share statistics;
* the group just before the attention call is the attention-input group; the Linear right after the
  attention call and the block's last Linear write into the residual stream when a numerical check
  shows ``out = in + y_attn + y_mlp`` (plain pre-norm residual blocks).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "BlockInputs",
    "LinearGroup",
    "StopForward",
    "block_output",
    "capture_block_inputs",
    "discover_groups",
    "find_decoder_blocks",
    "move_to",
    "run_block",
]


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (nothing after it is needed)."""


def move_to(obj: Any, device: torch.device | str) -> Any:
    """Move every tensor inside nested tuples/lists/dicts to ``device``; other objects are kept."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(move_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [move_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: move_to(v, device) for k, v in obj.items()}
    return obj


def _text_config(model: nn.Module) -> Any:
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks of ``model`` and their qualified name (e.g. ``"model.layers"``).

    Raises:
        ValueError: no block list is found, or the blocks use GPT-2 style ``Conv1D`` layers, or
            hold no ``nn.Linear``.
    """
    from transformers.pytorch_utils import Conv1D

    n_layers = getattr(_text_config(model), "num_hidden_layers", None)
    candidates: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if any(name.startswith(c + ".") for c, _ in candidates):
                continue  # lists nested inside blocks (e.g. MoE experts) are not blocks
            candidates.append((name, module))
    if not candidates:
        raise ValueError(
            f"{type(model).__name__} has no list of decoder blocks (nn.ModuleList); WaterSIC "
            "supports decoder-only transformers such as Llama, Qwen, Mistral, Phi-3, Gemma and OPT"
        )
    matching = [c for c in candidates if len(c[1]) == n_layers]
    name, blocks = (matching or sorted(candidates, key=lambda c: -len(c[1])))[0]
    if any(isinstance(m, Conv1D) for m in blocks.modules()):
        raise ValueError(
            f"{type(model).__name__} uses GPT-2 style Conv1D layers (transposed weights), which "
            "WaterSIC does not quantize; use a model whose blocks hold nn.Linear layers"
        )
    if not any(isinstance(m, nn.Linear) for m in blocks.modules()):
        raise ValueError(
            f"the decoder blocks of {type(model).__name__} ({name}) hold no nn.Linear layers: "
            "nothing to quantize with WaterSIC"
        )
    return name, blocks


def _block_output(out: Any) -> torch.Tensor:
    # transformers 5.x decoder layers return a Tensor; older/custom ones return a tuple.
    return out[0] if isinstance(out, (tuple, list)) else out


block_output = _block_output


def run_block(
    block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]
) -> torch.Tensor | None:
    """Run ``block`` on ``hidden`` with the captured ``kwargs``.

    Returns:
        the block's output hidden states, or None when a hook stopped the forward early.
    """
    try:
        return _block_output(block(hidden, **kwargs))
    except StopForward:
        return None


@dataclass
class BlockInputs:
    """Inputs of the first block for every calibration batch.

    Attributes:
        hidden (`list[torch.Tensor]`): per batch, ``(B, T, hidden)`` in the model dtype.
        kwargs (`list[dict[str, dict]]`): per batch, the keyword arguments each kind of block
            receives, keyed by layer type (Gemma 2/3 give sliding and full layers different masks
            and rotary embeddings); tensors on the cache device.
        layer_types (`list[str]`): per block, its key into ``kwargs``.
    """

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, dict[str, Any]]]
    layer_types: list[str]

    def block_kwargs(self, block_idx: int, batch_idx: int) -> dict[str, Any]:
        return self.kwargs[batch_idx][self.layer_types[block_idx]]

    @property
    def tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


def _layer_types(model: nn.Module, n_blocks: int) -> list[str]:
    types = getattr(_text_config(model), "layer_types", None)
    if (
        isinstance(types, (list, tuple))
        and len(types) >= n_blocks
        and len(set(types[:n_blocks])) > 1
    ):
        return [str(t) for t in types[:n_blocks]]
    return ["all"] * n_blocks


def _identity_forward(
    hidden_states: torch.Tensor | None = None, *args: Any, **kwargs: Any
) -> torch.Tensor:
    return hidden_states if hidden_states is not None else kwargs["hidden_states"]


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    batches: Sequence[torch.Tensor],
    cache_device: torch.device | str,
) -> BlockInputs:
    """Run the model up to its first block for every batch and keep that block's inputs.

    A forward pre-hook (with kwargs) on block 0 records ``hidden_states`` and the keyword arguments,
    then raises :class:`StopForward`, so nothing after the embeddings runs. When blocks of different
    layer types receive different kwargs (Gemma 2/3), the first block of each type is hooked too and
    the blocks before it are bypassed with an identity forward, which keeps the capture cheap.

    Args:
        model (`PreTrainedModel`): the float model (``use_cache`` must already be off).
        blocks (`nn.ModuleList`): from :func:`find_decoder_blocks`.
        batches (`Sequence[torch.LongTensor]`): token ids, each ``(B, T)``.
        cache_device: where captured tensors are kept (CPU when streaming blocks to an accelerator).

    Raises:
        ValueError: the model produced non-finite embeddings.
    """
    layer_types = _layer_types(model, len(blocks))
    first_of_type: dict[str, int] = {}
    for i, t in enumerate(layer_types):
        first_of_type.setdefault(t, i)
    last = max(first_of_type.values())
    records: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}

    def make_hook(idx: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            records[idx] = (args, kwargs)
            if idx == last:
                raise StopForward

        return hook

    handles = [
        blocks[i].register_forward_pre_hook(make_hook(i), with_kwargs=True)
        for i in first_of_type.values()
    ]
    bypassed = [blocks[i] for i in range(last)]
    for b in bypassed:
        b.forward = _identity_forward  # instance attribute shadows the class method
    embeddings = model.get_input_embeddings()
    input_device = embeddings.weight.device
    if input_device.type == "meta":
        # Offloaded by accelerate: its hook reads the weights onto its execution device.
        hook = getattr(embeddings, "_hf_hook", None)
        input_device = torch.device(getattr(hook, "execution_device", None) or "cpu")
    hidden: list[torch.Tensor] = []
    kwargs_per_batch: list[dict[str, dict[str, Any]]] = []
    try:
        for batch in batches:
            records.clear()
            try:
                model(input_ids=batch.to(input_device), use_cache=False)
            except StopForward:
                pass
            if 0 not in records:
                raise RuntimeError(
                    "the first decoder block was never called during the calibration forward"
                )
            per_type: dict[str, dict[str, Any]] = {}
            for t, idx in first_of_type.items():
                args, kw = records[idx]
                kw = dict(kw)
                h = args[0] if args else kw.pop("hidden_states")
                kw.pop("hidden_states", None)
                if len(args) > 1:
                    raise RuntimeError(
                        f"{type(blocks[idx]).__name__} received {len(args)} positional arguments; "
                        "WaterSIC expects only hidden_states positionally"
                    )
                # No cache is built or mutated while calibrating.
                kw["use_cache"] = False
                kw.pop("past_key_values", None)
                kw.pop("past_key_value", None)
                per_type[t] = move_to(kw, cache_device)
                if idx == 0:
                    if not torch.isfinite(h).all():
                        raise ValueError(
                            "the model's embeddings of the calibration data contain NaN/inf; "
                            "check the model weights and load it in float32 or bfloat16"
                        )
                    hidden.append(h.detach().to(cache_device))
            kwargs_per_batch.append(per_type)
    finally:
        for handle in handles:
            handle.remove()
        for b in bypassed:
            del b.forward
    return BlockInputs(hidden=hidden, kwargs=kwargs_per_batch, layer_types=layer_types)


# --------------------------------------------------------------------------------------------------
# Hooks on the Linears of one block


@dataclass
class LinearGroup:
    """Linears of one block that read the same input tensor, in call order.

    Attributes:
        names (`list[str]`): names relative to the block, e.g. ``["self_attn.q_proj", ...]``.
        attention_input (`bool`): the group feeds the attention (q/k/v); gets attention-weighted
            statistics.
        residual (`str` or None): ``"attn"`` for the Linear whose output is added to the block
            input, ``"mlp"`` for the one added to the post-attention hidden state, None otherwise.
    """

    names: list[str]
    attention_input: bool = False
    residual: str | None = None


@dataclass
class BlockStructure:
    """Result of :func:`discover_groups`."""

    groups: list[LinearGroup]
    order: list[str] = field(default_factory=list)
    residual_ok: bool = False
    attention_seen: bool = False
    #: ``out == (h + y_attn) + y_mlp`` holds bit for bit on the discovery batch: the block output
    #: can be assembled from its parts instead of running the block again.
    residual_exact: bool = False


@contextlib.contextmanager
def hooks(handles: list[Any]) -> Iterator[None]:
    """Remove the given hook handles on exit."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def discover_groups(
    block: nn.Module,
    hidden: torch.Tensor,
    kwargs: dict[str, Any],
    linears: dict[str, nn.Linear],
    *,
    attention_marker: Callable[[Callable[[], None]], Any] | None = None,
) -> BlockStructure:
    """Run ``block`` once and group its Linears by shared input.

    Args:
        block (`nn.Module`): the block (a float copy when ``attention_marker`` is used).
        hidden, kwargs: one batch of block inputs on the block's device.
        linears (`dict[str, nn.Linear]`): the Linears to quantize, by name relative to the block.
        attention_marker: a context-manager factory that calls the given callback whenever the
            block's attention function runs (see :mod:`watersic_hf.integration.attention`).

    Returns:
        the groups in call order, with attention and residual roles.
    """
    events: list[tuple[str, Any]] = []  # ("linear", (name, input, output)) or ("attention", None)
    name_of = {id(m): n for n, m in linears.items()}

    def record(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        events.append(("linear", (name_of[id(module)], args[0], output)))

    handles = [m.register_forward_hook(record) for m in linears.values()]
    marker = (
        attention_marker(lambda: events.append(("attention", None))) if attention_marker else None
    )
    with hooks(handles), marker or contextlib.nullcontext():
        out = _block_output(block(hidden, **kwargs))

    calls = [e[1] for e in events if e[0] == "linear"]
    seen: set[str] = set()
    groups: list[LinearGroup] = []
    prev_input: torch.Tensor | None = None
    attention_pos: int | None = None  # number of linear calls before the (first) attention call
    n_linear = 0
    for kind, payload in events:
        if kind == "attention":
            if attention_pos is None:
                attention_pos = n_linear
            continue
        n_linear += 1
        name, inp, _ = payload
        if name in seen:
            # A Linear called twice in one forward (weight sharing) would be quantized against mixed
            # statistics; keep it in float.
            logger.warning("%s is called more than once per forward; it is left unquantized", name)
            continue
        seen.add(name)
        same = prev_input is not None and (
            inp is prev_input
            or (inp.data_ptr() == prev_input.data_ptr() and inp.shape == prev_input.shape)
        )
        if same and groups:
            groups[-1].names.append(name)
        else:
            groups.append(LinearGroup(names=[name]))
        prev_input = inp
    never_called = [n for n in linears if n not in seen]
    if never_called:
        logger.warning(
            "Linears never called in a block forward are left unquantized: %s", never_called
        )

    structure = BlockStructure(
        groups=groups, order=[c[0] for c in calls], attention_seen=attention_pos is not None
    )
    if attention_pos is not None and groups:
        # The group whose members ran last before the attention call feeds it.
        before = [c[0] for c in calls[:attention_pos]]
        for g in groups:
            if before and g.names[-1] == before[-1]:
                g.attention_input = True
        after = [c[0] for c in calls[attention_pos:]]
        if after and len(calls) >= 2:
            attn_out, mlp_out = after[0], calls[-1][0]
            outputs = {c[0]: c[2] for c in calls}
            if attn_out != mlp_out and _is_plain_residual(
                hidden, out, outputs[attn_out], outputs[mlp_out]
            ):
                structure.residual_ok = True
                structure.residual_exact = _is_exact_residual(
                    hidden, out, outputs[attn_out], outputs[mlp_out]
                )
                for g in groups:
                    if g.names == [attn_out]:
                        g.residual = "attn"
                    elif g.names == [mlp_out]:
                        g.residual = "mlp"
    return structure


def residual_sum(h_in: torch.Tensor, y_attn: torch.Tensor, y_mlp: torch.Tensor) -> torch.Tensor:
    """``(h_in + y_attn) + y_mlp`` in the order and dtype a pre-norm residual block adds them."""
    return (h_in + y_attn.reshape(h_in.shape)) + y_mlp.reshape(h_in.shape)


def _is_exact_residual(
    h_in: torch.Tensor, h_out: torch.Tensor, y_attn: torch.Tensor, y_mlp: torch.Tensor
) -> bool:
    """True when :func:`residual_sum` reproduces the block output bit for bit."""
    if y_attn.numel() != h_in.numel() or y_mlp.numel() != h_in.numel():
        return False
    total = residual_sum(h_in, y_attn, y_mlp)
    return total.dtype == h_out.dtype and torch.equal(total, h_out.reshape(h_in.shape))


def _is_plain_residual(
    h_in: torch.Tensor, h_out: torch.Tensor, y_attn: torch.Tensor, y_mlp: torch.Tensor
) -> bool:
    """True when ``h_out == h_in + y_attn + y_mlp`` up to rounding (a pre-norm residual block)."""
    n = h_in.shape[-1]
    if y_attn.shape[-1] != n or y_mlp.shape[-1] != n:
        return False
    total = (
        h_in.reshape(-1, n).float() + y_attn.reshape(-1, n).float() + y_mlp.reshape(-1, n).float()
    )
    ref = h_out.reshape(-1, n).float()
    err = (ref - total).norm() / ref.norm().clamp_min(1e-30)
    tol = 1e-4 if h_out.dtype == torch.float32 else 3e-2
    return bool(err <= tol)
