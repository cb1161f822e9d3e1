"""benchmarks/sdpa_dtype.py: the kernel table it prints and writes (the peers step A/B needs SmolLM2 and GSM8K)."""

from __future__ import annotations

import json

import pytest

from benchmarks import sdpa_dtype


def test_kernel_table_has_every_length_and_setting(tmp_path):
    out = tmp_path / "sdpa.json"
    sdpa_dtype.main(["--lengths", "8", "24", "--heads", "4/2x8", "2/2x16", "--calls", "1", "--repeats", "1",
                     "--threads", "1", "--out", str(out)])  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [(r["heads"], r["tokens"]) for r in rows] == [("4/2x8", 8), ("4/2x8", 24), ("2/2x16", 8), ("2/2x16", 24)]
    for r in rows:
        assert all(r[k] > 0 for k in ("fwd_bf16_ms", "fwd_fp32_ms", "fwd_bwd_bf16_ms", "fwd_bwd_fp32_ms"))
        assert r["fwd_bwd_fp32_over_bf16"] == r["fwd_bwd_fp32_ms"] / r["fwd_bwd_bf16_ms"]


@pytest.mark.parametrize(
    "args, why",
    [(["--lengths", "0"], "must be at least 1"), (["--calls", "0"], "must be at least 1"),
     (["--steps", "-1"], "must be at least 1"), (["--heads", "9x64"], "not Q/KVxD"),
     (["--heads", "9/2x64"], "not Q/KVxD"), (["--heads", "a/bxc"], "not Q/KVxD")],
)  # fmt: skip
def test_bad_input_is_one_line_errors(args, why, tmp_path):
    with pytest.raises(SystemExit, match=f"^loopfit: error: .*{why}"):
        sdpa_dtype.main([*args, "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()
