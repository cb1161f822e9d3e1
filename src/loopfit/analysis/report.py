"""`loopfit analyze`: the terminal table, the two-panel plot and the JSON file of a layer analysis."""

from __future__ import annotations

import os
import time

from rich.console import Console
from rich.table import Table

from loopfit.analysis.zones import DROP_THRESHOLD, ZONES, LayerAnalysis, analyze, check_args, envelope
from loopfit.data import read_documents
from loopfit.errors import LoopfitError, check_output
from loopfit.io import write_json
from loopfit.loading import check_seq_len, load_model, load_tokenizer
from loopfit.plotting import pyplot, save_png


def _role(analysis: LayerAnalysis, i: int) -> str:
    layout = analysis.layout
    for name, part in (("prelude", layout.prelude), ("block", layout.block), ("coda", layout.coda)):
        if i in part:
            return name
    return "dropped"


def print_table(analysis: LayerAnalysis) -> None:
    """Layer, BI, angular distance, zone and role in the suggested layout, as a terminal table."""
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
    plt = pyplot()

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
    used = [i for i in layers if analysis.block_influence[i] >= DROP_THRESHOLD]
    curve = [analysis.angular_distance[i] for i in used]
    for direction, style in (("decreasing", (0, (4, 2))), ("increasing", (0, (1, 1.5)))):
        label = f"envelope ({'falling start' if direction == 'decreasing' else 'rising end'})"
        bottom.plot(used, envelope(curve, direction), color="grey", linestyle=style, linewidth=1.2, label=label)
    if dropped:
        d = sorted(dropped)
        bottom.scatter(d, [analysis.angular_distance[i] for i in d], marker="x", color="red", zorder=3, label="dropped")
    for j, k in enumerate(analysis.knees):
        bottom.axvline(k, color="purple", linestyle="--", linewidth=0.9, label="knee" if j == 0 else None)
    bottom.set_xlabel("layer")
    bottom.set_ylabel("angular distance arccos(cos) / pi")
    bottom.legend(loc="upper center", fontsize=8, ncol=3)
    bottom.set_xticks(layers if n <= 40 else layers[::2])
    save_png(fig, path, dpi=120)


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
    check_args(num_samples, seq_len, batch_size, target_recurrent_size)
    for flag, path in (("json", json), ("plot", plot)):
        if path is not None and os.path.isdir(path):
            raise LoopfitError(f"--{flag} {path} is a folder; give a file path")
        check_output(flag, path)

    read_documents(data)  # a missing or unreadable source fails now, before the model loads
    tokenizer = load_tokenizer(model)
    check_seq_len(model, seq_len)
    source = load_model(model)
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
