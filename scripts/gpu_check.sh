#!/usr/bin/env bash
# The GPU-only checks in one command, sized for a lent single-GPU machine (well inside
# 10 minutes on one H100: every step has its own time limit and the report is written
# whatever happens):
#   bash scripts/gpu_check.sh            # or: make gpu-check
# Figures land in bench/results/gpu/ (loss_speed.json, step_time.json, loss_memory.json,
# pytest.xml and README.md with the tables), and are copied to $OUT when that is set. Uses $PYTHON
# (default python3) with torch (CUDA), transformers, peft and pytest; wheels carried in
# .whl/ (liger-kernel, bitsandbytes: see README, "GPU checks") are installed first into
# /tmp/site. bitsandbytes, flash-attn and axolotl are optional: their checks are skipped,
# and say so, when absent. All checks use sdpa attention, except the flash-attn test.
# GPU_CHECK_DEVICE=cpu bash scripts/gpu_check.sh: a dry run of the pieces on CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=${GPU_CHECK_RESULTS:-bench/results/gpu}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$RESULTS"

if compgen -G ".whl/*.whl" >/dev/null; then
    echo "== installing the carried wheels: $(ls .whl)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

# GPU_CHECK_DEVICE=cpu: a dry run of every piece on tiny shapes (no GPU figures).
DEVICE=${GPU_CHECK_DEVICE:-cuda}
if [[ $DEVICE == cpu ]]; then
    LOSS_ARGS=(--device cpu --quick --hidden 16 --compile)
    STEP_ARGS=(--device cpu --quick --variants sft sft_chunked sft_liger otr_sampled otr_exact
        --heads frozen trainable)
    MEMORY_ARGS=(--device cpu --quick)
else
    LOSS_ARGS=(--device cuda --hidden 896 1536 --vocab 151936 --tokens 2048 --repeats 10
        --warmup 2 --compile)
    STEP_ARGS=(--device cuda --warmup 2 --steps 4 --rounds 1 --heads frozen trainable
        --variants sft sft_chunked sft_liger otr_sampled otr_exact)
    MEMORY_ARGS=(--device cuda)
fi

DEVICE=$DEVICE "$PY" - <<'PY' || exit 1
import os
import torch
if os.environ["DEVICE"] == "cpu":
    print(f"dry run on CPU, torch {torch.__version__}")
else:
    assert torch.cuda.is_available(), "no CUDA GPU is visible: these checks need one"
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  CUDA {torch.version.cuda}")
for name in ("transformers", "peft", "triton", "liger_kernel", "bitsandbytes", "flash_attn", "axolotl"):
    try:
        module = __import__(name)
        print(f"  {name} {getattr(module, '__version__', '?')}")
    except ImportError:
        print(f"  {name}: not installed (its checks are skipped)")
PY

status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep going on failure
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" || { echo "!! $name failed or timed out (exit $?)"; status=1; }
}

step "pytest -m gpu" 140 "$PY" -m pytest -q -rs -m gpu tests/gpu/test_gpu.py \
    --junitxml "$RESULTS/pytest.xml"
step "the loss alone: CE, Liger FLCE, OTR (eager and compiled)" 140 \
    "$PY" -m bench.loss_speed "${LOSS_ARGS[@]}" --json "$RESULTS/loss_speed.json"
step "LoRA training steps through trainer.train(), Qwen2.5-0.5B and 1.5B shapes, bf16, seq 2048, frozen and trainable lm_head" 210 \
    "$PY" -m bench.step_time "${STEP_ARGS[@]}" --json "$RESULTS/step_time.json"
step "the loss's memory ledger, Qwen2.5-0.5B and 7B and Gemma-3-1B lm_head shapes, 2048 and 8192 positions" 80 \
    "$PY" -m bench.loss_memory "${MEMORY_ARGS[@]}" --json "$RESULTS/loss_memory.json"

if [[ $DEVICE == cuda ]] && "$PY" -c "import axolotl, bitsandbytes, flash_attn" 2>/dev/null; then
    echo "== axolotl train: QLoRA + flash-attention + sample packing + OTR on the tiny model"
    "$PY" -m examples.tiny.build_tiny --out .cache/tiny
    mkdir -p outputs
    axolotl train scripts/gpu_check_qlora_flash.yml 2>&1 | tee outputs/gpu-check.log
    "$PY" -m examples.tiny.summarize_run outputs/gpu-check.log
    grep -oE "'(train_runtime|train_steps_per_second|memory/max_allocated \(GiB\))': '[^']*'" \
        outputs/gpu-check.log | tail -3
    gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")
    if (( gpus >= 2 )); then
        echo "== axolotl train on $gpus GPUs (Axolotl's own multi-GPU launch, DDP)"
        # Extra arguments after `--` go to the launcher.
        axolotl train scripts/gpu_check_qlora_flash.yml --launcher torchrun \
            -- --nproc_per_node "$gpus" 2>&1 | tee outputs/gpu-check-ddp.log
        "$PY" -m examples.tiny.summarize_run outputs/gpu-check-ddp.log
    else
        echo "== skipped the multi-GPU axolotl train run: one GPU visible"
    fi
else
    echo "== skipped the axolotl train run: it needs axolotl, bitsandbytes and flash-attn"
fi

"$PY" scripts/gpu_check_report.py "$RESULTS" || status=1
if [[ -n "${OUT:-}" ]]; then
    cp "$RESULTS"/*.json "$RESULTS"/*.xml "$RESULTS"/README.md "$OUT"/ 2>/dev/null
fi
exit $status
