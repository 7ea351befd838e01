"""Calibration at scale (issue 11): distributed runs and sequential onloading give the same codes.

* the chain reduction of the moment sums against the one-process sum, on data where an all-reduce
  of per-rank partial sums rounds differently (on the tiny models both happen to be exact);
* ``torchrun --standalone --nproc-per-node 2`` (gloo, CPU) against one process, on a tiny model,
  for the default mix (5 batches: uneven shards 3 + 2) and for batch 2 with the adaptive-ε search
  and without rate control (the Linears of a group solved at the same time on different ranks).
* blocks offloaded to disk by ``device_map`` (accelerate hooks) are onloaded one at a time and give
  the codes, logits and checkpoint of the in-memory calibration.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from _tiny import make_tiny_model
from transformers import AutoModelForCausalLM

import watersic_hf
from watersic_hf.integration.engine.distributed import shard_bounds
from watersic_hf.nn import WaterSICLinear

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_dist_worker.py")


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


def test_shard_bounds_are_contiguous_and_refuse_too_few_batches():
    assert shard_bounds(5, 2) == [(0, 3), (3, 5)]
    assert shard_bounds(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(ValueError, match="3 calibration batches cannot be shared by 4"):
        shard_bounds(3, 4)


def test_chain_reduce_adds_in_batch_order():
    """The moment sums of two gloo ranks equal the one-process sum bit for bit on data where an
    all-reduce of per-rank partial sums does not (fp64 addition is not associative)."""
    import socket

    import torch.multiprocessing as mp

    sys.path.insert(0, HERE)
    import _dist_worker

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_dist_worker.chain_check, args=(2, port), nprocs=2, join=True)


def test_two_gloo_processes_give_the_codes_of_one(tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    run = dict(cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    single = subprocess.run([sys.executable, WORKER, str(one)], **run)
    assert single.returncode == 0, single.stderr[-3000:]
    dist = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         WORKER, str(two)], **run)
    assert dist.returncode == 0, dist.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert sorted(a) == sorted(b)
    for case in a:
        changed = [n for n, fp in a[case]["layers"].items() if b[case]["layers"][n] != fp]
        assert not changed, f"{case}: codes or scales differ in {changed}"
        assert a[case]["achieved_bits"] == b[case]["achieved_bits"]


# ----------------------------------------------------------------------------- onloading


def _fingerprints(monkeypatch) -> list[tuple[str, ...]]:
    """Record SHA-256 of (codes, col_scale, row_scale) of every WaterSICLinear built."""
    seen: list[tuple[str, ...]] = []
    real = WaterSICLinear.from_quantized.__func__

    def sha(t: torch.Tensor) -> str:
        return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()

    def spy(cls, qw, bias, **kw):
        seen.append((sha(qw.codes), sha(qw.col_scale), sha(qw.row_scale)))
        return real(cls, qw, bias, **kw)

    monkeypatch.setattr(WaterSICLinear, "from_quantized", classmethod(spy))
    return seen


def test_offloaded_blocks_are_onloaded_with_the_same_codes(tmp_path, monkeypatch, one_thread):
    src = tmp_path / "float"
    make_tiny_model("llama", src, num_hidden_layers=3)
    g = torch.Generator().manual_seed(3)
    ids = [torch.randint(0, 128, (16,), generator=g) for _ in range(4)]

    def cfg() -> watersic_hf.WaterSICConfig:
        return watersic_hf.WaterSICConfig(bits=3, dataset=ids, seqlen=16, nsamples=4)

    seen = _fingerprints(monkeypatch)
    in_memory = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg())
    reference = list(seen)
    seen.clear()
    # Block 0 stays in memory, blocks 1-2, the embeddings, norm and lm_head go to disk.
    device_map = {"model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "disk", "model.norm": "disk", "model.rotary_emb": "cpu",
                  "lm_head": "disk"}
    offloaded = AutoModelForCausalLM.from_pretrained(
        src, quantization_config=cfg(), device_map=device_map,
        offload_folder=str(tmp_path / "offload"))
    assert len(reference) == 21 and seen == reference
    # The quantized blocks live in memory now; only the modules left offloaded stay on meta.
    meta = {n for n, p in offloaded.named_parameters() if p.device.type == "meta"}
    assert meta == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    x = ids[0][None]
    with torch.no_grad():
        expected = in_memory(x).logits
        torch.testing.assert_close(offloaded(x).logits, expected, rtol=0, atol=0)
    offloaded.save_pretrained(tmp_path / "saved")  # offloaded tensors are read back to be saved
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------- the CLI


def test_cli_torchrun_and_max_memory_write_the_checkpoint_of_one_process(
        tiny_llama_dir, calib_texts, tmp_path):
    """``torchrun ... -m watersic_hf.cli`` (2 gloo ranks) and ``--max-memory`` (blocks on disk)
    write a ``model.safetensors`` byte-identical to a plain one-process run."""
    calib_file = tmp_path.parent / "calib.txt"
    calib_file.write_text("\n\n".join(calib_texts * 20), encoding="utf-8")
    common = [str(tiny_llama_dir), "--bits", "3", "--dataset", str(calib_file), "--nsamples", "4",
              "--seqlen", "32", "--damp", "0.05", "--json"]
    run = dict(cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    cli = [sys.executable, "-m", "watersic_hf.cli"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2", "-m", "watersic_hf.cli"]
    outs = {}
    for name, prefix, extra in [("one", cli, []), ("two", torchrun, []),
                                ("offload", cli, ["--max-memory", "100KB"])]:
        out = tmp_path / name
        proc = subprocess.run([*prefix, *common, *extra, "--out", str(out)], **run)
        assert proc.returncode == 0, proc.stderr[-3000:]
        # One summary (rank 0 reports), and nothing left next to the output folder.
        json.loads(proc.stdout)
        outs[name] = (out / "model.safetensors").read_bytes()
    assert "offloaded to the disk" in proc.stderr  # the budget really moved blocks to disk
    assert outs["two"] == outs["one"] and outs["offload"] == outs["one"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["offload", "one", "two"]


def test_cli_memory_flags_are_checked(tmp_path, capsys):
    from watersic_hf.cli import _max_memory, quantize_main

    assert _max_memory("8GiB") == {"cpu": 8 * 2**30}
    assert _max_memory("cpu=1.5GB,0=20GiB") == {"cpu": 1_500_000_000, 0: 20 * 2**30}
    with pytest.raises(SystemExit):
        quantize_main(["--out", str(tmp_path / "o"), "--max-memory", "lots"])
    assert "not a memory size" in capsys.readouterr().err
    code = quantize_main(["--out", str(tmp_path / "o"), "--offload-folder", str(tmp_path)])
    assert code == 2 and "--offload-folder needs --max-memory" in capsys.readouterr().err
