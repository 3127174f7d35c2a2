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

    def register(self, cfg: Any) -> None:
        """Axolotl hands every loaded plugin the unparsed config before validating it
        (0.19: plugins the config lists; 0.21: those and every installed entry point):
        refuse misspelt otr keys and bad values here, as one clean line (``args.py``)."""
        from .args import check_config

        check_config(cfg)

    def get_input_args(self) -> str:
        return "axolotl_otr.args.OTRArgs"

    def pre_lora_load(self, cfg: Any, model: Any) -> None:
        """Seed the adapter's initialisation with ``seed``, as Axolotl 0.21 does itself.

        Axolotl 0.19 creates the LoRA weights from an unseeded generator, so two runs of
        one config differ from the first update on. Only under ``otr: true`` (the non-OTR
        path stays Axolotl's), and only when the config sets ``seed``.
        """
        if cfg.get("otr") and cfg.get("seed") is not None:
            from transformers import set_seed

            set_seed(int(cfg.get("seed")))

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
        from .trainer.training_choices import watch_ce

        trainer.otr_named_best_metric = cfg.get("metric_for_best_model")
        install_otr(trainer, OTRSettings.from_cfg(cfg))
        # Axolotl's loss watchdog reads the OTR loss; watch the cross-entropy instead.
        watch_ce(trainer, cfg.get("loss_watchdog_threshold"), cfg.get("loss_watchdog_patience"))


def _base_trainer_cls(cfg: Any) -> type:
    """The class Axolotl would use for this causal-LM run: ``trainer_cls`` or its own.

    A model whose support profile brings its own trainer (Axolotl 0.21: diffusion LMs)
    computes its own, non-causal loss; OTR refuses it instead of silently replacing it.
    """
    custom = cfg.get("trainer_cls")
    if custom:
        module, _, name = str(custom).rpartition(".")
        return getattr(importlib.import_module(module), name)
    try:
        from axolotl.model_support import get_model_support_for_cfg, resolve_model_support
    except ImportError:  # Axolotl 0.19 has no model support profiles
        pass
    else:
        profile = resolve_model_support(get_model_support_for_cfg(cfg))
        factory = None if profile is None else profile.strategies.trainer_cls
        own = None if factory is None else factory(cfg)
        if own is not None:
            raise ValueError(
                f"otr: true cannot be used with this model: Axolotl trains it with its own "
                f"trainer ({own.__name__}), whose loss is not a causal-LM token loss"
            )
    from axolotl.core.trainers.base import AxolotlTrainer

    return AxolotlTrainer
