"""Configuration of a looped (prelude -> recurrent block x R -> coda) causal LM built from a feedforward source."""

from __future__ import annotations

from types import MappingProxyType

from transformers import AutoConfig, PretrainedConfig

from loopfit.models.families import SUPPORTED_ARCHITECTURES  # noqa: F401  (re-exported)

STATE_INITS = ("normal", "zeros", "embed")
ADAPTER_INITS = ("identity", "random", "average", "state")
CACHE_MODES = ("full", "compress")


class LoopedConfig(PretrainedConfig):
    """Config of `LoopedForCausalLM`.

    Args:
        base_config: the source architecture's config (a dict or a `PretrainedConfig`), kept whole so that the
            decoder layers, norms and rotary embeddings are built exactly as in the source model.
        prelude_layers / block_layers / coda_layers: source-layer indices of each part, in order. Source layers
            named in none of them are dropped.
        mean_recurrence: the number of loop iterations R used when `forward` gets no `num_steps`.
        backprop_depth: in training mode without `num_steps`, how many of the sampled iterations keep gradients.
        state_init: `normal` (truncated normal with `state_init_std`), `zeros`, or `embed` (the prelude output).
        state_init_std: standard deviation of the `normal` state initialisation.
        adapter_init: `identity` (weights `[0 | I]`: the first R iterations all compute `block(e)`, so a converted
            model reproduces the pruned source model at any R), `random` (truncated normal, as arXiv:2511.07384),
            `average` (`[I/2 | I/2]`), or `state` (`[I | 0]`: the block sees the state alone; with `state_init`
            `embed` iteration i computes `s_{i+1} = block_i(s_i)` from `s_0` = the prelude output, the relaxed
            recursion's state passing).
        adapter_init_std: standard deviation of the `random` adapter initialisation.
        cache_mode: `full` (one KV entry per iteration and block layer; cached decoding equals uncached) or
            `compress` (one entry per block layer, overwritten each iteration; constant memory in R).
        seed: seeds the `normal` state initialisation in eval mode (per position, so results are deterministic)
            and the `random` adapter initialisation (the same weights on every run and device).
        relaxation_rank: per-iteration low-rank deltas on every block linear layer (models/relaxed.py): 0 for none
            (one shared block), an int rank, or `full` (exact deltas).
        relaxation_groups: the source layers each iteration stands for (L lists as long as the block), for deltas
            started from the source (SVD). Iterations from L on use the last group's deltas.
        relaxation_iterations: L for depth-wise LoRA started at zero (no groups: every delta starts at zero, so
            the model starts as the plain loop); 0 when `relaxation_groups` give L. One of the two is needed when
            `relaxation_rank` is not 0.
        relaxation_block_init: how the shared block was initialised (`layers`, `average` or a group number), or
            `zeros` for depth-wise LoRA from zero; a record for model cards, not read by the model.
        exit_gate: the model carries a learned exit gate (`model.exit_gate`, models/exit_gate.py) for
            `--exit_criterion gate`; off by default (no gate, nothing changes).
        exit_gate_width: the gate's hidden width (0: a linear gate on the normalised state).
    """

    model_type = "looped"
    sub_configs = {"base_config": AutoConfig}
    # No remote code: an empty, read-only `auto_map` unless a folder sets one. Tools that read `config.auto_map`
    # for every config whose class is not in transformers (TRL's model loading) then find nothing instead of failing.
    auto_map = MappingProxyType({})

    def __init__(
        self,
        base_config: dict | PretrainedConfig | None = None,
        prelude_layers: list[int] | None = None,
        block_layers: list[int] | None = None,
        coda_layers: list[int] | None = None,
        mean_recurrence: int = 4,
        backprop_depth: int = 8,
        state_init: str = "normal",
        state_init_std: float = 0.0087,
        adapter_init: str = "identity",
        adapter_init_std: float = 0.014,
        cache_mode: str = "full",
        seed: int = 0,
        relaxation_rank: int | str = 0,
        relaxation_groups: list[list[int]] | None = None,
        relaxation_iterations: int = 0,
        relaxation_block_init: str | None = None,
        exit_gate: bool = False,
        exit_gate_width: int = 0,
        **kwargs,
    ):
        if isinstance(base_config, dict):
            base_config = dict(base_config)
            model_type = base_config.pop("model_type", "llama")
            base_config = AutoConfig.for_model(model_type, **base_config)
        elif base_config is None:
            base_config = AutoConfig.for_model("llama", num_hidden_layers=0)
        self.base_config = base_config
        self.prelude_layers = list(prelude_layers or [])
        self.block_layers = list(block_layers or [])
        self.coda_layers = list(coda_layers or [])
        self.mean_recurrence = int(mean_recurrence)
        self.backprop_depth = int(backprop_depth)
        self.state_init = state_init
        self.state_init_std = float(state_init_std)
        self.adapter_init = adapter_init
        self.adapter_init_std = float(adapter_init_std)
        self.cache_mode = cache_mode
        self.seed = int(seed)
        self.relaxation_rank = relaxation_rank if relaxation_rank == "full" else int(relaxation_rank)
        self.relaxation_groups = [list(g) for g in relaxation_groups or []]
        self.relaxation_iterations = int(relaxation_iterations or 0)
        self.relaxation_block_init = relaxation_block_init
        self.exit_gate = bool(exit_gate)
        self.exit_gate_width = int(exit_gate_width)
        # Distinct decoder layers held; the KV cache has more slots than this (one per iteration and block layer).
        self.num_hidden_layers = len(self.prelude_layers) + len(self.block_layers) + len(self.coda_layers)
        kwargs.pop("num_hidden_layers", None)
        for key in ("vocab_size", "hidden_size", "initializer_range", "pad_token_id", "bos_token_id", "eos_token_id"):
            kwargs.setdefault(key, getattr(base_config, key, None))
        kwargs.setdefault("tie_word_embeddings", getattr(base_config, "tie_word_embeddings", False))
        super().__init__(**kwargs)
        self.validate_layout()

    def validate_layout(self) -> None:
        """Raise `ValueError` naming the problem if the layout or an option is invalid."""
        if self.state_init not in STATE_INITS:
            raise ValueError(f"state_init must be one of {STATE_INITS}, got {self.state_init!r}")
        if self.adapter_init not in ADAPTER_INITS:
            raise ValueError(f"adapter_init must be one of {ADAPTER_INITS}, got {self.adapter_init!r}")
        if self.cache_mode not in CACHE_MODES:
            raise ValueError(f"cache_mode must be one of {CACHE_MODES}, got {self.cache_mode!r}")
        if self.mean_recurrence < 1:
            raise ValueError(f"mean_recurrence must be >= 1, got {self.mean_recurrence}")
        if self.exit_gate_width < 0:
            raise ValueError(f"exit_gate_width must be >= 0, got {self.exit_gate_width}")
        if self.backprop_depth < 1:
            raise ValueError(f"backprop_depth must be >= 1, got {self.backprop_depth}")
        n = getattr(self.base_config, "num_hidden_layers", 0) or 0
        used = self.prelude_layers + self.block_layers + self.coda_layers
        if n == 0 and not used:
            return  # an empty placeholder config (transformers builds one when loading)
        if not self.block_layers:
            raise ValueError("the recurrent block needs at least one layer")
        bad = [i for i in used if not 0 <= i < n]
        if bad:
            raise ValueError(f"layer indices {bad} are out of range for a source model with {n} layers (0-{n - 1})")
        dup = sorted({i for i in used if used.count(i) > 1})
        if dup:
            raise ValueError(f"layer indices {dup} appear more than once in the layout")
        if self.relaxation_rank != "full" and self.relaxation_rank < 0:
            raise ValueError(f"relaxation_rank must be >= 0 or 'full', got {self.relaxation_rank}")
        if self.relaxation_iterations < 0:
            raise ValueError(f"relaxation_iterations must be >= 0, got {self.relaxation_iterations}")
        if self.relaxation_groups and self.relaxation_iterations:
            raise ValueError("give relaxation_groups (deltas from the source) or relaxation_iterations (from zero)")
        if self.relaxation_rank != 0 and not self.num_relaxed:
            raise ValueError(
                "relaxation_rank needs relaxation_groups (the source layers of each iteration) or relaxation_iterations"
            )
        for g in self.relaxation_groups:
            if len(g) != len(self.block_layers) or not all(0 <= i < n for i in g):
                raise ValueError(f"relaxation group {g} must hold {len(self.block_layers)} source layers in 0-{n - 1}")

    # The source's logit transform, read through: tools that apply `lm_head` to the backbone's output themselves
    # (TRL's DistillationTrainer, its fused LM head) read these from the model's config, as on the source model.
    logit_scale = property(lambda self: getattr(self.base_config, "logit_scale", None))  # Cohere
    logits_scaling = property(lambda self: getattr(self.base_config, "logits_scaling", None))  # Granite
    final_logit_softcapping = property(lambda self: getattr(self.base_config, "final_logit_softcapping", None))

    @property
    def num_relaxed(self) -> int:
        """L, the number of per-iteration deltas: one per source group, or `relaxation_iterations` (0: none)."""
        return len(self.relaxation_groups) or self.relaxation_iterations

    @property
    def layout(self) -> str:
        """The layout as `prelude:block:coda` index lists, the syntax `loopfit convert --layers` accepts."""
        return ":".join(",".join(map(str, part)) for part in (self.prelude_layers, self.block_layers, self.coda_layers))

    def to_dict(self):
        out = super().to_dict()
        if isinstance(self.base_config, PretrainedConfig):
            out["base_config"] = self.base_config.to_dict()
        return out
