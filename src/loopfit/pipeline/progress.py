"""What the demo shows while it runs: stage banners and times (`timings.json`), progress bars, ticking generation."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers.generation.streamers import BaseStreamer

from loopfit.io import write_json


def start_stage(title: str) -> float:
    print(f"\n=== {title} ===", flush=True)
    return time.perf_counter()


def end_stage(t0: float, out: Path, name: str) -> None:
    """Print the stage's seconds and record them in `timings.json` (the report lists them)."""
    seconds = time.perf_counter() - t0
    print(f"    ({seconds:.0f} s)", flush=True)
    path = out / "timings.json"
    timings = json.loads(path.read_text()) if path.exists() else {}
    write_json(path, {**timings, name: round(seconds, 1)})


def progress_bar(total: int, desc: str, unit: str):
    """A progress bar that also shows when stderr is not a terminal (`loopfit demo ... | tee log`), at most once a
    second there so that a log stays small."""

    return tqdm(total=total, desc=desc, unit=unit, disable=False, mininterval=1.0, dynamic_ncols=True)


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id prompts as one left-padded batch: `(input_ids, attention_mask)`, each (len(prompts), longest)."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.as_tensor(p)
        mask[i, width - len(p) :] = 1
    return ids, mask


def generate_ids(model, prompts: list[list[int]], pad_id: int, desc: str, **kwargs) -> list[list[int]]:
    """Continue token-id prompts (left-padded into one batch) with `model.generate(**kwargs)`, one progress tick per
    new token. Returns each row's new tokens, `max_new_tokens` long (padding after an end of text included)."""

    class Ticks(BaseStreamer):
        # generate puts the prompt first, then each step's new tokens
        def __init__(self, bar):
            self.bar, self.prompt_seen = bar, False

        def put(self, value):
            if self.prompt_seen:
                self.bar.update(1)
            self.prompt_seen = True

        def end(self):
            pass

    ids, mask = left_padded(prompts, pad_id)
    width = ids.shape[1]
    with progress_bar(kwargs["max_new_tokens"], desc, "tok") as bar, torch.inference_mode():
        out = model.eval().generate(
            input_ids=ids, attention_mask=mask, pad_token_id=pad_id, streamer=Ticks(bar), **kwargs
        )
    return out[:, width:].tolist()
