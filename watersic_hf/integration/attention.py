"""Measure attention probabilities inside an unmodified transformers attention module.

transformers 5.x attention modules call ``ALL_ATTENTION_FUNCTIONS.get_interface(
config._attn_implementation, eager_attention_forward)`` with the post-rotary ``query``/``key``. We
register one extra implementation, ``"watersic_probe"``, that

1. recomputes the attention probabilities from ``query``/``key`` (in fp32, one key/value head group
at a
   time to bound memory), reduces them to the attention each key position *receives*, hands that to
   a sink function, and
2. delegates the actual attention to the implementation the model was using, so outputs are
unchanged.

Only the float copy of the block being calibrated is switched to the probe (its config is a private
deep copy), so the user's model is never touched.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import torch
from transformers import AttentionInterface, PretrainedConfig

logger = logging.getLogger(__name__)

PROBE_NAME = "watersic_probe"
_ORIG_ATTR = "_watersic_orig_attn"
_SINK_ATTR = "_watersic_sink"

__all__ = ["PROBE_NAME", "install_probe", "received_attention", "set_sink"]


def _original_interface(module: torch.nn.Module, name: str | None) -> Callable[..., Any]:
    if name is None or name == "eager":
        # "eager" is each model file's own function (it may handle softcap, sinks, ...).
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is None:
            raise RuntimeError(f"cannot find eager_attention_forward for {type(module).__name__}")
        return eager
    return AttentionInterface._global_mapping[name]


def _additive_mask(
    attention_mask: Any,
    b: int,
    t: int,
    s: int,
    device: torch.device,
    *,
    causal: bool,
    sliding: int | None,
) -> torch.Tensor | None:
    """Float mask broadcastable to ``(B, H, t, s)`` with 0 for visible pairs and -inf otherwise."""
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        mask = attention_mask[..., :t, :s]
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, device=device).masked_fill(
                ~mask.to(device), float("-inf")
            )
        return mask.to(device, torch.float32)
    if not causal:
        return None
    i = torch.arange(t, device=device)[:, None] + (s - t)  # absolute query positions
    j = torch.arange(s, device=device)[None, :]
    visible = j <= i
    if sliding is not None:
        visible &= j > i - sliding
    return torch.zeros(t, s, device=device).masked_fill(~visible, float("-inf"))


def received_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: Any,
    *,
    scaling: float | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Attention received by each key position, summed over queries and heads.

    Args:
        module (`nn.Module`): the attention module (``is_causal`` is read from it, default True).
        query (`torch.Tensor` of shape ``(B, H, t, d)``): post-rotary queries.
        key (`torch.Tensor` of shape ``(B, H_kv, s, d)``): post-rotary keys (``H`` a multiple of
            ``H_kv``).
        attention_mask: 4-D bool/additive mask, or None for a causal (optionally sliding-window)
        mask.
        scaling (`float`, *optional*): score scale; defaults to ``d ** -0.5``.
        softcap (`float`, *optional*): logit soft-capping (Gemma 2).
        sliding_window (`int`, *optional*): window used when no mask tensor is given.

    Returns:
        `torch.Tensor` of shape ``(B, s)``, float32: ``Σ_h Σ_i A_h[i, j]``.
    """
    b, h, t, d = query.shape
    h_kv, s = key.shape[1], key.shape[2]
    rep = h // h_kv
    scale = float(scaling) if scaling is not None else d**-0.5
    mask = _additive_mask(
        attention_mask,
        b,
        t,
        s,
        query.device,
        causal=bool(getattr(module, "is_causal", True)),
        sliding=sliding_window,
    )
    received = torch.zeros(b, s, dtype=torch.float32, device=query.device)
    for g in range(h_kv):
        q = query[:, g * rep : (g + 1) * rep].float()  # (B, rep, t, d)
        k = key[:, g : g + 1].float()  # (B, 1, s, d)
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, rep, t, s)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if mask is not None:
            m = mask
            if m.dim() == 4 and m.shape[1] > 1:
                m = m[:, g * rep : (g + 1) * rep]
            scores = scores + m
        received += torch.softmax(scores, dim=-1).nan_to_num_(0.0).sum(dim=(1, 2))
    return received


def _probe_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    *args: Any,
    **kwargs: Any,
) -> Any:
    config = module.config
    sink = getattr(config, _SINK_ATTR, None)
    if sink is not None:
        sink(
            received_attention(
                module,
                query,
                key,
                attention_mask,
                scaling=kwargs.get("scaling"),
                softcap=kwargs.get("softcap"),
                sliding_window=kwargs.get("sliding_window"),
            ),
            query.shape[1],
        )
    impl = _original_interface(module, getattr(config, _ORIG_ATTR, None))
    return impl(module, query, key, value, attention_mask, *args, **kwargs)


AttentionInterface.register(PROBE_NAME, _probe_forward)


def install_probe(block: torch.nn.Module) -> list[PretrainedConfig]:
    """Switch the attention of ``block`` (a private copy!) to the probe.

    Returns:
        the configs that were switched (empty when the block has no transformers attention).
    """
    configs: dict[int, PretrainedConfig] = {}
    for module in block.modules():
        cfg = getattr(module, "config", None)
        if isinstance(cfg, PretrainedConfig):
            configs[id(cfg)] = cfg
    for cfg in configs.values():
        current = cfg._attn_implementation
        if current != PROBE_NAME:
            setattr(cfg, _ORIG_ATTR, current)
            cfg._attn_implementation = PROBE_NAME
        setattr(cfg, _SINK_ATTR, None)
    return list(configs.values())


def set_sink(
    configs: list[PretrainedConfig], sink: Callable[[torch.Tensor, int], None] | None
) -> None:
    """Route the probe's output (received attention ``(B, s)``, number of heads) to ``sink``."""
    for cfg in configs:
        setattr(cfg, _SINK_ATTR, sink)
