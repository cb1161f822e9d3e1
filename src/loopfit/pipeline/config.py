"""The demo's settings (`DemoConfig`, every field a `loopfit demo` flag), its held-out prompts and its plan."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DemoConfig:
    """Settings of one demo run (every field is a `loopfit demo` flag)."""

    out: str = "runs/demo"
    """Run folder."""
    model: str = "smollm2-135m"
    """Source (and teacher) model."""
    data: str | None = None
    """Training data (file/folder/dataset); default: the built-in arithmetic word problems."""
    layers: str = "0-3:20-25:26-29"
    """Layout `prelude:block:coda` of source layers, or `auto` to take the layer analysis' suggestion."""
    budget_minutes: float = 8.0
    """Wall-clock minutes of healing. The rest of the demo (loading, analysis, the teacher's training texts and its
    cache for the planned steps, the teacher's held-out texts, the depth sweep, samples) takes about 10 more on 2 CPU
    cores: 18 in all."""
    seq_len: int = 256
    """Tokens per packed training and evaluation sequence."""
    batch_size: int = 4
    """Sequences per training step and per evaluation batch."""
    max_documents: int | None = None
    """Cap on the documents read (train + validation); by default just enough for the planned training steps."""
    val_fraction: float = 0.1
    """Fraction of documents held out for evaluation (never trained on)."""
    chat: bool = True
    """Format question/answer records with the tokenizer's chat template."""
    max_mean_rec: int = 4
    """Mean depth the curriculum ramps to."""
    backprop_depth: int = 3
    """Iterations that keep gradients (the rest of a sampled depth runs without: truncated backprop)."""
    lr: float = 5e-4
    """Peak learning rate (AdamW, warmup-stable-decay)."""
    lora_r: int = 16
    """LoRA rank (lora_alpha = 2r) on every linear layer; the loop adapter is trained fully."""
    estimator: str = "topk_tail"
    """Teacher-cache estimator: `topk`, `topk_tail` or `sampled`."""
    top_k: int = 64
    """Tokens kept per position by the `topk` / `topk_tail` cache."""
    depths: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    """Loop depths R at which the converted and the healed model are evaluated."""
    analysis_samples: int = 16
    """Calibration sequences of the layer analysis."""
    eval_rows: int = 16
    """Held-out sequences of the training data scored at each depth (the report's second, in-format rows; the
    healed model's sweep to the deepest R over them is the costliest part of evaluating)."""
    teacher_texts: int = 32
    """Texts the teacher samples (temperature 1) from the built-in prompts, cycled: the teacher-referenced held-out
    data."""
    teacher_text_tokens: int = 128
    """New tokens per teacher-sampled text (fewer where the teacher ends it)."""
    teacher_train_share: float = 0.5
    """Share of the heal's training tokens that are texts the teacher writes itself (temperature 1, `TRAIN_PROMPTS`:
    openings disjoint from the held-out ones), beside `data`: sequence-level KD (Kim & Rush 2016, arXiv:1606.07947)
    that keeps the student near its teacher on general text while it learns the task. 0: `data` alone, on which the
    heal makes the model worse than its pruned start on the teacher's text. Costs the teacher's sampling time
    (about 4.5 minutes for the default 8-minute heal on 2 CPU cores). A run folder keeps the share it was
    healed with: resuming it with another is refused."""
    val_data: str | None = None
    """Your own held-out data (.txt/.md, JSONL, Parquet or HF dataset), scored like the teacher's texts by teacher,
    converted and healed models: its first `eval_rows x seq_len` tokens, cut into `seq_len` chunks."""
    seed: int = 0
    """Seeds data order and split, depth sampling and the cache's draws."""
    baseline: str | None = None
    """`static`: also heal the static pruned model (the layout's layers once, no loop) with the same recipe and
    score it beside the looped one. Off by default: it adds a heal about as long as the looped one."""
    baseline_budget: str | None = None
    """With `--baseline static`, what the static heal gets as much of as the looped heal achieved: `flops` (the
    default: its training FLOPs, `loopfit.flops.train_flops_per_token` summed over its steps' drawn depths) or
    `minutes` (its training step time, the static steps planned from a 3-step probe)."""


# Plain-text openings of many kinds, none of them arithmetic word problems or chat: the teacher continues each, so
# the scored text is the teacher's own distribution on data the student never trained on.
HELDOUT_PROMPTS = (
    "The history of the printing press begins",
    "Photosynthesis is the process by which",
    "def merge_sorted(a, b):\n",
    "Dear Sam,\n\nThank you for",
    "The recipe calls for two cups of flour and",
    "In 1969, the first humans to walk on the Moon",
    "The main difference between a virus and a bacterium is",
    "Once upon a time, in a small village by the sea,",
    "To reset your router, first",
    "The stock market fell sharply on Monday after",
    "Q: Why is the sky blue?\nA:",
    "The best way to learn a new language is",
    "Chapter 1\n\nThe rain had not stopped for three days when",
    "Water boils at a lower temperature on a mountain because",
    "Here is a short poem about autumn:\n",
    "The city council voted on Tuesday to",
)


TEACHER_TEXTS = "teacher-texts.json"
# Openings the teacher continues to write its own training text (`teacher_train_share`): other kinds and topics than
# HELDOUT_PROMPTS, so that no held-out text is a continuation of a training opening.
TRAIN_PROMPTS = (
    "The old lighthouse keeper climbed the stairs",
    "Volcanoes form when",
    "import json\n\ndef load_config(path):\n",
    "Hi Maria,\n\nI wanted to follow up on",
    "To make a simple tomato sauce,",
    "The Roman Empire reached its greatest extent",
    "Gravity is the force that",
    "She opened the letter and read",
    "How to change a flat tire:\n1.",
    "The company announced on Friday that",
    "Q: What causes the seasons?\nA:",
    "Learning to play the piano takes",
    "Bees communicate with each other by",
    "The museum's new exhibition features",
    "In mathematics, a prime number is",
    "The train was late again, so",
    "Our product review: the new headphones",
    "The human heart has four chambers:",
    "A short story about a lost dog:\n",
    "Climate change affects farmers because",
    "The rules of chess are simple:",
    "Yesterday the team won the championship",
    "The first computers filled entire rooms",
    "Good sleep habits include",
)
TEACHER_TRAIN = "teacher-train.jsonl"


@dataclass(frozen=True)
class Plan:
    """What the timing probe decided; saved as `plan.json` so a resumed demo keeps the same plan."""

    steps: int
    """Training steps that fit the budget."""
    max_documents: int
    """Documents to read so that training gets `steps * batch_size` rows."""
    val_fraction: float
    """Held-out fraction of those documents (enough for `eval_rows` sequences)."""
    seconds_per_step: float
    """Probe's measured seconds per step."""
