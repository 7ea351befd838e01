"""Checkpoint format v2: stored packing layout, segmented streams, checksums, manifests.

Covers: round trips of the layout-driven packer on odd shapes, escapes, dead columns and
outliers (against ``packing.pack_codes``); the segmented codec's bounds; every kind of tensor
and config.json being protected; malformed layouts refused before any kernel runs; the GPU
decoder against the CPU decoder (Triton interpreter); the ``weight`` stand-in.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from _tiny import make_tiny_model
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from watersic_hf import WaterSICConfig, WaterSICLinear, packing
from watersic_hf.storage import _segments, decode_codes, decode_codes_packed, encode_codes
from watersic_hf.storage.checksum import digest_tensor
from watersic_hf.storage.layout import (
    pack_with_layout,
    permuted_codes,
    torch_pack_with_layout,
    validate_layout,
    validate_packed,
)

IDS = torch.tensor([[3, 17, 99, 4, 56, 8, 120, 1, 77, 30, 2, 64]])


def _codes(rows: int, cols: int, seed: int, *, outliers: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    spread = torch.exp(torch.randn(cols, generator=g) * 0.8) * 2.0
    z = torch.round(torch.randn(rows, cols, generator=g) * spread)
    if outliers:
        idx = torch.randint(0, rows * cols, (max(1, rows * cols // 200),), generator=g)
        z.view(-1)[idx] = torch.randint(-10_000, 10_001, (idx.numel(),), generator=g).float()
    if cols > 3:
        z[:, 1] = 0  # a dead column
    return z.to(torch.int32)


SHAPES = [(1, 1), (5, 33), (37, 19), (64, 65), (100, 70), (33, 1)]


@pytest.mark.parametrize("shape", SHAPES)
def test_layout_packer_equals_pack_codes(shape):
    z = _codes(*shape, seed=shape[0] * 7 + shape[1])
    ref = packing.pack_codes(z)
    n_out, n_in = shape
    meta = validate_layout(ref.tensors["weight_perm"], ref.tensors["weight_group_meta"],
                           ref.layout, n_in, n_out, name="x")
    zp = z[:, ref.tensors["weight_perm"].long()].contiguous()
    fast = pack_with_layout(zp.numpy(), meta, ref.layout, name="x")
    twin = torch_pack_with_layout(zp, ref.tensors["weight_group_meta"], ref.layout, name="x")
    for key, value in fast.items():
        assert torch.equal(value, ref.tensors[key]), key
        assert torch.equal(twin[key], ref.tensors[key]), key
    assert np.array_equal(permuted_codes(ref.tensors, n_in, n_out), zp.numpy())
    validate_packed(ref.tensors, ref.layout, n_in, n_out, name="x")


def test_every_width_round_trips():
    # blocks of 32 columns spanning 2^1 .. 2^16 values: the packer meets most widths
    cols = []
    g = torch.Generator().manual_seed(0)
    for b in range(1, 17):
        block = torch.randint(0, 1 << b, (40, 32), generator=g)
        block[0] = 0
        block[1] = (1 << b) - 1
        cols.append(block - (1 << (b - 1)))
    z = torch.cat(cols, 1).to(torch.int32)
    ref = packing.pack_codes(z)
    widths = set(ref.tensors["weight_group_meta"][:, 0].tolist())
    assert len(widths) >= 8 and max(widths) >= 14, widths
    meta = validate_layout(ref.tensors["weight_perm"], ref.tensors["weight_group_meta"],
                           ref.layout, z.shape[1], z.shape[0], name="x")
    zp = z[:, ref.tensors["weight_perm"].long()].contiguous()
    out = pack_with_layout(zp.numpy(), meta, ref.layout, name="x")
    assert torch.equal(out["weight_packed"], ref.tensors["weight_packed"])


def test_codes_that_do_not_fit_the_layout_are_rejected():
    z = _codes(40, 40, seed=1, outliers=False)
    ref = packing.pack_codes(z)
    meta = validate_layout(ref.tensors["weight_perm"], ref.tensors["weight_group_meta"],
                           ref.layout, 40, 40, name="layer.x")
    zp = z[:, ref.tensors["weight_perm"].long()].contiguous().numpy().copy()
    zp[3, 5] = 100_000  # outside its group's range: no escape stream was planned for it
    with pytest.raises(ValueError, match="layer.x"):
        pack_with_layout(zp, meta, ref.layout, name="layer.x")
    with pytest.raises(ValueError, match="layer.x"):
        torch_pack_with_layout(torch.from_numpy(zp), ref.tensors["weight_group_meta"],
                               ref.layout, name="layer.x")


def test_malformed_layouts_are_rejected():
    z = _codes(64, 96, seed=2)
    ref = packing.pack_codes(z)
    perm, meta, lay = ref.tensors["weight_perm"], ref.tensors["weight_group_meta"], ref.layout
    bad_perm = perm.clone()
    bad_perm[0] = bad_perm[1]
    with pytest.raises(ValueError, match="not a permutation"):
        validate_layout(bad_perm, meta, lay, 96, 64, name="x")
    bad_perm = perm.clone()
    bad_perm[0] = 96
    with pytest.raises(ValueError, match="not a permutation"):
        validate_layout(bad_perm, meta, lay, 96, 64, name="x")
    for field, value, match in [(packing.META_WIDTH, 17, "width"),
                                (packing.META_OFFSET, 10_000, "offsets"),
                                (packing.META_ESC_SLOT, 7, "slots")]:
        bad = meta.clone()
        bad[0, field] = value
        with pytest.raises(ValueError, match=match):
            validate_layout(perm, bad, lay, 96, 64, name="x")
    # escape bases that would send a kernel past the escape stream
    if lay["escape_groups"]:
        tensors = dict(ref.tensors)
        tensors["weight_escape_base"] = tensors["weight_escape_base"] + 1000
        with pytest.raises(ValueError, match="escape_base"):
            validate_packed(tensors, lay, 96, 64, name="x")


def test_segmented_stream_round_trip_over_many_segments():
    # 32 columns -> 8192 rows per segment would be one segment; use 600 columns (448 rows each)
    z = _codes(1000, 600, seed=3)
    enc = encode_codes(z)
    rows = _segments.segment_rows(600)
    assert rows % 32 == 0 and enc.metadata["header_nbytes"] == 8 * (-(-1000 // rows) + 1)
    assert torch.equal(decode_codes(enc), z)
    lanes = _segments.segment_lanes(1000, 600)
    assert lanes.max() <= _segments.MAX_SEGMENT_LANES and lanes.min() >= 1
    # _segments keeps its own copy so that importing it does not load numba
    assert _segments.MAX_SEGMENT_LANES == _segments._jit.MAX_LANES


@pytest.mark.parametrize("shape", [(150, 3000), (100, 70), (1, 1), (65, 33)])
def test_fused_decode_pack_equals_decode_then_pack(shape):
    # (150, 3000): 64-row segments, the last one partial; the codes never exist whole
    z = _codes(*shape, seed=shape[1])
    ref = packing.pack_codes(z)
    n_out, n_in = shape
    meta = validate_layout(ref.tensors["weight_perm"], ref.tensors["weight_group_meta"],
                           ref.layout, n_in, n_out, name="x")
    zp = z[:, ref.tensors["weight_perm"].long()].contiguous()
    enc = encode_codes(zp)
    fused = decode_codes_packed(enc, meta, ref.layout, name="layer.x")
    for key, value in fused.items():
        assert torch.equal(value, ref.tensors[key]), key


def test_fused_decode_pack_refuses_codes_that_do_not_fit():
    z = _codes(96, 200, seed=5, outliers=False)
    ref = packing.pack_codes(z)
    meta = validate_layout(ref.tensors["weight_perm"], ref.tensors["weight_group_meta"],
                           ref.layout, 200, 96, name="x")
    zp = z[:, ref.tensors["weight_perm"].long()].contiguous()
    zp[70, 3] = 50_000  # no escape stream planned for it
    with pytest.raises(ValueError, match=r"layer\.x\.codes_stream.*does not fit"):
        decode_codes_packed(encode_codes(zp), meta, ref.layout, name="layer.x")
    zp = z[:, ref.tensors["weight_perm"].long()].contiguous()
    wrong = meta.copy()
    wrong[0, packing.META_MAXABS] += 1  # a stored largest |code| that the codes do not have
    with pytest.raises(ValueError, match="largest"):
        decode_codes_packed(encode_codes(zp), wrong, ref.layout, name="layer.x")


def test_segment_header_and_truncation_errors():
    z = _codes(500, 600, seed=4)
    enc = encode_codes(z)
    stream = enc.stream.clone()
    stream[4:8] = torch.tensor([255, 255, 255, 0], dtype=torch.uint8)  # segment offset past end
    bad = type(enc)(stream, enc.model, dict(enc.metadata))
    with pytest.raises(ValueError, match="codes"):
        decode_codes(bad, verify=False)
    meta = dict(enc.metadata)
    meta["segment_rows"] = 32  # the format fixes it from the shape
    with pytest.raises(ValueError, match="impossible"):
        decode_codes(type(enc)(enc.stream, enc.model, meta), verify=False)
    flipped = enc.stream.clone()
    flipped[enc.metadata["header_nbytes"] + 100] ^= 0x40
    with pytest.raises(ValueError, match="checksum"):
        decode_codes(type(enc)(flipped, enc.model, dict(enc.metadata)))
    with pytest.raises(ValueError, match="do not decode"):
        decode_codes(type(enc)(flipped, enc.model, dict(enc.metadata)), verify=False)


@pytest.mark.parametrize("shape", [(6, 2), (9, 5), (3, 11)])
def test_gpu_decoder_equals_cpu_decoder_in_the_interpreter(shape):
    from watersic_hf._triton import HAS_TRITON, interpreter_enabled
    from watersic_hf.storage.codec import decode_codes_on_device

    if not HAS_TRITON or not interpreter_enabled():
        pytest.skip("needs Triton with TRITON_INTERPRET=1 (CI sets it)")
    z = _codes(*shape, seed=shape[0])
    z.view(-1)[0] = -(2**31)
    z.view(-1)[-1] = 70_000
    enc = encode_codes(z)
    got = decode_codes_on_device(enc, torch.device("cpu"))
    assert torch.equal(got, decode_codes(enc)) and torch.equal(got, z)
    flipped = enc.stream.clone()
    flipped[-1] ^= 0x01  # an escape bit or a word: either the decode or an end check fails
    bad = type(enc)(flipped, enc.model, dict(enc.metadata))
    try:
        out = decode_codes_on_device(bad, torch.device("cpu"))
    except ValueError:
        return
    assert not torch.equal(out, z), "a flipped byte decoded silently to the same codes"


# ---------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny Qwen2 (biased q/k/v, untied LM head) quantized at 3 bits, saved both ways."""
    torch.set_num_threads(1)
    src = tmp_path_factory.mktemp("qwen2_src")
    make_tiny_model("qwen2", src)
    g = torch.Generator().manual_seed(5)
    ids = [torch.randint(0, 128, (16,), generator=g) for _ in range(4)]
    cfg = WaterSICConfig(bits=3, dataset=ids, nsamples=4, seqlen=16, method="rtn")
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg)
    with torch.no_grad():
        logits = model(IDS).logits
    dirs = {}
    for storage in ("entropy", "packed"):
        model.config.quantization_config.storage = storage
        model.hf_quantizer.quantization_config.storage = storage
        dirs[storage] = tmp_path_factory.mktemp(storage)
        model.save_pretrained(dirs[storage])
    return model, logits, dirs


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _flip(folder, key: str) -> None:
    path = os.path.join(folder, "model.safetensors")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    start, end = header[key]["data_offsets"]
    assert end > start, key
    pos = 8 + n + (start + end) // 2
    with open(path, "r+b") as f:
        f.seek(pos)
        byte = f.read(1)
        f.seek(pos)
        f.write(bytes([byte[0] ^ 0x10]))


def _rewrite(folder, edit) -> None:
    """Apply ``edit(tensors)`` to the file and re-record valid checksums (a crafted file)."""
    path = os.path.join(folder, "model.safetensors")
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    cfg_path = os.path.join(folder, "config.json")
    config = json.load(open(cfg_path))
    config["quantization_config"]["checksums"]["tensors"] = {
        k: digest_tensor(v) for k, v in tensors.items()}
    json.dump(config, open(cfg_path, "w"), indent=2)


def test_both_storages_reload_exactly_with_a_weight_stand_in(checkpoints):
    model, logits, dirs = checkpoints
    for storage, folder in dirs.items():
        back = AutoModelForCausalLM.from_pretrained(folder)
        q = back.model.layers[0].self_attn.q_proj
        assert isinstance(q, WaterSICLinear), storage
        with torch.no_grad():
            torch.testing.assert_close(back(IDS).logits, logits, rtol=0, atol=0, msg=storage)
        # model code that reads weight.dtype / .device / .shape keeps working
        assert q.weight.dtype == torch.float32 and q.weight.device.type == "cpu"
        assert tuple(q.weight.shape) == (q.out_features, q.in_features)
        back.to(torch.bfloat16)
        assert q.weight.dtype == torch.bfloat16 and q.weight_col_scale.dtype == torch.float16


ENTROPY_KEYS = ["codes_stream", "codes_model", "weight_perm", "weight_group_meta",
                "weight_col_scale", "weight_row_scale", "bias", "weight"]


@pytest.mark.parametrize("suffix", ENTROPY_KEYS + ["embed", "norm", "lm_head"])
def test_a_flipped_byte_anywhere_names_the_tensor_and_file(checkpoints, tmp_path, suffix):
    _, _, dirs = checkpoints
    layer = "model.layers.1.self_attn.k_proj"
    key = {"embed": "model.embed_tokens.weight", "norm": "model.layers.0.input_layernorm.weight",
           "lm_head": "lm_head.weight"}.get(suffix, f"{layer}.{suffix}")
    folder = _copy(dirs["entropy"], tmp_path / "bad")
    _flip(folder, key)
    with pytest.raises(ValueError) as info:
        AutoModelForCausalLM.from_pretrained(folder)
    assert key in str(info.value) and "model.safetensors" in str(info.value)


@pytest.mark.parametrize("suffix", ["weight_packed", "weight_escape_packed", "weight_escape_base"])
def test_a_flipped_byte_in_packed_storage_is_caught(checkpoints, tmp_path, suffix):
    _, _, dirs = checkpoints
    with safe_open(os.path.join(dirs["packed"], "model.safetensors"), "pt") as f:
        keys = [k for k in f.keys() if k.endswith(suffix) and f.get_slice(k).get_shape()[0]]
    if not keys:
        pytest.skip(f"no non-empty {suffix} in this model")
    folder = _copy(dirs["packed"], tmp_path / "bad")
    _flip(folder, keys[0])
    with pytest.raises(ValueError, match=keys[0].replace(".", r"\.")):
        AutoModelForCausalLM.from_pretrained(folder)


def test_edited_or_missing_config_entries_are_errors(checkpoints, tmp_path):
    _, _, dirs = checkpoints
    layer = "model.layers.0.mlp.up_proj"
    edited = _copy(dirs["entropy"], tmp_path / "edited")
    cfg_path = edited / "config.json"
    config = json.load(open(cfg_path))
    config["quantization_config"]["layers"][layer]["bits"] += 1.0
    json.dump(config, open(cfg_path, "w"))
    with pytest.raises(ValueError, match=rf"{layer}.*manifest"):
        AutoModelForCausalLM.from_pretrained(edited)

    removed = _copy(dirs["entropy"], tmp_path / "removed")
    config = json.load(open(removed / "config.json"))
    del config["quantization_config"]["layers"][layer]
    json.dump(config, open(removed / "config.json", "w"))
    with pytest.raises((ValueError, RuntimeError), match=layer.replace(".", r"\.")):
        AutoModelForCausalLM.from_pretrained(removed)

    unsigned = _copy(dirs["entropy"], tmp_path / "unsigned")
    config = json.load(open(unsigned / "config.json"))
    del config["quantization_config"]["checksums"]
    json.dump(config, open(unsigned / "config.json", "w"))
    with pytest.raises(ValueError, match="checksums"):
        AutoModelForCausalLM.from_pretrained(unsigned)


def test_crafted_layouts_with_valid_checksums_are_refused(checkpoints, tmp_path):
    _, _, dirs = checkpoints
    layer = "model.layers.0.mlp.down_proj"

    def dup_perm(t):
        t[f"{layer}.weight_perm"][0] = t[f"{layer}.weight_perm"][1]

    def wide_meta(t):
        t[f"{layer}.weight_group_meta"][0, packing.META_WIDTH] = 30

    for storage in ("entropy", "packed"):
        for edit, match in ((dup_perm, "permutation"), (wide_meta, "width")):
            folder = _copy(dirs[storage], tmp_path / f"{storage}-{edit.__name__}")
            _rewrite(folder, edit)
            with pytest.raises(ValueError, match=match):
                AutoModelForCausalLM.from_pretrained(folder)


def test_v1_golden_checkpoint_still_loads():
    golden = os.path.join(os.path.dirname(__file__), "golden", "tiny_entropy_v1")
    config = json.load(open(os.path.join(golden, "config.json")))["quantization_config"]
    assert config["format_version"] == 1  # the pinned file stays a version-1 file
    model = AutoModelForCausalLM.from_pretrained(golden)
    assert sum(isinstance(m, WaterSICLinear) for m in model.modules()) == 7
