"""On-policy distillation in `loopfit train` (`--distillation.on_policy.*`): steps that train on the student's own
samples, scored by the teacher (GKD, arXiv:2306.13649; on-policy distillation, Thinking Machines, Oct 2025).

The unit is the optimizer step. Each step draws one coin from a seeded generator (saved in checkpoints): with
probability `lmbda` every micro-batch of the step is made on-policy, otherwise the step is the ordinary off-policy
one, unchanged (the coin is drawn at every step, so the generator's position depends only on the step). The first
`start_step` steps are off-policy whatever their coin (supervised first, then the mix, in one run). An on-policy
micro-batch:

1. takes `batch_size` prompts from the training split's prompt/response pairs, through their own seeded, resumable
   `BatchStream` (packed rows hold several documents and pieces of documents, so prompts cannot be cut out of
   them; the packed stream advances only on off-policy steps). Prompts are rendered as training renders the pair
   (chat template through the generation prompt, or `Question: ...\\nAnswer:`); those longer than
   `seq_len - max_new_tokens` are left out, so a prompt and its completion always fit in one row;
2. samples their completions in one batched, left-padded call of `loopfit.models.sampling.sample` (the model's
   forward token by token with a preallocated KV cache; `generate`'s positions, masks and stopping, a cheaper draw),
   in eval mode, at the depth drawn for the step (`n_no_grad + k_grad` iterations), at `temperature` / `top_p` (no
   top-k), from a generator seeded with a number drawn from the same generator (the global RNG is not touched);
   with `merge_lora` (the default) each LoRA layer samples as one matmul with its update added to a copy of its
   weight, and with `prepack` (the default) through oneDNN-packed weights on CPU in fp32;
3. lays each row out right-padded, `prompt + completion` (with `--position_ids=true` all rows packed in one, positions
   restarting at each, no padding), with labels on the completion only: its tokens up to and including the first
   EOS, never the prompt, the padding or what follows the first EOS;
4. scores it with the run's objective with `on_policy.kind` (reverse KL by default) as the divergence, the KD
   weight of the run and no CE term (the CE of the student's own samples would teach it to imitate itself): the
   student runs at the step's `(n_no_grad, k_grad)` with gradients, the teacher scores the same rows.

The teacher is the run's: the source model, no loop, no LoRA, its frozen layers shared with the student
(`share_teacher_weights`). The generator's state and the prompt stream's position are in every checkpoint, so a
resumed run samples exactly what an unbroken one does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import DataCollatorWithFlattening

from loopfit.data.chat import prompt_token_ids
from loopfit.data.dataset import train_documents
from loopfit.data.packing import IGNORE_INDEX, left_pad
from loopfit.data.stream import BatchStream
from loopfit.errors import LoopfitError
from loopfit.losses.objective import Objective
from loopfit.models.prepacked import prepacked_linears
from loopfit.models.sampling import sample
from loopfit.train.config import OnPolicyConfig, TrainConfig
from loopfit.train.student import lora_merged

if TYPE_CHECKING:
    from loopfit.train.state import Run

_SEED_OFFSET = 104_729  # the coin / sampling-seed generator is seeded with `seed + this` (the depth's is + 7919)


class _Indices(torch.utils.data.Dataset):
    """Row i is `{"index": i}`: lets a `BatchStream` (seeded, rank-aware, resumable) walk a list of prompts."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"index": torch.tensor(i)}


def eos_token_ids(tokenizer, model: nn.Module) -> list[int]:
    """The ids that end a completion: the tokenizer's EOS and the model's generation config's (an int or a list)."""
    ids = [tokenizer.eos_token_id]
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    ids += extra if isinstance(extra, (list, tuple)) else [extra]
    return sorted({int(i) for i in ids if i is not None})


def sample_completions(
    model: nn.Module,
    prompts: list[list[int]],
    cfg: OnPolicyConfig,
    seed: int,
    num_steps: int | None,
    eos_ids: list[int],
    pad_id: int,
    device=None,
) -> torch.Tensor:
    """The student's sampled completions of `prompts`, `(B, T)` with `T <= cfg.max_new_tokens` (pad after a row's
    EOS): `loopfit.models.sampling.sample` on the left-padded batch, in eval mode, at depth `num_steps` (None for a
    plain model), drawing from a `torch.Generator` seeded `seed` on the model's device (the global RNG is not
    touched). `sample(...)` with these arguments gives the same tokens.

    Raises:
        LoopfitError: the student's next-token probabilities are not finite (a diverged run).
    """
    ids, mask = left_pad(prompts, pad_id, device)
    generator = torch.Generator(ids.device).manual_seed(seed)
    try:
        return sample(model, ids, mask, cfg.max_new_tokens, eos_ids, pad_id, generator, cfg.temperature, cfg.top_p,
                      num_steps)  # fmt: skip
    except ValueError as e:  # the settings are validated at start: what is left is a diverged student (NaN logits)
        raise LoopfitError(f"on-policy sampling failed: {e}") from None


def completion_rows(
    prompts: list[list[int]], completions: torch.Tensor, eos_ids: list[int], pad_id: int, packed: bool = False
) -> dict[str, torch.Tensor]:
    """Training rows `prompt + completion`: `input_ids` and unshifted `labels`, right-padded `(B, L)` with `L` the
    longest row; labels are the completion's tokens up to and including its first EOS, -100 elsewhere (prompt,
    padding, anything after the first EOS). With `packed` the B rows are one `(1, sum of lengths)` row without
    padding, with `position_ids` restarting at each (for `loopfit train --position_ids=true`: it scores as the
    padded rows and computes only the real tokens)."""
    comp = completions.cpu()
    is_eos = torch.isin(comp, torch.tensor(eos_ids, dtype=comp.dtype))
    # Length of each completion: through the first EOS, or all T tokens when it never ended.
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full((len(comp),), comp.shape[1])).tolist()
    rows = [{"input_ids": p + row[:n], "labels": [IGNORE_INDEX] * len(p) + row[:n]}
            for p, row, n in zip(prompts, comp.tolist(), first)]  # fmt: skip
    if packed:  # HF's padding-free collator: one row, positions restarting at each (whose first label is a prompt's)
        return dict(DataCollatorWithFlattening(return_position_ids=True)(rows))
    length = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"], dtype=torch.long)
        labels[i, : len(r["labels"])] = torch.tensor(r["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels}


def training_prompts(cfg: TrainConfig, tokenizer) -> list[list[int]]:
    """Token ids of the training split's prompts that fit with their completion in `seq_len`.

    Raises:
        LoopfitError: the data has no prompt/response pairs, or none of their prompts fits.
    """
    try:
        docs = train_documents(cfg.data, cfg.val_fraction, cfg.seed, cfg.max_documents)
    except LoopfitError as e:
        raise LoopfitError(f"--distillation.on_policy needs the data's prompts: {e}") from None
    pairs = [d for d in docs if d.is_pair]
    where = cfg.data if cfg.data else "the built-in arithmetic data"
    if not pairs:
        raise LoopfitError(f"--distillation.on_policy needs prompts to complete: the training data {where} has no "
                           "prompt/response pairs (question/answer records), only free text")  # fmt: skip
    room = cfg.seq_len - cfg.distillation.on_policy.max_new_tokens
    ids = prompt_token_ids(pairs, tokenizer, chat=cfg.chat, system=cfg.system_prompt)
    kept = [p for p in ids if 0 < len(p) <= room]
    if not kept:
        raise LoopfitError(f"no prompt of {where} fits in --seq_len {cfg.seq_len} with --distillation.on_policy."
                           f"max_new_tokens {cfg.distillation.on_policy.max_new_tokens} new tokens: the shortest "
                           f"has {min(len(p) for p in ids)} tokens")  # fmt: skip
    if len(kept) < len(ids):
        print(f"on-policy: {len(ids) - len(kept)} of {len(ids)} prompts are longer than seq_len - max_new_tokens "
              f"({room} tokens) and are left out", file=sys.stderr)  # fmt: skip
    return kept


class OnPolicy:
    """The on-policy part of a run: the per-step coin, the prompt stream, the sampling and the objective.

    Args:
        cfg: the on-policy settings. prompts: token ids of the prompts to complete.
        objective: the run's objective; on-policy micro-batches use a copy with `cfg.kind` and no CE term.
        batch_size, seed, rank, world_size: as the run's (`rank` also varies the sampling seed per rank).
        eos_ids, pad_id: ids that end a completion; the padding id.
        packed: each micro-batch's rows packed into one with per-row positions (`completion_rows`), for a run
            with `--position_ids=true`.
    """

    def __init__(self, cfg: OnPolicyConfig, prompts: list[list[int]], objective: Objective, batch_size: int,
                 seed: int, eos_ids: list[int], pad_id: int, rank: int = 0, world_size: int = 1,
                 packed: bool = False):  # fmt: skip
        if len(prompts) < batch_size * world_size:
            raise LoopfitError(f"only {len(prompts)} prompts for on-policy distillation: fewer than one global batch "
                               f"({batch_size * world_size})")  # fmt: skip
        self.cfg, self.prompts, self.eos_ids, self.pad_id, self.rank = cfg, prompts, eos_ids, pad_id, rank
        self.packed = packed
        self.generator = torch.Generator().manual_seed(seed + _SEED_OFFSET)
        self.stream = BatchStream(_Indices(len(prompts)), batch_size, seed + _SEED_OFFSET, rank, world_size)
        weights = dataclasses.replace(objective.weights, ce_scale=0.0, kd_scale=objective.scales[1])
        self.objective = dataclasses.replace(objective, weights=weights, divergence=cfg.kind,
                                             divergence_params=dict(cfg.kind_params))  # fmt: skip
        self.last: dict = {}  # the last on-policy step's `seeds` and prompt `indices` per micro-batch, `num_steps`

    def flip(self) -> bool:
        """This step's coin: True (on-policy) with probability `lmbda`; one draw per step, whatever `lmbda`."""
        return bool(torch.rand((), generator=self.generator, dtype=torch.float64) < self.cfg.lmbda)

    def batches(self, model: nn.Module, micro_batches: int, num_steps: int | None, device=None,
                autocast=contextlib.nullcontext) -> list[dict]:  # fmt: skip
        """`micro_batches` on-policy micro-batches `{"input_ids", "labels"}` on `device`, sampled by `model` at
        depth `num_steps` (None for a plain model) under the context `autocast()` (the run's precision)."""
        self.last = {"seeds": [], "indices": [], "num_steps": num_steps}
        out = []
        with autocast():
            fp32 = not torch.is_autocast_enabled("cpu")  # packing is for fp32 matmuls; under autocast it is waste
        with contextlib.ExitStack() as stack:
            if self.cfg.merge_lora:
                stack.enter_context(lora_merged(model))
            if self.cfg.prepack and fp32:  # after the merge: packs the merged weights
                stack.enter_context(prepacked_linears(model, self.stream.batch_size))
            for _ in range(micro_batches):
                out.append(self._micro_batch(model, num_steps, device, autocast))
        return out

    def _micro_batch(self, model, num_steps, device, autocast) -> dict:
        idx = self.stream.next()["index"].tolist()
        seed = int(torch.randint(0, 2**62, (), generator=self.generator)) + self.rank
        prompts = [self.prompts[i] for i in idx]
        with autocast():
            comp = sample_completions(model, prompts, self.cfg, seed, num_steps, self.eos_ids, self.pad_id, device)
        rows = completion_rows(prompts, comp, self.eos_ids, self.pad_id, packed=self.packed)
        self.last["seeds"].append(seed)
        self.last["indices"].append(idx)
        return {k: v.to(device) for k, v in rows.items()}

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "prompts": self.stream.state_dict()}

    def load_state_dict(self, state: dict | None) -> None:
        if state is None:
            raise LoopfitError("the checkpoint holds no on-policy state: it was written by a run without "
                               "--distillation.on_policy")  # fmt: skip
        self.generator.set_state(state["generator"])
        self.stream.load_state_dict(state["prompts"])


def build_on_policy(run: Run) -> OnPolicy | None:
    """The run's `OnPolicy` from its config, tokenizer and objective; None when `lmbda` is 0 (nothing changes)."""
    cfg = run.cfg
    if cfg.distillation.on_policy.lmbda == 0:
        return None
    tok = run.tokenizer
    model = run.model.get_base_model() if hasattr(run.model, "get_base_model") else run.model
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ignored = ignored_generation_settings(model)
    if ignored and run.d.rank == 0:
        print(f"on-policy: the student's generation_config sets {', '.join(ignored)}; on-policy samples ignore it: "
              "they are drawn from the student's own distribution (the one the divergence is taken on) at "
              "--distillation.on_policy.temperature / top_p", file=sys.stderr)  # fmt: skip
    return OnPolicy(cfg.distillation.on_policy, training_prompts(cfg, tok), run.objective, cfg.batch_size, cfg.seed,
                    eos_token_ids(tok, model), pad, run.d.rank, run.d.world_size, packed=cfg.position_ids)  # fmt: skip


# Settings of a generation config that change what `generate` samples beyond temperature / top-p / top-k, with their
# no-op values: `loopfit.models.sampling.sample` applies none of them.
_SAMPLING_SETTINGS = {"repetition_penalty": 1.0, "min_p": None, "typical_p": 1.0, "epsilon_cutoff": 0.0,
                      "eta_cutoff": 0.0, "no_repeat_ngram_size": 0, "bad_words_ids": None, "suppress_tokens": None,
                      "begin_suppress_tokens": None, "encoder_repetition_penalty": 1.0}  # fmt: skip


def ignored_generation_settings(model: nn.Module) -> list[str]:
    """`name=value` for each setting of `model.generation_config` that would change HF `generate`'s samples and that
    on-policy sampling does not apply (a source model's repetition penalty, copied to its looped conversion)."""
    gen = getattr(model, "generation_config", None)
    out = []
    for name, neutral in _SAMPLING_SETTINGS.items():
        value = getattr(gen, name, neutral)
        if value is not None and value != neutral:
            out.append(f"{name}={value}")
    return out


def on_policy_step(run: Run, num_steps: tuple[int, int]) -> tuple[list[dict], Objective, dict] | None:
    """This step's coin; if on-policy: (its sampled micro-batches, the on-policy objective, metrics), else None.

    Every rank draws the same coin (same generator, same draws) and samples its own share of the prompts.
    """
    op = run.on_policy
    if op is None:
        return None
    coin = op.flip()  # drawn at every step, also before `start_step`
    if not coin or run.step < op.cfg.start_step:
        return None
    t0 = time.perf_counter()
    depth = sum(num_steps) if run.looped else None
    batches = op.batches(run.model, run.cfg.gradient_accumulation_steps, depth, run.device, lambda: run.autocast)
    generated = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
    return batches, op.objective, {"generated_tokens": generated, "generate_s": time.perf_counter() - t0}
