"""Stable import path of ``install_otr`` and ``OTRSettings`` for non-Axolotl users.

``from axolotl_otr.trainer_hook import OTRSettings, install_otr`` keeps working; the
implementation lives in ``trainer.py`` (the trainer mixin) and ``objective.py``.
"""

from __future__ import annotations

from .objective import Objective, OTRSettings
from .trainer import OTRTrainerMixin, install_otr, with_otr

__all__ = ["OTRSettings", "OTRTrainerMixin", "Objective", "install_otr", "with_otr"]
