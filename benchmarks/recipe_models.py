"""The models of docs/recipes.md's estimates: each one's public architecture numbers (its HF config.json fields,
each with its source) and its looped layout, read by `benchmarks/recipe_estimates.py`."""

# ----------------------------------------------------------------------------------------------- the models
# Architecture numbers of each model's config.json. Sources (public repositories, read with the code search):
#   [tt-qwen3]  pytorch/torchtune torchtune/models/qwen3/_model_builders.py (qwen3_0_6b_*, qwen3_1_7b_*: vocab,
#               layers, heads, kv heads, hidden, intermediate, tie_word_embeddings=True)
#   [mt-qwen3]  AI-Hypercomputer/maxtext src/MaxText/utils/ckpt_conversion/utils/hf_model_configs.py
#               (qwen3_0_6b_config: the HF config, head_dim=128)
#   [sl-qwen3]  zyzshishui/slime scripts/models/qwen3-0.6B.sh, qwen3-1.7B.sh (--kv-channels 128 = head_dim)
#   [gemma3]    the HF config.json of google/gemma-3-1b-pt/-it as copied into public test fixtures (hidden 1152,
#               26 layers, 4 heads, 1 kv head, head_dim 256, intermediate 6912, vocab 262144, sliding window 512
#               every layer but each 6th, tied); the total checked against keras-team/keras-hub
#               keras_hub/src/models/gemma3/gemma3_presets.py ("gemma3_1b" params 999,885,952)
#   [tt-llama]  pytorch/torchtune torchtune/models/llama3_2/_model_builders.py (llama3_2_1b, llama3_2_3b)
#   [hf-l1b]    kevinstephano/thunder_model_blocks hf_llama/llama_config.py (meta-llama/Llama-3.2-1B-Instruct
#               config.json: head_dim 64, tie_word_embeddings true)
#   [hf-l3b]    citsjtu2020/LLM-Prof sglang/Model_Config.md (meta-llama/Llama-3.2-3B config.json: head_dim 128,
#               tie_word_embeddings true)
#   [fs2-olmo]  facebookresearch/fairseq2 src/fairseq2/models/olmo2/config.py (OLMO2Config defaults "correspond
#               to the allenai/OLMo-2-0425-1B model": dim 2048, 16 layers, 16 heads, 16 kv heads, ffn 8192,
#               vocab 100352, untied)
#   [tt-smol]   pytorch/torchtune torchtune/models/smol/_model_builders.py and _component_builders.py
#               (smollm2_360m: 32 layers, 15/5 heads, 960, 2560; smollm2_1_7b: 24, 32/32, 2048, 8192; vocab 49152,
#               tied)
# Layouts: the paper's (../shared/REFERENCE.md) where it has one, else prelude ~1/4, block ~1/3 of the layers
# taken just before the coda (upper middle), coda ~1/4, the few layers between prelude and block dropped.
MODELS = [
    {
        "name": "Qwen3-0.6B",
        "hf_id": "Qwen/Qwen3-0.6B",
        "model_type": "qwen3",
        "config": dict(
            vocab_size=151936,  # [tt-qwen3] [mt-qwen3]
            hidden_size=1024,  # [tt-qwen3] [mt-qwen3]
            intermediate_size=3072,  # [tt-qwen3] [mt-qwen3]
            num_hidden_layers=28,  # [tt-qwen3] [mt-qwen3]
            num_attention_heads=16,  # [tt-qwen3] [mt-qwen3]
            num_key_value_heads=8,  # [tt-qwen3] [mt-qwen3]
            head_dim=128,  # [mt-qwen3] [sl-qwen3]
            tie_word_embeddings=True,  # [tt-qwen3] [mt-qwen3]
            max_position_embeddings=40960,  # [mt-qwen3]
            rope_theta=1e6,  # [tt-qwen3]
            rms_norm_eps=1e-6,  # [tt-qwen3]
        ),
        "layers": "0-6:11-20:21-27",
        "layout_note": "7-10-7 (28 layers, 11-20 the upper middle, 7-10 dropped)",
    },
    {
        "name": "Qwen3-1.7B",
        "hf_id": "Qwen/Qwen3-1.7B",
        "model_type": "qwen3",
        "config": dict(
            vocab_size=151936,  # [tt-qwen3] [sl-qwen3]
            hidden_size=2048,  # [tt-qwen3] [sl-qwen3]
            intermediate_size=6144,  # [tt-qwen3] [sl-qwen3]
            num_hidden_layers=28,  # [tt-qwen3] [sl-qwen3]
            num_attention_heads=16,  # [tt-qwen3] [sl-qwen3]
            num_key_value_heads=8,  # [tt-qwen3] [sl-qwen3]
            head_dim=128,  # [sl-qwen3] (--kv-channels 128)
            tie_word_embeddings=True,  # [tt-qwen3]
            max_position_embeddings=40960,  # [tt-qwen3]
            rope_theta=1e6,  # [tt-qwen3]
            rms_norm_eps=1e-6,  # [tt-qwen3]
        ),
        "layers": "0-6:11-20:21-27",
        "layout_note": "7-10-7 (28 layers, 7-10 dropped)",
    },
    {
        "name": "Gemma-3-1B (text)",
        "hf_id": "google/gemma-3-1b-pt",
        "model_type": "gemma3_text",
        "config": dict(
            vocab_size=262144,  # [gemma3]
            hidden_size=1152,  # [gemma3]
            intermediate_size=6912,  # [gemma3]
            num_hidden_layers=26,  # [gemma3]
            num_attention_heads=4,  # [gemma3]
            num_key_value_heads=1,  # [gemma3]
            head_dim=256,  # [gemma3]
            query_pre_attn_scalar=256,  # [gemma3]
            sliding_window=512,  # [gemma3]
            sliding_window_pattern=6,  # [gemma3] (layers 5, 11, 17, 23 global, the rest local)
            tie_word_embeddings=True,  # [gemma3]
            max_position_embeddings=32768,  # [gemma3]
            rope_theta=1e6,  # [gemma3]
            rope_local_base_freq=10000.0,  # [gemma3]
            rms_norm_eps=1e-6,  # [gemma3]
        ),
        "published_total": 999_885_952,  # keras-team/keras-hub gemma3_presets.py "gemma3_1b"
        "layers": "0-5:10-19:20-25",
        "layout_note": "6-10-6 (26 layers, 6-9 dropped; the block holds global layers 11 and 17)",
    },
    {
        "name": "Llama-3.2-1B",
        "hf_id": "meta-llama/Llama-3.2-1B",
        "model_type": "llama",
        "config": dict(
            vocab_size=128256,  # [tt-llama] [hf-l1b]
            hidden_size=2048,  # [tt-llama] [hf-l1b]
            intermediate_size=8192,  # [tt-llama] [hf-l1b]
            num_hidden_layers=16,  # [tt-llama] [hf-l1b]
            num_attention_heads=32,  # [tt-llama] [hf-l1b]
            num_key_value_heads=8,  # [tt-llama] [hf-l1b]
            head_dim=64,  # [hf-l1b]
            tie_word_embeddings=True,  # [hf-l1b]
            max_position_embeddings=131072,  # [tt-llama] [hf-l1b]
            rope_theta=500000.0,  # [tt-llama] [hf-l1b]
            rms_norm_eps=1e-5,  # [tt-llama] [hf-l1b]
        ),
        "layers": "0-3:6-11:12-15",
        "untie": True,
        "layout_note": "4-6-4, the paper's (embeddings untied as in the paper)",
    },
    {
        "name": "Llama-3.2-1B 2-4-2",
        "hf_id": "meta-llama/Llama-3.2-1B",
        "same_as": "Llama-3.2-1B",
        "layers": "0-1:10-13:14-15",
        "untie": True,
        "layout_note": "2-4-2, the paper's (layers 2-9 dropped)",
    },
    {
        "name": "Llama-3.2-3B",
        "hf_id": "meta-llama/Llama-3.2-3B",
        "model_type": "llama",
        "config": dict(
            vocab_size=128256,  # [tt-llama] [hf-l3b]
            hidden_size=3072,  # [tt-llama] [hf-l3b]
            intermediate_size=8192,  # [tt-llama] [hf-l3b]
            num_hidden_layers=28,  # [tt-llama] [hf-l3b]
            num_attention_heads=24,  # [tt-llama] [hf-l3b]
            num_key_value_heads=8,  # [tt-llama] [hf-l3b]
            head_dim=128,  # [hf-l3b]
            tie_word_embeddings=True,  # [hf-l3b]
            max_position_embeddings=131072,  # [tt-llama] [hf-l3b]
            rope_theta=500000.0,  # [tt-llama] [hf-l3b]
            rms_norm_eps=1e-5,  # [tt-llama] [hf-l3b]
        ),
        "layers": "0-6:11-20:21-27",
        "untie": True,
        "layout_note": "7-10-7 (28 layers, 7-10 dropped; untied like the paper's Llama-3.2-1B)",
    },
    {
        "name": "OLMo-2-1B",
        "hf_id": "allenai/OLMo-2-0425-1B",
        "model_type": "olmo2",
        "config": dict(
            vocab_size=100352,  # [fs2-olmo]
            hidden_size=2048,  # [fs2-olmo]
            intermediate_size=8192,  # [fs2-olmo]
            num_hidden_layers=16,  # [fs2-olmo]
            num_attention_heads=16,  # [fs2-olmo] (head_dim = 2048 / 16 = 128)
            num_key_value_heads=16,  # [fs2-olmo]
            tie_word_embeddings=False,  # [fs2-olmo]
            max_position_embeddings=4096,  # [fs2-olmo]
            rope_theta=500000.0,  # [fs2-olmo]
            rms_norm_eps=1e-6,  # [fs2-olmo]
        ),
        "layers": "0-3:6-11:12-15",
        "layout_note": "4-6-4, the paper's (4-5 dropped)",
    },
    {
        "name": "SmolLM2-360M",
        "hf_id": "HuggingFaceTB/SmolLM2-360M",
        "model_type": "llama",
        "config": dict(
            vocab_size=49152,  # [tt-smol]
            hidden_size=960,  # [tt-smol]
            intermediate_size=2560,  # [tt-smol]
            num_hidden_layers=32,  # [tt-smol]
            num_attention_heads=15,  # [tt-smol] (head_dim 64)
            num_key_value_heads=5,  # [tt-smol]
            tie_word_embeddings=True,  # [tt-smol]
            max_position_embeddings=8192,  # [tt-smol]
            rope_theta=100000.0,  # [tt-smol]
            rms_norm_eps=1e-5,  # [tt-smol]
        ),
        "layers": "0-7:12-23:24-31",
        "layout_note": "8-12-8 (32 layers, 8-11 dropped)",
    },
    {
        "name": "SmolLM2-1.7B",
        "hf_id": "HuggingFaceTB/SmolLM2-1.7B",
        "model_type": "llama",
        "config": dict(
            vocab_size=49152,  # [tt-smol]
            hidden_size=2048,  # [tt-smol]
            intermediate_size=8192,  # [tt-smol]
            num_hidden_layers=24,  # [tt-smol]
            num_attention_heads=32,  # [tt-smol] (head_dim 64)
            num_key_value_heads=32,  # [tt-smol]
            tie_word_embeddings=True,  # [tt-smol]
            max_position_embeddings=8192,  # [tt-smol]
            rope_theta=130000.0,  # [tt-smol]
            rms_norm_eps=1e-5,  # [tt-smol]
        ),
        "layers": "0-5:10-17:18-23",
        "layout_note": "6-8-6 (24 layers, 6-9 dropped)",
    },
]
# The model the H100 throughput was measured on (docs/benchmarks.md): SmolLM2-135M, 4-6-4; its FLOPs per token
# recomputed here must equal the benchmark's 1.109822976 GFLOP (a check of the accounting).
REFERENCE = {
    "name": "SmolLM2-135M",
    "model_type": "llama",
    "config": dict(
        vocab_size=49152,  # SmolLM2-135M, the model loopfit embeds (README: 30 layers, hidden 576)
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    ),
    "layers": "0-3:20-25:26-29",
}
