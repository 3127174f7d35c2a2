"""Shared pieces of the OTR-vs-SFT study: methods, the HF Trainer run, stats.

Every fine-tuning run goes through a plain ``transformers.Trainer`` with the loss put in
place by ``axolotl_otr.install_otr``, the same hook the Axolotl plugin uses,
so SFT, DFT and OTR differ only in the objective the hook computes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from axolotl_otr import OTRSettings, install_otr
from axolotl_otr.objective import Objective


@dataclass(frozen=True)
class Method:
    name: str
    objective: Objective


def otr(
    k: int = 256,
    kappa: float = 1.3,
    beta: float = -0.1,
    estimator: str = "sampled",
    sft_mix: float = 0.0,
):
    return Objective(
        "otr",
        num_samples=k,
        temperature=kappa,
        beta=beta,
        estimator=estimator,
        sft_mix=sft_mix,
    )


# The methods compared everywhere (the paper's defaults for OTR), and the remedy for
# weak priors: lambda * cross-entropy mixed into the sampled OTR weights (otr_sft_mix).
METHODS = [
    Method("sft", Objective("sft")),
    Method("dft", Objective("dft")),
    Method("otr_sampled", otr()),
    Method("otr_exact", otr(estimator="exact")),
    Method("otr_mix0.1", otr(sft_mix=0.1)),
    Method("otr_mix0.3", otr(sft_mix=0.3)),
]
METHOD_BY_NAME = {m.name: m for m in METHODS}


@torch.no_grad()
def token_measures(model, batches) -> dict[str, float]:
    """What a user can read off their own data before training (issue 16, step 7): over
    the target tokens of ``batches`` (collated, teacher-forced), the mean probability the
    model gives the target and the share of targets that are the model's argmax. The
    plugin logs the same from a user's first step (``otr/first_window_*``)."""
    p_sum = torch.zeros((), dtype=torch.float64)  # a sum over thousands of tokens
    hits = torch.zeros((), dtype=torch.long)
    n = torch.zeros((), dtype=torch.long)
    for batch in batches:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        labels = batch["labels"][:, 1:]
        logits = out.logits[:, :-1].float()
        mask = labels != -100
        target = labels.clamp(min=0)
        p = logits.softmax(-1).gather(-1, target[..., None])[..., 0]
        p_sum += (p * mask).sum(dtype=torch.float64)
        hits += ((logits.argmax(-1) == target) & mask).sum()
        n += mask.sum()
    return {
        "p_target": round(float(p_sum / n), 4),
        "argmax_share": round(float(hits / n), 4),
        "tokens": int(n),
    }


class RunCache:
    """One JSON file per finished run, named by a hash of everything that defines it.

    A long experiment killed at any point restarts where it stopped: a run whose
    configuration (model level, method settings, LR, seed, steps, data sizes...) is
    already on disk is read back instead of trained again. Change anything in the
    configuration and the key changes, so a stale result is never reused.
    """

    def __init__(self, folder: str | None):
        self.folder = folder
        if folder:
            os.makedirs(folder, exist_ok=True)

    @staticmethod
    def key(config: dict[str, Any]) -> str:
        blob = json.dumps(config, sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    def path(self, config: dict[str, Any]) -> str | None:
        return os.path.join(self.folder, self.key(config) + ".json") if self.folder else None

    def get(self, config: dict[str, Any]) -> dict | None:
        path = self.path(config)
        if path and os.path.exists(path):
            with open(path) as f:
                return json.load(f)["result"]
        return None

    def put(self, config: dict[str, Any], result: dict) -> None:
        path = self.path(config)
        if path:
            write_json(path, {"config": config, "result": result})


def method_config(method: Method) -> dict[str, Any]:
    """The settings that define a method (its name alone could be reused for others)."""
    o = method.objective
    return {
        "name": method.name,
        "objective": o.kind,
        "num_samples": o.num_samples,
        "temperature": o.temperature,
        "beta": o.beta,
        "estimator": o.estimator,
        "sft_mix": o.sft_mix,
    }


def next_lr_grid(
    grid: list[float], scores: dict[float, tuple], ladder: list[float]
) -> float | None:
    """The LR to add when the best score sits at an edge of ``grid``, else None.

    ``ladder`` is the ordered list of allowed LRs; the grid grows one rung outward on the
    side of the best point, until the best point is inside or the ladder ends.
    """
    best = max(grid, key=lambda lr: (scores[lr], -lr))
    ordered = sorted(grid)
    if best == ordered[0]:
        i = ladder.index(ordered[0])
        return ladder[i - 1] if i > 0 else None
    if best == ordered[-1]:
        i = ladder.index(ordered[-1])
        return ladder[i + 1] if i + 1 < len(ladder) else None
    return None


class CurveCallback:
    """Evaluates every ``every`` steps; keeps training wall time apart from eval time."""

    def __init__(
        self,
        every: int,
        evaluate: Callable[[Any], dict[str, float]],
        initial: dict[str, float] | None = None,
    ):
        from transformers import TrainerCallback

        outer = self
        self.every = every
        self.evaluate = evaluate
        self.points: list[dict[str, float]] = []
        self.train_time = 0.0
        self._t0: float | None = None
        self.initial = initial

        class _CB(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kw):
                if outer.initial is not None:  # the untouched base model, evaluated once
                    outer.points.append({"step": 0, "train_time_s": 0.0, **outer.initial})
                else:
                    outer._record(model, 0)
                outer._t0 = time.perf_counter()

            def on_step_end(self, args, state, control, model=None, **kw):
                step = state.global_step
                if step % outer.every == 0 or step == state.max_steps:
                    outer.train_time += time.perf_counter() - outer._t0
                    outer._record(model, step)
                    outer._t0 = time.perf_counter()

        self.callback = _CB()

    def _record(self, model, step: int) -> None:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            point = self.evaluate(model)
        if was_training:
            model.train()
        point = {"step": step, "train_time_s": round(self.train_time, 3), **point}
        self.points.append(point)


def train(
    model,
    train_dataset,
    collator,
    method: Method,
    *,
    lr: float,
    steps: int,
    batch_size: int,
    seed: int,
    warmup_steps: int,
    evaluate: Callable[[Any], dict[str, float]],
    eval_every: int,
    output_dir: str,
    grad_accum: int = 1,
    initial: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Fine-tune ``model`` in place with ``method`` through an HF Trainer + install_otr.

    The LR schedule is constant after a linear warmup, so the first m steps of a run are
    exactly a run of m steps: the learning curve can be read at equal wall time.
    """
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        max_steps=steps,
        learning_rate=lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=warmup_steps,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=max(1, eval_every),
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=seed,
        data_seed=seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train_dataset, data_collator=collator)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the curve and the JSON keep the logs
    install_otr(trainer, OTRSettings(objective=method.objective, seed=seed))
    curve = CurveCallback(eval_every, evaluate, initial)
    trainer.add_callback(curve.callback)
    trainer.train()
    logs = [
        {k: v for k, v in entry.items() if isinstance(v, (int, float))}
        for entry in trainer.state.log_history
        if "loss" in entry
    ]
    return {"curve": curve.points, "train_time_s": round(curve.train_time, 3), "train_logs": logs}


def at_wall_time(curve: list[dict[str, float]], budget_s: float) -> dict[str, float]:
    """The last curve point whose cumulative training time fits within ``budget_s``."""
    fitting = [p for p in curve if p["train_time_s"] <= budget_s * 1.0001]
    return fitting[-1] if fitting else curve[0]


def make_collate(pad_id: int) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """A collator that right-pads ``input_ids`` with ``pad_id`` and ``labels`` with -100."""

    def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
        n = max(len(x["input_ids"]) for x in batch)
        ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, x in enumerate(batch):
            k = len(x["input_ids"])
            ids[i, :k] = torch.tensor(x["input_ids"])
            labels[i, :k] = torch.tensor(x["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return collate


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids left-padded with ``pad_id`` to the longest prompt, and their attention mask."""
    n = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), n), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, n - len(p) :] = torch.tensor(p)
        mask[i, n - len(p) :] = 1
    return ids, mask


class FineTunes:
    """Runs each (method, LR, seed) fine-tune once and records every use of it in ``runs``.

    A run asked for again under another ``setting`` is not retrained: its record is copied
    with the new setting. Finished runs are kept in ``cache`` (a ``RunCache``) under a key
    made of ``identity`` (what the base model and data are), ``cfg`` and the run's own
    method, LR and seed, so an interrupted experiment resumes. ``build_model(seed)`` gives a
    fresh model to fine-tune and ``train_data(seed)`` its training examples; ``cfg`` holds
    steps, batch, warmup and eval_every.
    """

    def __init__(
        self,
        cfg: dict[str, Any],
        *,
        build_model: Callable[[int], Any],
        train_data: Callable[[int], list[dict]],
        collate: Callable[[list[dict]], dict[str, torch.Tensor]],
        evaluate: Callable[[Any], dict[str, float]],
        initial: dict[str, float],
        output_dir: str,
        log: Callable[[str], None],
        name_width: int,
        cache: RunCache | None = None,
        identity: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        needs: tuple[str, ...] = (),
    ):
        self.cfg = cfg
        self.build_model = build_model
        self.train_data = train_data
        self.collate = collate
        self.evaluate = evaluate
        self.initial = initial
        self.output_dir = output_dir
        self.log = log
        self.name_width = name_width  # method-name column width in the log lines
        self.cache = cache or RunCache(None)
        self.identity = identity or {}
        self.extra = extra or {}  # fields added to every run record (e.g. the prior level)
        # fields a cached non-sweep run must hold to be reused (e.g. per-item correctness,
        # added after some runs were cached): a record without them is trained again under
        # the same key, which reproduces it (seeded) and fills them in
        self.needs = needs
        self.runs: list[dict] = []
        self._results: dict[tuple[str, float, int], dict] = {}

    def run_config(self, method: Method, lr: float, seed: int) -> dict[str, Any]:
        train_keys = ("steps", "batch", "warmup", "eval_every")
        return {
            **self.identity,
            "train": {k: self.cfg[k] for k in train_keys},
            "method": method_config(method),
            "lr": lr,
            "seed": seed,
        }

    def one(self, method: Method, lr: float, seed: int, setting: str) -> dict:
        """Fine-tune ``method`` at ``lr`` on ``seed`` (or reuse that run); record and log it."""
        key = (method.name, lr, seed)
        if key in self._results and (
            setting == "sweep" or all(k in self._results[key] for k in self.needs)
        ):
            r = dict(self._results[key], setting=setting)
            self.runs.append(r)
            return r
        config = self.run_config(method, lr, seed)
        cached = self.cache.get(config)
        stale = None
        if cached is not None and setting != "sweep" and any(k not in cached for k in self.needs):
            self.log(f"  {method.name} lr={lr:g} seed={seed}: cached without {self.needs}, rerun")
            stale, cached = cached, None
        if cached is not None:
            r = dict(cached, setting=setting, cached=True)
            self._results[key] = r
            self.runs.append(r)
            return r
        cfg = self.cfg
        model = self.build_model(seed)
        t0 = time.perf_counter()
        out = train(
            model,
            self.train_data(seed),
            self.collate,
            method,
            lr=lr,
            steps=cfg["steps"],
            batch_size=cfg["batch"],
            seed=seed,
            warmup_steps=cfg["warmup"],
            evaluate=self.evaluate,
            eval_every=cfg["eval_every"],
            output_dir=self.output_dir,
            initial=self.initial,
        )
        final = out["curve"][-1]
        r = {
            **self.extra,
            "method": method.name,
            "seed": seed,
            "lr": lr,
            "setting": setting,
            "steps": cfg["steps"],
            **{k: v for k, v in final.items() if k not in ("step", "train_time_s")},
            "train_time_s": out["train_time_s"],
            "wall_s": round(time.perf_counter() - t0, 1),
            "curve": out["curve"],
            "train_logs": out["train_logs"],
        }
        if stale is not None:  # a rerun of a cached run: does it reproduce the old record?
            same = {k: stale.get(k) == r.get(k) for k in ("in_domain", "ood", "retention")}
            r["rerun_reproduces"] = all(same.values())
            if not r["rerun_reproduces"]:
                self.log(f"  rerun differs from the cached record: {same}")
        self.cache.put(config, {k: v for k, v in r.items() if k != "setting"})
        self._results[key] = r
        self.runs.append(r)
        self.log(
            f"  {setting:10s} {method.name:{self.name_width}s} lr={lr:g} seed={seed}: "
            f"id={r['in_domain']:.3f} ood={r['ood']:.3f} ret={r['retention']:.3f} "
            f"val={r['val_in_domain']:.3f} "
            f"train {r['train_time_s']:.1f}s wall {r['wall_s']:.1f}s"
        )
        return r

    def run_methods(
        self, methods: list[Method], lr: float | dict[str, float], seeds: list[int], setting: str
    ) -> None:
        """Every method on every seed (seed by seed) at ``lr``, or at ``lr[method name]``."""
        for seed in seeds:
            for m in methods:
                self.one(m, lr[m.name] if isinstance(lr, dict) else lr, seed, setting)

    def sweep_best_lr(
        self,
        lr_grid: list[float],
        seed: int,
        methods: list[Method] | None = None,
        ladder: list[float] | None = None,
    ) -> dict[str, float]:
        """Sweep ``lr_grid`` for every method on ``seed``; pick the LR with the best
        validation score at the final step: in-domain accuracy, ties broken by the lower
        validation cross-entropy when it is measured (``val_ce``), then the smaller LR.
        With ``ladder``, a best LR at an edge of the grid adds the next rung outward
        (``next_lr_grid``) until it is inside or the ladder ends."""
        best_lr = {}
        for m in methods or METHODS:
            grid = list(lr_grid)
            scores: dict[float, tuple] = {}
            while True:
                for lr in grid:
                    if lr not in scores:
                        r = self.one(m, lr, seed, "sweep")
                        scores[lr] = (r["val_in_domain"], -r.get("val_ce", 0.0))
                more = next_lr_grid(grid, scores, ladder) if ladder else None
                if more is None:
                    break
                grid.append(more)
            best_lr[m.name] = max(grid, key=lambda lr, s=scores: (s[lr], -lr))
        self.log(f"  best LR per method (val, seed {seed}): {best_lr}")
        return best_lr

    def equal_time(
        self, seeds: list[int], methods: list[Method] | None = None, note: str | None = None
    ) -> None:
        """Add ``equal_time`` records: each method's best-LR run read at the last eval point
        within SFT's training time of the same seed (``note`` is added to each if given)."""
        for seed in seeds:
            budget = next(
                r["train_time_s"]
                for r in self.runs
                if r["setting"] == "best_lr" and r["method"] == "sft" and r["seed"] == seed
            )
            for m in methods or METHODS:
                src = next(
                    r
                    for r in self.runs
                    if r["setting"] == "best_lr" and r["method"] == m.name and r["seed"] == seed
                )
                p = at_wall_time(src["curve"], budget)
                record = {
                    **self.extra,
                    "method": m.name,
                    "seed": seed,
                    "lr": src["lr"],
                    "setting": "equal_time",
                    "steps": p["step"],
                    "time_budget_s": budget,
                    **{k: v for k, v in p.items() if k != "step"},
                }
                if note is not None:
                    record["note"] = note
                self.runs.append(record)


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    if len(values) == 1:
        return values[0], 0.0
    return statistics.fmean(values), statistics.stdev(values)


def summarize(runs: list[dict[str, Any]], keys=("in_domain", "ood", "retention")) -> list[dict]:
    """Mean and sample std over seeds, grouped by (prior level, setting, method)."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        # sweep and trade-off runs: one row per LR
        lr = run.get("lr") if run.get("setting") in ("sweep", "tradeoff") else None
        key = (run.get("level"), run.get("setting", ""), run["method"], lr)
        groups.setdefault(key, []).append(run)
    rows = []
    for (level, setting, method, _), items in groups.items():
        row = {"setting": setting, "method": method, "n_seeds": len(items)}
        if level is not None:
            row["level"] = level
            row["base_in_domain"] = items[0].get("base_in_domain")
        row["lr"] = sorted({r.get("lr") for r in items})
        for key in keys + ("train_time_s", "steps"):
            vals = [r[key] for r in items if r.get(key) is not None]
            m, s = mean_std(vals)
            row[key] = {"mean": round(m, 4), "std": round(s, 4)}
        rows.append(row)
    return rows


def table(rows: list[dict], keys=("in_domain", "ood", "retention")) -> str:
    levels = any("level" in r for r in rows)
    lead = "| level | base id " if levels else ""
    head = lead + "| setting | method | LR | seeds | " + " | ".join(keys) + " | train s | steps |"
    out = [head, "|" + "---|" * (len(keys) + 6 + (2 if levels else 0))]
    for r in rows:
        cells = [f"{r[k]['mean']:.3f} ± {r[k]['std']:.3f}" for k in keys]
        lrs = ", ".join(f"{x:g}" for x in r["lr"])
        first = f"| {r['level']} | {r['base_in_domain']:.3f} " if levels else ""
        out.append(
            first
            + f"| {r['setting']} | {r['method']} | {lrs} | {r['n_seeds']} | "
            + " | ".join(cells)
            + f" | {r['train_time_s']['mean']:.1f} | {r['steps']['mean']:.0f} |"
        )
    return "\n".join(out)


METRICS = ("in_domain", "ood", "retention")


def paired_differences(runs: list[dict], setting: str = "best_lr") -> dict:
    """{(level, method, metric): [method - sft on each seed]} over the runs of ``setting``."""
    by_key = {
        (r.get("level", "real"), r["method"], r["seed"]): r
        for r in runs
        if r.get("setting") == setting
    }
    out: dict[tuple, list[float]] = {}
    for (level, method, seed), r in by_key.items():
        sft = by_key.get((level, "sft", seed))
        if method == "sft" or sft is None:
            continue
        for metric in METRICS:
            if r.get(metric) is not None and sft.get(metric) is not None:
                out.setdefault((level, method, metric), []).append(r[metric] - sft[metric])
    return out


def difference_table(payload: dict, metric: str, setting: str = "best_lr") -> str:
    """Markdown: one row per prior level, one column per method: method - SFT on
    ``metric`` (paired by seed, mean ± sample std, n seeds), next to SFT's own value."""
    runs = payload["runs"]
    levels = payload.get("levels") or [{"level": "real", "base": payload["base_model"]}]
    methods = [m for m in dict.fromkeys(r["method"] for r in runs) if m != "sft"]
    diffs = paired_differences(runs, setting)
    head = f"| level | base {metric} | sft {metric} | " + " | ".join(f"{m} - sft" for m in methods)
    out = [head + " |", "|" + "---|" * (3 + len(methods))]
    for lv in levels:
        level = lv["level"]
        sft = [
            r[metric]
            for r in runs
            if r.get("setting") == setting
            and r["method"] == "sft"
            and r.get("level", "real") == level
        ]
        if not sft:
            continue
        m, s = mean_std(sft)
        cells = []
        for method in methods:
            d = diffs.get((level, method, metric), [])
            dm, ds = mean_std(d)
            cells.append(f"{dm:+.3f} ± {ds:.3f} ({len(d)})" if d else "-")
        base = lv["base"].get(metric, float("nan"))
        out.append(f"| {level} | {base:.3f} | {m:.3f} ± {s:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def write_json(path: str, payload: dict) -> None:
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    # A temporary name per writer: two shards may write the same record (the base
    # evaluation) at the same moment, and a shared ".tmp" name let one replace the
    # other's file away.
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def set_threads() -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
