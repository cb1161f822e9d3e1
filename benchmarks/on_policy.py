"""On-policy distillation, loopfit against TRL's GKDTrainer at lmbda = 1: tokens/s (generated + trained), peak memory.

Same models, prompts and settings for both: teacher SmolLM2-135M-Instruct (30 layers); student its 4-6-4 loop
(layers 0-3 : 20-25 : 26-29, identity adapter, converted in-process by `loopfit.convert.to_looped`), LoRA r = 16
(alpha 32) on every linear layer; the first `--prompts` GSM8K train records as chat turns (user: question; the
answer is never trained on: every step is on-policy); `--batch` prompts per step, `--max_new_tokens` sampled per
prompt at temperature 1, top-p 1, no top-k, with the KV cache; generalized JSD beta 0.5 at T = 1 (GKD's objective,
no CE term); the loop at a fixed depth R = `--depth` in both (TRL's forward and `generate` in training mode would draw
a depth per call, so its student's `default_num_steps` is pinned to R); AdamW lr 2e-4; fp32 (`--bf16`: both in
bf16 autocast). Each system runs `--warmup` untimed steps then `--steps` timed ones, in its own subprocess.

Rows:
  loopfit   `loopfit train`'s trainer (`setup` + `fit`) with `--distillation.on_policy.lmbda=1 kind=jsd`.
  trl_gkd   `trl.experimental.gkd.GKDTrainer`, lmbda 1, seq_kd off, its ChatML collator on the same records;
            gradient checkpointing off (`--trl_gradient_checkpointing`: on, TRL's default, which also turns its KV
            cache off while sampling).
Columns: `generate_s` = the seconds of a step spent sampling the completions (`generate`, both systems);
`tokens_per_s` = (generated + trained tokens) / timed seconds, where generated = completion tokens through
the first EOS, trained = prompt + completion tokens of the rows the loss step runs (padding excluded); `peak_rss_gib`
= the child process's peak resident memory (`resource.getrusage(...).ru_maxrss`, whole process: models, data,
optimizer, activations); `train_peak_rss_gib` the same after the kernel's peak mark was reset before the first
step (Linux `clear_refs`); on CUDA also `peak_cuda_gib` (`torch.cuda.max_memory_allocated`).

    python -m benchmarks.on_policy                                            # full size (batch 8, 128 new tokens)
    python -m benchmarks.on_policy --steps 2 --warmup 1 --batch 2 --max_new_tokens 16      # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import peers
from benchmarks.peers import chat_records, start_training_phase

ROOT = Path(__file__).resolve().parent.parent
GSM8K = str(ROOT / "../shared/data/gsm8k/train.jsonl")
SYSTEMS = ("loopfit", "trl_gkd")
LR, R, LORA_ALPHA, BETA = 2e-4, 16, 32, 0.5


def prepare(args, tmp: Path) -> tuple[str, str]:
    """(the looped student's folder, a JSONL of the prompts' records), written under `tmp`."""
    from loopfit.convert import layout_from_sizes, to_looped
    from loopfit.loading import load_model, load_tokenizer

    teacher = load_model("smollm2-135m")
    student = to_looped(teacher, layout_from_sizes(teacher.config.num_hidden_layers, 4, 6, 4),
                        mean_recurrence=args.depth)  # fmt: skip
    student.save_pretrained(tmp / "student")
    load_tokenizer("smollm2-135m").save_pretrained(tmp / "student")
    data = tmp / "prompts.jsonl"
    with open(data, "w") as f:
        for conv in chat_records(args.data, args.prompts):
            f.write(json.dumps({"question": conv[0]["content"], "answer": conv[1]["content"]}) + "\n")
    return str(tmp / "student"), str(data)


def _row_tokens(labels) -> int:
    """Prompt + completion tokens of right-padded rows: each row's last scored position + 1 (a packed row: all its
    tokens, as it has no padding and ends with a scored completion)."""

    scored = labels != -100
    last = scored.shape[1] - 1 - scored.flip(1).int().argmax(1)
    return int((last + 1)[scored.any(1)].sum())


# ---------------------------------------------------------------------------------------------- workers
def worker_loopfit(args) -> dict:
    import torch

    import loopfit.process  # noqa: F401  (the `loopfit` command's defaults, as in benchmarks/peers.py)
    from loopfit.train import DistillationConfig, LoRAConfig, LRSchedule, OnPolicyConfig, TrainConfig, recipe

    op = OnPolicyConfig(lmbda=1.0, max_new_tokens=args.max_new_tokens, kind="jsd", kind_params={"beta": BETA})
    cfg = TrainConfig(
        model_name=args.student, out=str(Path(args.tmp) / "run-loopfit"), data=args.prompts_file, chat=True,
        assistant_only=True, seq_len=args.seq_len, batch_size=args.batch, max_steps=args.warmup + args.steps,
        fixed_num_steps=args.depth, lora=LoRAConfig(enabled=True, r=R, lora_alpha=LORA_ALPHA),
        distillation=DistillationConfig(enabled=True, teacher_model_name="smollm2-135m", temperature=1.0,
                                        ce_scale=0.0, kd_scale=1.0, on_policy=op),
        lr_schedule=LRSchedule(kind="constant"), progress_bar=False, tensorboard=False, overwrite=True,
        device=args.device, precision="bf16" if args.bf16 else "fp32", position_ids=args.loopfit_rows == "packed",
    )  # fmt: skip
    cfg.optim_config.lr = LR
    run = recipe.setup(cfg)
    counts = {"generated": 0, "trained": 0, "generate_s": 0.0}
    step = recipe.on_policy_step

    def counting(run_, num_steps):
        out = step(run_, num_steps)
        if out is not None and counting.timed:
            counts["generated"] += out[2]["generated_tokens"]
            counts["trained"] += sum(_row_tokens(b["labels"]) for b in out[0])
            counts["generate_s"] += out[2]["generate_s"]
        return out

    counting.timed = False
    recipe.on_policy_step = counting
    start_training_phase()
    recipe.fit(run, until=args.warmup)
    counting.timed = True
    _sync(run.device)
    t0 = time.perf_counter()
    recipe.fit(run)
    _sync(run.device)
    seconds = time.perf_counter() - t0
    run.logger.close()
    return {"seconds": seconds, **counts, **_cuda_peak(torch)}


def worker_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from loopfit.loading import load_model, load_tokenizer

    tok = load_tokenizer(args.student)
    student = load_model(args.student)
    depth = args.depth
    student.model.default_num_steps = lambda: depth  # one fixed depth, as loopfit's --fixed_num_steps
    convs = chat_records(args.data, args.prompts)
    times: list[float] = []
    counts = {"generated": 0, "trained": 0, "generate_s": 0.0}

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            _sync(trainer.args.device)
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            _sync(trainer.args.device)
            times.append(time.perf_counter() - self.t0)

    targs = GKDConfig(
        output_dir=str(Path(args.tmp) / "trl"), per_device_train_batch_size=args.batch,
        max_steps=args.warmup + args.steps, learning_rate=LR, lr_scheduler_type="constant", lmbda=1.0, beta=BETA,
        temperature=1.0, max_new_tokens=args.max_new_tokens, seq_kd=False, max_length=args.seq_len,
        gradient_checkpointing=args.trl_gradient_checkpointing, logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=args.device == "cpu", disable_tqdm=True, dataloader_num_workers=0, seed=0, bf16=args.bf16,
    )  # fmt: skip
    trainer = GKDTrainer(
        model=student, teacher_model=load_model("smollm2-135m"), args=targs,
        train_dataset=Dataset.from_list([{"messages": c} for c in convs]), processing_class=tok,
        peft_config=LoraConfig(r=R, lora_alpha=LORA_ALPHA, target_modules="all-linear", task_type="CAUSAL_LM"),
        callbacks=[Timer()],
    )  # fmt: skip
    generate = trainer.generate_on_policy_outputs

    def counting(model, inputs, generation_config):
        _sync(trainer.args.device)
        t0 = time.perf_counter()
        ids, mask, labels = generate(model, inputs, generation_config)
        _sync(trainer.args.device)
        if len(times) >= args.warmup:  # the step being run is a timed one
            counts["generated"] += int((labels != -100).sum())
            counts["trained"] += int(mask.sum())
            counts["generate_s"] += time.perf_counter() - t0
        return ids, mask, labels

    trainer.generate_on_policy_outputs = counting
    start_training_phase()
    trainer.train()
    return {"seconds": sum(times[args.warmup :]), **counts, **_cuda_peak(torch),
            "gradient_checkpointing": bool(targs.gradient_checkpointing)}  # fmt: skip


def _sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _cuda_peak(torch) -> dict:
    return {"peak_cuda_gib": torch.cuda.max_memory_allocated() / 2**30} if torch.cuda.is_available() else {}


def run_worker(args) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    peers.write_result({"loopfit": worker_loopfit, "trl_gkd": worker_trl}[args.worker](args), args.json)


# ------------------------------------------------------------------------------------------- orchestrator
def spawn(system: str, args, student: str, prompts: str, tmp: Path) -> dict:
    out = tmp / f"{system}.json"
    cmd = [sys.executable, "-m", "benchmarks.on_policy", "--worker", system, "--json", str(out), "--student", student,
           "--prompts_file", prompts, "--tmp", str(tmp), "--data", args.data, "--prompts", str(args.prompts),
           "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup), "--max_new_tokens",
           str(args.max_new_tokens), "--seq_len", str(args.seq_len), "--depth", str(args.depth), "--device",
           args.device]  # fmt: skip
    cmd += (["--threads", str(args.threads)] if args.threads else []) + (["--bf16"] if args.bf16 else [])
    cmd += ["--trl_gradient_checkpointing"] if args.trl_gradient_checkpointing else []
    cmd += ["--loopfit_rows", args.loopfit_rows]
    print(f"[on_policy] {system} ...", file=sys.stderr, flush=True)
    env = peers.huge_pages_env(args.huge_pages, peer=system != "loopfit")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = proc.stdout.strip().splitlines()[-3:]
        print(f"[on_policy] {system} failed:\n" + "\n".join(tail), file=sys.stderr)
        return {"error": " | ".join(tail)}
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument("--data", default=GSM8K, help="GSM8K-format JSONL (question, answer)")
    ap.add_argument("--prompts", type=int, default=None, help="records used (default: batch x (warmup + steps))")
    ap.add_argument("--batch", type=int, default=8, help="prompts per step")
    ap.add_argument("--steps", type=int, default=4, help="timed steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--seq_len", type=int, default=512, help="prompt + completion at most (longer prompts left out)")
    ap.add_argument("--depth", type=int, default=4, help="loop depth R of sampling and training, both systems")
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu", choices=("cpu", "cuda"))
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast in both (default fp32)")
    ap.add_argument("--trl_gradient_checkpointing", action="store_true", help="TRL's default (KV cache off)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--loopfit_rows", choices=("packed", "padded"), default="packed",
                    help="loopfit trains on each step's rows packed in one with per-row positions (`loopfit train "
                         "--position_ids=true`), or right-padded as TRL's")  # fmt: skip
    ap.add_argument("--huge_pages", choices=("loopfit", "all", "none"), default="loopfit", help=peers.HUGE_PAGES_HELP)
    ap.add_argument("--out", default=None)
    for hidden in ("--worker", "--json", "--student", "--prompts_file", "--tmp"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.prompts = args.prompts or args.batch * (args.warmup + args.steps)
    if args.worker:
        return run_worker(args)
    from benchmarks.common import report

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        student, prompts = prepare(args, Path(tmp))
        for system in args.systems:
            results[system] = spawn(system, args, student, prompts, Path(tmp))
    rows = []
    for system, r in results.items():
        if "error" in r:
            rows.append({"system": system, "error": r["error"][:160]})
            continue
        tokens = r["generated"] + r["trained"]
        rows.append({"system": system, "tokens_per_s": tokens / r["seconds"], "step_s": r["seconds"] / args.steps,
                     "generate_s": r["generate_s"] / args.steps, "generated": r["generated"], "trained": r["trained"],
                     "peak_rss_gib": r["peak_rss_gib"], "train_peak_rss_gib": r["train_peak_rss_gib"],
                     **{k: r[k] for k in ("peak_cuda_gib", "gradient_checkpointing") if k in r}})  # fmt: skip
    keys = ("batch", "steps", "warmup", "max_new_tokens", "seq_len", "depth", "device", "bf16", "prompts", "data",
            "trl_gradient_checkpointing", "loopfit_rows", "huge_pages")  # fmt: skip
    meta = {k: getattr(args, k) for k in keys}
    meta |= {"student": "SmolLM2-135M 4-6-4 loop (0-3:20-25:26-29), LoRA r16 all-linear", "lmbda": 1.0,
             "objective": f"generalized JSD beta {BETA}, T 1, no CE", "memory": "peak RSS via resource.ru_maxrss",
             "load_avg": os.getloadavg()}  # fmt: skip
    by = {r["system"]: r for r in rows if "error" not in r}
    if len(by) == 2:
        a, b = by["loopfit"], by["trl_gkd"]
        meta["speedup_vs_trl"] = a["tokens_per_s"] / b["tokens_per_s"]
        meta["memory_ratio_vs_trl"] = a["peak_rss_gib"] / b["peak_rss_gib"]
        if "peak_cuda_gib" in a and "peak_cuda_gib" in b:
            meta["cuda_memory_ratio_vs_trl"] = a["peak_cuda_gib"] / b["peak_cuda_gib"]
    report("on_policy", rows, meta, out=args.out)
    for k, v in meta.items():
        if k.endswith("_vs_trl"):
            print(f"{k}: {v:.4g}")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
