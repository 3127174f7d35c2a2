"""Scale 1 pieces: a ~0.9M-parameter Llama, its tasks, greedy scoring and base pre-training.

The experiment that uses them is ``continuum.py``.

Everything is generated here from fixed seeds; nothing is downloaded.

Base skills (pre-training, one base model shared by all fine-tuning seeds):
  add   "123+45="  -> "168"         operands of 1-3 digits
  rev   "R40521="  -> "12504"       reverse a digit string of 3-7 digits
  copy  "C40521="  -> "40521"       copy a digit string of 3-7 digits
Target skill (fine-tuning), a three-term sum with its working written out:
  in-domain  "12+7+45="     -> "12+7=19,19+45=64"            terms 1-99
  OOD        "123+210+301=" -> "123+210=333,333+301=634"     terms 100-333 (every step is
             a <=3-digit addition in the base skill's own format; only the chaining is new)
Metrics (greedy decoding, exact match of the final number for the target, of the whole
answer for base skills): in_domain, ood, retention (mean over add/rev/copy), and a second
OOD variant ood_steps: four terms of 1-99 (one step more, the working written the same way).
"""

from __future__ import annotations

import random
import time
from typing import Any

import torch

from experiments.otr_vs_sft.common import left_pad, make_collate

CHARS = "0123456789+=,RC"
PAD, BOS, EOS = 0, 1, 2
STOI = {c: i + 3 for i, c in enumerate(CHARS)}
ITOS = {i: c for c, i in STOI.items()}
VOCAB = 3 + len(CHARS)
MAX_LEN = 48


def encode(text: str) -> list[int]:
    return [STOI[c] for c in text]


def decode(ids: list[int]) -> str:
    out = []
    for i in ids:
        if i == EOS:
            break
        out.append(ITOS.get(i, "?"))
    return "".join(out)


# ---- tasks --------------------------------------------------------------------------
def _num(rng: random.Random, max_digits: int) -> int:
    d = rng.randint(1, max_digits)
    return rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1)


def _digits(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(rng.randint(lo, hi)))


def gen_add(rng):
    a, b = _num(rng, 3), _num(rng, 3)
    return f"{a}+{b}=", f"{a + b}"


def gen_rev(rng):
    s = _digits(rng, 3, 7)
    return f"R{s}=", s[::-1]


def gen_copy(rng):
    s = _digits(rng, 3, 7)
    return f"C{s}=", s


def gen_chain(rng, lo=1, hi=99):
    a, b, c = (rng.randint(lo, hi) for _ in range(3))
    return f"{a}+{b}+{c}=", f"{a}+{b}={a + b},{a + b}+{c}={a + b + c}"


def gen_chain_ood(rng):
    return gen_chain(rng, 100, 333)


def gen_chain4(rng):
    """Second OOD variant: one step more (four terms of 1-99)."""
    a, b, c, d = (rng.randint(1, 99) for _ in range(4))
    return (
        f"{a}+{b}+{c}+{d}=",
        f"{a}+{b}={a + b},{a + b}+{c}={a + b + c},{a + b + c}+{d}={a + b + c + d}",
    )


BASE_TASKS = {"add": gen_add, "rev": gen_rev, "copy": gen_copy}


def unique_set(gen, n: int, seed: int, exclude: set[str] = frozenset()) -> list[tuple[str, str]]:
    """``n`` distinct (prompt, answer) from ``gen`` with ``seed``, none in ``exclude``.

    A generator's range is not known here, so the draw is bounded (100 n draws); a range
    with fewer distinct problems than asked ends it with a ValueError, never with a
    silently shorter set (which would score every run on fewer items than configured).
    """
    rng = random.Random(seed)
    seen, out = set(exclude), []
    tries = 0
    while len(out) < n and tries < 100 * n:
        tries += 1
        p, a = gen(rng)
        if p not in seen:
            seen.add(p)
            out.append((p, a))
    if len(out) < n:
        name = getattr(gen, "__name__", gen)
        raise ValueError(
            f"{name} gave {len(out)} distinct problems outside the excluded ones in {tries} "
            f"draws; {n} were asked: its range is too small for this set"
        )
    return out


# ---- model --------------------------------------------------------------------------
def make_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=MAX_LEN,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def example(prompt: str, answer: str) -> dict[str, list[int]]:
    p = [BOS] + encode(prompt)
    a = encode(answer) + [EOS]
    return {"input_ids": p + a, "labels": [-100] * len(p) + a}


collate = make_collate(PAD)


@torch.no_grad()
def greedy(model, prompts: list[str], max_new: int = 9, batch: int = 512) -> list[str]:
    outs: list[str] = []
    for s in range(0, len(prompts), batch):
        chunk = [[BOS] + encode(p) for p in prompts[s : s + batch]]
        ids, mask = left_pad(chunk, PAD)
        done = torch.zeros(len(chunk), dtype=torch.bool)
        gen = []
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cur, past = ids, None
        for _ in range(max_new):  # KV cache: one new token per step
            out = model(
                input_ids=cur,
                attention_mask=mask,
                position_ids=pos,
                past_key_values=past,
                use_cache=True,
            )
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, EOS), nxt)
            gen.append(nxt)
            done |= nxt == EOS
            if done.all():
                break
            cur = nxt[:, None]
            mask = torch.cat([mask, torch.ones_like(cur)], 1)
            pos = pos[:, -1:] + 1
        gen = torch.stack(gen, 1).tolist()
        outs.extend(decode(g) for g in gen)
    return outs


def correct(model, items, final_only: bool) -> list[bool]:
    """Per item, whether the greedy answer is right (kept for paired bootstrap intervals)."""
    preds = greedy(model, [p for p, _ in items], max_new=max(len(a) for _, a in items) + 2)
    if final_only:  # the number after the last "=" is the final answer
        return [
            pr.split("=")[-1] == a.split("=")[-1] and pr != ""
            for pr, (_, a) in zip(preds, items, strict=True)
        ]
    return [pr == a for pr, (_, a) in zip(preds, items, strict=True)]


def accuracy(model, items, final_only: bool) -> float:
    ok = correct(model, items, final_only)
    return sum(ok) / max(1, len(ok))


def evaluator(sets: dict[str, list]):
    def evaluate(model) -> dict[str, float]:
        out = {
            "val_in_domain": accuracy(model, sets["val"], True),
            "in_domain": accuracy(model, sets["test"], True),
            "ood": accuracy(model, sets["ood"], True),
            "ood_steps": accuracy(model, sets["ood_steps"], True),
        }
        for name in BASE_TASKS:
            out[f"retention_{name}"] = accuracy(model, sets[name], False)
        out["retention"] = sum(out[f"retention_{n}"] for n in BASE_TASKS) / len(BASE_TASKS)
        return {k: round(v, 4) for k, v in out.items()}

    return evaluate


# ---- base model ---------------------------------------------------------------------
def pretrain_base(cfg: dict, log) -> tuple[Any, dict]:
    """Train the base model on the base skills (plain CE, own loop: not a compared run)."""
    torch.manual_seed(0)
    model = make_model(0)
    rng = random.Random(12345)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["base_lr"], weight_decay=0.0)
    steps, bs = cfg["base_steps"], cfg["base_batch"]
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warm)
            * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(s / steps * 3.14159)).item()))
        ),
    )
    gens = list(BASE_TASKS.values())
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        batch = collate([example(*rng.choice(gens)(rng)) for _ in range(bs)])
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % max(1, steps // 10) == 0:
            log(f"  base step {step + 1}/{steps} loss {loss.item():.4f}")
    model.eval()
    return model, {"base_train_time_s": round(time.perf_counter() - t0, 1)}
