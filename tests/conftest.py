"""Shared fixtures: tiny random source models of each supported architecture and a tiny byte-level tokenizer."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
    StableLmConfig,
    StableLmForCausalLM,
)

ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "olmo2": (Olmo2Config, Olmo2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "phi3": (Phi3Config, Phi3ForCausalLM),
    "smollm3": (SmolLM3Config, SmolLM3ForCausalLM),
    "granite": (GraniteConfig, GraniteForCausalLM),
    "cohere": (CohereConfig, CohereForCausalLM),
    "stablelm": (StableLmConfig, StableLmForCausalLM),
    "gpt_neox": (GPTNeoXConfig, GPTNeoXForCausalLM),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM),
    "gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM),
    "qwen2_moe": (Qwen2MoeConfig, Qwen2MoeForCausalLM),
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM),
}
# What a family needs beyond the shared tiny config: small heads, and non-trivial multipliers, so that a family
# option the loop ignored would show.
ARCH_DEFAULTS = {
    "granite": dict(embedding_multiplier=3.0, logits_scaling=2.5, residual_multiplier=0.5, attention_multiplier=0.3),
    "cohere": dict(logit_scale=0.7),
    "gemma2": dict(head_dim=8, sliding_window=8, final_logit_softcapping=3.0),
    "gemma3_text": dict(head_dim=8, sliding_window=8, final_logit_softcapping=3.0),
    "qwen2_moe": dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16
    ),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
}
CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tiny_model(
    arch: str = "llama",
    num_layers: int = 6,
    hidden: int = 32,
    vocab: int = 260,
    seed: int = 0,
    tie: bool = True,
    **config_kwargs,
):
    """A tiny random causal LM of a supported architecture, in eval mode, fp32; `config_kwargs` go to its config."""
    torch.manual_seed(seed)
    config_cls, model_cls = ARCHS[arch]
    config = config_cls(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **(ARCH_DEFAULTS.get(arch, {}) | config_kwargs),
    )
    model = model_cls(config).eval()
    # Random init leaves the residual stream nearly unchanged per layer; larger weights make layers matter.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with no merges (vocab = 256 bytes + 4 specials) and a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    specials = ["<pad>", "<s>", "<|im_end|>", "<|im_start|>"]
    alphabet = ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML
    return fast


@pytest.fixture
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(params=list(ARCHS))
def arch(request):
    return request.param


@pytest.fixture
def tiny_source_dir(tmp_path):
    """A tiny Llama source model saved as an HF folder with its tokenizer."""
    model = make_tiny_model("llama")
    path = tmp_path / "src"
    model.save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


TEXT = "\n\n".join(f"Line {i}: the quick brown fox {i % 7} jumps over the lazy dog {i % 5}." for i in range(60))


def write_teacher_and_looped_student(root):
    """Save a tiny Llama teacher, its 1-2-1 looped conversion and a small text file under `root`."""
    from loopfit.convert import layout_from_sizes, to_looped

    src = make_tiny_model("llama", num_layers=6, hidden=32)
    tok = make_tiny_tokenizer()
    src.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    looped = to_looped(src, layout_from_sizes(6, 1, 2, 1), state_init="zeros", mean_recurrence=2)
    looped.save_pretrained(root / "looped")
    tok.save_pretrained(root / "looped")
    (root / "data.txt").write_text(TEXT)
    return root


def bf16_kd_config(models, out, lora=True, share=True, precision="bf16", **kw):
    """A LoRA (or full fine-tune) + KD `TrainConfig` on `write_teacher_and_looped_student(models)`'s files: bf16,
    batch 4 x 32, 6 steps, a checkpoint every 3, fixed depth 2; the teacher shares its weights unless `share=False`."""
    from loopfit.train import DistillationConfig, LoRAConfig, TrainConfig

    return TrainConfig(
        model_name=str(models / "looped"), out=str(out), data=str(models / "data.txt"), seq_len=32, batch_size=4,
        max_steps=6, save_every=3, progress_bar=False, tensorboard=False, fixed_num_steps=2, precision=precision,
        lora=LoRAConfig(enabled=lora, r=4, modules_to_save=["adapter"] if lora else None),
        distillation=DistillationConfig(enabled=True, teacher_model_name=str(models / "teacher"), ce_scale=0.5,
                                        kd_scale=0.5, share_weights=share), **kw)  # fmt: skip


def kd_loss_and_grads(run, batch, depth):
    """One micro-batch's objective under the run's autocast: (loss, {name: gradient} of every trainable tensor)."""
    from loopfit.train.student import objective_loss

    run.student.zero_grad(set_to_none=True)
    num_items = (batch["labels"][:, 1:] != -100).sum().float()
    with run.autocast:
        parts = objective_loss(run.objective, run.student, run.teacher, batch, depth, num_items)
    parts.total.backward()
    return parts.total.detach(), {n: p.grad.clone() for n, p in run.trainable}


@pytest.fixture
def one_thread():
    """Tiny matmuls on a shared 2-core machine run much faster without intra-op threads spinning."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def logits_dtypes(monkeypatch):
    """The fused loss's lm_head products as they run: a list that gains `(hidden, weight, out)` dtypes per call of
    `logits_into` (patched where the forward and the backward chunk loops look it up)."""
    from loopfit.losses import chunk_grad, fused

    seen, real = [], chunk_grad.logits_into

    def spy(h, w, b, out):
        seen.append((h.dtype, w.dtype, out.dtype))
        return real(h, w, b, out)

    monkeypatch.setattr(fused, "logits_into", spy)
    monkeypatch.setattr(chunk_grad, "logits_into", spy)
    return seen
