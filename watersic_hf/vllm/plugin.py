"""vLLM quantization config and linear method for ``quant_method="watersic"`` checkpoints.

Imported by :func:`watersic_hf.vllm.register` (vLLM's ``vllm.general_plugins`` entry point),
never by ``import watersic_hf``: it imports vLLM.

How a checkpoint is read (both storages, ``"packed"`` and ``"entropy"``):

1. :class:`WaterSICVllmConfig` is built from ``config.json``'s ``quantization_config``; its
   ``layers`` entry of every stored layer gives the shape and dtype of each stored tensor.
2. For a vLLM linear layer, :meth:`WaterSICVllmConfig.get_quant_method` finds the stored layers
   it is made of (a *fused* layer such as ``qkv_proj`` is made of ``q_proj``, ``k_proj`` and
   ``v_proj``, through the model's ``packed_modules_mapping``).
3. :meth:`WaterSICLinearMethod.create_weights` registers one empty placeholder parameter per
   stored tensor name (``weight_packed``, ``codes_stream``, ``weight_col_scale``, ...). Their
   weight loaders keep the tensor of each stored layer as it is read (checking its shape, dtype
   and XXH3 checksum), whatever shard of the fused layer it belongs to.
4. :meth:`WaterSICLinearMethod.process_weights_after_loading` decodes each stored layer into a
   packed ``WaterSICLinear`` (:func:`watersic_hf.storage.checkpoint.materialize_layer`), cuts this
   rank's tensor-parallel part (:mod:`watersic_hf.vllm.sharding`) and keeps the modules in
   ``layer.watersic_sources``.
5. :meth:`WaterSICLinearMethod.apply` runs them (Triton kernels on CUDA, the numba kernels on
   CPU) and concatenates their outputs.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    QKVParallelLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.utils import set_weight_attrs

from ..storage.checkpoint import (
    CHECKPOINT_VERSION,
    WaterSICCheckpointLinear,
    materialize_layer,
)
from ..storage.checksum import digest_tensor
from .sharding import (
    ShardPlan,
    column_parallel_plan,
    fused_linear,
    refuse_grouped_layers,
    row_parallel_plan,
    shard_linear,
)

logger = logging.getLogger(__name__)

__all__ = ["QUANT_METHOD", "WaterSICLinearMethod", "WaterSICVllmConfig"]

QUANT_METHOD = "watersic"

# Used when a model class gives vLLM no packed_modules_mapping (most decoder models use these).
_DEFAULT_PACKED = {
    "qkv_proj": ["q_proj", "k_proj", "v_proj"],
    "gate_up_proj": ["gate_proj", "up_proj"],
}
_QKV_INDEX = {"q": 0, "k": 1, "v": 2}


@register_quantization_config(QUANT_METHOD)
class WaterSICVllmConfig(QuantizationConfig):
    """vLLM's view of a WaterSIC checkpoint's ``quantization_config``.

    Args:
        layers (`dict[str, dict]`): ``quantization_config.layers``: per stored layer ``{"in",
            "out", "bias", "layout", "storage", ...}``.
        format_version (`int`): the checkpoint's ``format_version`` (1 or 2).
        checksums (`dict`, *optional*): ``{"algorithm": "xxh3_64", "tensors": {name: hex}}``;
            every tensor is checked as it is loaded.
        backend (`str`, *optional*, defaults to ``"auto"``): ``WaterSICLinear`` backend
            (``"auto"``: Triton on CUDA, numba on CPU; ``WATERSIC_BACKEND`` overrides it).
    """

    def __init__(self, layers: dict[str, dict[str, Any]], format_version: int,
                 checksums: dict[str, Any] | None = None, backend: str | None = None) -> None:
        super().__init__()
        self.layers = dict(layers)
        self.format_version = int(format_version)
        self.checksums = checksums if isinstance(checksums, dict) else None
        self.backend = backend or "auto"
        # vLLM name -> name in the checkpoint (they differ when the model has an hf_to_vllm
        # mapper with renames); the checksums are keyed by the checkpoint's names
        self.checkpoint_names = {name: name for name in self.layers}

    def __repr__(self) -> str:
        return (f"WaterSICVllmConfig(layers={len(self.layers)}, "
                f"format_version={self.format_version}, backend={self.backend!r})")

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        # the Triton kernels need Volta or newer; vLLM skips this check on CPU
        return 70

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything is in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> WaterSICVllmConfig:
        """Build from ``config.json``'s ``quantization_config`` (a dict, or a ``WaterSICConfig``
        when transformers has already parsed it).

        Raises:
            ValueError: the config is not a WaterSIC one, has no ``layers``, has layers with
                per-group scales (standard GPTQ, not served) or a ``format_version`` this
                watersic_hf cannot read.
        """
        if hasattr(config, "to_dict"):
            config = config.to_dict()
        method = config.get("quant_method")
        if method != QUANT_METHOD:
            raise ValueError(f"quant_method={method!r}; WaterSICVllmConfig reads "
                             f"{QUANT_METHOD!r} checkpoints only.")
        layers = config.get("layers")
        if not isinstance(layers, dict) or not layers:
            raise ValueError(
                "quantization_config has no 'layers'; this WaterSIC folder was not written by "
                "watersic_hf's save_pretrained after quantization. Quantize and save it again.")
        refuse_grouped_layers(layers)
        version = int(config.get("format_version") or 1)
        if version not in (1, CHECKPOINT_VERSION):
            raise ValueError(f"format_version={version} is not supported by this watersic_hf "
                             f"(reads 1 and {CHECKPOINT_VERSION}); upgrade watersic-hf.")
        return cls(layers, version, config.get("checksums"), config.get("backend"))

    def apply_vllm_mapper(self, hf_to_vllm_mapper: Any) -> None:
        """Rename the stored layers as the vLLM model names its modules (renames only: the
        fused layers are resolved through ``packed_modules_mapping``)."""
        rename_only = getattr(hf_to_vllm_mapper, "get_rename_mapper", None)
        mapper = rename_only() if rename_only is not None else hf_to_vllm_mapper
        layers, names = {}, {}
        for name, meta in self.layers.items():
            new = mapper.map_name(name) or name
            layers[new] = meta
            names[new] = self.checkpoint_names.get(name, name)
        self.layers, self.checkpoint_names = layers, names

    def source_layers(self, prefix: str) -> list[str] | None:
        """The stored layers a vLLM linear layer is made of, in its output order.

        Returns:
            ``[prefix]`` for a stored layer, the names of its parts for a fused layer whose
            parts are all stored, ``None`` for a layer kept in float.

        Raises:
            ValueError: only some parts of a fused layer are quantized.
        """
        if prefix in self.layers:
            return [prefix]
        parent, _, leaf = prefix.rpartition(".")
        parts = self.packed_modules_mapping.get(leaf) or _DEFAULT_PACKED.get(leaf)
        if not parts:
            return None
        names = [f"{parent}.{p}" if parent else p for p in parts]
        stored = [n in self.layers for n in names]
        if all(stored):
            return names
        if any(stored):
            raise ValueError(
                f"{prefix}: vLLM fuses {names} into one layer, but the checkpoint quantizes only "
                f"{[n for n, s in zip(names, stored, strict=True) if s]}. Quantize all of them "
                "or none (modules_to_not_convert).")
        return None

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase | None:
        if not isinstance(layer, LinearBase):
            return None  # embeddings, lm_head and attention stay in float
        sources = self.source_layers(prefix)
        if sources is None:
            return UnquantizedLinearMethod()
        return WaterSICLinearMethod(self, prefix, sources)


class WaterSICLinearMethod(LinearMethodBase):
    """Linear method of one vLLM layer made of stored WaterSIC layers (see the module docstring).

    Args:
        config (`WaterSICVllmConfig`): the checkpoint's config.
        prefix (`str`): the vLLM layer's name (``model.layers.0.self_attn.qkv_proj``).
        sources (`list[str]`): its stored layers in output order (``[..q_proj, ..k_proj,
            ..v_proj]``).
    """

    def __init__(self, config: WaterSICVllmConfig, prefix: str, sources: list[str]) -> None:
        self.config = config
        self.prefix = prefix
        self.sources = list(sources)
        self.metas = [config.layers[name] for name in self.sources]
        self.specs = [WaterSICCheckpointLinear.tensor_specs(m, config.format_version)
                      for m in self.metas]

    def create_weights(self, layer: nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs: Any) -> None:
        """Register one empty placeholder per stored tensor name; the loaders fill a per-source
        dict (shapes differ between sources, so they cannot share one fused tensor)."""
        for name, meta in zip(self.sources, self.metas, strict=True):
            if int(meta["in"]) != int(input_size):
                raise ValueError(
                    f"{name}: the checkpoint stores in_features={meta['in']} but vLLM's "
                    f"{self.prefix} has input_size={input_size}; config.json does not match "
                    "the model.")
        layer.watersic_loaded = [{} for _ in self.sources]
        layer.watersic_partition_sizes = list(output_partition_sizes)
        names = list(dict.fromkeys(n for spec in self.specs for n in spec))
        for pname in names:
            param = nn.Parameter(torch.empty(0, dtype=torch.uint8), requires_grad=False)
            set_weight_attrs(param, {"weight_loader": self._loader(layer, pname)})
            layer.register_parameter(pname, param)

    def _loader(self, layer: nn.Module, pname: str) -> Any:
        def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
            if shard_id is None:
                shard_id = getattr(loaded, "shard_id", None)
            index = self._source_index(shard_id)
            name = self.sources[index]
            spec = self.specs[index].get(pname)
            if spec is None:
                raise ValueError(f"{name}.{pname} is in the checkpoint but not a tensor of this "
                                 "layer's storage in config.json; the files do not match it.")
            shape, dtype = spec
            if tuple(loaded.shape) != tuple(shape) or loaded.dtype != dtype:
                raise ValueError(
                    f"{name}.{pname} is {loaded.dtype} {tuple(loaded.shape)}; config.json needs "
                    f"{dtype} {tuple(shape)}. The safetensors files and config.json disagree.")
            self._verify(name, pname, loaded)
            # a copy on the layer's device: the loader may hand out views of a reused buffer
            layer.watersic_loaded[index][pname] = loaded.to(param.device, copy=True)

        return load

    def _source_index(self, shard_id: Any) -> int:
        if shard_id is None:
            if len(self.sources) != 1:
                raise ValueError(f"{self.prefix}: a tensor without shard id was loaded into a "
                                 f"layer fused from {self.sources}.")
            return 0
        index = _QKV_INDEX.get(shard_id, shard_id) if isinstance(shard_id, str) else shard_id
        if not isinstance(index, int) or not 0 <= index < len(self.sources):
            raise ValueError(f"{self.prefix}: shard id {shard_id!r} does not name one of "
                             f"{self.sources}.")
        return index

    def _verify(self, name: str, pname: str, loaded: torch.Tensor) -> None:
        checksums = self.config.checksums
        if checksums is None or self.config.format_version < 2:
            return
        stored_name = self.config.checkpoint_names.get(name, name)
        expected = checksums.get("tensors", {}).get(f"{stored_name}.{pname}")
        if expected is None:
            raise ValueError(f"{stored_name}.{pname} has no checksum in config.json; the folder "
                             "was not written by watersic_hf's save_pretrained.")
        if digest_tensor(loaded) != expected:
            raise ValueError(f"{stored_name}.{pname} does not match its checksum in config.json: "
                             "the safetensors file is corrupted. Download or save it again.")

    def _plans(self, layer: nn.Module) -> list[ShardPlan]:
        tp_rank = int(getattr(layer, "tp_rank", 0))
        tp_size = int(getattr(layer, "tp_size", 1))
        if tp_size == 1:
            return [ShardPlan() for _ in self.sources]
        if isinstance(layer, RowParallelLinear):
            return [row_parallel_plan(int(m["in"]), tp_rank, tp_size) for m in self.metas]
        parts = layer.watersic_partition_sizes
        replicas = int(getattr(layer, "num_kv_head_replicas", 1))
        # q (and every non-attention segment) is split by rank; k/v may be replicated
        ranks = [tp_rank if (i == 0 or not isinstance(layer, QKVParallelLinear))
                 else tp_rank // replicas for i in range(len(parts))]
        if len(self.sources) == len(parts):
            return [column_parallel_plan(int(m["out"]), [p], [r])
                    for m, p, r in zip(self.metas, parts, ranks, strict=True)]
        if len(self.sources) == 1:  # a fused matrix stored as one layer (Phi-3's gate_up_proj)
            return [column_parallel_plan(int(self.metas[0]["out"]), parts, ranks)]
        raise ValueError(f"{self.prefix}: {len(self.sources)} stored layers for "
                         f"{len(parts)} output segments.")

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Decode every stored layer, keep this rank's part, and drop the loaded tensors."""
        loaded = layer.watersic_loaded
        device = next((t.device for d in loaded for t in d.values()), None)
        plans = self._plans(layer)
        modules = []
        for index, name in enumerate(self.sources):
            module = materialize_layer(name, self.metas[index], loaded[index],
                                       version=self.config.format_version,
                                       backend=self.config.backend, device=device)
            loaded[index].clear()  # frees the stored tensors (streams) of this layer
            modules.append(shard_linear(module, plans[index]))
        layer.watersic_sources = nn.ModuleList(modules)
        layer.watersic_loaded = [{} for _ in self.sources]

    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        return fused_linear(x, layer.watersic_sources, bias)
