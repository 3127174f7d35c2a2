"""Markdown tables of what ``scripts/gpu_check.sh`` measured, checked against the targets.

Reads ``loss_speed.json``, ``step_time.json``, ``loss_memory.json`` and ``pytest.xml``
from the results folder (each optional: a missing one is reported as missing) and
writes ``README.md`` there.

    python scripts/gpu_check_report.py bench/results/gpu
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

# Targets of issue 9 on a GPU (the CPU has its own, in bench/README.md).
STEP_VS_LIGER = 1.05  # OTR step time and peak memory <= 1.05x SFT + Liger FLCE
LOSS_VS_LIGER = 1.5  # the loss alone <= 1.5x Liger's fused linear CE


def _mark(value: float | None, limit: float) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f} {'(met)' if value <= limit else '(MISSED)'}"


def loss_table(data: dict) -> list[str]:
    lines = [
        f"Loss alone, fwd+bwd, {data['dtype']}, K={data['num_samples']}, median "
        f"(`bench/loss_speed.py`), {data.get('gpu', data['device'])}, torch {data['torch']}:",
        "",
        "| tokens x hidden -> vocab | variant | ms | x CE | x Liger | peak above inputs, MiB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for shape in data["shapes"]:
        figures = shape["ms"]
        ce = figures["ce"]["ms"]
        liger = figures.get("liger_flce", {}).get("ms")
        where = f"{shape['tokens']} x {shape['hidden']} -> {shape['vocab']}"
        for name, fig in figures.items():
            vs_liger = fig["ms"] / liger if liger else None
            shown = _mark(vs_liger, LOSS_VS_LIGER) if name.startswith("otr") else "-"
            if vs_liger is not None and not name.startswith("otr"):
                shown = f"{vs_liger:.3f}"
            lines.append(
                f"| {where} | {name} | {fig['ms']:.2f} | {fig['ms'] / ce:.3f} | "
                f"{shown if liger else 'no Liger'} | {fig['peak_mib']:.1f} |"
            )
    return lines


def step_table(data: dict) -> list[str]:
    lines = [
        f"LoRA training step (r=16, all linear layers), {data['dtype']}, micro-batch 1, "
        f"median (`bench/step_time.py`), {data.get('gpu', data['device'])}, "
        f"torch {data['torch']}:",
        "",
        "| shape | variant | s/step | peak GiB | time x SFT | time x SFT+Liger | mem x SFT+Liger |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for shape in data["shapes"]:
        name = f"{shape['shape']['name']} seq {shape['shape']['seq']}"
        name += f", lm_head {shape.get('head', 'frozen')}"
        for variant, fig in shape["variants"].items():
            otr = variant.startswith("otr")
            t_liger = fig.get("time_vs_sft_liger")
            m_liger = fig.get("mem_vs_sft_liger")
            lines.append(
                f"| {name} | {variant} | {fig['s_per_step']:.3f} | "
                f"{fig['peak_bytes'] / 2**30:.2f} | {fig.get('time_vs_sft', 1.0):.3f} | "
                f"{_mark(t_liger, STEP_VS_LIGER) if otr else '-'} | "
                f"{_mark(m_liger, STEP_VS_LIGER) if otr else '-'} |"
            )
    return lines


def memory_table(data: dict) -> list[str]:
    lines = [
        f"The loss's peak memory above its inputs, fwd+bwd, {data['dtype']} "
        f"(`bench/loss_memory.py`), {data['device']}, torch {data['torch']}: OTR-sampled "
        "against chunked SFT and full-logit SFT (targets <= 1.05x and <= 1.0x), and the "
        "analytic ledger on this device's chunk budget:",
        "",
        "| shape | vocab | tokens | lm_head | OTR MiB | ledger MiB | x chunked SFT "
        "| x full-logit SFT |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in data["rows"]:
        otr = row["otr_sampled"]
        ledger = otr.get("analytic_gpu") if data["device"] == "cuda" else otr.get("analytic_cpu")
        shown = f"{ledger['total_bytes'] / 2**20:.1f}" if ledger else "n/a"
        cap = f", soft-cap {row['softcap']:g}" if row.get("softcap") else ""
        lines.append(
            f"| {row['shape']}{cap} | {row['vocab']} | {row['tokens']} | {row['head']} | "
            f"{otr['measured_bytes'] / 2**20:.1f} | {shown} | "
            f"{_mark(row['otr_vs_sft_chunked'], 1.05)} | {_mark(row['otr_vs_sft_full'], 1.0)} |"
        )
    return lines


def pytest_lines(path: Path) -> list[str]:
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: suite.get(k, "0") for k in ("tests", "failures", "errors", "skipped")}
    lines = [
        f"`pytest -m gpu tests/gpu/test_gpu.py`: {counts['tests']} tests, {counts['failures']} "
        f"failed, {counts['errors']} errors, {counts['skipped']} skipped.",
        "",
    ]
    for case in suite.iter("testcase"):
        for outcome in ("failure", "error", "skipped"):
            found = case.find(outcome)
            if found is not None:
                message = (
                    (found.get("message") or "").splitlines()[0][:160]
                    if found.get("message")
                    else ""
                )
                lines.append(f"- {outcome}: `{case.get('name')}` {message}")
    return lines


def main(argv: list[str] | None = None) -> int:
    folder = Path((argv or sys.argv[1:] or ["bench/results/gpu"])[0])
    out = [
        "# GPU check results",
        "",
        "Written by `make gpu-check` (`scripts/gpu_check.sh`); attention: sdpa. Targets: "
        f"OTR step time and peak memory <= {STEP_VS_LIGER}x SFT + Liger fused linear CE; "
        f"the loss alone <= {LOSS_VS_LIGER}x Liger's.",
        "",
    ]
    sources = {
        "pytest.xml": pytest_lines,
        "loss_speed.json": lambda p: loss_table(json.loads(p.read_text())),
        "step_time.json": lambda p: step_table(json.loads(p.read_text())),
        "loss_memory.json": lambda p: memory_table(json.loads(p.read_text())),
    }
    for name, render in sources.items():
        path = folder / name
        out += render(path) if path.exists() else [f"{name}: missing (that step failed)."]
        out.append("")
    (folder / "README.md").write_text("\n".join(out))
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
