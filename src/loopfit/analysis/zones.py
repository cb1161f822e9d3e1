"""Encoder / thinking / decoder zones from the knees of the angular-distance curve, and the layout they suggest."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedModel

from loopfit.analysis.metrics import calibration_batches, layer_stats
from loopfit.errors import LoopfitError
from loopfit.layout import Layout

DROP_THRESHOLD = 1e-4
"""A layer whose block influence is below this changes (almost) nothing and is dropped whatever its zone."""

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


def envelope(y: list[float], direction: str) -> list[float]:
    """Monotone lower envelope of `y`: running minimum from the left (`decreasing`) or from the right (`increasing`).

    Kneedle looks for one bend in a monotone curve; the envelope removes the plateau's bumps, which would otherwise
    read as knees, and keeps the falling start (or rising end) where the zones change.
    """
    arr = np.asarray(y, dtype=float)
    env = np.minimum.accumulate(arr) if direction == "decreasing" else np.minimum.accumulate(arr[::-1])[::-1]
    return env.tolist()


def _kneedle(x: list[int], y: list[float], direction: str) -> int | None:
    """Kneedle (convex) on the envelope of `y`; None when kneed finds no knee (e.g. a flat or too short curve)."""
    from kneed import KneeLocator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kneed warns (and returns None) on flat curves
        knee = KneeLocator(x, envelope(y, direction), curve="convex", direction=direction).knee
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
    check_args(num_samples, seq_len, batch_size, target_recurrent_size)
    _check_model(model)
    batches = calibration_batches(tokenizer, data, num_samples, seq_len, batch_size, chat=chat)
    stats = layer_stats(model, batches, total=num_samples)
    name = getattr(model.config, "_name_or_path", "") or model.config.model_type
    return suggest(stats.block_influence, stats.angular_distance, target_recurrent_size, name, stats.num_tokens)


def check_args(num_samples: int, seq_len: int, batch_size: int, target: int | None) -> None:
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
