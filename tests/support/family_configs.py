"""The example configs derived from Axolotl's own examples, and their tiny twins.

Each entry of ``FAMILY_CONFIGS`` names a YAML in examples/configs/, the family of
tests/families.py whose tiny random model stands in for its base model (same
``model_type``, tied or untied as released), the special tokens the YAML (or the chat
template it names) needs in the tokenizer, and the layout of its dataset. ``build_twin``
writes that model with the tiny offline tokenizer (tests/conftest.py ``tiny_dir``), those
tokens added, and ``twin_data`` the tiny alpaca data in the dataset's own layout, so a
config's dataset block (``type``, ``field_messages``, role mappings) is kept as written
and only its ``path`` changes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from tests.support.families import FAMILIES, TINY

FAMILIES_BY_NAME = {family.name: family for family in FAMILIES}


@dataclass(frozen=True)
class FamilyConfig:
    """One derived example: the family twin, its extra tokens and its data layout."""

    family: str  # a tests/families.py Family.name
    tokens: tuple[str, ...] = ()  # special tokens the config or its chat template names
    data: str = "alpaca"  # alpaca | sharegpt (conversations, from/value) | messages
    tied: bool | None = None  # overrides the family's tying where this size differs
    extra: dict = dataclasses.field(default_factory=dict)  # more tokenizer special tokens


# bitsandbytes' CPU 4-bit kernels need every quantized layer's input width to be a whole
# number of its 64-value blocks (at tests/families.py's hidden size 32 they fail), so
# the twins are twice that wide; still a few hundred thousand parameters.
TWIN_SIZES = dict(hidden_size=64, intermediate_size=128, head_dim=16)
LLAMA3_PAD = ("<|end_of_text|>",)
FAMILY_CONFIGS = {
    "llama-3.2-1b-otr-lora.yml": FamilyConfig("llama", LLAMA3_PAD),
    "llama-3.2-1b-otr-qlora.yml": FamilyConfig("llama", LLAMA3_PAD),
    # Qwen3-8B and -32B are released with untied embeddings (the 0.6B-4B sizes tie them).
    "qwen3-8b-otr-lora.yml": FamilyConfig("qwen3", tied=False),
    "qwen3-32b-otr-qlora.yml": FamilyConfig(
        "qwen3", ("<|im_start|>", "<|im_end|>", "<think>", "</think>"), "sharegpt", tied=False
    ),
    "gemma-3-1b-otr-qlora.yml": FamilyConfig(
        "gemma3_text", ("<start_of_turn>", "<end_of_turn>"), "sharegpt"
    ),
    "mistral-7b-otr-qlora.yml": FamilyConfig("mistral", extra={"unk_token": "<unk>"}),
    "phi-3.5-mini-otr-lora.yml": FamilyConfig(
        "phi3", ("<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|endoftext|>"), "messages"
    ),
    "smollm3-3b-otr-lora.yml": FamilyConfig("smollm3", LLAMA3_PAD),
}


def build_twin(entry: FamilyConfig, tokenizer_dir: Path, out: Path, sequence_len: int) -> Path:
    """Save the tiny random model of ``entry``'s family with the tiny tokenizer plus the
    config's special tokens; the vocabulary is the tokenizer's, positions reach
    ``sequence_len`` (packed rows are that long)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    family = FAMILIES_BY_NAME[entry.family]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens(
        {**entry.extra, "additional_special_tokens": list(entry.tokens)},
        replace_extra_special_tokens=False,
    )
    tied = family.tied if entry.tied is None else entry.tied
    kwargs = {
        **TINY,
        **TWIN_SIZES,
        "tie_word_embeddings": tied,
        **family.options,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": max(sequence_len, TINY["max_position_embeddings"]),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = AutoConfig.for_model(family.model_type, **kwargs)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def twin_data(alpaca: Path, layout: str, out: Path) -> Path:
    """The tiny alpaca rows in ``layout``: a user turn (instruction and input) and an
    assistant turn (output), in the field and role names the config's dataset uses."""
    if layout == "alpaca":
        return alpaca
    rows = []
    for line in alpaca.read_text().splitlines():
        row = json.loads(line)
        prompt = row["instruction"] + (f"\n{row['input']}" if row["input"] else "")
        if layout == "sharegpt":
            turns = [{"from": "human", "value": prompt}, {"from": "gpt", "value": row["output"]}]
            rows.append({"conversations": turns})
        elif layout == "messages":
            turns = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": row["output"]},
            ]
            rows.append({"messages": turns})
        else:
            raise ValueError(layout)
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out


# What a CPU needs, applied only where the config sets the key (None removes the key).
CPU_OVERRIDES = {
    "bf16": False,  # bf16 autocast is a GPU setting here; the twin trains in fp32
    "bfloat16": None,  # the same, under its older name (Phi-3.5's example)
    "fp16": None,  # the same for fp16
    "tf32": False,  # a CUDA matmul mode
    "flash_attention": False,  # flash-attn is a CUDA kernel
    "attn_implementation": "sdpa",  # flash_attention_2 likewise; PyTorch's SDPA runs on CPU
    "fused_attn_kernel": False,  # Axolotl's Triton RMSNorm+RoPE kernel (CUDA only)
}
# Set always: Axolotl may turn its Triton LoRA kernels on by itself when a config names
# none (Qwen3-32B's names them), and the run must be short and local.
ALWAYS = {
    "lora_mlp_kernel": False,  # Axolotl's Triton LoRA kernels (CUDA only)
    "lora_qkv_kernel": False,
    "lora_o_kernel": False,
    "max_steps": 2,  # two optimizer steps, the point of the test
    "save_strategy": "no",  # no checkpoint mid-run; the final adapter is still written
    "dataloader_num_workers": 0,  # no worker processes on this 2-core machine
    "dataloader_pin_memory": False,  # pinned memory is a CUDA transfer setting
}


def twin_overrides(raw: dict, twin, data, tmp_path) -> dict:
    """What the twin needs: its local folder instead of the hub id, the tiny data (in
    the dataset's own layout) instead of the hub dataset, outputs in the tmp dir."""
    out = {"base_model": str(twin)}
    for key in ("base_model_config", "tokenizer_config"):
        if raw.get(key):
            out[key] = str(twin)  # the same hub id, written twice in some examples
    out["datasets"] = [
        {**dataset, "path": str(data), "ds_type": "json"} for dataset in raw["datasets"]
    ]
    out["dataset_prepared_path"] = str(tmp_path / "prepared")
    out["output_dir"] = str(tmp_path / "out")
    return out


def cpu_config(raw: dict, twin, data, tmp_path) -> dict:
    """``raw`` with the CPU and twin overrides applied, nothing else changed."""
    cfg = dict(raw)
    for key, value in CPU_OVERRIDES.items():
        if key in raw:
            cfg[key] = value
    if raw.get("gradient_checkpointing") == "offload":
        # Checkpointing kept; "offload" also moves activations from the accelerator to
        # host memory (TRL's offloading asks torch.accelerator, which a CPU has not).
        cfg["gradient_checkpointing"] = True
    cfg.update(ALWAYS)
    cfg.update(twin_overrides(raw, twin, data, tmp_path))
    return {key: value for key, value in cfg.items() if value is not None}
