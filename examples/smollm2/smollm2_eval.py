"""Greedy exact-answer accuracy of SmolLM2 (optionally with a LoRA adapter) on the demo's sets.

Usage::

    python -m examples.smollm2.smollm2_eval --model .cache/smollm2-135m-instruct-v2 \
        --data .cache/smollm2-demo/data/in_domain.jsonl [--adapter outputs/smollm2-135m-otr-lora]

Replies are generated greedily through the model's own chat template, many questions
at once (left padding, so every prompt ends where its reply starts), and scored by
``tasks.is_right``. Prints hits, accuracy and a 95% Wilson interval per file.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
from pathlib import Path

import torch

from examples.smollm2 import smollm2_tasks as tasks
from examples.smollm2.smollm2_model import SetupError

MAX_NEW_TOKENS = 14  # "48 + 49 = 97<|im_end|>" is 11 tokens; a first line is all we score


def load(model_dir: str | Path, adapter_dir: str | Path | None = None):
    """The model in fp32 eval mode (a LoRA adapter merged in when given) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, adapter_dir = Path(model_dir), adapter_dir and Path(adapter_dir)
    _check_paths(model_dir, adapter_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return model.eval(), tokenizer


def _check_paths(model_dir: Path, adapter_dir: Path | None) -> None:
    if not (model_dir / "config.json").is_file():
        raise SetupError(f"no converted model at {model_dir}; run: make demo (it converts it)")
    if adapter_dir is not None and not (adapter_dir / "adapter_config.json").is_file():
        raise SetupError(
            f"no LoRA adapter at {adapter_dir}; train it first: make demo "
            "(or axolotl train examples/configs/smollm2-135m-otr-lora.yml)"
        )


def prompt_ids(tokenizer, question: str) -> list[int]:
    """The chat template's prompt for one user turn, ending where the reply starts."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )


@torch.no_grad()
def replies(model, tokenizer, questions: list[str], batch_size: int = 64) -> list[str]:
    """Greedy replies, ``batch_size`` questions per ``generate`` call (left padded)."""
    out = []
    pad = tokenizer.pad_token_id
    for start in range(0, len(questions), batch_size):
        prompts = [prompt_ids(tokenizer, q) for q in questions[start : start + batch_size]]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        generated = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        out.extend(tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True))
    return out


def result(items: list[dict], answers: list[str]) -> dict:
    """Hits, accuracy, 95% interval and every reply, for one set of items."""
    if not items:
        raise ValueError("nothing to score: the set is empty")
    right = [tasks.is_right(reply, item) for reply, item in zip(answers, items, strict=True)]
    hits, n = sum(right), len(items)
    low, high = tasks.wilson_interval(hits, n)
    return {
        "hits": hits,
        "n": n,
        "accuracy": hits / n,
        "ci95": [low, high],
        "right": right,
        "replies": answers,
    }


def score(model, tokenizer, items: list[dict]) -> dict:
    """Score one set in this process."""
    return result(items, replies(model, tokenizer, [item["question"] for item in items]))


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


_WORKER: dict = {}


def _load_worker(model_dir: str, adapter_dir: str | None, threads: int, log: str | None) -> None:
    if log is not None:  # keep the console for `axolotl train`'s progress bar
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    torch.set_num_threads(threads)
    _WORKER["model"], _WORKER["tokenizer"] = load(model_dir, adapter_dir)


def _worker_replies(questions: list[str]) -> list[str]:
    return replies(_WORKER["model"], _WORKER["tokenizer"], questions, batch_size=len(questions))


class Scoring:
    """Sets scored in ``workers`` processes of ``threads`` threads each, in the background.

    Processes rather than more threads: on a 2-core machine, two processes of one thread
    each keep both cores busy, where one process with two OpenMP threads was measured
    3.3x slower in wall time as soon as anything else ran (its threads wait on each other).
    """

    def __init__(
        self,
        model_dir: str | Path,
        adapter_dir: str | Path | None,
        sets: dict[str, list[dict]],
        workers: int,
        threads: int,
        log: str | Path | None = None,
        batch_size: int = 32,
    ) -> None:
        _check_paths(Path(model_dir), adapter_dir and Path(adapter_dir))
        self.sets = sets
        self.flat = [(name, item) for name, items in sets.items() for item in items]
        self.pool = multiprocessing.get_context("spawn").Pool(
            max(1, workers),
            initializer=_load_worker,
            initargs=(str(model_dir), adapter_dir and str(adapter_dir), threads, log and str(log)),
        )
        questions = [item["question"] for _, item in self.flat]
        batches = [questions[i : i + batch_size] for i in range(0, len(questions), batch_size)]
        self.pending = self.pool.map_async(_worker_replies, batches, chunksize=1)

    def wait(self) -> dict[str, dict]:
        """The scores of every set, once all replies are in."""
        try:
            answers = [reply for batch in self.pending.get() for reply in batch]
        except BaseException:
            self.cancel()
            raise
        self.pool.close()
        self.pool.join()
        by_set: dict[str, list[str]] = {name: [] for name in self.sets}
        for (name, _), reply in zip(self.flat, answers, strict=True):
            by_set[name].append(reply)
        return {name: result(self.sets[name], by_set[name]) for name in self.sets}

    def cancel(self) -> None:
        """Stop the workers now (the run they serve has failed)."""
        self.pool.terminate()
        self.pool.join()


def summary_line(name: str, result: dict) -> str:
    low, high = result["ci95"]
    return (
        f"{name:>10}: {result['hits']:>3}/{result['n']:<3} = {result['accuracy']:.3f} "
        f"(95% CI {low:.3f}-{high:.3f})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, nargs="+", required=True)
    parser.add_argument("--adapter", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    try:
        for path in args.data:
            if not path.is_file():
                raise SetupError(f"no such data file: {path}; make it with: make demo")
        sets = {path.stem: tasks.read_jsonl(path) for path in args.data}
        results = Scoring(args.model, args.adapter, sets, 2, max(1, cores() // 2)).wait()
    except SetupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for name, result in results.items():
        print(summary_line(name, result))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
