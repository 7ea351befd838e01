"""Installed means registered: WaterSIC checkpoints load in processes that never import watersic_hf.

The mechanism is ``_watersic_hf_autoregister.py`` plus the ``watersic_hf-autoregister.pth`` line
that pip puts in site-packages (see setup.py). Every check runs in a fresh interpreter, since the
hook acts at interpreter start and on the first import of transformers' quantizer registry.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile

import pytest
import torch
from _tiny import make_local_tokenizer, make_tiny_model
from transformers import AutoModelForCausalLM

import _watersic_hf_autoregister as autoregister
from watersic_hf import WaterSICConfig

REPO = pathlib.Path(__file__).resolve().parents[1]
IDS = torch.tensor([[3, 9, 14, 2, 7, 30, 11, 5]])


def _fresh_python(code: str, cwd: pathlib.Path, *args: str, **env: str):
    """Run ``code`` in a new interpreter, outside the repository (so only the install counts)."""
    drop = ("PYTHONPATH", autoregister.ENV_VAR)
    full_env = {k: v for k, v in os.environ.items() if k not in drop}
    full_env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **env)
    return subprocess.run([sys.executable, *args, "-c", textwrap.dedent(code)], cwd=cwd,
                          env=full_env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    src = tmp_path_factory.mktemp("autoreg_src")
    make_tiny_model("llama", src)
    ids = [torch.randint(0, 128, (16,), generator=torch.Generator().manual_seed(i))
           for i in range(4)]
    model = AutoModelForCausalLM.from_pretrained(
        src, quantization_config=WaterSICConfig(bits=4, dataset=ids, seqlen=16, method="gptq"))
    out = tmp_path_factory.mktemp("autoreg_q")
    model.save_pretrained(out)
    make_local_tokenizer(out)
    with torch.no_grad():
        logits = model(IDS).logits
    return out, logits


def test_interpreter_start_only_installs_a_finder(tmp_path):
    code = """
        import sys
        heavy = [m for m in ("torch", "transformers", "watersic_hf") if m in sys.modules]
        finders = [type(f).__name__ for f in sys.meta_path]
        print("heavy:", heavy, "finder:", "WaterSICAutoRegisterFinder" in finders)
    """
    on = _fresh_python(code, tmp_path)
    assert on.returncode == 0, on.stderr[-3000:]
    assert "heavy: [] finder: True" in on.stdout
    off = _fresh_python(code, tmp_path, **{autoregister.ENV_VAR: "1"})
    assert "heavy: [] finder: False" in off.stdout, off.stderr[-3000:]


def test_pipeline_in_a_fresh_process_without_importing_watersic_hf(saved, tmp_path):
    folder, logits = saved
    out = tmp_path / "logits.pt"
    result = _fresh_python(f"""
        import sys
        import torch

        assert "watersic_hf" not in sys.modules
        from transformers import pipeline  # registers watersic: its quantizer registry loads

        pipe = pipeline("text-generation", model={str(folder)!r}, device="cpu")
        print("layer:", type(pipe.model.model.layers[0].self_attn.q_proj).__name__)
        print("hook left:", any(type(f).__name__ == "WaterSICAutoRegisterFinder"
                                for f in sys.meta_path))
        with torch.no_grad():
            torch.save(pipe.model(torch.tensor({IDS.tolist()})).logits, {str(out)!r})
        print(pipe("the quick brown", max_new_tokens=3, do_sample=False)[0]["generated_text"])
    """, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "layer: WaterSICLinear" in result.stdout and "hook left: False" in result.stdout
    assert "Unknown quantization type" not in result.stderr
    torch.testing.assert_close(torch.load(out), logits, rtol=0, atol=0)


def test_a_normal_wheel_install_registers_too(saved, tmp_path):
    # Build the wheel that `pip install watersic-hf` would install and unpack it into a fresh site
    # directory; the interpreter below sees only that directory's .pth files (-S skips the
    # editable install of this environment), with torch and transformers on a plain path entry.
    # Built from a copy: setuptools writes build/ and *.egg-info into the source folder.
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", "__pycache__", "tests", "benchmarks"))
    wheel_dir = tmp_path / "wheel"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(wheel_dir), str(source)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheel_dir.glob("watersic_hf-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert autoregister.PTH_FILE in names and "_watersic_hf_autoregister.py" in names
        assert zf.read(autoregister.PTH_FILE).decode().strip() == autoregister.PTH_LINE
        assert not any(n.startswith("kernels/") for n in names)
        site_dir = tmp_path / "site"
        zf.extractall(site_dir)
    deps = sysconfig.get_paths()["purelib"]
    folder, _ = saved
    result = _fresh_python(f"""
        import site, sys
        sys.path.append({deps!r})
        site.addsitedir({str(site_dir)!r})
        assert "torch" not in sys.modules and "watersic_hf" not in sys.modules
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r})
        print("layer:", type(model.model.layers[0].mlp.up_proj).__name__)
        print("from:", sys.modules["watersic_hf"].__file__)
    """, tmp_path, "-S")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "layer: WaterSICLinear" in result.stdout
    assert f"from: {site_dir}" in result.stdout
