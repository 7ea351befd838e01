"""push_to_hub end to end against the loopback fake Hub (watersic_hf.testing.hub_server).

huggingface_hub reads HF_ENDPOINT when it is imported, so the pushes run in a subprocess whose
environment points at the fake server; the server runs in this process and keeps what it received.
"""

import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request

import pytest

from watersic_hf.model_card import CARD_MARKER
from watersic_hf.testing import FakeHubServer, hub_env

TESTS_DIR = os.path.dirname(__file__)

PUSH_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    sys.path.insert(0, sys.argv[1])
    from _tiny import CALIB_TEXTS, make_local_tokenizer, make_tiny_model
    from transformers import AutoModelForCausalLM

    work = sys.argv[2]
    report = {}

    # 1. A plain float model through transformers' own push_to_hub.
    model = make_tiny_model("llama")
    model.save_pretrained(f"{work}/float_local")
    report["float_url"] = str(model.push_to_hub("tiny-float", tags=["watersic"]))
    back = AutoModelForCausalLM.from_pretrained("watersic-tester/tiny-float")
    report["float_roundtrip"] = all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values())
    )

    # 2. A WaterSIC-quantized model through watersic_hf's push (model + tokenizer + card).
    import watersic_hf
    from watersic_hf.model_card import push_to_hub

    model.save_pretrained(f"{work}/float_src")
    tok = make_local_tokenizer(f"{work}/float_src")
    config = watersic_hf.WaterSICConfig(
        bits=3, dataset=list(CALIB_TEXTS) * 10, tokenizer=tok, nsamples=2, seqlen=16
    )
    q = AutoModelForCausalLM.from_pretrained(f"{work}/float_src", quantization_config=config)
    info = push_to_hub(q, "tiny-watersic", tokenizer=tok, ppl=12.5)
    report["quant_commit"] = info.commit_url
    # The same files, saved locally the same way, for the byte-for-byte comparison.
    type(q).save_pretrained(q, f"{work}/quant_local")
    tok.save_pretrained(f"{work}/quant_local")
    from watersic_hf.evaluation import disk_bits, memory_bits
    from watersic_hf.model_card import write_model_card
    write_model_card(f"{work}/quant_local", q.config, repo_id="watersic-tester/tiny-watersic",
                     base_model=q.config._name_or_path, ppl=12.5,
                     bits_on_disk=disk_bits(f"{work}/quant_local")["bits_per_weight"],
                     bits_in_memory=memory_bits(q)["bits_per_weight"])
    # Download it back and compare logits.
    q2 = AutoModelForCausalLM.from_pretrained("watersic-tester/tiny-watersic")
    ids = torch.tensor([[3, 5, 7, 9, 11, 13]])
    with torch.no_grad():
        report["quant_roundtrip_max_diff"] = (q(ids).logits - q2(ids).logits).abs().max().item()

    # 3. transformers' push_to_hub on the quantized model (what a user would call).
    q.push_to_hub("tiny-watersic-direct")
    type(q).save_pretrained(q, f"{work}/direct_local")
    print(json.dumps(report))
    """
)


def _files(folder):
    return {
        name: open(os.path.join(folder, name), "rb").read()
        for name in os.listdir(folder)
        if os.path.isfile(os.path.join(folder, name))
    }


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    work = tmp_path_factory.mktemp("hub")
    script = work / "push.py"
    script.write_text(PUSH_SCRIPT)
    with FakeHubServer(lifetime_s=240) as hub:
        env = {**os.environ, **hub_env(hub, work / "hf_home"), "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(
            [sys.executable, str(script), TESTS_DIR, str(work)],
            env=env,
            capture_output=True,
            text=True,
            timeout=220,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        yield hub, work, report


def test_fake_hub_basics(tmp_path):
    with FakeHubServer(lifetime_s=30) as hub:
        assert hub.url.startswith("http://127.0.0.1:")
        create = hub.url + "/api/repos/create"
        body = json.dumps({"name": "r", "organization": None}).encode()
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(urllib.request.Request(create, data=body, method="POST"))
        assert err.value.code == 401
        auth = {"Authorization": f"Bearer {hub.token}", "Content-Type": "application/json"}
        with urllib.request.urlopen(urllib.request.Request(create, data=body, headers=auth)) as r:
            assert json.load(r)["url"] == f"{hub.url}/watersic-tester/r"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(urllib.request.Request(create, data=body, headers=auth))
        assert err.value.code == 409 and json.load(err.value)["url"].endswith("/watersic-tester/r")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(hub.url + "/watersic-tester/r/resolve/main/missing.txt")
        assert err.value.code == 404 and err.value.headers["X-Error-Code"] == "EntryNotFound"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(hub.url + "/api/spaces/whatever")
        assert err.value.code == 404
        assert hub.unhandled == [("GET", "/api/spaces/whatever")]
        assert hub.files("watersic-tester/r") == {
            ".gitattributes": hub.files("watersic-tester/r")[".gitattributes"]
        }
    assert not hub.running


def test_fake_hub_stops_by_itself():
    hub = FakeHubServer(lifetime_s=0.3).start()
    url = hub.url
    deadline = time.monotonic() + 5
    while hub.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not hub.running
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "/api/whoami-v2", timeout=2)
    with pytest.raises(ValueError, match="lifetime_s"):
        FakeHubServer(lifetime_s=0)


def test_transformers_push_uploads_save_pretrained_output(pushed):
    hub, work, report = pushed
    assert hub.unhandled == []
    stored = hub.stored_files("watersic-tester/tiny-float")
    local = _files(work / "float_local")
    # Every file save_pretrained wrote arrives byte for byte; transformers adds its own README.md.
    assert set(stored) == set(local) | {"README.md", ".gitattributes"}
    for name, data in local.items():
        assert stored[name].data == data, name
    assert stored["model.safetensors"].lfs  # weights went through the LFS protocol, not inline
    assert "- watersic" in stored["README.md"].data.decode()
    assert report["float_roundtrip"] is True


def test_watersic_push_uploads_model_tokenizer_and_card(pushed):
    hub, work, report = pushed
    stored = hub.files("watersic-tester/tiny-watersic")
    local = _files(work / "quant_local")
    assert set(stored) == set(local) | {".gitattributes"}
    for name, data in local.items():
        assert stored[name] == data, name
    card = stored["README.md"].decode()
    assert CARD_MARKER in card and "import watersic_hf" in card and "12.500" in card
    assert 'from_pretrained("watersic-tester/tiny-watersic")' in card
    config = json.loads(stored["config.json"])["quantization_config"]
    assert config["quant_method"] == "watersic" and config["layers"]
    assert report["quant_roundtrip_max_diff"] == 0.0


def test_transformers_push_of_a_quantized_model_keeps_the_watersic_card(pushed):
    """Needs the quantizer to call watersic_hf.model_card.install_save_hooks on quantized models."""
    hub, work, _ = pushed
    stored = hub.files("watersic-tester/tiny-watersic-direct")
    for name, data in _files(work / "direct_local").items():
        assert stored[name] == data, name
    card = stored["README.md"].decode()
    assert CARD_MARKER in card and "import watersic_hf" in card
    # The tokenizer calibration used travels with the model.
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(stored)
