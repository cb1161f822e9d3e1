"""Per-layer sums of cos(h_i, h_{i+1}) over calibration tokens, streamed batch by batch through the model."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from loopfit.data import document_text, read_documents
from loopfit.data.paragraphs import file_runs, paragraph_tokens
from loopfit.models.families import family_of


@dataclass
class LayerStats:
    """Running per-layer sums of cos(h_i, h_{i+1}) and of the angular distance, over non-padding tokens."""

    num_layers: int
    cos_sum: torch.Tensor = field(init=False)
    angle_sum: torch.Tensor = field(init=False)
    num_tokens: int = 0

    def __post_init__(self) -> None:
        self.cos_sum = torch.zeros(self.num_layers, dtype=torch.float64)
        self.angle_sum = torch.zeros(self.num_layers, dtype=torch.float64)

    def update(self, states: list[torch.Tensor], mask: torch.Tensor) -> None:
        """Add one batch: `states` are the num_layers + 1 streams [B, T, H]; `mask` [B, T] marks real tokens."""
        if len(states) != self.num_layers + 1:
            raise ValueError(f"expected {self.num_layers + 1} residual streams, got {len(states)}")
        keep = mask.bool()
        for i in range(self.num_layers):
            # float64: an identity layer must give cos == 1 exactly enough that arccos stays far below 1e-3.
            a, b = states[i][keep].double(), states[i + 1][keep].double()
            cos = F.cosine_similarity(a, b, dim=-1).clamp(-1.0, 1.0)
            self.cos_sum[i] += cos.sum().cpu()
            self.angle_sum[i] += (torch.arccos(cos) / math.pi).sum().cpu()
        self.num_tokens += int(keep.sum())

    @property
    def block_influence(self) -> list[float]:
        return (1.0 - self.cos_sum / max(self.num_tokens, 1)).tolist()

    @property
    def angular_distance(self) -> list[float]:
        return (self.angle_sum / max(self.num_tokens, 1)).tolist()


def residual_streams(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> list[torch.Tensor]:
    """The num_layers + 1 residual streams of one batch, all before the final norm.

    HF's `hidden_states` tuple ends with the *normed* output of the last layer; we take that entry instead from the
    input of the final norm (a forward pre-hook), so the last layer is compared on the same footing as the others.
    """
    family = family_of(model.config)
    decoder = family.decoder(model)
    captured: list[torch.Tensor] = []
    handle = family.final_norm(model).register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
    try:
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
    finally:
        handle.remove()
    return [*out.hidden_states[:-1], captured[-1]]


def layer_stats(
    model: PreTrainedModel, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], total: int | None = None
) -> LayerStats:
    """Stream `(input_ids, attention_mask)` batches through `model` and accumulate per-layer sums.

    Only one batch's hidden states exist at a time. `total` (number of samples) sizes the progress bar.
    """
    stats = LayerStats(model.config.num_hidden_layers)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=total, unit="sample", desc="layer analysis") as bar:
            for input_ids, attention_mask in batches:
                states = residual_streams(model, input_ids.to(device), attention_mask.to(device))
                stats.update(states, attention_mask.to(device))
                bar.update(input_ids.shape[0])
    finally:
        model.train(was_training)
    return stats


def calibration_batches(
    tokenizer, data: str | None, num_samples: int, seq_len: int, batch_size: int, chat: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`(input_ids, attention_mask)` batches of `num_samples` windows of `seq_len` tokens from a data source.

    Documents are tokenised one at a time, joined with EOS (none after a paragraph its text file goes on after: a
    text file reads as itself) and cut into consecutive windows (each starting with BOS when the tokenizer adds one),
    so a window is ordinary running text; only a final, short window is padded.
    Stops early, with fewer samples, if the source runs out.
    """
    docs = read_documents(data)  # raises here, not at the first batch, for a missing source
    # Built whole now (a few hundred windows at most), so that an unreadable document fails before any progress
    # output, as one error line.
    return iter(list(_windows(tokenizer, docs, num_samples, seq_len, batch_size, chat)))


def _windows(tokenizer, docs, num_samples: int, seq_len: int, batch_size: int, chat: bool):
    bos = tokenizer("").input_ids[:1] if tokenizer.bos_token_id is not None else []
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    body = seq_len - len(bos)
    windows: list[list[int]] = []
    buffer: list[int] = []
    done = 0
    for ids in _document_ids(tokenizer, docs, chat, sep):
        buffer += ids
        while len(buffer) >= body and done < num_samples:
            windows.append(bos + buffer[:body])
            buffer = buffer[body:]
            done += 1
            if len(windows) == batch_size:
                yield _collate(windows, seq_len, pad)
                windows = []
        if done == num_samples:
            break
    if done < num_samples and buffer:
        windows.append(bos + buffer)
    if windows:
        yield _collate(windows, seq_len, pad)


def _document_ids(tokenizer, docs, chat: bool, sep: list[int]) -> Iterator[list[int]]:
    """Token ids of each document then its separator; a text file's paragraphs read as the file
    (`loopfit.data.paragraphs`), with one separator at its end (calibration reads its source whole: every file ends)."""
    for run in file_runs(docs):
        first = next(run)
        if first.continued:
            yield from paragraph_tokens(tokenizer, (doc.text for doc in chain([first], run)))
            yield sep
        else:
            yield tokenizer(document_text(first, tokenizer, chat=chat), add_special_tokens=False).input_ids + sep


def _collate(windows: list[list[int]], seq_len: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(windows), seq_len), pad, dtype=torch.long)
    mask = torch.zeros((len(windows), seq_len), dtype=torch.long)
    for r, w in enumerate(windows):
        ids[r, : len(w)] = torch.tensor(w)
        mask[r, : len(w)] = 1
    return ids, mask
