"""The staged calibration engine (issue 11): same codes as before, fewer passes, clear parts."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from watersic_hf import algorithm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "golden"))

import make_calib_codes as golden  # noqa: E402

with open(os.path.join(HERE, "golden", "calib_codes_v1.json")) as _f:
    REFERENCE = json.load(_f)


@pytest.mark.parametrize("case", sorted(golden.CASES))
def test_codes_match_reference(case, one_thread):
    """Codes and scales of every layer equal those of the engine before issue 11 (aa2255d)."""
    got = golden.fingerprint(case)
    ref = REFERENCE[case]
    assert sorted(got["layers"]) == sorted(ref["layers"])
    changed = [name for name, fp in got["layers"].items() if fp != ref["layers"][name]]
    assert not changed, f"{case}: codes or scales changed in {changed}"
    assert got["achieved_bits"] == pytest.approx(ref["achieved_bits"], abs=1e-9)


# ---------------------------------------------------------- statistics factored once per group


def _group_stats(n: int = 24, dead: int = 0):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, n, generator=g, dtype=torch.float64)
    x[:, :dead] = 0.0
    xh = x + 0.05 * torch.randn(300, n, generator=g, dtype=torch.float64)
    return x.T @ x / 300, xh.T @ xh / 300, x.T @ xh / 300


@pytest.mark.parametrize("dead", [0, 3])
@pytest.mark.parametrize("method", ["watersic", "gptq_entropy"])
def test_prepared_statistics_give_identical_codes(method, dead):
    sx, sxh, sxxh = _group_stats(dead=dead)
    quantize = getattr(algorithm, f"{method}_quantize")
    prep = algorithm.prepare_statistics(sx, sigma_xhat=sxh, sigma_x_xhat=sxxh, damp=1e-3)
    assert prep.n_dead == dead and (prep.keep is None) == (dead == 0)
    g = torch.Generator().manual_seed(6)
    for rows in (8, 16):  # two layers of one group share the prepared statistics
        w = torch.randn(rows, 24, generator=g)
        sres = 0.01 * torch.randn(rows, 24, generator=g, dtype=torch.float64)
        kw = dict(sigma_xhat=sxh, sigma_x_xhat=sxxh, sigma_residual=sres, damp=1e-3)
        a = quantize(w, sx, 3.0, **kw)
        b = quantize(w, sx, 3.0, prepared=prep, **kw)
        assert torch.equal(a.codes, b.codes)
        assert torch.equal(a.col_scale, b.col_scale) and torch.equal(a.row_scale, b.row_scale)


def test_prepared_statistics_refuse_other_inputs():
    sx, sxh, sxxh = _group_stats()
    prep = algorithm.prepare_statistics(sx, sigma_xhat=sxh, sigma_x_xhat=sxxh)
    w = torch.randn(4, 24)
    with pytest.raises(ValueError, match="made from other statistics"):
        algorithm.watersic_quantize(w, sx.clone(), 3.0, sigma_xhat=sxh, sigma_x_xhat=sxxh,
                                    prepared=prep)
    with pytest.raises(ValueError, match="damp=0.0001.*damp=0.01"):
        algorithm.watersic_quantize(w, sx, 3.0, sigma_xhat=sxh, sigma_x_xhat=sxxh, damp=0.01,
                                    prepared=prep)
    with pytest.raises(ValueError, match="the weight needs"):
        algorithm.prepare_statistics(sx, n=12)
    with pytest.raises(TypeError, match="prepare_statistics"):
        algorithm.watersic_quantize(w, sx, 3.0, prepared=object())


# ---------------------------------------------------------------------- passes and the probe


def test_block_calls_per_block_and_model_config_untouched(one_thread):
    """Each block runs B float passes, one quantized pass per group and batch and one discovery
    pass; the next quantized cache of a block that adds its Linears' outputs exactly as
    ``(h + y_attn) + y_mlp`` is assembled from kept parts, with no block call (5B + 1; 6B + 1
    with a next-cache pass, 9B + 1 before issue 11). The probe never leaks into the model's
    config."""
    from _tiny import make_tiny_model

    import watersic_hf
    from watersic_hf.integration import calibrate as calib

    model = make_tiny_model("llama")
    before = model.config.to_json_string()
    attn_impl = model.config._attn_implementation
    batches = 3
    cfg = watersic_hf.WaterSICConfig(bits=3, dataset=golden.calibration_ids()[:batches],
                                     seqlen=golden.SEQLEN, nsamples=batches)
    res = calib.calibrate_model(model, cfg, modules_to_not_convert=["lm_head"])
    groups = 4  # q/k/v, o, gate/up, down
    # Block 0 feeds block 1 from kept parts; block 1 is the last one and needs no next cache.
    assert res.block_calls == [batches * (groups + 1) + 1, batches * (groups + 1) + 1]
    assert model.config._attn_implementation == attn_impl
    assert model.config.to_json_string() == before
    for module in model.modules():
        cfg_m = getattr(module, "config", None)
        if cfg_m is not None and hasattr(cfg_m, "_attn_implementation"):
            assert cfg_m is model.config
            assert not hasattr(cfg_m, "_watersic_sink")


def test_blocks_without_an_exact_residual_sum_keep_the_next_cache_pass(one_thread):
    """Gemma 2 normalises the attention and MLP outputs before adding them: its next cache
    comes from a block call (6B + 1), and its codes are pinned by the golden fingerprints."""
    from _tiny import make_tiny_model

    import watersic_hf
    from watersic_hf.integration import calibrate as calib

    batches = 2
    cfg = watersic_hf.WaterSICConfig(bits=3, dataset=golden.calibration_ids()[:batches],
                                     seqlen=golden.SEQLEN, nsamples=batches)
    res = calib.calibrate_model(make_tiny_model("gemma2"), cfg, modules_to_not_convert=["lm_head"])
    assert res.block_calls == [batches * 6 + 1, batches * 5 + 1]


# ---------------------------------------------------------------------------- memory diet


def test_symmetrize_in_place_matches_the_copying_formula():
    from watersic_hf.integration.stats import MomentAccumulator, symmetrize_

    g = torch.Generator().manual_seed(7)
    a = torch.randn(37, 37, generator=g, dtype=torch.float64)
    ref = 0.5 * (a + a.T)
    got = symmetrize_(a.clone(), block=8)  # tiles that do not divide n
    assert torch.equal(got, ref)
    acc = MomentAccumulator(5, 5, "cpu")
    x = torch.randn(40, 5, generator=g)
    acc.add(x)
    expected = acc.get()
    taken = acc.take(symmetrize=True)
    assert torch.equal(taken, 0.5 * (expected + expected.T))
    with pytest.raises(RuntimeError, match="no tokens"):
        acc.take()


def test_exactly_symmetric_statistics_are_not_copied():
    from watersic_hf.algorithm import _validate

    g = torch.Generator().manual_seed(8)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    sym = 0.5 * (a + a.T)
    assert _validate.check_matrix("s", sym, (6, 6), symmetric=True,
                                  device=torch.device("cpu")) is sym
    near = sym.clone()
    near[0, 1] += 1e-9
    out = _validate.check_matrix("s", near, (6, 6), symmetric=True, device=torch.device("cpu"))
    assert out is not near and torch.equal(out, out.T) and near[0, 1] != near[1, 0]


def test_memory_model_predicts_measured_peak_rss():
    """The memory model (engine/memory.py) is within 25% of the measured peak RSS of calibrating
    a mid-size block (hidden 512, intermediate 2048: the down_proj group has n = 2048)."""
    import subprocess

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(
        [sys.executable, "-m", "watersic_hf.testing.block_memory", "--hidden", "512",
         "--intermediate", "2048", "--heads", "8", "--kv-heads", "2", "--nsamples", "4",
         "--seqlen", "128", "--threads", "1"],
        capture_output=True, text=True, env=env, cwd=HERE, timeout=900, check=True,
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["predicted_group"] == 3  # down_proj: the largest n
    ratio = r["predicted_bytes"] / r["measured_bytes"]
    assert 0.75 <= ratio <= 1.25, r


def test_memory_model_terms():
    from watersic_hf.integration.engine.memory import block_peak, group_bytes, llama_groups

    n, a, h = 28672, 8192, 8192
    # (3 statistics + 4 work matrices) fp64 n², the Gram row block, 8 fp64 (a, n), Σ_ΔR.
    assert group_bytes(n, a, h, residual=True) == 56 * n * n + n * n + 64 * a * n + 8 * h * n
    assert group_bytes(n, a, h, drift=False) == 40 * n * n + n * n + 64 * a * n
    peak = block_peak(llama_groups(4096, 14336, 32, 8), 4096, 8192)
    assert peak["group"] == 3 and peak["peak"] == peak["stats"] + peak["activations"]


# ---------------------------------------------------------------------------------- resume

_RESUME_CHILD = r"""
import logging, sys, torch
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from transformers import AutoModelForCausalLM
import watersic_hf
src, work, out = sys.argv[1:4]
g = torch.Generator().manual_seed(3)
ids = [torch.randint(0, 128, (48,), generator=g) for _ in range(6)]
cfg = watersic_hf.WaterSICConfig(bits=3, dataset=ids, nsamples=6, seqlen=48, resume=True,
                                 work_dir=work)
model = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg)
model.save_pretrained(out)
"""


def _run_child(args, **kw):
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", _RESUME_CHILD, *map(str, args)], env=env,
                            cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kw)


def test_resume_after_kill_gives_byte_identical_checkpoint(tmp_path):
    """Kill a quantizing process after some blocks are committed, rerun it with the same work
    folder: it continues after the last finished block and saves the same bytes as a run that was
    never interrupted."""
    import signal
    import time

    from _tiny import make_tiny_model

    blocks = 6
    src = tmp_path / "src"
    make_tiny_model("llama", src, num_hidden_layers=blocks)
    work, out_resumed, out_plain = tmp_path / "work", tmp_path / "resumed", tmp_path / "plain"

    proc = _run_child([src, work, tmp_path / "never"])
    manifest = work / "manifest.json"
    finished = 0
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.exists():
            try:
                finished = json.loads(manifest.read_text())["finished"]
            except ValueError:  # replaced while reading
                continue
            if finished >= 2:
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-2000:]
    assert 2 <= finished < blocks and not (tmp_path / "never").exists()

    resumed = _run_child([src, work, out_resumed])
    _, err = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, err[-2000:]
    assert "resuming after block" in err  # it continued instead of starting over
    assert not work.exists()  # removed once calibration completed

    plain = _run_child([src, tmp_path / "work2", out_plain])
    _, err = plain.communicate(timeout=900)
    assert plain.returncode == 0, err[-2000:]
    assert "resuming" not in err
    files = sorted(p.name for p in out_plain.iterdir())
    assert files == sorted(p.name for p in out_resumed.iterdir())
    for name in files:
        if name.endswith((".safetensors", ".json")):
            assert (out_plain / name).read_bytes() == (out_resumed / name).read_bytes(), name


def test_resume_refuses_a_folder_of_another_run(tmp_path):
    from watersic_hf.integration.engine.resume import BlockStore

    store = BlockStore(tmp_path, "a" * 64)
    store.commit(0, {}, [], 0.0, 0, None, [])
    assert store.load().finished == 1
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        BlockStore(tmp_path, "b" * 64).load()
