"""One-Token Rollout (OTR) fine-tuning for Axolotl (the algorithm: docs/algorithm.md).

The layers, each importing only those above it in this list:

- ``objective``: the settings, their defaults and allowed ranges (pure Python);
- ``kernels/``: the chunked loss math (pure torch);
- ``loss``, ``scaling``, ``metrics``: the public loss functions, how a micro-batch's loss
  is scaled into its window, and the metric names and their sums;
- ``map_reading`` (with ``otr_map.json``): the one-line reading of the measured map;
- ``model/``: what the loss needs from a model (lm_head, hidden state, exactness, path);
- ``trainer/``: the Hugging Face Trainer glue (mixin, sampler state, callbacks);
- ``args``, ``plugin``: the Axolotl glue (config schema, plugin hooks).

Everything public is imported lazily, so ``import axolotl_otr`` stays cheap and works
without Axolotl installed.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "otr_loss": "axolotl_otr.loss",
    "otr_loss_from_hidden": "axolotl_otr.loss",
    "stats_to_metrics": "axolotl_otr.metrics",
    "select_targets": "axolotl_otr.loss",
    "Objective": "axolotl_otr.objective",
    "OTRConfigError": "axolotl_otr.objective",
    "OTRSettings": "axolotl_otr.objective",
    "install_otr": "axolotl_otr.trainer",
    "with_otr": "axolotl_otr.trainer",
    "OTRTrainerMixin": "axolotl_otr.trainer",
    "OTRArgs": "axolotl_otr.args",
    "OTRPlugin": "axolotl_otr.plugin",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'axolotl_otr' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
