"""lm-evaluation-harness model type `loopfit`: HF's `HFLM` running a looped model at a chosen depth.

lm-eval 0.4.13 finds models only in its own registry (no entry-point group, and `--include_path` loads tasks, not
models), so the `loopfit` type exists once this module is imported. Run the harness through it:

    python -m loopfit.lm_eval_model --model loopfit --model_args pretrained=runs/heal,num_steps=8 \
        --tasks hellaswag,arc_easy --device cpu

which registers the model and then hands every argument to lm-eval's own CLI unchanged. From Python,
`import loopfit.lm_eval_model` then `lm_eval.simple_evaluate(model="loopfit", model_args=...)` works too.
"""

from __future__ import annotations

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

import loopfit.models  # noqa: F401  (registers the looped model type with the Auto classes)
from loopfit.errors import LoopfitError
from loopfit.loading import resolve_model_path


@register_model("loopfit")
class LoopfitLM(HFLM):
    """`HFLM` for loopfit models; `model_args`: `pretrained` (folder, hub id, .gguf or `smollm2-135m`),
    `num_steps` (loop depth R, default the model's `mean_recurrence`), optional `cache_mode` (`full`|`compress`),
    plus any `hf` model argument. A plain HF model works too (the depth is then ignored)."""

    def __init__(self, pretrained: str, num_steps: int | None = None, cache_mode: str | None = None, **kwargs) -> None:

        kwargs.setdefault("dtype", "float32")
        kwargs.setdefault("backend", "causal")  # lm-eval cannot tell from a `looped` config
        super().__init__(pretrained=resolve_model_path(pretrained), **kwargs)
        config = self.model.config
        self.looped = config.model_type == "looped"
        self.num_steps = None
        if self.looped:
            self.num_steps = int(num_steps) if num_steps is not None else config.mean_recurrence
            if self.num_steps < 1:
                raise LoopfitError(f"num_steps must be >= 1, got {num_steps}")
            if cache_mode is not None:
                if cache_mode not in ("full", "compress"):
                    raise LoopfitError(f"cache_mode must be full or compress, got '{cache_mode}'")
                config.cache_mode = cache_mode

    def _depth(self) -> dict:
        return {"num_steps": self.num_steps} if self.looped else {}

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        if not self.looped:
            return super()._model_call(inps, attn_mask, labels)
        with torch.no_grad():
            return self.model(inps, **self._depth()).logits

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs) -> torch.Tensor:
        return super()._model_generate(context, max_length, stop, **generation_kwargs, **self._depth())

    def get_model_info(self) -> dict:
        return {**super().get_model_info(), "num_steps": self.num_steps}


def main() -> None:
    """`python -m loopfit.lm_eval_model ARGS`: lm-eval's CLI with the `loopfit` model type registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
