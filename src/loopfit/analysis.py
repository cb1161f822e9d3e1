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
    from loopfit.data import read_documents

    docs = read_documents(data)  # raises here, not at the first batch, for a missing source
    return _windows(tokenizer, docs, num_samples, seq_len, batch_size, chat)


def _windows(tokenizer, docs, num_samples: int, seq_len: int, batch_size: int, chat: bool):
    from loopfit.data import document_text

    bos = tokenizer("").input_ids[:1] if tokenizer.bos_token_id is not None else []
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    body = seq_len - len(bos)
    windows: list[list[int]] = []
    buffer: list[int] = []
    done = 0
    for doc in docs:
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
    return LayerAnalysis(model, num_tokens, block_influence, angular_distance, zones, knees, layout, layout.dropped(n))


def analyze(
    model: PreTrainedModel,
    tokenizer,
    data: str | None = None,
    num_samples: int = 128,
    seq_len: int = 256,
    batch_size: int = 8,
    target_recurrent_size: int | None = None,
    chat: bool = False,
) -> LayerAnalysis:
    """Measure every layer of `model` on calibration data and suggest a layout."""
    _check_args(num_samples, seq_len, batch_size, target_recurrent_size)
    _check_model(model)
    batches = calibration_batches(tokenizer, data, num_samples, seq_len, batch_size, chat=chat)
    stats = layer_stats(model, batches, total=num_samples)
    name = getattr(model.config, "_name_or_path", "") or model.config.model_type
    return suggest(stats.block_influence, stats.angular_distance, target_recurrent_size, name, stats.num_tokens)


def _check_args(num_samples: int, seq_len: int, batch_size: int, target: int | None) -> None:
    for flag, value, least in (("num_samples", num_samples, 1), ("seq_len", seq_len, 2), ("batch_size", batch_size, 1)):
        if value < least:
            raise LoopfitError(f"--{flag} must be >= {least}, got {value}")
    if target is not None and target < 1:
        raise LoopfitError(f"--target_recurrent_size must be >= 1, got {target}")


def _check_model(model: PreTrainedModel) -> None:
    if model.config.model_type == "looped":
        raise LoopfitError("layer analysis needs a feedforward source model, not a looped one")
    if model.config.num_hidden_layers < 3:
        raise LoopfitError(f"layer analysis needs at least 3 layers, the model has {model.config.num_hidden_layers}")


def suggest_layout(
    model: PreTrainedModel,
    tokenizer,
    data: str | None = None,
    num_samples: int = 64,
    target_recurrent_size: int | None = None,
    seq_len: int = 256,
    batch_size: int = 8,
) -> str:
    """The `prelude:block:coda` string (as `convert --layers` takes it) suggested by the layer analysis."""
    return str(analyze(model, tokenizer, data, num_samples, seq_len, batch_size, target_recurrent_size).layout)


def _role(analysis: LayerAnalysis, i: int) -> str:
    layout = analysis.layout
    for name, part in (("prelude", layout.prelude), ("block", layout.block), ("coda", layout.coda)):
        if i in part:
            return name
    return "dropped"


def print_table(analysis: LayerAnalysis) -> None:
    """Layer, BI, angular distance, zone and role in the suggested layout, as a terminal table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"layer analysis of {analysis.model} ({analysis.num_tokens} tokens)")
    for col in ("layer", "block influence", "angular distance", "zone", "layout"):
        table.add_column(col, justify="right" if col != "zone" and col != "layout" else "left")
    for i, (bi, ad) in enumerate(zip(analysis.block_influence, analysis.angular_distance)):
        role = _role(analysis, i)
        style = "dim" if role == "dropped" else None
        table.add_row(str(i), f"{bi:.5f}", f"{ad:.5f}", analysis.zones[i], role, style=style)
    console = Console()
    console.print(table)
    console.print(f"thinking zone: layers {analysis.knees[0]}-{analysis.knees[1]} (knees of the angular distance)")
    console.print(f"dropped: {', '.join(map(str, analysis.dropped)) or 'none'}")
    console.print(f"suggested: --layers {analysis.layout}")


_ZONE_COLORS = {"encoder": "tab:blue", "thinking": "tab:green", "decoder": "tab:orange"}


def save_plot(analysis: LayerAnalysis, path: str) -> None:
    """Two panels: block influence bars (log scale) and the angular distance curve with zones and knees."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from loopfit.io import atomic_file

    n = len(analysis.zones)
    layers = list(range(n))
    dropped = set(analysis.dropped)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.3 * n + 2), 6.5), sharex=True)
    colors = ["lightgrey" if i in dropped else _ZONE_COLORS[z] for i, z in enumerate(analysis.zones)]
    top.bar(layers, [max(b, 1e-6) for b in analysis.block_influence], color=colors, edgecolor="black", linewidth=0.4)
    top.axhline(DROP_THRESHOLD, color="red", linestyle=":", linewidth=1, label=f"drop threshold {DROP_THRESHOLD:g}")
    top.set_yscale("log")
    top.set_ylabel("block influence 1 - E[cos]")
    top.set_title(f"{analysis.model}: suggested --layers {analysis.layout} (grey = dropped)")
    top.legend(loc="upper right", fontsize=8)
    for zone in ZONES:
        idx = [i for i in layers if analysis.zones[i] == zone]
        if idx:
            bottom.axvspan(idx[0] - 0.5, idx[-1] + 0.5, color=_ZONE_COLORS[zone], alpha=0.15, label=zone)
    bottom.plot(layers, analysis.angular_distance, color="black", marker="o", markersize=3, linewidth=1)
    if dropped:
        d = sorted(dropped)
        bottom.scatter(d, [analysis.angular_distance[i] for i in d], marker="x", color="red", zorder=3, label="dropped")
    for k in analysis.knees:
        bottom.axvline(k, color="black", linestyle="--", linewidth=0.8)
    bottom.set_xlabel("layer")
    bottom.set_ylabel("angular distance arccos(cos) / pi")
    bottom.legend(loc="upper center", fontsize=8, ncol=4)
    bottom.set_xticks(layers if n <= 40 else layers[::2])
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def analyze_command(
    model: str,
    data: str | None = None,
    num_samples: int = 128,
    seq_len: int = 256,
    batch_size: int = 8,
    chat: bool = False,
    target_recurrent_size: int | None = None,
    json: str | None = None,
    plot: str | None = None,
) -> None:
    """Measure each layer's block influence and angular distance and suggest a prelude:block:coda layout.

    Args:
        model: source model: HF folder, hub id, .gguf file or `smollm2-135m`.
        data: calibration data: text / JSONL / Parquet file, HF dataset, or none for the built-in word problems.
        num_samples: number of calibration windows of `seq_len` tokens.
        seq_len: tokens per window.
        batch_size: windows per forward pass.
        chat: format prompt/response records with the tokenizer's chat template.
        target_recurrent_size: drop the lowest-influence thinking layers until this many remain in the block.
        json: write the measurements, zones and suggested layout to this JSON file.
        plot: write a two-panel PNG (block influence; angular distance with zones and knees) to this file.
    """
    import time

    from loopfit.io import write_json
    from loopfit.loading import load_model, load_tokenizer

    _check_args(num_samples, seq_len, batch_size, target_recurrent_size)
    from loopfit.data import read_documents

    read_documents(data)  # a missing or unreadable source fails now, before the model loads
    source, tokenizer = load_model(model), load_tokenizer(model)
    start = time.perf_counter()
    result = analyze(source, tokenizer, data, num_samples, seq_len, batch_size, target_recurrent_size, chat)
    result.model = model
    elapsed = time.perf_counter() - start
    print_table(result)
    print(f"{result.num_tokens} tokens in {elapsed:.1f} s ({result.num_tokens / elapsed:.0f} tokens/s)")
    if json is not None:
        write_json(json, result.to_json())
        print(f"wrote {json}")
    if plot is not None:
        save_plot(result, plot)
        print(f"wrote {plot}")
