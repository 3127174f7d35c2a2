"""The Axolotl plugin: thin hooks that do nothing unless ``otr: true``.

Like Axolotl's own KD integration, the plugin hands Axolotl its trainer class through
``get_trainer_cls`` (Axolotl's trainer with ``OTRTrainerMixin``), and gives it the run's
settings in ``post_trainer_create``. Should another code path build the trainer (a newer
Axolotl that skips ``get_trainer_cls``), ``install_otr`` still applies the same mixin.
"""

from __future__ import annotations

import importlib
from typing import Any

from axolotl.integrations.base import BasePlugin


class OTRPlugin(BasePlugin):
    """Trains with One-Token Rollout instead of cross-entropy when ``otr: true``.

    YAML: ``plugins: [axolotl_otr.OTRPlugin]`` (or the short ``[axolotl_otr]``) and
    ``otr: true``. See ``docs/algorithm.md`` for what is computed.
    """

    def get_input_args(self) -> str:
        return "axolotl_otr.args.OTRArgs"

    def get_trainer_cls(self, cfg: Any) -> type | None:
        if not cfg.get("otr"):
            return None
        from .trainer import with_otr

        return with_otr(_base_trainer_cls(cfg))

    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        if not cfg.get("otr"):
            return
        from .objective import OTRSettings
        from .trainer import install_otr

        install_otr(trainer, OTRSettings.from_cfg(cfg))


def _base_trainer_cls(cfg: Any) -> type:
    """The class Axolotl would use for a causal-LM run: ``trainer_cls`` or its own."""
    custom = cfg.get("trainer_cls")
    if custom:
        module, _, name = str(custom).rpartition(".")
        return getattr(importlib.import_module(module), name)
    from axolotl.core.trainers.base import AxolotlTrainer

    return AxolotlTrainer
