"""Checks of a training run's inputs that need the file system: run at the start of `recipe.setup`, after the
config's own `validate` and before any model weights load or anything is written.

`TrainConfig.validate` checks the settings alone (sweeps call it on configs whose files do not exist yet); this
module checks what the settings point at: the run folder can be written, the student (and teacher) have a
tokenizer, teacher and student share one vocabulary token for token, the sequence length fits the models, and
the data sources exist.
"""

from __future__ import annotations

from loopfit.data.dataset import check_sources
from loopfit.errors import LoopfitError, check_output
from loopfit.loading import check_seq_len, load_tokenizer
from loopfit.train.config import TrainConfig


def check_inputs(cfg: TrainConfig) -> None:
    """Raise `LoopfitError` naming the first input of `cfg` that cannot work."""
    check_output("out", cfg.out, folder=True)
    student_tok = load_tokenizer(cfg.model_name)
    check_seq_len(cfg.model_name, cfg.seq_len)
    d = cfg.distillation
    if d.enabled and d.teacher_model_name:
        check_seq_len(d.teacher_model_name, cfg.seq_len)
        check_same_vocabulary(cfg.model_name, student_tok, d.teacher_model_name)
    check_sources(cfg.data)  # exist and have a known format (nothing is read yet)
    if cfg.val_data:
        check_sources(cfg.val_data)


def check_same_vocabulary(student_name: str, student_tok, teacher_name: str) -> None:
    """Refuse a teacher whose tokenizer maps any token to another id than the student's.

    The logits are compared id by id, so a vocabulary of the same size but other content (another tokenizer, or the
    same one with tokens added in another order) trains the student towards the wrong tokens without any error.
    A teacher without a tokenizer is refused rather than trusted: nothing else shows that its ids mean the same.
    """
    try:
        teacher_tok = load_tokenizer(teacher_name)
    except LoopfitError as e:
        raise LoopfitError(
            f"the teacher's vocabulary cannot be checked against the student's: {e} (loopfit compares the two "
            "tokenizers before distilling)"
        ) from None
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv == tv:
        return
    differ = sorted(t for t in sv.keys() | tv.keys() if sv.get(t) != tv.get(t))
    example = differ[0]
    raise LoopfitError(
        f"the teacher {teacher_name} and the student {student_name} have different vocabularies ({len(differ)} "
        f"tokens differ, e.g. {example!r}: id {tv.get(example)} in the teacher, {sv.get(example)} in the "
        "student): distillation needs the same tokenizer; use a teacher of the student's family"
    )
