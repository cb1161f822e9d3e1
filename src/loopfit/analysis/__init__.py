"""Layer analysis: which source layers to use as prelude, recurrent block and coda, and which to drop.

Per layer i we measure, over every non-padding calibration token, the cosine between the residual stream entering
(h_i) and leaving (h_{i+1}) the layer: block influence `BI_i = 1 - E[cos]` (ShortGPT, arXiv:2403.03853) and angular
distance `d_i = E[arccos(cos)] / pi` (Encode-Think-Decode, arXiv:2510.07358). The knees of the angular-distance
curve split the layers into encoder / thinking / decoder zones, which become prelude / block / coda.
"""

from loopfit.analysis.metrics import LayerStats, calibration_batches, layer_stats, residual_streams
from loopfit.analysis.report import analyze_command, print_table, save_plot
from loopfit.analysis.zones import (
    DROP_THRESHOLD,
    ZONES,
    LayerAnalysis,
    analyze,
    envelope,
    find_zones,
    suggest,
    suggest_layout,
)

__all__ = [
    "DROP_THRESHOLD",
    "ZONES",
    "LayerAnalysis",
    "LayerStats",
    "analyze",
    "analyze_command",
    "calibration_batches",
    "envelope",
    "find_zones",
    "layer_stats",
    "print_table",
    "residual_streams",
    "save_plot",
    "suggest",
    "suggest_layout",
]
