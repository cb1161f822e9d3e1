"""Memory saved by sharing the teacher's weights with a LoRA student (`--distillation.share_weights`).

Sets up a LoRA + KD run (student, teacher, data; no training step) in a fresh process with sharing on and off
and reports the process's resident memory after one training step and the bytes the recipe reports as shared.

    python -m benchmarks.teacher_sharing --model runs/smol-4-6-4 --teacher smollm2-135m
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _child(model: str, teacher: str, data: str, share: bool) -> None:
    from loopfit.train import DistillationConfig, LoRAConfig, TrainConfig
    from loopfit.train.recipe import fit, setup

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(model_name=model, out=f"{tmp}/run", data=data, max_documents=200, seq_len=256,
                          lora=LoRAConfig(enabled=True, r=16, modules_to_save=["adapter"]), progress_bar=False,
                          tensorboard=False, fixed_num_steps=3,
                          distillation=DistillationConfig(enabled=True, teacher_model_name=teacher,
                                                          share_weights=share))  # fmt: skip
        run = setup(cfg)
        fit(run, until=1)  # weights load memory-mapped: only a step touches (and so holds) all of them
        gc.collect()
        print(
            json.dumps({"share_weights": share, "rss_mib": _rss_mib(), "shared_mib": run.info["shared_bytes"] / 2**20})
        )
        run.logger.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/smol-4-6-4")
    ap.add_argument("--teacher", default="smollm2-135m")
    ap.add_argument("--data", default="../shared/data/text/tinyshakespeare.txt")
    ap.add_argument("--json", default="benchmarks/results/teacher_sharing.json")
    ap.add_argument("--child", choices=["on", "off"])
    a = ap.parse_args()
    if a.child:
        _child(a.model, a.teacher, a.data, a.child == "on")
        return
    rows = []
    for mode in ("off", "on"):
        cmd = [sys.executable, "-m", "benchmarks.teacher_sharing", "--model", a.model, "--teacher", a.teacher,
               "--data", a.data, "--child", mode]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"{'share_weights':>14} {'RSS after 1 step (MiB)':>22} {'reported shared (MiB)':>22}")
    for r in rows:
        print(f"{str(r['share_weights']):>14} {r['rss_mib']:>22.0f} {r['shared_mib']:>22.0f}")
    saved = rows[0]["rss_mib"] - rows[1]["rss_mib"]
    print(f"resident memory saved by sharing: {saved:.0f} MiB")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    from loopfit.io import write_json

    write_json(a.json, {"rows": rows, "rss_saved_mib": saved, "model": a.model, "teacher": a.teacher})


if __name__ == "__main__":
    main()
