"""The Axolotl plugin: thin hooks that do nothing unless ``otr: true``."""

from __future__ import annotations

from typing import Any

from axolotl.integrations.base import BasePlugin


class OTRPlugin(BasePlugin):
    """Trains with One-Token Rollout instead of cross-entropy when ``otr: true``.

    YAML: ``plugins: [axolotl_otr.OTRPlugin]`` (or the short ``[axolotl_otr]``) and
    ``otr: true``. The loss is installed on the trainer after Axolotl creates it, in the
    trainer's ``compute_loss_func`` slot, so no trainer class is claimed.
    """

    def get_input_args(self) -> str:
        return "axolotl_otr.args.OTRArgs"

    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        if not cfg.get("otr"):
            return
        from .trainer_hook import OTRSettings, install_otr

        install_otr(trainer, OTRSettings.from_cfg(cfg))
