"""Held-out accuracy of the tiny model: greedy answers to questions it was not trained on.

Usage::

    python -m examples.tiny.evaluate --model .cache/tiny/model \
        --data .cache/tiny/data/heldout.jsonl [--adapter outputs/tiny-cpu-lora]

An answer counts as correct when the greedy continuation of the alpaca prompt (the
template Axolotl trains on) is exactly the expected output. Without ``--adapter`` it
scores the base model, with it the OTR fine-tuned one, so ``make demo-tiny`` can show
"before -> after" as a figure a person reads at a glance.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def load(model_dir: Path, adapter_dir: Path | None = None):
    """The tiny model (with the LoRA adapter merged in, if given) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return model.eval(), tokenizer


@torch.no_grad()
def greedy_answer(model, tokenizer, example: dict[str, str], max_new_tokens: int = 12) -> str:
    template = PROMPT_WITH_INPUT if example["input"] else PROMPT_NO_INPUT
    ids = tokenizer(template.format(**example), return_tensors="pt")["input_ids"]
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def accuracy(model, tokenizer, examples: list[dict[str, str]]) -> float:
    """Share of ``examples`` whose greedy answer is exactly the expected output."""
    hits = sum(greedy_answer(model, tokenizer, ex) == ex["output"] for ex in examples)
    return hits / max(len(examples), 1)


@torch.no_grad()
def token_accuracy(model, tokenizer, examples: list[dict[str, str]]) -> float:
    """Share of answer tokens (end of text included) that the model's greedy choice gets
    right, given the prompt and the correct answer so far (teacher forcing)."""
    right = total = 0
    for ex in examples:
        template = PROMPT_WITH_INPUT if ex["input"] else PROMPT_NO_INPUT
        prompt = tokenizer(template.format(**ex))["input_ids"]
        answer = tokenizer(ex["output"], add_special_tokens=False)["input_ids"]
        answer = answer + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt + answer])
        guesses = model(ids).logits[0, len(prompt) - 1 : -1].argmax(-1)
        right += int((guesses == torch.tensor(answer)).sum())
        total += len(answer)
    return right / max(total, 1)


def read_jsonl(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, default=None)
    parser.add_argument("--label", default=None, help="name printed with the figure")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    examples = read_jsonl(args.data)
    model, tokenizer = load(args.model, args.adapter)
    score = accuracy(model, tokenizer, examples)
    tokens = token_accuracy(model, tokenizer, examples)
    label = args.label or ("fine-tuned" if args.adapter else "base model")
    hits = round(score * len(examples))
    print(
        f"held-out, {label}: {hits}/{len(examples)} answers exactly right ({score:.1%}), "
        f"{tokens:.1%} of answer tokens right"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
