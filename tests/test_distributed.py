"""Two DeepSpeed engines over gloo with 2 real ranks against a plain-PyTorch Algorithm 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import deepspeed_cmd, run, tail


@pytest.mark.slow
def test_two_engines_match_plain_pytorch_under_zero_1_2_3(tmp_path: Path) -> None:
    report_path = tmp_path / "grad_check.json"
    proc = run(deepspeed_cmd(2, "tests/workers/grad_check.py", str(report_path)))
    assert proc.returncode == 0, tail(proc)
    report = json.loads(report_path.read_text())
    assert sorted(report) == ["zero1", "zero2", "zero3"]
    for stage, r in report.items():
        # fp32 on both sides; only the order of the cross-rank sum differs.
        assert r["encoder_rel_err"] < 1e-4, (stage, r)
        assert r["generator_rel_err"] < 1e-4, (stage, r)
        assert r["generator_holds_grad_in_encoder_phase"] is False, (stage, r)
        assert r["encoder_holds_grad_in_generator_phase"] is False, (stage, r)
