"""`make demo`: SmolLM2-135M-Instruct fine-tuned with OTR through `axolotl train`, on CPU,
scored on held-out problems before and after.

Usage (from the repository root; `make demo` and `make demo-sft` run these)::

    python -m examples.smollm2.demo                 # OTR (the smollm2-135m-otr-lora.yml config)
    python -m examples.smollm2.demo --sft           # the same config with otr: false
    python -m examples.smollm2.demo --prepare-only  # model folder and data files only

Steps: convert the GGUF once (``smollm2_model.ensure_model``), write the train and
held-out files from fixed seeds (``tasks``), score the base model, run ``axolotl train``
(its output streamed and saved to a log), summarize the OTR metrics and plot them, score
the adapter on the same sets, print a before/after table with 95% intervals (with the
other objective's column when its results exist in this checkout).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from examples.smollm2 import smollm2_tasks as tasks
from examples.smollm2.smollm2_model import SetupError, ensure_model

ROOT = Path(__file__).resolve().parents[2]

CONFIG = ROOT / "examples" / "configs" / "smollm2-135m-otr-lora.yml"
DATA_DIR = Path(".cache") / "smollm2-demo" / "data"
SETS = ("in_domain", "ood", "retention")
ROW_NAMES = {"in_domain": "in-domain", "ood": "OOD", "retention": "retention"}
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "AXOLOTL_DO_NOT_TRACK": "1"}


def _summarize_run():
    """examples/tiny/summarize_run.py: the log parser and plot the tiny demo uses too."""
    from examples.tiny import summarize_run

    return summarize_run


def read_config(path: Path) -> dict:
    if not path.is_file():
        raise SetupError(f"no such config: {path}; the demo's is {CONFIG.relative_to(ROOT)}")
    cfg = yaml.safe_load(path.read_text())
    for key in ("base_model", "datasets", "output_dir", "max_steps", "micro_batch_size"):
        if not cfg.get(key):
            raise SetupError(f"{path} has no {key}; copy it from {CONFIG.relative_to(ROOT)}")
    return cfg


def check_dataset_path(cfg: dict, config: Path, data_dir: Path) -> None:
    """The config must train on the demo's generated file, which the held-out sets exclude."""
    want = (data_dir / "train.jsonl").resolve()
    given = Path(cfg["datasets"][0].get("path", ""))
    if given.resolve() == want:
        return
    if not given.exists():
        raise SetupError(
            f"dataset path {given} (in {config}) does not exist; the demo writes its data "
            f"to {want}: set datasets[0].path to it, or run with --data-dir {given.parent}"
        )
    raise SetupError(
        f"{config} trains on {given}, but the demo's held-out sets exclude {want} only: "
        f"set datasets[0].path to {want}"
    )


def prepare(cfg: dict, data_dir: Path, sizes: dict[str, int], log) -> dict[str, list[dict]]:
    """Convert the model once; write the train and held-out files (deterministic)."""
    steps = int(cfg["max_steps"])
    n_train = steps * int(cfg["micro_batch_size"]) * int(cfg.get("gradient_accumulation_steps", 1))
    try:
        sets = tasks.build_sets(n_train, sizes["in_domain"], sizes["ood"])
    except ValueError as error:  # more problems asked for than the task has
        raise SetupError(f"{error}; lower max_steps x micro_batch_size or --n-in-domain") from None
    ensure_model(log, model_dir=str(cfg["base_model"]))
    sets["retention_pool"] = tasks.retention_pool(sizes["products"], sizes["facts"])
    tasks.write_jsonl([tasks.chat_row(item) for item in sets["train"]], data_dir / "train.jsonl")
    for name in ("in_domain", "ood", "retention_pool"):
        tasks.write_jsonl(sets[name], data_dir / f"{name}.jsonl")
    log(
        f"data in {data_dir}: {n_train} training problems, {sizes['in_domain']} in-domain and "
        f"{sizes['ood']} OOD held-out, {len(sets['retention_pool'])} retention candidates"
    )
    return sets


def fingerprint(model_dir: Path, sets: dict[str, list[dict]]) -> str:
    """Names what the scores depend on (model weights' config, held-out items, scorer)."""
    from examples.smollm2 import smollm2_eval as evaluate

    digest = hashlib.sha256((model_dir / "config.json").read_bytes())
    digest.update((model_dir / "model.safetensors").read_bytes()[: 1 << 20])
    for name in ("in_domain", "ood", "retention_pool"):
        digest.update(json.dumps(sets[name]).encode())
    digest.update(str(evaluate.MAX_NEW_TOKENS).encode())
    return digest.hexdigest()[:16]


def start_base_scoring(model_dir: Path, sets: dict, data_dir: Path, threads: int, log):
    """Start scoring the base model in the background (it runs next to `axolotl train`);
    return (the function that waits for its scores, the function that cancels it).
    Cached in the data folder under the scores' fingerprint."""
    from examples.smollm2 import smollm2_eval as evaluate

    key = fingerprint(model_dir, sets)
    cache = data_dir / "base_scores.json"
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("fingerprint") == key:
            log(f"base model scores: read from {cache} (same model and problems)")
            return (lambda: cached), (lambda: None)
    names = ("in_domain", "ood", "retention_pool")
    scoring = evaluate.Scoring(
        model_dir, None, {n: sets[n] for n in names}, 1, threads, log=data_dir / "scoring.log"
    )
    start = time.perf_counter()

    def finish() -> dict:
        scores = scoring.wait()
        pool = scores["retention_pool"]
        kept = [item for item, ok in zip(sets["retention_pool"], pool["right"], strict=True) if ok]
        if not kept:
            raise SetupError("the base model answers no retention question right; check it")
        scores.update(fingerprint=key, retention_set=kept)
        scores["seconds_waited"] = round(time.perf_counter() - start, 1)
        cache.write_text(json.dumps(scores, indent=1))
        return scores

    return finish, scoring.cancel


def sft_output_dir(otr_output_dir: str) -> str:
    """Where the SFT twin of a run writes: "-otr-" becomes "-sft-" (or "-sft" is added)."""
    name = str(otr_output_dir)
    return name.replace("-otr-", "-sft-") if "-otr-" in name else name + "-sft"


def run_config(config: Path, cfg: dict, sft: bool) -> tuple[Path, dict]:
    """The YAML `axolotl train` runs: the config itself, or a copy with otr: false."""
    if not sft:
        return config, cfg
    cfg = {**cfg, "otr": False, "output_dir": sft_output_dir(cfg["output_dir"])}
    path = Path(cfg["output_dir"] + ".yml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"# {config} with otr: false (written by examples/smollm2/demo.py --sft)\n"
        + yaml.safe_dump(cfg, sort_keys=False)
    )
    return path, cfg


def axolotl_train(config: Path, log_path: Path, threads: int) -> None:
    """Run `axolotl train CONFIG` as a user would, its output shown live and saved."""
    axolotl = shutil.which("axolotl", path=str(Path(sys.executable).parent)) or shutil.which(
        "axolotl"
    )
    if axolotl is None:
        raise SetupError("the axolotl command is not installed; run: make setup")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # Axolotl re-launches itself through `accelerate`, found on PATH: put this venv's
    # bin first, so the demo also runs with the venv not activated.
    path = os.pathsep.join([str(Path(axolotl).parent), os.environ.get("PATH", "")])
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": str(threads), "PATH": path}
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [axolotl, "train", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        while chunk := proc.stdout.read1(65536):
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
            log_file.write(chunk)
        code = proc.wait()
    if code != 0:
        raise SetupError(f"axolotl train {config} failed (exit {code}); its output: {log_path}")


def table(results: dict[str, dict], base: dict) -> str:
    """Before/after exact-answer accuracy with 95% intervals, one column per objective."""

    def cell(result: dict) -> str:
        low, high = result["ci95"]
        return f"{result['accuracy']:.3f} [{low:.3f}, {high:.3f}]"

    columns = ["base model"] + [f"after {name.upper()}" for name in results]
    lines = [f"{'':<18}" + "".join(f"{c:<24}" for c in columns)]
    for name in SETS:
        if name == "retention":
            n = len(base["retention_set"])
            before = f"1.000 (selected, {n})"
        else:
            n = base[name]["n"]
            before = cell(base[name])
        row = f"{ROW_NAMES[name] + f' ({n})':<18}{before:<24}"
        lines.append(row + "".join(f"{cell(r['after'][name]):<24}" for r in results.values()))
    return "\n".join(lines)


def _headline(result: dict) -> dict:
    """A score without its replies: hits, n, accuracy and interval."""
    return {key: result[key] for key in ("hits", "n", "accuracy", "ci95")}


def gain_points(base: dict, after: dict) -> dict[str, float]:
    """Held-out accuracy after minus before, in points (what CI's demo check reads)."""
    return {
        name: round(100 * (after[name]["accuracy"] - base[name]["accuracy"]), 1)
        for name in ("in_domain", "ood")
    }


def other_results(path: Path, fingerprint_key: str) -> dict | None:
    """The other objective's results, if measured in this checkout on the same problems."""
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    return result if result.get("fingerprint") == fingerprint_key else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=CONFIG.relative_to(ROOT))
    parser.add_argument("--sft", action="store_true", help="the same config with otr: false")
    parser.add_argument("--prepare-only", action="store_true")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--n-in-domain", type=int, default=200)
    parser.add_argument("--n-ood", type=int, default=60)
    parser.add_argument("--n-products", type=int, default=None, help="default: all 36")
    parser.add_argument("--n-facts", type=int, default=None, help="default: all 30")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except SetupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def train(args: argparse.Namespace, cfg: dict, threads: int, log) -> tuple[Path, Path, Path, float]:
    """`axolotl train` on the demo config (or its otr: false twin): (config, adapter, log, s)."""
    config, run_cfg = run_config(args.config, cfg, args.sft)
    output_dir = Path(run_cfg["output_dir"])
    shutil.rmtree(output_dir, ignore_errors=True)  # the scores below are this run's
    if cfg.get("dataset_prepared_path"):  # Axolotl keys it by config, not by file content
        shutil.rmtree(cfg["dataset_prepared_path"], ignore_errors=True)
    log(f"axolotl train {config}  (the base model is scored meanwhile)")
    start = time.perf_counter()
    train_log = Path(str(output_dir) + ".log")
    axolotl_train(config, train_log, threads)
    return config, output_dir, train_log, time.perf_counter() - start


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[demo {time.perf_counter() - start:5.0f} s] {message}", flush=True)

    cfg = read_config(args.config)
    check_dataset_path(cfg, args.config, args.data_dir)
    sizes = {
        "in_domain": args.n_in_domain,
        "ood": args.n_ood,
        "products": args.n_products,
        "facts": args.n_facts,
    }
    sets = prepare(cfg, args.data_dir, sizes, log)
    if args.prepare_only:
        log(f"ready: axolotl train {args.config}")
        return 0
    from examples.smollm2 import smollm2_eval as evaluate

    # Two cores' worth of work at every moment, one OpenMP pool per core-share: the base
    # model is scored while `axolotl train` runs (see evaluate.Scoring).
    threads = max(1, evaluate.cores() // 2)
    model_dir = Path(cfg["base_model"])
    base_scores, cancel = start_base_scoring(model_dir, sets, args.data_dir, threads, log)
    try:
        config, output_dir, train_log, train_s = train(args, cfg, threads, log)
    except BaseException:
        cancel()
        raise
    base = base_scores()

    for name in ("in_domain", "ood"):
        log("base model " + evaluate.summary_line(ROW_NAMES[name], base[name]))
    log(f"retention set: {len(base['retention_set'])} questions the base model answers right")

    summarize_run = _summarize_run()
    logs = summarize_run.parse_logs(train_log.read_text(errors="replace"))
    print(summarize_run.summarize(logs))
    png = summarize_run.plot(logs, output_dir / "otr_metrics.png")

    log("scoring the fine-tuned model")
    after_sets = {"in_domain": sets["in_domain"], "ood": sets["ood"]}
    after_sets["retention"] = base["retention_set"]
    after = evaluate.Scoring(
        model_dir, output_dir, after_sets, 2, threads, log=args.data_dir / "scoring.log"
    ).wait()
    objective = "sft" if args.sft else "otr"
    result = {
        "objective": objective,
        "config": str(config),
        "fingerprint": base["fingerprint"],
        "train_seconds": round(train_s, 1),
        "demo_seconds": round(time.perf_counter() - start, 1),
        "base": {name: _headline(base[name]) for name in ("in_domain", "ood")},
        "gain_points": gain_points(base, after),
        "after": after,
    }
    (output_dir / "demo_results.json").write_text(json.dumps(result, indent=1))
    results = {objective: result}
    other_dir = cfg["output_dir"] if args.sft else sft_output_dir(cfg["output_dir"])
    other = other_results(Path(other_dir) / "demo_results.json", base["fingerprint"])
    if other is not None:
        results = {"otr": other, "sft": result} if args.sft else {"otr": result, "sft": other}
    print()
    print("exact-answer accuracy, greedy, [95% Wilson interval]; (n) problems per set")
    print(table(results, base))
    if "sft" not in results:
        print("SFT column: run `make demo-sft` (the same config with otr: false)")
    gains = result["gain_points"]
    print(
        f"held-out gain over the base model: in-domain {gains['in_domain']:+.1f} points, "
        f"OOD {gains['ood']:+.1f} points"
    )
    print(f"metrics plot: {png.resolve()}")
    print(f"adapter: {output_dir.resolve()}  ({train_s:.0f} s of axolotl train)")
    log("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
