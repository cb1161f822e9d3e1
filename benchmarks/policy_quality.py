"""On-policy against off-policy distillation at equal wall-clock, on the same looped student (issue 21 item 4).

    python -m benchmarks.policy_quality                  # the measurement: 2 arms x 2 seeds x 20 minutes, then eval
    python -m benchmarks.policy_quality --minutes 0.5 --seeds 0 --heldout 8 --eval_new_tokens 32 --name pq_check

- Student: SmolLM2-135M-Instruct's 4-6-4 loop (`loopfit convert smollm2-135m --prelude 4 --block 6 --coda 4
  --state_init zeros`, written once under `--out_dir`), teacher the source model; LoRA r = 16 on every linear layer
  plus the loop adapter, trained at the fixed depth R = `--depth`.
- Data: GSM8K train records in the tokenizer's chat format, the loss on the answer only. The last `--heldout` (64)
  records are held out (the same problems as `benchmarks/heal_yardsticks.py`'s out-of-domain yardstick); training
  reads a copy of the records before them written under `--out_dir` (never into the repository).
- Arms (`--arms label=lmbda,...`): `off` = lmbda 0 (KD + CE on the dataset's answers, `distillation.kind` fkl), `on`
  = lmbda 1 (every step on the student's own completions, `--max_new_tokens` sampled at temperature 1, per-token
  reverse KL, the documented default). A two-stage arm `label=a>b` (e.g. `offmix=0>0.5`, as GKD and on-policy
  distillation start on-policy after supervised training) trains half the minutes at lmbda a, exports that run
  (LoRA merged), and trains the other half at lmbda b from the export with a fresh LoRA, adapter trained on and a
  fresh optimizer and schedule; its `steps` is the two stages' sum. A one-run arm `label=b@N` (e.g.
  `offmix=0.5@35`) trains at lmbda b with `--distillation.on_policy.start_step N`: steps 1..N off-policy, then the
  mix, with one LoRA, optimizer and schedule. Each run is `loopfit train` with
  `--max_minutes M` (equal wall-clock; run on a quiet machine, one run at a time) and the same seed, optimizer
  (AdamW lr 1e-3, WSD) and precision (`--precision`, default bf16).
- Evaluation on the held-out problems at R and 2R: the answer loss (nats/token, `loopfit.evaluate.depth_sweep` on the
  answer tokens and end-of-turn token) and greedy accuracy (`loopfit.gsm8k.evaluate_depth`, zero-shot chat, flexible
  and strict extraction, `--eval_new_tokens` new tokens).

A finished run (its `done.json`) is not trained again, so an interrupted measurement continues where it stopped.
Writes benchmarks/results/NAME.json (one row per arm and seed, and the mean of each arm).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.common import report
from benchmarks.heal_yardsticks import gsm8k_batches
from loopfit.evaluate import depth_sweep
from loopfit.gsm8k import build_prompt, evaluate_depth, read_problems
from loopfit.loading import load_model, load_tokenizer


def loopfit(*args: str) -> None:
    """Run one `loopfit` command in a child process; its failure stops the benchmark with its last lines."""
    res = subprocess.run([sys.executable, "-m", "loopfit", *args], capture_output=True, text=True)
    if res.returncode != 0:
        tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-5:])
        raise SystemExit(f"loopfit {args[0]} failed:\n{tail}")


def training_records(path: str, heldout: int, out_dir: Path) -> Path:
    """Write the records before the last `heldout` to `out_dir` (the held-out ones are read from `path` itself, as
    `heal_yardsticks.gsm8k_batches` reads them)."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    if heldout >= len(lines):
        raise SystemExit(f"--heldout {heldout} leaves no training records in {path} ({len(lines)} records)")
    train = out_dir / "gsm8k_train.jsonl"
    train.write_text("\n".join(lines[:-heldout]) + "\n")
    return train


def train_arm(args, student: Path, data: Path, lmbdas: list[str], seed: int, out: Path) -> list[Path]:
    """Train one arm (one stage per lmbda spec `b` or `b@N`, `--minutes` split evenly); returns the stages' run
    folders."""
    runs = [out] if len(lmbdas) == 1 else [out.with_name(f"{out.name}-stage{i + 1}") for i in range(len(lmbdas))]
    start = student
    for i, (lmbda, run) in enumerate(zip(lmbdas, runs)):
        if i:
            start = exported(runs[i - 1])
        train_stage(args, start, data, lmbda, seed, run, args.minutes / len(lmbdas))
    return runs


def exported(run: Path) -> Path:
    """`run`'s export with the LoRA merged, `<run>-merged`, written once."""
    merged = run.with_name(run.name + "-merged")
    if not (merged / "config.json").is_file():
        loopfit("export", str(run), "--out", str(merged))
    return merged


def train_stage(args, student: Path, data: Path, lmbda: str, seed: int, out: Path, minutes: float) -> None:
    if (out / "done.json").is_file():
        return
    lmbda, _, start_step = lmbda.partition("@")
    loopfit(
        "train", "--model_name", str(student), "--data", str(data), "--chat", "true", "--assistant_only", "true",
        "--seq_len", str(args.seq_len), "--batch_size", str(args.batch_size), "--seed", str(seed),
        "--max_minutes", str(minutes), "--max_steps", "1000000", "--fixed_num_steps", str(args.depth),
        "--lora.enabled", "true", "--lora.r", "16", "--lora.lora_alpha", "32", "--lora.modules_to_save", "[adapter]",
        "--distillation.enabled", "true", "--distillation.teacher_model_name", args.teacher,
        "--distillation.on_policy.lmbda", str(lmbda), "--distillation.on_policy.max_new_tokens",
        str(args.max_new_tokens), "--distillation.on_policy.start_step", start_step or "0", "--optim_config.lr",
        "1e-3", "--lr_schedule.kind", "wsd",
        "--lr_schedule.warmup_steps", "10", "--precision", args.precision, "--tensorboard", "false",
        "--save_every", "0", "--overwrite", "true", "--out", str(out),
    )  # fmt: skip


def evaluate_run(args, merged: Path) -> dict:
    tok = load_tokenizer(str(merged))
    model = load_model(str(merged)).eval()
    depths = [args.depth, 2 * args.depth]
    row = {}
    loss = depth_sweep(model, gsm8k_batches(args.gsm8k, tok, args.heldout, 8), depths)
    for d, x in zip(loss["depths"], loss["loss"]):
        row[f"loss_R{d}"] = round(x, 4)
    problems = read_problems(args.gsm8k)[-args.heldout :]
    prompts = [build_prompt(tok, p.question, [], True, None) for p in problems]
    for d in depths:
        summary, _ = evaluate_depth(model, tok, problems, prompts, d, args.eval_new_tokens, 8, True)
        row[f"acc_R{d}"] = round(summary["flexible"]["accuracy"], 4)
        row[f"strict_R{d}"] = round(summary["strict"]["accuracy"], 4)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="smollm2-135m")
    ap.add_argument("--gsm8k", default="../shared/data/gsm8k/train.jsonl")
    ap.add_argument("--heldout", type=int, default=64)
    ap.add_argument("--arms", default="off=0,on=1", help="label=lmbda pairs, comma-separated")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--minutes", type=float, default=20.0, help="training wall-clock of every run")
    ap.add_argument("--depth", type=int, default=4, help="the fixed training depth R (evaluated at R and 2R)")
    ap.add_argument("--seq_len", type=int, default=512)
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--max_new_tokens", type=int, default=128, help="on-policy completion length")
    ap.add_argument("--eval_new_tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--precision",
        default="bf16",
        choices=("bf16", "fp32"),
        help="of every run (fp32 on a CPU without native bf16: `loopfit train` warns there)",
    )
    ap.add_argument("--out_dir", default="runs/policy_quality")
    ap.add_argument("--name", default="policy_quality")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    student = out_dir / "student"
    if not (student / "config.json").is_file():
        loopfit("convert", args.teacher, "--out", str(student), "--prelude", "4", "--block", "6", "--coda", "4",
                "--state_init", "zeros")  # fmt: skip
    train = training_records(args.gsm8k, args.heldout, out_dir)
    arms = [(a.split("=")[0], a.split("=")[1].split(">")) for a in args.arms.split(",")]
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for label, lmbda in arms:
            run = out_dir / f"{label}-s{seed}"
            runs = train_arm(args, student, train, lmbda, seed, run)
            steps = 0
            for r in runs:
                metrics = [json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines() if line.strip()]
                steps += max(m.get("step", 0) for m in metrics)
            merged = exported(runs[-1])
            spec = ">".join(lmbda)
            row = {"arm": label, "lmbda": float(spec) if spec.replace(".", "").isdigit() else spec, "seed": seed,
                   "steps": steps}  # fmt: skip
            row.update(evaluate_run(args, merged))
            rows.append(row)
            print(row, flush=True)
    for label, _ in arms:
        mine = [r for r in rows if r["arm"] == label]
        mean = {"arm": label, "seed": "mean"}
        for k in mine[0]:
            if k.startswith(("loss_", "acc_", "strict_", "steps")):
                mean[k] = round(statistics.mean(r[k] for r in mine), 4)
        rows.append(mean)
    report(args.name, rows, {"args": vars(args)})


if __name__ == "__main__":
    main()
