"""The staged calibration engine (issue 11): same codes as before, fewer passes, clear parts."""

from __future__ import annotations

import json
import os
import sys

import pytest

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
