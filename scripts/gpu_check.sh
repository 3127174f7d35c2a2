#!/usr/bin/env bash
# The GPU-only checks in one command (CUDA, bf16, 4-bit QLoRA, flash-attention, packing):
#   bash scripts/gpu_check.sh            # or: make gpu-check
# Uses $PYTHON (default python3) as it is: it needs torch with CUDA, transformers, peft
# and pytest; bitsandbytes, flash-attn and axolotl are optional (their checks are
# skipped, and say so, when absent). Imports this package from the source tree.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PY" - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA GPU is visible: these checks need one"
print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  CUDA {torch.version.cuda}")
for name in ("transformers", "peft", "bitsandbytes", "flash_attn", "axolotl"):
    try:
        module = __import__(name)
        print(f"  {name} {getattr(module, '__version__', '?')}")
    except ImportError:
        print(f"  {name}: not installed (its checks are skipped)")
PY

echo "== pytest -m gpu"
"$PY" -m pytest -v -rs -m gpu tests/test_gpu.py

echo "== loss and step benchmarks on the GPU"
"$PY" bench/loss_speed.py --device cuda
"$PY" bench/step_time.py --device cuda

if "$PY" -c "import axolotl, bitsandbytes, flash_attn" 2>/dev/null; then
    echo "== axolotl train: QLoRA + flash-attention + sample packing + OTR on the tiny model"
    "$PY" examples/tiny/build_tiny.py --out .cache/tiny
    mkdir -p outputs
    axolotl train scripts/gpu_check_qlora_flash.yml 2>&1 | tee outputs/gpu-check.log
    "$PY" examples/tiny/summarize_run.py outputs/gpu-check.log
    grep -oE "'(train_runtime|train_steps_per_second|memory/max_allocated \(GiB\))': '[^']*'" \
        outputs/gpu-check.log | tail -3
    gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")
    if (( gpus >= 2 )); then
        echo "== axolotl train on $gpus GPUs (Axolotl's own multi-GPU launch, DDP)"
        # Extra arguments after `--` go to the launcher.
        axolotl train scripts/gpu_check_qlora_flash.yml --launcher torchrun \
            -- --nproc_per_node "$gpus" 2>&1 | tee outputs/gpu-check-ddp.log
        "$PY" examples/tiny/summarize_run.py outputs/gpu-check-ddp.log
    else
        echo "== skipped the multi-GPU axolotl train run: one GPU visible"
    fi
else
    echo "== skipped the axolotl train run: it needs axolotl, bitsandbytes and flash-attn"
fi
