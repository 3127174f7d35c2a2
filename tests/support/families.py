"""Tiny random models of the families Axolotl users train, from transformers' own configs.

Each ``Family`` is a ``model_type`` with the options its released checkpoints use that
matter to the output layer: tied or untied embeddings as released, the logit scale or
soft-cap as released (Gemma 2: 30, Cohere: 0.0625, Granite 3.x: divided by 8), a bias
on the lm_head where the architecture has one. Everything else is shrunk (2 layers,
hidden 32, vocab 128) so a model builds and runs in well under a second on a CPU.
``expected`` is the transform the exactness check must measure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from axolotl_otr.kernels.transform import LogitTransform

VOCAB = 128
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
MAMBA = dict(mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=16)
VISION = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=28,
    patch_size=14,
)


@dataclass(frozen=True)
class Family:
    """One architecture as released: its model_type, tying, and output-layer options."""

    name: str
    model_type: str
    tied: bool
    options: dict = field(default_factory=dict)
    expected: LogitTransform = LogitTransform()
    example: str = ""  # the Axolotl example folder users copy (examples/<name>)

    def config(self):
        """The transformers config of the tiny twin."""
        kwargs = {**TINY, "tie_word_embeddings": self.tied, **self.options}
        return AutoConfig.for_model(self.model_type, **kwargs)

    def build(self, seed: int = 0, dtype: torch.dtype = torch.float32):
        """The tiny model, random weights, its lm_head scaled so the logits are large
        enough that soft-capping and scaling change them visibly: the lm_head's output
        reaches twice the soft-cap, or logits of about 10 after the scale."""
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(self.config(), dtype=torch.float32)
        head = model.get_output_embeddings()
        with torch.no_grad():
            ids = torch.arange(3, 3 + 16).unsqueeze(0) % VOCAB
            out = model(input_ids=ids, use_cache=False).logits
            raw = out if self.expected.is_identity else None
            if raw is None:  # undo the transform to size the lm_head's own output
                raw = model(input_ids=ids, use_cache=False, output_hidden_states=True)
                raw = head(raw.hidden_states[-1])
            cap = self.expected.softcap
            reach = 2.0 * cap if cap is not None else 10.0 / self.expected.scale
            head.weight.mul_(reach / raw.abs().max().clamp_min(1e-6))
        return model.to(dtype).train()


FAMILIES = [
    Family("llama", "llama", tied=True, example="llama-3 (Llama-3.2-1B)"),
    Family("llama-untied", "llama", tied=False, example="llama-3 (Llama-3.1-8B)"),
    Family("mistral", "mistral", tied=False, example="mistral (Mistral-7B)"),
    Family("ministral", "ministral", tied=False, example="ministral"),
    Family(
        "mixtral",
        "mixtral",
        tied=False,
        example="mistral (Mixtral)",
        options=dict(num_local_experts=4, num_experts_per_tok=2),
    ),  # fmt: skip
    Family("qwen2", "qwen2", tied=True, example="qwen2 (Qwen2.5-0.5B)"),
    Family(
        "qwen2_moe",
        "qwen2_moe",
        tied=False,
        example="archived/qwen (Qwen1.5-MoE)",
        options=dict(**MOE, shared_expert_intermediate_size=32),
    ),  # fmt: skip
    Family("qwen3", "qwen3", tied=True, example="qwen3 (Qwen3-0.6B)"),
    Family("qwen3_moe", "qwen3_moe", tied=False, options=MOE, example="qwen3 (Qwen3-30B-A3B)"),
    Family(
        "qwen3_next",
        "qwen3_next",
        tied=False,
        example="qwen3-next",
        options=dict(
            **MOE,
            shared_expert_intermediate_size=32,
            linear_num_key_heads=2,
            linear_num_value_heads=2,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            layer_types=["linear_attention", "full_attention"],
        ),
    ),  # fmt: skip
    Family("gemma", "gemma", tied=True, example="gemma (Gemma-7B)"),
    Family(
        "gemma2",
        "gemma2",
        tied=True,
        example="gemma2",
        options=dict(final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
        expected=LogitTransform(softcap=30.0),
    ),  # fmt: skip
    Family("gemma3_text", "gemma3_text", tied=True, example="gemma3 (Gemma-3-1B, 270m)"),
    Family(
        "gemma3_text-softcap",
        "gemma3_text",
        tied=True,
        example="gemma3 option",
        options=dict(final_logit_softcapping=30.0),
        expected=LogitTransform(softcap=30.0),
    ),  # fmt: skip
    Family("phi", "phi", tied=False, example="phi (phi-2; lm_head bias)"),
    Family("phi3", "phi3", tied=False, example="phi (Phi-3.5-mini)"),
    Family("olmo", "olmo", tied=False, example="olmo (OLMo-7B)"),
    Family("olmo2", "olmo2", tied=False, example="olmo2"),
    Family("olmo3", "olmo3", tied=False, example="olmo3"),
    Family(
        "cohere",
        "cohere",
        tied=True,
        example="cohere (Command-R)",
        options=dict(logit_scale=0.0625),
        expected=LogitTransform(scale=0.0625),
    ),  # fmt: skip
    Family(
        "cohere2",
        "cohere2",
        tied=True,
        example="cohere (Command-R7B)",
        options=dict(logit_scale=0.25),
        expected=LogitTransform(scale=0.25),
    ),  # fmt: skip
    Family(
        "granite",
        "granite",
        tied=True,
        example="granite (Granite-3.x)",
        options=dict(
            logits_scaling=8.0,
            embedding_multiplier=12.0,
            residual_multiplier=0.22,
            attention_multiplier=0.125,
        ),
        expected=LogitTransform(scale=0.125),
    ),  # fmt: skip
    Family(
        "granitemoe",
        "granitemoe",
        tied=True,
        example="granite (Granite-3.x MoE)",
        options=dict(logits_scaling=6.0, num_local_experts=4, num_experts_per_tok=2),
        expected=LogitTransform(scale=1 / 6.0),
    ),  # fmt: skip
    Family("smollm3", "smollm3", tied=True, example="smollm3 (SmolLM3-3B)"),
    Family("stablelm", "stablelm", tied=False, example="stablelm-2"),
    Family("lfm2", "lfm2", tied=True, example="LiquidAI (LFM2)"),
    Family(
        "gpt_oss",
        "gpt_oss",
        tied=False,
        example="gpt-oss",
        options=dict(num_local_experts=4, num_experts_per_tok=2),
    ),  # fmt: skip
    Family("glm4", "glm4", tied=False, example="glm4"),
    Family("seed_oss", "seed_oss", tied=False, example="seed-oss"),
    Family("hunyuan_v1_dense", "hunyuan_v1_dense", tied=True, example="hunyuan"),
    Family("apertus", "apertus", tied=False, example="apertus"),
    Family("arcee", "arcee", tied=False, example="arcee (AFM-4.5B)"),
    Family("exaone4", "exaone4", tied=False, example="exaone4"),
    Family("ernie4_5", "ernie4_5", tied=True, example="ernie4_5 (0.3B)"),
    Family(
        "gemma3",
        "gemma3",
        tied=True,
        example="gemma3 (Gemma-3-4B, multimodal)",
        options=dict(text_config=dict(TINY), vision_config=VISION, mm_tokens_per_image=4),
    ),
    Family(
        "gemma3n_text",
        "gemma3n_text",
        tied=True,
        example="gemma3n",
        options=dict(
            final_logit_softcapping=30.0,
            layer_types=["sliding_attention", "full_attention"],
            num_kv_shared_layers=0,
            laurel_rank=4,
            hidden_size_per_layer_input=8,
            vocab_size_per_layer_input=VOCAB,
            activation_sparsity_pattern=[0.0, 0.0],
        ),
        expected=LogitTransform(softcap=30.0),
    ),  # fmt: skip
    Family(
        "granitemoehybrid",
        "granitemoehybrid",
        tied=True,
        example="granite4",
        options=dict(
            logits_scaling=4.0,
            num_local_experts=4,
            num_experts_per_tok=2,
            layer_types=["mamba", "attention"],
            **MAMBA,
        ),
        expected=LogitTransform(scale=0.25),
    ),  # fmt: skip
    Family(
        "falcon_h1",
        "falcon_h1",
        tied=False,
        example="falcon-h1",
        options=dict(lm_head_multiplier=0.5, mamba_d_ssm=64, **MAMBA),
        expected=LogitTransform(scale=0.5),
    ),  # fmt: skip
    Family(
        "hyperclovax",
        "hyperclovax",
        tied=False,
        example="(logits multiplied by logits_scaling)",
        options=dict(logits_scaling=0.25),
        expected=LogitTransform(scale=0.25),
    ),  # fmt: skip
    Family(
        "jamba",
        "jamba",
        tied=False,
        example="jamba",
        options=dict(
            num_experts=4,
            num_experts_per_tok=2,
            attn_layer_period=2,
            attn_layer_offset=1,
            expert_layer_period=2,
            expert_layer_offset=1,
            use_mamba_kernels=False,
            mamba_d_state=8,
        ),
    ),  # fmt: skip
    Family(
        "lfm2_moe",
        "lfm2_moe",
        tied=True,
        example="LiquidAI (LFM2-8B-A1B)",
        options=dict(
            **MOE,
            num_dense_layers=1,
            layer_types=["full_attention", "conv"],
        ),
    ),  # fmt: skip
    Family(
        "qwen3_5_text",
        "qwen3_5_text",
        tied=True,
        example="qwen3.5",
        options=dict(
            linear_num_key_heads=2,
            linear_num_value_heads=2,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            layer_types=["linear_attention", "full_attention"],
        ),
    ),  # fmt: skip
]
