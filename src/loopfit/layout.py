"""Layouts: which source layers form the prelude, the recurrent block and the coda (`--layers P:B:C`)."""

from __future__ import annotations

from dataclasses import dataclass

from loopfit.errors import LoopfitError


@dataclass(frozen=True)
class Layout:
    """Source-layer indices of the prelude, the recurrent block and the coda; layers named nowhere are dropped."""

    prelude: list[int]
    block: list[int]
    coda: list[int]

    def __str__(self) -> str:
        return ":".join(_format_indices(part) for part in (self.prelude, self.block, self.coda))

    @property
    def kept(self) -> list[int]:
        return self.prelude + self.block + self.coda

    def dropped(self, num_layers: int) -> list[int]:
        return [i for i in range(num_layers) if i not in set(self.kept)]


def _format_indices(indices: list[int]) -> str:
    """Compact `0,1,2,3,7` as `0-3,7`."""
    parts, start = [], None
    for k, i in enumerate(indices):
        if start is None:
            start = i
        if k + 1 == len(indices) or indices[k + 1] != i + 1:
            parts.append(str(start) if start == i else f"{start}-{i}")
            start = None
    return ",".join(parts)


def _parse_indices(text: str) -> list[int]:
    out: list[int] = []
    for tok in filter(None, (t.strip() for t in text.split(","))):
        if "-" in tok:
            a, b = tok.split("-", 1)
            lo, hi = int(a), int(b)
            if hi < lo:
                raise ValueError(f"descending range '{tok}'")
            out.extend(range(lo, hi + 1))
        else:
            out.append(int(tok))
    return out


def parse_layout(spec: str, num_layers: int) -> Layout:
    """Parse `"0-3:10-15:26-29"` (prelude:block:coda, each a comma/range list; a part may be empty)."""
    parts = spec.split(":")
    if len(parts) != 3:
        raise LoopfitError(f"--layers must have three ':'-separated parts (prelude:block:coda), got '{spec}'")
    try:
        layout = Layout(*(_parse_indices(p) for p in parts))
    except ValueError as e:
        raise LoopfitError(f"cannot parse --layers '{spec}': {e}") from None
    validate_layout(layout, num_layers)
    return layout


def layout_from_sizes(num_layers: int, prelude: int, block: int, coda: int) -> Layout:
    """The paper's a-b-c naming: first `prelude` layers; the `block` layers just before the coda; last `coda` layers."""
    if min(prelude, block, coda) < 0 or block < 1:
        raise LoopfitError(f"--prelude/--coda must be >= 0 and --block >= 1, got {prelude}-{block}-{coda}")
    if prelude + block + coda > num_layers:
        raise LoopfitError(
            f"layout {prelude}-{block}-{coda} needs {prelude + block + coda} layers; source has {num_layers}"
        )
    start = num_layers - coda - block
    return Layout(list(range(prelude)), list(range(start, start + block)), list(range(num_layers - coda, num_layers)))


def validate_layout(layout: Layout, num_layers: int) -> None:
    if not layout.block:
        raise LoopfitError("the recurrent block needs at least one layer")
    bad = [i for i in layout.kept if not 0 <= i < num_layers]
    if bad:
        raise LoopfitError(f"layer indices {bad} out of range for a source model with {num_layers} layers")
    dup = sorted({i for i in layout.kept if layout.kept.count(i) > 1})
    if dup:
        raise LoopfitError(f"layer indices {dup} appear more than once in the layout")
