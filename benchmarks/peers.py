"""loopfit's distillation step against TRL's GKDTrainer and torchtune's chunked forward-KL loss, side by side.

Same models, data, batch and sequence length for every system: teacher SmolLM2-135M (30 layers); student its copy
pruned to layers 0-3 and 20-29 (`loopfit.convert.to_static`), LoRA r = 16 (alpha 32) on every linear layer; one
batch of the first 4 GSM8K train records as chat turns (user: question, assistant: answer; loss on the answer only),
right-padded; AdamW lr 2e-4; fp32, or bf16 autocast for every system with `--precision bf16`. Each system trains
`--warmup + --steps` steps on that batch, in its own subprocess, so the peak resident memory (`ru_maxrss` of the
child) is that system's alone. The whole measurement (every system once) is repeated `--repeats` times, the systems
taking turns within each repeat so that a change of load on the machine falls on all of them; each row gives the
median over the repeats and the spread (min, max) of tokens/s and peak memory. A run's tokens/s is its real
(unpadded) tokens per step times its timed steps over their summed wall-clock.

Systems (rows):
  loopfit jsd     `loopfit train`'s run (trainer `setup` + `fit`, plain student, fused loss), generalized JSD
                  beta 0.5, T 1, no CE term: the objective of TRL's GKD.
  trl gkd         `trl.experimental.gkd.GKDTrainer`, lmbda 0 (off-policy), beta 0.5 (its loss uses T = 1), its own
                  ChatML collator on the same 4 records, at `--precision` like the others (fp32 by default; TRL's own
                  default is bf16 autocast); its other settings at their defaults (gradient checkpointing on).
  loopfit fkl     the same loopfit run with forward KL, T 1, alpha 0.5 (0.5 CE + 0.5 KD).
  torchtune fkl   torchtune's `ForwardKLWithChunkedOutputLoss` + `CEWithChunkedOutputLoss` (8 chunks, kd_ratio 0.5),
                  the loss step of its knowledge_distillation_single_device recipe, on the same HF models (torchtune
                  has no SmolLM2 builder) in a plain AdamW loop.
Losses are compared on the shared batch before any update (LoRA starts as a no-op, so every system computes the
same function): loopfit jsd vs TRL; loopfit fkl's CE and KD vs torchtune's, whose "forward KL" is the cross-entropy
-sum p_t log p_s = KL(p_t || p_s) + H(p_t), so the teacher's entropy is subtracted before comparing. A relative
difference above `LOSS_RTOL[precision]`, or a system that failed, makes the exit status 1 (after the results are
written).

TRL and torchtune are not loopfit dependencies: they run from the venv that `benchmarks/run_peers.sh` sets up from
requirements/peers-lock.txt (loopfit's locked versions + trl, torchtune, torchao), the one command:

    bash benchmarks/run_peers.sh                                        # all four rows, 3 repeats
    bash benchmarks/run_peers.sh --steps 1 --warmup 0 --repeats 1       # a quick check that everything runs
    python -m benchmarks.peers --systems loopfit_jsd loopfit_fkl        # loopfit only, any loopfit venv
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GSM8K = "../shared/data/gsm8k/train.jsonl"
SYSTEMS = ("loopfit_jsd", "trl_gkd", "loopfit_fkl", "torchtune_fkl")
PEERS = {"trl_gkd", "torchtune_fkl"}
LAYOUT = ([0, 1, 2, 3], list(range(20, 26)), list(range(26, 30)))
LR, R, LORA_ALPHA = 2e-4, 16, 32
THP_ENV = "THP_MEM_ALLOC_ENABLE"  # PyTorch's CPU allocator on transparent huge pages (loopfit.process)
# How far the shared-batch losses may differ. They are computed before any training step, outside autocast, so in
# fp32 (they agree to ~1e-7: summation orders) - except TRL's teacher under `--precision bf16`: GKDTrainer has
# accelerate prepare the teacher at construction, which wraps its forward in bf16 autocast (measured 1.6e-4 off).
LOSS_RTOL = {"fp32": 1e-4, "bf16": 1e-3}


# ------------------------------------------------------------------------------------------ shared inputs
def chat_records(data: str, n: int) -> list[list[dict]]:
    """The first `n` GSM8K records as [user question, assistant answer] conversations."""
    out = []
    with open(data) as f:
        for line in f:
            if len(out) == n:
                break
            r = json.loads(line)
            out.append([{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}])
    return out


def shared_batch(tokenizer, conversations: list[list[dict]]) -> dict:
    """Right-padded `input_ids`, `attention_mask` and `labels` (-100 on the prompt and padding)."""
    import torch

    rows = []
    for conv in conversations:
        full = tokenizer.apply_chat_template(conv, tokenize=False)
        prompt = tokenizer.apply_chat_template(conv[:-1], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        rows.append((ids, n_prompt))
    length = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
        labels[i, n_prompt : len(ids)] = input_ids[i, n_prompt : len(ids)]
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def packed_batch(batch: dict) -> dict:
    """The shared batch's records, unpadded, in one row with position ids restarting at each record (HF's
    padding-free collator, `DataCollatorWithFlattening`): how `loopfit train --position_ids=true` reads packed
    documents (each attends only to itself; a record's first token is no target), without the EOS its packing
    appends. Scores exactly as the padded batch."""
    from transformers import DataCollatorWithFlattening

    lengths = batch["attention_mask"].sum(1).tolist()
    rows = [{"input_ids": ids[:n].tolist(), "labels": labels[:n].tolist()}
            for ids, labels, n in zip(batch["input_ids"], batch["labels"], lengths)]  # fmt: skip
    return dict(DataCollatorWithFlattening(return_position_ids=True)(rows))


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


_CHECK_PEAK: list[float] = []


def start_training_phase() -> None:
    """Note the peak so far (loading, the loss check) and reset the kernel's peak-RSS mark (Linux), so the peak
    measured at the end is that of the training steps alone (on top of what stayed resident)."""
    _CHECK_PEAK.append(_peak_rss_gib())
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


class FixedBatch:
    """Stands in for the trainer's batch stream: the same batch every step (what the peers train on too)."""

    def __init__(self, batch: dict):
        self.batch = {k: batch[k] for k in ("input_ids", "labels", "position_ids") if k in batch}

    def next(self) -> dict:
        return self.batch

    def state_dict(self) -> dict:
        return {}


# ---------------------------------------------------------------------------------------------- workers
def distillation_config(kind: str, chunk_size: int | None = None):
    """loopfit's objective for a row: `jsd` = GKD's (generalized JSD beta 0.5, T 1, no CE term), `fkl` = 0.5 CE +
    0.5 forward KL at T 1 (torchtune's kd_ratio 0.5). Built with keyword arguments, so a renamed field fails here
    instead of being set on the side (an assignment to the old `alpha` once left the JSD row with a CE term)."""
    from loopfit.train import DistillationConfig

    scales = {"jsd": dict(kind="jsd", kind_params={"beta": 0.5}, ce_scale=0.0, kd_scale=1.0),
              "fkl": dict(kind="fkl", ce_scale=0.5, kd_scale=0.5)}[kind]  # fmt: skip
    extra = {"chunk_size": chunk_size} if chunk_size else {}
    return DistillationConfig(enabled=True, teacher_model_name="smollm2-135m", temperature=1.0, **scales, **extra)


def loopfit_run(student: str, data: str, batch: dict, batch_size: int, kind: str, out: str, max_steps: int,
                precision: str, gradient_checkpointing: bool = False, chunk_size: int | None = None):  # fmt: skip
    """loopfit's row as `loopfit train` builds it (trainer `setup`): the student with LoRA r = `R`, the objective of
    `distillation_config(kind, chunk_size)`, AdamW at `LR`, a constant schedule, and `batch` (its `batch_size`
    records padded, or packed when it carries `position_ids`) every step. Returns the `Run`; `fit(run, until=...)`
    trains it."""
    from loopfit.train import LoRAConfig, LRSchedule, TrainConfig
    from loopfit.train.recipe import setup

    cfg = TrainConfig(
        model_name=student, out=out, data=data, chat=True, assistant_only=True, max_documents=64,
        seq_len=batch["input_ids"].shape[1], batch_size=batch_size, max_steps=max_steps,
        lora=LoRAConfig(enabled=True, r=R, lora_alpha=LORA_ALPHA),
        distillation=distillation_config(kind, chunk_size), lr_schedule=LRSchedule(kind="constant"),
        progress_bar=False, tensorboard=False, overwrite=True, device="cpu",
        gradient_checkpointing=gradient_checkpointing, position_ids="position_ids" in batch, precision=precision,
    )  # fmt: skip
    cfg.optim_config.lr = LR
    run = setup(cfg)
    run.stream = FixedBatch(batch)
    return run


def worker_loopfit(args, kind: str) -> dict:
    import torch

    import loopfit.process  # noqa: F401  (the `loopfit` command's defaults: huge pages for large CPU tensors)
    from loopfit.loading import load_tokenizer
    from loopfit.train.recipe import fit
    from loopfit.train.student import micro_batch_loss

    tok = load_tokenizer(args.student)
    batch = shared_batch(tok, chat_records(args.data, args.batch_size))
    real_tokens = int(batch["attention_mask"].sum())
    if args.loopfit_rows == "packed":
        batch = packed_batch(batch)
    out = str(Path(args.tmp) / f"run-{kind}")
    run = loopfit_run(args.student, args.data, batch, args.batch_size, kind, out, args.warmup + args.steps,
                      args.precision, args.gradient_checkpointing, args.chunk_size)  # fmt: skip
    num_items = (batch["labels"][:, 1:] != -100).sum().float()
    with torch.no_grad():
        parts = micro_batch_loss(run.student, run.teacher, batch, None, run.cfg.distillation, num_items)
    start_training_phase()
    fit(run, until=args.warmup)
    times = []
    for i in range(args.steps):  # one step per call, to time each step like the peers' workers do
        t0 = time.perf_counter()
        fit(run, until=args.warmup + i + 1)
        times.append(time.perf_counter() - t0)
    run.logger.close()
    return {"loss0": float(parts.total), "ce0": float(parts.ce), "kd0": float(parts.kd), "step_s": times,
            "tokens_per_step": real_tokens, "rows": list(batch["input_ids"].shape)}  # fmt: skip


def worker_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from loopfit.loading import load_model, load_tokenizer

    tok = load_tokenizer(args.student)
    convs = chat_records(args.data, args.batch_size)
    batch = shared_batch(tok, convs)
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    targs = GKDConfig(
        output_dir=str(Path(args.tmp) / "trl"), per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup + args.steps, learning_rate=LR, lr_scheduler_type="constant", lmbda=0.0, beta=0.5,
        max_length=1024, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, seed=0, bf16=args.precision == "bf16",
    )  # fmt: skip
    trainer = GKDTrainer(
        model=load_model(args.student), teacher_model=load_model("smollm2-135m"), args=targs,
        train_dataset=Dataset.from_list([{"messages": c} for c in convs]), processing_class=tok,
        peft_config=LoraConfig(r=R, lora_alpha=LORA_ALPHA, target_modules="all-linear", task_type="CAUSAL_LM"),
        callbacks=[Timer()],
    )  # fmt: skip
    collated = trainer.data_collator([{"messages": c} for c in convs])
    with torch.no_grad():
        loss0 = trainer.compute_loss(trainer.model, batch)
    start_training_phase()
    trainer.train()
    return {"loss0": float(loss0), "step_s": times[args.warmup :],
            "tokens_per_step": int(collated["attention_mask"].sum()),
            "gradient_checkpointing": bool(targs.gradient_checkpointing), "bf16": bool(targs.bf16)}  # fmt: skip


def worker_torchtune(args) -> dict:
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from torchtune.modules.loss import CEWithChunkedOutputLoss, ForwardKLWithChunkedOutputLoss

    from loopfit.loading import load_model, load_tokenizer

    chunks = 8
    tok = load_tokenizer(args.student)
    batch = shared_batch(tok, chat_records(args.data, args.batch_size))
    lora = LoraConfig(r=R, lora_alpha=LORA_ALPHA, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(load_model(args.student), lora).train()
    base = model.get_base_model()
    teacher = load_model("smollm2-135m").eval().requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    kd_fn, ce_fn = ForwardKLWithChunkedOutputLoss(chunks), CEWithChunkedOutputLoss(chunks)
    ids = batch["input_ids"]
    # The recipe's shift: labels[..., 1:] with an ignored last column, logits unshifted.
    labels = torch.hstack((batch["labels"][:, 1:], torch.full((ids.shape[0], 1), -100)))

    def _loss_step():
        h = base.model(ids).last_hidden_state
        logits = [base.lm_head(c) for c in h.chunk(chunks, dim=1)]
        with torch.no_grad():
            th = teacher.model(ids).last_hidden_state
            t_logits = [teacher.lm_head(c) for c in th.chunk(chunks, dim=1)]
        ce, kd = ce_fn(logits, labels), kd_fn(logits, t_logits, labels)
        return 0.5 * ce + 0.5 * kd, ce, kd, t_logits

    def loss_step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            return _loss_step()

    with torch.no_grad():  # in fp32 whatever --precision says, as the other systems' shared-batch losses
        loss0, ce0, kd0, t_logits = _loss_step()
        t = torch.cat(t_logits, dim=1).reshape(-1, t_logits[0].shape[-1])
        m = labels.reshape(-1) != -100
        logp = F.log_softmax(t[m].float(), dim=-1)
        entropy = float(-(logp.exp() * logp).sum(-1).mean())
    times = []
    start_training_phase()
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss, *_ = loss_step()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return {"loss0": float(loss0), "ce0": float(ce0), "kd0": float(kd0), "teacher_entropy": entropy,
            "step_s": times, "tokens_per_step": int(batch["attention_mask"].sum())}  # fmt: skip


def run_worker(args) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    fn = {
        "loopfit_jsd": lambda: worker_loopfit(args, "jsd"),
        "loopfit_fkl": lambda: worker_loopfit(args, "fkl"),
        "trl_gkd": lambda: worker_trl(args),
        "torchtune_fkl": lambda: worker_torchtune(args),
    }[args.worker]
    write_result(fn(), args.json)


def write_result(result: dict, path: str) -> None:
    """A worker's `result` with what every run records, written to `path` as JSON: the huge-page setting it had
    (loopfit's rows set it themselves), the peak RSS of its training steps (the mark is reset before the first step)
    and the whole peak (loading and the loss check too)."""
    result["huge_pages"] = os.environ.get(THP_ENV) == "1"
    result["train_peak_rss_gib"] = _peak_rss_gib()
    result["peak_rss_gib"] = max([result["train_peak_rss_gib"], *_CHECK_PEAK])
    Path(path).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------- orchestrator
def prepare_student(tmp: Path) -> str:
    from loopfit.convert import Layout, to_static
    from loopfit.loading import load_model, load_tokenizer

    student = to_static(load_model("smollm2-135m"), Layout(*LAYOUT))
    path = tmp / "student"
    student.save_pretrained(path)
    load_tokenizer("smollm2-135m").save_pretrained(path)
    return str(path)


def huge_pages_env(mode: str, peer: bool) -> dict:
    """A worker's environment with `THP_MEM_ALLOC_ENABLE` for `--huge_pages mode`: `loopfit` = each system at its
    default (unset for loopfit's rows, whose worker sets it as the `loopfit` command does; off for a peer, PyTorch's
    default), `all` = on, `none` = off; whatever the caller's environment holds."""
    env = dict(os.environ)
    if mode in ("all", "none"):
        env[THP_ENV] = "1" if mode == "all" else "0"
    elif peer:
        env[THP_ENV] = "0"
    else:
        env.pop(THP_ENV, None)
    return env


HUGE_PAGES_HELP = ("THP_MEM_ALLOC_ENABLE per system: loopfit = each at its default (the loopfit command turns huge "
                   "pages on, PyTorch leaves them off for the peers), all = on for every system, none = off for every "
                   "system")  # fmt: skip


def spawn(system: str, python: str, args, student: str, tmp: Path, repeat: int) -> dict:
    out = tmp / f"{system}-{repeat}.json"
    cmd = [
        python,
        "-m",
        "benchmarks.peers",
        "--worker",
        system,
        "--json",
        str(out),
        "--student",
        student,
        "--tmp",
        str(tmp),
        "--data",
        args.data,
        "--batch_size",
        str(args.batch_size),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--loopfit_rows",
        args.loopfit_rows,
    ]
    cmd += ["--threads", str(args.threads)] if args.threads else []  # fmt: skip
    if args.chunk_size:
        cmd += ["--chunk_size", str(args.chunk_size)]
    cmd += ["--precision", args.precision]
    if args.gradient_checkpointing:
        cmd += ["--gradient_checkpointing"]
    print(f"[peers] repeat {repeat + 1}/{args.repeats} {system}: {' '.join(cmd[:3])} ...", file=sys.stderr, flush=True)
    env = huge_pages_env(args.huge_pages, peer=system in PEERS)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = proc.stdout.strip().splitlines()[-3:]
        print(f"[peers] {system} failed:\n" + "\n".join(tail), file=sys.stderr)
        return {"error": " | ".join(tail)}
    return json.loads(out.read_text())


def spread(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of one measurement over the repeats."""
    return statistics.median(values), min(values), max(values)


def summarize(system: str, runs: list[dict]) -> dict:
    """One table row from a system's runs: tokens/s, step time and memory as the median over the runs (tokens/s and
    the whole peak memory with their min and max); the shared-batch losses (and TRL's settings) of the first run,
    and how far the runs' losses differ from it (`loss0_max_dev`, 0 where the runs are deterministic)."""
    row = {"system": system, "runs": len(runs)}
    failed = [r["error"] for r in runs if "error" in r]
    if failed:
        return row | {"error": failed[0][:120]}
    for r in runs:  # kept in the run's record too, for the per-repeat ratios and the JSON
        r["tokens_per_s"] = r["tokens_per_step"] * len(r["step_s"]) / sum(r["step_s"])
    row["tokens_per_s"], row["tokens_per_s_min"], row["tokens_per_s_max"] = spread([r["tokens_per_s"] for r in runs])
    row["step_s"] = statistics.median(sum(r["step_s"]) / len(r["step_s"]) for r in runs)
    row["peak_rss_gib"], row["peak_rss_gib_min"], row["peak_rss_gib_max"] = spread([r["peak_rss_gib"] for r in runs])
    row["train_peak_rss_gib"] = statistics.median(r["train_peak_rss_gib"] for r in runs)
    row["tokens_per_step"] = runs[0]["tokens_per_step"]
    row["loss0"] = runs[0]["loss0"]
    row["loss0_max_dev"] = max(abs(r["loss0"] - row["loss0"]) for r in runs)
    for k in ("ce0", "kd0", "teacher_entropy", "gradient_checkpointing", "bf16"):
        if k in runs[0]:
            row[k] = runs[0][k]
    return row


def compare(by: dict, runs: dict) -> dict:
    """Speed-up and memory ratio of loopfit against each peer (ratio of the medians, and the min and max of the
    per-repeat ratios: repeat i of one system against repeat i of the other), and the relative loss differences."""
    meta = {}

    def ratios(name: str, ours: str, peer: str) -> None:
        pairs = list(zip(runs[ours], runs[peer]))
        for key, field in (("speedup", "tokens_per_s"), ("memory_ratio", "peak_rss_gib")):
            meta[f"{key}_{name}"] = by[ours][field] / by[peer][field]
            per = [a[field] / b[field] for a, b in pairs]
            meta[f"{key}_{name}_range"] = [min(per), max(per)]

    if "loopfit_jsd" in by and "trl_gkd" in by:
        ratios("vs_trl", "loopfit_jsd", "trl_gkd")
        a, b = by["loopfit_jsd"], by["trl_gkd"]
        meta["jsd_loss_rel_diff_vs_trl"] = abs(a["loss0"] - b["loss0"]) / abs(b["loss0"])
    if "loopfit_fkl" in by and "trl_gkd" in by:  # loopfit's default objective family against TRL, for reference
        ratios("fkl_vs_trl", "loopfit_fkl", "trl_gkd")
    if "loopfit_fkl" in by and "torchtune_fkl" in by:
        ratios("vs_torchtune", "loopfit_fkl", "torchtune_fkl")
        a, b = by["loopfit_fkl"], by["torchtune_fkl"]
        meta["ce_rel_diff_vs_torchtune"] = abs(a["ce0"] - b["ce0"]) / abs(b["ce0"])
        kl_tt = b["kd0"] - b["teacher_entropy"]
        meta["fkl_rel_diff_vs_torchtune"] = abs(a["kd0"] - kl_tt) / abs(kl_tt)
    return meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", default=str(ROOT / ".venv-peers" / "bin" / "python"),
                    help="interpreter with trl and torchtune installed (default .venv-peers/bin/python)")  # fmt: skip
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument("--data", default=GSM8K)
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10, help="timed steps of each run")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--repeats", type=int, default=3, help="runs of every system (median and min-max reported)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="every system's compute: fp32, or bf16 autocast (TRL's own default; `loopfit train "
                         "--precision bf16`; torchtune's loss step under torch.autocast). The shared-batch losses are "
                         "computed before training, in fp32 but for TRL's teacher under bf16 (LOSS_RTOL)")  # fmt: skip
    ap.add_argument("--chunk_size", type=int, default=None, help="loopfit's fused-loss chunk (default: its own)")
    ap.add_argument("--gradient_checkpointing", action="store_true",
                    help="loopfit rows with gradient checkpointing (TRL GKD has it on by default)")  # fmt: skip
    ap.add_argument("--loopfit_rows", choices=("packed", "padded"), default="packed",
                    help="loopfit reads the records packed in one row with per-record positions (as `loopfit train "
                         "--position_ids=true` reads packed documents), or as the peers' padded rows")  # fmt: skip
    ap.add_argument("--huge_pages", choices=("loopfit", "all", "none"), default="loopfit", help=HUGE_PAGES_HELP)
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    ap.add_argument("--student", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return run_worker(args)
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1 or args.batch_size < 1:
        sys.exit("loopfit: error: --steps, --repeats and --batch_size must be >= 1 and --warmup >= 0")
    if not Path(args.data).is_file():
        sys.exit(f"loopfit: error: --data {args.data} is not a file (the GSM8K train records, one JSON a line)")
    from benchmarks.common import report

    runs: dict[str, list[dict]] = {s: [] for s in args.systems}
    with tempfile.TemporaryDirectory() as tmp:
        student = prepare_student(Path(tmp))
        for repeat in range(args.repeats):
            for system in args.systems:
                python = args.python if system in PEERS else sys.executable
                if system in PEERS and not Path(python).exists():
                    error = f"{python} not found (bash benchmarks/run_peers.sh sets it up, see docs/benchmarks.md)"
                    runs[system].append({"error": error})
                    continue
                runs[system].append(spawn(system, python, args, student, Path(tmp), repeat))
    rows = [summarize(system, rs) for system, rs in runs.items()]
    by = {r["system"]: r for r in rows if "error" not in r}
    meta = {"batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
            "data": args.data, "student": "SmolLM2 layers 0-3 + 20-29, LoRA r16 all-linear",
            "teacher": "SmolLM2-135M (30 layers)", "uptime": os.getloadavg(), "python_peers": args.python,
            "loopfit_chunk_size": args.chunk_size, "loopfit_rows": args.loopfit_rows,
            "loopfit_gradient_checkpointing": args.gradient_checkpointing, "huge_pages": args.huge_pages,
            "precision": args.precision, "loss_rtol": LOSS_RTOL[args.precision]}  # fmt: skip
    meta |= compare(by, {s: runs[s] for s in by})
    meta["runs"] = runs  # every run's step times, memory and losses, for a look at the spread
    report("peers", rows, meta, out=args.out)
    for k, v in meta.items():
        if k.endswith(("_vs_trl", "_vs_torchtune")):
            rng = meta.get(f"{k}_range")
            print(f"{k}: {v:.4g}" + (f" (per repeat {rng[0]:.4g} - {rng[1]:.4g})" if rng else ""))
    rel_diffs = {k: v for k, v in meta.items() if k.endswith(("_rel_diff_vs_trl", "_rel_diff_vs_torchtune"))}
    bad = [k for k, v in rel_diffs.items() if v > meta["loss_rtol"]]
    failed = [r["system"] for r in rows if "error" in r]
    if bad or failed:
        print(f"[peers] losses disagree: {bad}; failed: {failed}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
