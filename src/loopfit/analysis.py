"""Layer analysis: which source layers to use as prelude, recurrent block and coda, and which to drop.

Per layer i we measure, over every non-padding calibration token, the cosine between the residual stream entering
(h_i) and leaving (h_{i+1}) the layer: block influence `BI_i = 1 - E[cos]` (ShortGPT, arXiv:2403.03853) and angular
distance `d_i = E[arccos(cos)] / pi` (Encode-Think-Decode, arXiv:2510.07358). The knees of the angular-distance
curve split the layers into encoder / thinking / decoder zones, which become prelude / block / coda.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from loopfit.convert import Layout
from loopfit.errors import LoopfitError

DROP_THRESHOLD = 1e-4
"""A layer whose block influence is below this changes (almost) nothing and is dropped whatever its zone."""


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
        """Add one batch: `states` are the num_layers + 1 residual streams [B, T, H], `mask` [B, T] marks real tokens."""
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


def residual_streams(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """The num_layers + 1 residual streams of one batch, all before the final norm.

    HF's `hidden_states` tuple ends with the *normed* output of the last layer; we take that entry instead from the
    input of the final norm (a forward pre-hook), so the last layer is compared on the same footing as the others.
    """
    decoder = model.get_decoder()
    captured: list[torch.Tensor] = []
    handle = decoder.norm.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
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
    from tqdm.auto import tqdm

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

    Documents are tokenised one at a time, joined with EOS and cut into consecutive windows (each starting with BOS
    when the tokenizer adds one), so a window is ordinary running text; only a final, short window is padded.
    Stops early, with fewer samples, if the source runs out.
    """
    from loopfit.data import document_text, read_documents

    bos = tokenizer("").input_ids[:1] if tokenizer.bos_token_id is not None else []
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    body = seq_len - len(bos)
    windows: list[list[int]] = []
    buffer: list[int] = []
    done = 0
    for doc in read_documents(data):
        buffer += tokenizer(document_text(doc, tokenizer, chat=chat), add_special_tokens=False).input_ids + sep
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


def _collate(windows: list[list[int]], seq_len: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(windows), seq_len), pad, dtype=torch.long)
    mask = torch.zeros((len(windows), seq_len), dtype=torch.long)
    for r, w in enumerate(windows):
        ids[r, : len(w)] = torch.tensor(w)
        mask[r, : len(w)] = 1
    return ids, mask


ZONES = ("encoder", "thinking", "decoder")


@dataclass
class LayerAnalysis:
    """Per-layer measurements, zones and the layout suggested from them."""

    model: str
    num_tokens: int
    block_influence: list[float]
    angular_distance: list[float]
    zones: list[str]
    """One of `ZONES` per layer."""
    knees: tuple[int, int]
    """First and last layer of the thinking zone."""
    layout: Layout
    dropped: list[int]
    """Layers in no part of the layout: near-identity layers and thinking layers cut by the target size."""

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "num_tokens": self.num_tokens,
            "block_influence": self.block_influence,
            "angular_distance": self.angular_distance,
            "zones": self.zones,
            "knees": list(self.knees),
            "dropped": self.dropped,
            "suggested_layers": str(self.layout),
        }


def _kneedle(x: list[int], y: list[float], direction: str) -> int | None:
    """Kneedle on a monotone envelope of `y`; None when kneed finds no knee (e.g. a flat or too short curve)."""
    import warnings

    import numpy as np
    from kneed import KneeLocator

    arr = np.asarray(y, dtype=float)
    # Running minimum from the outer end: noise bumps inside the plateau cannot create false knees.
    env = np.minimum.accumulate(arr) if direction == "decreasing" else np.minimum.accumulate(arr[::-1])[::-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kneed warns (and returns None) on flat curves
        knee = KneeLocator(x, env, curve="convex", direction=direction).knee
    return None if knee is None else int(knee)


def find_zones(angular_distance: list[float], ignore: Iterable[int] = ()) -> tuple[list[str], tuple[int, int]]:
    """Encoder / thinking / decoder label per layer and the thinking zone's first and last layer.

    The thinking zone starts at the knee of the falling start of the curve and ends at the knee of its rising end
    (Kneedle, convex); layers in `ignore` (near-identity) take no part in finding the knees. Without a knee the
    encoder (or decoder) falls back to the first (last) used layer alone. Each zone keeps at least one used layer.
    """
    skip = set(ignore)
    x = [i for i in range(len(angular_distance)) if i not in skip]
    if len(x) < 3:
        raise LoopfitError(f"layer analysis needs at least 3 layers that change the residual stream, found {len(x)}")
    y = [angular_distance[i] for i in x]
    start = _kneedle(x, y, "decreasing")
    end = _kneedle(x, y, "increasing")
    start = x[1] if start is None else max(start, x[1])
    end = x[-2] if end is None else min(end, x[-2])
    if start > end:
        start, end = x[1], x[-2]
    zones = ["encoder" if i < start else "decoder" if i > end else "thinking" for i in range(len(angular_distance))]
    return zones, (start, end)


def suggest(
    block_influence: list[float],
    angular_distance: list[float],
    target_recurrent_size: int | None = None,
    model: str = "",
    num_tokens: int = 0,
) -> LayerAnalysis:
    """Zones and layout from per-layer metrics: prelude = encoder, block = thinking, coda = decoder.

    Layers with BI below `DROP_THRESHOLD` are dropped wherever they are; with `target_recurrent_size` N the
    lowest-BI thinking layers are dropped until N remain.
    """
    n = len(block_influence)
    identity = [i for i in range(n) if block_influence[i] < DROP_THRESHOLD]
    zones, knees = find_zones(angular_distance, ignore=identity)
    parts = {z: [i for i in range(n) if zones[i] == z and i not in identity] for z in ZONES}
    block = parts["thinking"]
    if target_recurrent_size is not None:
        if target_recurrent_size > len(block):
            raise LoopfitError(
                f"--target_recurrent_size {target_recurrent_size} is larger than the thinking zone "
                f"({len(block)} usable layers, {knees[0]}-{knees[1]}); pass at most {len(block)}"
            )
        strongest = sorted(block, key=lambda i: block_influence[i], reverse=True)[:target_recurrent_size]
        block = sorted(strongest)
    layout = Layout(parts["encoder"], block, parts["decoder"])
    return LayerAnalysis(
        model, num_tokens, block_influence, angular_distance, zones, knees, layout, layout.dropped(n)
    )
