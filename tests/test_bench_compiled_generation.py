"""benchmarks/compiled_generation.py on a tiny model: every mode decodes eager's tokens in fp32, one row per mode."""

from __future__ import annotations

import json

import pytest
import torch._dynamo

from benchmarks import compiled_generation
from loopfit.models.compiled import compile_unsupported


@pytest.mark.skipif(compile_unsupported("cpu") is not None, reason="torch.compile cannot run on this machine")
def test_every_mode_decodes_eagers_tokens(tiny_source_dir, tmp_path, one_thread):
    torch._dynamo.reset()
    out = tmp_path / "gen.json"
    compiled_generation.main(["--model", str(tiny_source_dir), "--layout", "1-2-1", "--num_steps", "2",
                              "--precisions", "fp32", "--batch_sizes", "2", "--new_tokens", "3", "--rounds", "1",
                              "--out", str(out)])  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["mode"]) for r in rows] == [
        (m, mode) for m in ("plain", "looped 1-2-1 R=2") for mode in ("eager", "compile", "prepack")
    ]
    for r in rows:
        assert r["same_tokens"], r
        assert r["tokens_per_s"] == pytest.approx(2 * 3 / r["seconds"])
        assert r["first_call_s"] > 0
    assert all(r["vs_eager"] == 1.0 for r in rows if r["mode"] == "eager")


@pytest.mark.parametrize(
    "args, why",
    [(["--precisions", "fp16"], "takes fp32 and/or bf16"), (["--batch_sizes", "0"], "must be >= 1"),
     (["--layout", "4-x-4"], "not integers"), (["--layout", "4-6"], "P-B-C"), (["--rounds", "0"], "must be >= 1")],
)  # fmt: skip
def test_bad_input_is_one_line_errors(args, why):
    with pytest.raises(SystemExit, match=f"^loopfit: error: .*{why}"):
        compiled_generation.main(args)
