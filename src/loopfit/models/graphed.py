"""Fixed-depth decoding of a looped model on a static KV cache, each one-token step replayed from a CUDA graph.

Why: a decoding step of a small looped model is hundreds of small kernels (SmolLM2 4-6-4 at R = 4: 32 decoder
layers, ~15 kernels each), and on a GPU the step is bound by launching them, not by running them. A CUDA graph
records the step's kernels once and replays them with one launch. That needs every tensor of the step at a fixed
address and shape, so:

- the KV cache is static: one transformers `StaticLayer` per cache slot (`LoopedModel.prelude_slot` /
  `block_slots` / `coda_slot`: prelude + coda + R x block slots in `full` mode, one per block layer in `compress`
  mode), `max_len` tokens long, its write position an on-device counter that each replay advances;
- the attention masks are built inside the step from a static `(batch, max_len)` padding mask and that counter
  (causal, plus the sliding window for sliding layers: transformers' `sliding_window_overlay`, `kv > q - window`),
  boolean for `sdpa`, additive for `eager` attention;
- the depth R is fixed for the decoder's life (the graph is one unrolled step).

The step itself is the model's own loop (`prepare`, `run_prelude`, `initial_state`, `iterate` x R, `run_coda`,
`logits_from_hidden`), so the graph computes what eager decoding computes (up to the rounding of attention over
the longer, masked static cache): on CPU, or with `use_graph=False`, the same decoder runs the step eagerly, and
the tests compare both against `model.generate`.

Sources: CUDA graphs in PyTorch (`torch.cuda.CUDAGraph`, "CUDA Graphs" in the PyTorch CUDA semantics notes);
transformers' `StaticCache` (built for torch.compile's cudagraphs); positions of a left-padded batch as in
`GenerationMixin` (`models.sampling.padded_positions`).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, StaticLayer

from loopfit.models.sampling import padded_positions

_MASKED_ATTENTION = ("sdpa", "eager")


class GraphCaptureError(RuntimeError):
    """The decoding step could not be recorded in a CUDA graph (e.g. a kernel that synchronises with the host, as
    some mixture-of-experts routings do)."""


class StaticLoopCache(Cache):
    """A KV cache of `num_slots` static layers of `max_len` tokens each (`transformers.cache_utils.StaticLayer`).

    `replace_current` serves the `compress` cache mode (`layers._CacheSlot`): the iteration's entries for the
    current tokens overwrite the ones the first iteration wrote, at the same positions.
    """

    def __init__(self, num_slots: int, max_len: int):
        super().__init__(layers=[StaticLayer(max_len) for _ in range(num_slots)])

    def replace_current(self, key_states, value_states, slot: int, *args, **kwargs):
        layer = self.layers[slot]
        layer.cumulative_length.sub_(key_states.shape[-2])
        return layer.update(key_states, value_states)

    def rewind(self) -> None:
        """Every slot's write position back to 0 (the entries stay, masked out until overwritten)."""
        for layer in self.layers:
            if layer.is_initialized:
                layer.cumulative_length.zero_()


def graph_unsupported(model, device: torch.device | str | None = None) -> str | None:
    """Why fixed-depth CUDA-graph decoding cannot run `model` on `device`, or None if it can.

    `device=None` checks the model alone (the static-cache step runs eagerly on any device)."""
    if getattr(model.config, "model_type", None) != "looped":
        return "CUDA-graph decoding runs the loop of a looped model; this is a plain model"
    impl = model.config.base_config._attn_implementation
    if impl not in _MASKED_ATTENTION:
        return f"CUDA-graph decoding builds sdpa or eager attention masks; the model uses `{impl}` attention"
    if device is not None and torch.device(device).type != "cuda":
        return "CUDA graphs need a CUDA GPU (use --device cuda)"
    return None


class GraphedDecoder:
    """Greedy or sampled decoding of a looped model at fixed depth `num_steps` on a static cache.

    Args:
        model: a `LoopedForCausalLM` in eval mode, on its device.
        batch_size: rows decoded together (prompts are left-padded).
        max_len: cache length in tokens; every call needs `prompt length + max_new_tokens <= max_len`.
        num_steps: loop iterations R of every token (prefill and decoding alike).
        use_graph: capture the one-token step in a CUDA graph (CUDA only); False runs the same step eagerly.

    Raises `ValueError` for a plain model, attention other than sdpa / eager, or `use_graph` off CUDA.
    The graph is captured at the first decoding step and reused by later calls; its memory (the cache, the
    graph's pool) lives as long as the decoder.
    """

    def __init__(self, model, batch_size: int, max_len: int, num_steps: int, use_graph: bool = True):
        device = next(model.parameters()).device
        why = graph_unsupported(model, device if use_graph else None)
        if why:
            raise ValueError(why)
        m = model.model
        p, b, q = len(m.prelude), len(m.block), len(m.coda)
        slots = p + q + (num_steps * b if model.config.cache_mode == "full" else b)
        self.model, self.device, self.num_steps, self.use_graph = model, device, num_steps, use_graph
        self.batch_size, self.max_len = batch_size, max_len
        self.cache = StaticLoopCache(slots, max_len)
        # Tokens written so far (all slots alike). The static layers count too, but they allocate at their first
        # write, so no counter of theirs exists when the prefill's masks are built: this one is the step's clock.
        self.length = torch.zeros((), dtype=torch.long, device=device)
        self.pad_mask = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.kv_idx = torch.arange(max_len, device=device)
        self.ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)  # the token the next step reads
        self.pos = torch.zeros(batch_size, 1, dtype=torch.long, device=device)  # its position (per row)
        # Eval-mode `normal` state noise is a function of the position alone, looked up on the host
        # (models/modeling_looped.py): computed once for every position the cache can hold, gathered in the step.
        self.noise = None
        if model.config.state_init == "normal":
            like = torch.empty(1, max_len, model.config.hidden_size, dtype=model.dtype)
            self.noise = m.initial_state(like, torch.arange(max_len)[None])[0].to(device)  # (max_len, hidden)
        self.logits = None
        self.graph = None

    # --- the step: the model's own loop on static buffers --------------------------------------------------

    def _masks(self, q_len: int, dtype: torch.dtype) -> dict:
        """Attention masks `(batch, 1, q_len, max_len)` per attention type for the tokens at `length + 0..q_len-1`."""
        m = self.model.model
        q_idx = self.length + torch.arange(q_len, device=self.device)
        kv, qi = self.kv_idx.view(1, 1, 1, -1), q_idx.view(1, 1, -1, 1)
        allowed = (kv <= qi) & self.pad_mask.bool()[:, None, None, :]
        # A padding query sees nothing; let it see itself so its (unused) output stays finite: a NaN in the cache
        # would reach real tokens through 0 * NaN in the attention's weighted sum.
        allowed = allowed | (kv == qi)
        masks = {}
        for kind in set(m.attention_types):
            a = allowed
            if kind == "sliding_attention":
                a = a & (kv > qi - self.model.config.base_config.sliding_window)
            if self.model.config.base_config._attn_implementation == "eager":
                a = torch.zeros(a.shape, dtype=dtype, device=self.device).masked_fill(~a, torch.finfo(dtype).min)
            masks[kind] = a
        return masks

    def _step(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits `(batch, vocab)` of the last of `ids` `(batch, q)` at positions `pos`; writes the cache."""
        m = self.model.model
        x = m.embed(ids)
        ctx = m.prepare(x, self._masks(ids.shape[1], x.dtype), pos, self.cache, use_cache=True)
        e = m.run_prelude(x, ctx)
        s = self.noise[pos] if self.noise is not None else m.initial_state(e, pos)
        for i in range(self.num_steps):
            s = m.iterate(s, e, i, ctx)
        h = m.run_coda(s, ctx)  # every position: the coda's cache slots need the prompt's entries too
        self.length.add_(ids.shape[1])
        return self.model.logits_from_hidden(h[:, -1])

    def _decode_step(self) -> torch.Tensor:
        """One token for every row: mark its cache position as real, run the step, advance the positions."""
        self.pad_mask.index_fill_(1, self.length.view(1), 1)
        logits = self._step(self.ids, self.pos)
        self.pos.add_(1)
        return logits

    def _capture(self) -> None:
        """Record `_decode_step` in a CUDA graph: warm up on a side stream, then capture (state restored).

        Everything runs with the decoder's GPU current: `torch.cuda.graph` captures on a stream of the current
        device, so a model on `cuda:1` captured from `cuda:0` would record an empty graph."""
        with torch.cuda.device(self.device):
            saved = (self.length.clone(), self.pos.clone(), self.pad_mask.clone())
            layers = [layer for layer in self.cache.layers if layer.is_initialized]
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # cuBLAS workspaces and allocator blocks exist before the capture
                    self._decode_step()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            for t, v in zip((self.length, self.pos, self.pad_mask), saved):
                t.copy_(v)
            for layer in layers:  # every slot holds as many tokens as the step counter
                layer.cumulative_length.copy_(saved[0])
            self.graph = torch.cuda.CUDAGraph()
            try:
                # Recorded, not run: the state restored above is what the first replay reads.
                with torch.cuda.graph(self.graph, stream=torch.cuda.Stream(self.device)):
                    self.logits = self._decode_step()
            except RuntimeError as e:
                self.graph = None
                cause = e.__context__ if isinstance(e.__context__, Exception) else e  # the capture's own error
                text = str(cause).strip()
                first = text.splitlines()[0] if text else type(cause).__name__
                raise GraphCaptureError(f"the decoding step cannot be captured in a CUDA graph: {first}") from e

    # --- decoding ------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
    ) -> torch.Tensor:
        """New tokens `(batch, n <= max_new_tokens)` after the left-padded prompts `input_ids` `(batch, prompt)`.

        As `GenerationMixin.generate` does: a row that produced an end-of-sequence token continues with
        `pad_token_id` (the first end-of-sequence id when None), and decoding stops early once every row has.
        Sampling draws from `softmax(logits / temperature)` with the global RNG (no top-k / top-p).

        Raises `ValueError` for a batch of another size than the decoder's or a prompt + `max_new_tokens` longer
        than `max_len`.
        """
        b, n = input_ids.shape
        if b != self.batch_size or n + max_new_tokens > self.max_len:
            raise ValueError(f"the decoder holds {self.batch_size} rows of {self.max_len} tokens; got {b} rows of "
                             f"{n} + {max_new_tokens} new tokens")  # fmt: skip
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        if pad_token_id is None and eos:
            pad_token_id = eos[0]
        eos = torch.tensor(eos, dtype=torch.long, device=self.device)
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device).long()
        pos = padded_positions(attention_mask)
        # Prefill, eagerly: the prompt's length varies from call to call.
        self.cache.rewind()
        self.length.zero_()
        self.pad_mask.zero_()
        self.pad_mask[:, :n] = attention_mask
        logits = self._step(input_ids, pos)
        self.pos.copy_(pos[:, -1:] + 1)
        out = torch.empty(b, max_new_tokens, dtype=torch.long, device=self.device)
        unfinished = torch.ones(b, dtype=torch.bool, device=self.device)
        for t in range(max_new_tokens):
            if do_sample:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                token = torch.multinomial(probs, num_samples=1).squeeze(1)
            else:
                token = logits.argmax(-1)
            if pad_token_id is not None:
                token = torch.where(unfinished, token, pad_token_id)
            out[:, t] = token
            if eos.numel():
                unfinished &= ~torch.isin(token, eos)
                if not bool(unfinished.any()):
                    return out[:, : t + 1]
            if t == max_new_tokens - 1:
                break
            self.ids.copy_(token[:, None])
            if self.use_graph:
                if self.graph is None:
                    self._capture()
                self.graph.replay()
                logits = self.logits
            else:
                logits = self._decode_step()
        return out
