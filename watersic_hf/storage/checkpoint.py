"""Save/load wiring of WaterSIC checkpoints (format version 2; version 1 still loads).

Saving (``HfQuantizer.get_state_dict_and_metadata`` → :func:`encode_model_state`):

* ``storage="entropy"``: each quantized layer's packed words are replaced by
  ``<layer>.codes_stream`` / ``<layer>.codes_model`` (uint8; codes in the packed layout's column
  order); ``<layer>.weight_perm`` and ``<layer>.weight_group_meta`` (the layout chosen at
  quantization time) are stored as they are, so loading never searches for a layout again.
* ``storage="packed"``: the packed tensors as they are in memory.
* Both: ``<layer>.weight`` holds the layer's *manifest*, the canonical JSON of its entry in
  ``config.json``. Its 1-D uint8 shape can never match ``nn.Linear.weight``, so plain transformers
  without this plugin refuses the files (size mismatch) instead of building random weights; with
  the plugin, an edited or missing ``config.json`` entry is caught by comparing the two.
* ``quantization_config.checksums``: XXH3-64 of every tensor written, verified on load.

Loading (``pre_quantized=True``): :func:`verify_checkpoint` hashes the files before anything is
read into the model; :func:`build_checkpoint_skeleton` puts :class:`WaterSICCheckpointLinear`
placeholders on the meta device; after the weights are read, :func:`materialize_loaded_model`
checks each manifest and layout, decodes the streams (compiled CPU decoder, or the Triton decoder
when the tensors were loaded onto a GPU) and packs them into ``WaterSICLinear`` modules.

See docs/format.md for every byte.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from .. import packing
from ..nn._grouped import GROUP_TENSOR, group_scale_shape, group_size_of
from .checksum import ALGORITHM, digest_tensor, verify_safetensors_files
from .codec import (
    EncodedCodes,
    _check_metadata,
    decode_codes,
    decode_codes_on_device,
    decode_codes_packed,
    encoded_tensor_specs,
)
from .encoding import (
    LAYOUT_TENSORS,
    code_tensor_names,
    encoded_module,
    prepare_layer,
    stored_perm_dtype,
)
from .layout import torch_pack_with_layout, validate_layout, validate_packed

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_VERSION",
    "MANIFEST_KEY",
    "STREAM_TENSOR_NAMES",
    "WaterSICCheckpointLinear",
    "WaterSICEncodedLinear",
    "build_checkpoint_skeleton",
    "build_encoded_skeleton",
    "code_tensor_names",
    "decode_loaded_model",
    "encode_model_state",
    "encoded_module",
    "layer_manifest",
    "layer_storage",
    "materialize_layer",
    "materialize_loaded_model",
    "verify_checkpoint",
]

CHECKPOINT_VERSION = 2
STREAM_TENSOR_NAMES = ("codes_stream", "codes_model")
"""Per-layer tensor names of the entropy storage (suffixes after the module name)."""
MANIFEST_KEY = "manifest_nbytes"


def layer_storage(meta: dict[str, Any]) -> str:
    """Storage of one layer entry of ``WaterSICConfig.layers`` (absent = ``"packed"``, as in
    checkpoints written before the entropy storage existed)."""
    return str(meta.get("storage", "packed"))


def layer_manifest(entry: dict[str, Any]) -> bytes:
    """Canonical JSON of a layer's config entry (without its own ``manifest_nbytes``)."""
    body = {k: v for k, v in entry.items() if k != MANIFEST_KEY}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _config_targets(model: nn.Module, cfg: Any) -> list[Any]:
    # transformers keeps the config on model.config.quantization_config; the quantizer holds its
    # own reference. Both are updated so that config.json gets the metadata whichever is written.
    targets = [cfg]
    other = getattr(getattr(model, "config", None), "quantization_config", None)
    if other is not None and other is not cfg and hasattr(other, "layers"):
        targets.append(other)
    return targets


# ---------------------------------------------------------------------------- saving
def encode_model_state(model: nn.Module, cfg: Any) -> tuple[dict[str, torch.Tensor],
                                                             dict[str, str]]:
    """State dict and safetensors header metadata for ``save_pretrained`` (format version 2).

    Args:
        model (`PreTrainedModel`): a model holding ``WaterSICLinear`` modules.
        cfg (`WaterSICConfig`): its quantization config; ``cfg.layers[name]`` gets ``"storage"``,
            ``"layout"``, ``"manifest_nbytes"`` and (entropy storage) ``"entropy"`` (the codec
            metadata), and ``cfg.report`` the summary of :func:`watersic_hf.report`.

    Returns:
        ``(state_dict, metadata)``; ``metadata`` (the safetensors header) is empty: safetensors
        keeps header metadata in a hash map whose order changes between processes, so any key
        beyond transformers' own would make two saves of one model differ byte for byte.
    """
    from ..nn import WaterSICLinear
    from ..report import report as make_report

    storage = str(getattr(cfg, "storage", "entropy"))
    modules = {n: m for n, m in model.named_modules() if isinstance(m, WaterSICLinear)}
    targets = _config_targets(model, cfg)
    state = dict(model.state_dict())
    for key, value in state.items():
        if value.device.type == "meta":
            # Offloaded by accelerate (quantized with device_map="auto" and disk offload: the
            # embeddings or lm_head may still be on disk); read it back to write and checksum it.
            from transformers.integrations.accelerate import load_offloaded_parameter

            state[key] = load_offloaded_parameter(model, key)

    def prepare(item: tuple[str, nn.Module]) -> None:
        name, module = item
        n_dead = int(cfg.layers.get(name, {}).get("dead_columns", 0) or 0)
        prepare_layer(module, name, n_dead, entropy=storage == "entropy")

    # streams and statistics of all layers on a thread pool, one unpacking per layer
    for _ in _in_order(prepare, list(modules.items()), _workers()):
        pass
    for name, module in modules.items():
        fields: dict[str, Any] = {
            "in": module.in_features, "out": module.out_features,
            "bias": module.bias is not None, "layout": module.layout_metadata(),
            "storage": storage,
        }
        if storage == "entropy":
            enc = encoded_module(module, name)
            keep = LAYOUT_TENSORS if module.format == "packed" else ()
            for pname in code_tensor_names(module):
                if pname not in keep:
                    state.pop(f"{name}.{pname}", None)
            for pname, tensor in zip(STREAM_TENSOR_NAMES, (enc.stream, enc.model), strict=True):
                state[f"{name}.{pname}"] = tensor
            if module.format == "packed":
                perm_dtype = stored_perm_dtype(module.in_features)
                state[f"{name}.weight_perm"] = module.weight_perm.detach().to(perm_dtype)
            fields["entropy"] = dict(enc.metadata)
        entry: dict[str, Any] = {}
        for target in targets:
            entry = target.layers.setdefault(name, {})
            entry.update(fields)
            if storage != "entropy":
                entry.pop("entropy", None)
        manifest = layer_manifest(entry)
        for target in targets:
            target.layers[name][MANIFEST_KEY] = len(manifest)
        state[f"{name}.weight"] = torch.frombuffer(bytearray(manifest), dtype=torch.uint8)
    state = _without_aliases(state, model)
    checksums = {"algorithm": ALGORITHM,
                 "tensors": {key: digest_tensor(value) for key, value in sorted(state.items())}}
    summary = make_report(model, storage=storage)
    summary.pop("layers", None)
    for target in targets:
        target.report = summary
        target.format_version = CHECKPOINT_VERSION
        target.checksums = checksums
    return state, {}


def _without_aliases(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as transformers will write it: tied weights kept once (safetensors stores
    no aliases), by transformers' own rule, so the checksums name exactly the stored tensors."""
    try:
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:  # pragma: no cover - older transformers: keep the first name per storage
        seen: set[tuple[int, int]] = set()
        out = {}
        for key, value in state.items():
            ptr = (value.untyped_storage().data_ptr(), value.storage_offset())
            if value.device.type == "meta" or ptr not in seen:
                out[key] = value
            seen.add(ptr)
        return out
    return remove_tied_weights_from_state_dict(state, model)


# ---------------------------------------------------------------------------- loading
def verify_checkpoint(cfg: Any, checkpoint_files: list[str] | None) -> None:
    """Verify every tensor of a format-v2 checkpoint against ``cfg.checksums`` (before loading).

    Raises:
        ValueError: the config has no checksums, a file is corrupted (the message names the
            tensor and the file), or a tensor is missing or extra.
    """
    checksums = getattr(cfg, "checksums", None)
    if (not isinstance(checksums, dict) or checksums.get("algorithm") != ALGORITHM
            or not isinstance(checksums.get("tensors"), dict)):
        raise ValueError(
            "this WaterSIC checkpoint (format_version 2) has no valid 'checksums' in its "
            "config.json quantization_config; the folder was not finished by watersic_hf's "
            "save_pretrained or config.json was replaced. Save the model again.")
    stored = {key.rsplit(".", 1)[0] for key in checksums["tensors"]
              if key.endswith(".weight_col_scale")}
    unlisted = sorted(stored - set(getattr(cfg, "layers", {}) or {}))
    if unlisted:
        raise ValueError(
            f"the checkpoint stores quantized layers that config.json does not list: "
            f"{unlisted[:5]}; config.json was edited or belongs to other files")
    files = [f for f in (checkpoint_files or []) if str(f).endswith(".safetensors")]
    if not files:
        raise ValueError("this WaterSIC checkpoint has no .safetensors files to verify; WaterSIC "
                         "checkpoints are stored as safetensors")
    nbytes = verify_safetensors_files(files, checksums["tensors"])
    logger.info("WaterSIC: verified %d tensors (%.1f MB) against their checksums",
                len(checksums["tensors"]), nbytes / 1e6)


class WaterSICCheckpointLinear(nn.Module):
    """Placeholder for a quantized Linear while ``from_pretrained`` reads a checkpoint.

    Holds the layer's tensors exactly as stored; the quantizer's after-hook turns it into a
    ``WaterSICLinear`` (:func:`materialize_loaded_model`). It has no forward.

    Args:
        meta (`dict`): the layer's entry of ``quantization_config.layers``.
        version (`int`): the checkpoint's format version (1: entropy streams only; 2: manifest,
            stored layout and either storage).
        dtype (`torch.dtype`): bias dtype.
        device: where to create the (empty) tensors, normally ``"meta"``.
    """

    def __init__(self, meta: dict[str, Any], *, version: int = CHECKPOINT_VERSION,
                 dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features = int(meta["in"])
        self.out_features = int(meta["out"])
        self.meta = meta
        self.version = int(version)
        for pname, (shape, dt) in self.tensor_specs(meta, self.version).items():
            self.register_parameter(pname, _frozen(torch.zeros(shape, dtype=dt, device=device)))
        if meta.get("bias"):
            self.bias = _frozen(torch.zeros(self.out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @staticmethod
    def tensor_specs(meta: dict[str, Any],
                     version: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of every stored tensor of a layer entry (bias excluded)."""
        n_in, n_out = int(meta["in"]), int(meta["out"])
        layout = meta.get("layout") or {"format": "packed"}
        entropy = layer_storage(meta) == "entropy"
        specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        if version >= 2:
            nbytes = meta.get(MANIFEST_KEY)
            if not isinstance(nbytes, int) or nbytes < 2:
                raise ValueError(f"layer entry has no valid {MANIFEST_KEY!r}; config.json is "
                                 "incomplete or was edited")
            specs["weight"] = ((nbytes,), torch.uint8)
        if entropy:
            if not isinstance(meta.get("entropy"), dict):
                raise ValueError("layer entry says storage='entropy' but has no 'entropy' "
                                 "metadata; the config.json is incomplete")
            streams = encoded_tensor_specs(meta["entropy"])
            specs["codes_stream"] = streams["stream"]
            specs["codes_model"] = streams["model"]
            if version >= 2 and layout.get("format") == "packed":
                packed = packing.param_specs(n_in, n_out, layout)
                for pname in LAYOUT_TENSORS:
                    specs[pname] = packed[pname]
                specs["weight_perm"] = ((n_in,), stored_perm_dtype(n_in))
        elif layout.get("format") == "plain":
            specs["weight_codes"] = ((n_out, n_in), torch.int32)
        else:
            packed = packing.param_specs(n_in, n_out, layout)
            for pname in packing.CODE_TENSOR_NAMES:
                specs[pname] = packed[pname]
        specs["weight_col_scale"] = ((n_in,), torch.float16)
        specs["weight_row_scale"] = ((n_out,), torch.float16)
        group = group_size_of(layout)
        if group:
            # per-group scales (standard GPTQ), stored as they are in memory in both storages
            specs[GROUP_TENSOR] = (group_scale_shape(n_in, n_out, group), torch.float16)
        return specs

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError(
            "WaterSICCheckpointLinear is a loading placeholder; the WaterSIC quantizer turns it "
            "into a WaterSICLinear after the weights are loaded. Load the checkpoint with "
            "from_pretrained after `import watersic_hf`."
        )


# Format-v1 name of the placeholder (entropy-stored layers only).
WaterSICEncodedLinear = WaterSICCheckpointLinear


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def build_checkpoint_skeleton(model: nn.Module, layers: dict[str, dict[str, Any]], *,
                              version: int) -> int:
    """Swap the Linears of the stored layers for empty placeholders on the meta device.

    Format 2: every layer; format 1: the entropy-stored layers (packed ones are built by
    ``integration.replace.build_skeleton``).

    Returns:
        the number of replaced modules.

    Raises:
        ValueError: a listed module is missing, not a Linear, has another shape, or its entry is
            incomplete.
    """
    from ..integration.replace import set_submodule, skeleton_dtype

    count = 0
    for name, meta in layers.items():
        if version < 2 and layer_storage(meta) != "entropy":
            continue
        dtype = skeleton_dtype(model, name, meta, WaterSICCheckpointLinear)
        if dtype is None:
            continue
        try:
            module = WaterSICCheckpointLinear(meta, version=version, dtype=dtype, device="meta")
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
        set_submodule(model, name, module)
        count += 1
    return count


def build_encoded_skeleton(model: nn.Module, layers: dict[str, dict[str, Any]]) -> int:
    """Format-v1 skeleton of the entropy-stored layers (see :func:`build_checkpoint_skeleton`)."""
    return build_checkpoint_skeleton(model, layers, version=1)


def _check_manifest(name: str, module: WaterSICCheckpointLinear) -> None:
    stored = bytes(module.weight.detach().cpu().numpy().tobytes())
    if stored != layer_manifest(module.meta):
        raise ValueError(
            f"{name}: the layer's entry in config.json does not match the manifest stored in the "
            f"checkpoint ({name}.weight); config.json was edited or belongs to other files")


def _decode_gpu(enc: EncodedCodes, device: torch.device, name: str) -> torch.Tensor | None:
    """Codes decoded on the GPU (Triton), or None when the layer is not loaded onto a GPU."""
    from .._triton import HAS_TRITON

    if device.type != "cuda" or not HAS_TRITON:
        return None
    return decode_codes_on_device(enc, device, name=f"{name}.codes_stream")


def _materialize(name: str, module: WaterSICCheckpointLinear, backend: str) -> nn.Module:
    from ..nn import WaterSICLinear

    if module.version >= 2:
        _check_manifest(name, module)
    meta = module.meta
    layout = dict(meta.get("layout") or {"format": "packed"})
    n_in, n_out = module.in_features, module.out_features
    device = module.weight_col_scale.device
    bias = module.bias.detach() if module.bias is not None else None
    tensors: dict[str, torch.Tensor] = {}
    if layer_storage(meta) == "entropy":
        enc = EncodedCodes.from_tensors(
            {"stream": module.codes_stream.detach(), "model": module.codes_model.detach()},
            meta["entropy"])
        _check_metadata(enc.metadata, f"{name}.codes_stream")
        if tuple(enc.shape) != (n_out, n_in):
            raise ValueError(f"{name}: entropy metadata shape {list(enc.shape)} does not match "
                             f"the layer (out={n_out}, in={n_in}); config.json is inconsistent")
        verify = module.version < 2  # format 2: the file bytes were verified before loading
        if module.version >= 2 and layout.get("format") == "packed":
            perm = module.weight_perm.detach().to(torch.int32)
            meta_np = validate_layout(perm, module.weight_group_meta, layout, n_in, n_out,
                                      name=name)
            codes = _decode_gpu(enc, device, name)
            if codes is not None:
                tensors = torch_pack_with_layout(codes, module.weight_group_meta, layout,
                                                 name=name)
            else:
                tensors = decode_codes_packed(enc, meta_np, layout, name=name)
            tensors["weight_perm"] = perm
            tensors["weight_group_meta"] = module.weight_group_meta.detach()
        else:
            # format 1 (or plain layout): the codes are in the original column order
            codes = decode_codes(enc, name=f"{name}.codes_stream", verify=verify)
            if layout.get("format") == "plain":
                tensors = {"weight_codes": codes}
            else:
                packed = packing.pack_codes(codes)
                layout, tensors = packed.layout, packed.tensors
    elif layout.get("format") == "plain":
        tensors = {"weight_codes": module.weight_codes.detach()}
    else:
        tensors = {n: getattr(module, n).detach() for n in packing.CODE_TENSOR_NAMES}
        validate_packed(tensors, layout, n_in, n_out, name=name)
    scales = {"weight_col_scale": module.weight_col_scale.detach(),
              "weight_row_scale": module.weight_row_scale.detach()}
    if group_size_of(layout):
        scales[GROUP_TENSOR] = getattr(module, GROUP_TENSOR).detach()
    return WaterSICLinear.from_tensors(
        n_in, n_out, layout, {**tensors, **scales}, bias, backend=backend, device=device)


def materialize_layer(name: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor], *,
                      version: int = CHECKPOINT_VERSION, backend: str = "auto",
                      device: torch.device | str | None = None) -> nn.Module:
    """Build one ``WaterSICLinear`` (without bias) from a layer's stored tensors.

    For loaders other than transformers' (the vLLM plugin, :mod:`watersic_hf.vllm`), which read
    the safetensors files themselves: the same checks and decoding as
    :func:`materialize_loaded_model` (manifest, stored layout, entropy streams decoded and
    packed; compiled CPU decoder, or the Triton decoder when ``device`` is a GPU).

    Args:
        name (`str`): the layer's name in the checkpoint (for error messages).
        meta (`dict`): its entry of ``quantization_config.layers``.
        tensors (`dict[str, torch.Tensor]`): every stored tensor of the layer, by suffix
            (``"weight"``, ``"weight_packed"`` / ``"codes_stream"``, ..., the scales), without
            the bias; their shapes and dtypes must be those of
            ``WaterSICCheckpointLinear.tensor_specs(meta, version)``.
        version (`int`, *optional*): the checkpoint's ``format_version``.
        backend (`str`, *optional*, defaults to ``"auto"``): backend of the built module.
        device: where to build it (the tensors are moved there first).

    Returns:
        `WaterSICLinear` of shape ``(meta["out"], meta["in"])`` with no bias.

    Raises:
        ValueError: a tensor is missing or has the wrong shape or dtype, or the manifest,
            layout or stream does not check (the message names the layer and tensor).
    """
    specs = WaterSICCheckpointLinear.tensor_specs(meta, int(version))
    missing = sorted(set(specs) - set(tensors))
    if missing:
        raise ValueError(f"{name}: the checkpoint has no {missing}; the safetensors files are "
                         "incomplete or do not match config.json")
    module = WaterSICCheckpointLinear(meta, version=int(version), device="meta")
    module.register_parameter("bias", None)
    for pname, (shape, dtype) in specs.items():
        value = tensors[pname]
        if tuple(value.shape) != tuple(shape) or value.dtype != dtype:
            raise ValueError(
                f"{name}.{pname} is {value.dtype} {tuple(value.shape)}; its config.json entry "
                f"needs {dtype} {tuple(shape)}; config.json and the safetensors files disagree")
        module.register_parameter(pname, _frozen(value.detach().to(device)))
    return _materialize(name, module, backend)


def _workers() -> int:
    return max(1, torch.get_num_threads())


def _in_order(fn: Any, items: list[Any], workers: int) -> Any:
    """``fn(item)`` for every item on a thread pool, yielded in order, with at most ``workers +
    1`` results in flight (the compiled loops release the GIL; the window bounds memory)."""
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="watersic") as pool:
        pending: deque = deque()
        queue = iter(items)
        for item in queue:
            pending.append(pool.submit(fn, item))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def materialize_loaded_model(model: nn.Module, *, backend: str | None = None) -> int:
    """Replace every loaded :class:`WaterSICCheckpointLinear` by its ``WaterSICLinear``.

    Layers are built on ``torch.get_num_threads()`` threads (decoding and packing release the
    GIL) and swapped into the model in order, with at most one layer per thread plus one in
    flight, so host memory holds only those layers' decoded codes beyond the stored and packed
    tensors.

    Returns:
        the number of replaced modules.

    Raises:
        ValueError: a tensor was not in the checkpoint, a manifest or layout does not match, or a
            stream does not decode (the message names the module).
    """
    from ..integration.replace import set_submodule

    # names only: holding the placeholders would keep every layer's streams alive to the end
    targets = [n for n, m in model.named_modules() if isinstance(m, WaterSICCheckpointLinear)]

    def build(name: str) -> tuple[str, nn.Module]:
        module = model.get_submodule(name)
        missing = [p for p, t in module.named_parameters(recurse=False) if t.is_meta]
        if missing:
            raise ValueError(
                f"{name}: {missing} were not found in the checkpoint's safetensors files; the "
                "files are incomplete or do not match config.json")
        return name, _materialize(name, module, backend or "auto")

    for name, new in _in_order(build, targets, _workers()):
        set_submodule(model, name, new)
        del new
    if targets:
        logger.info("WaterSIC: built %d quantized layers from the checkpoint", len(targets))
    return len(targets)


def decode_loaded_model(model: nn.Module, *, backend: str | None = None) -> int:
    """Same as :func:`materialize_loaded_model` (the format-v1 name)."""
    return materialize_loaded_model(model, backend=backend)
