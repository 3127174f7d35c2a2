"""Installs OTR on a Hugging Face / Axolotl trainer instance, without replacing its class.

The loss goes in the trainer's ``compute_loss_func`` slot, so the Trainer's own logic
keeps counting ``num_items_in_batch`` over the whole accumulation window and scaling for
data parallelism exactly as it does for cross-entropy. A thin wrapper around
``compute_loss`` asks the model for its last hidden state instead of full logits when
the chunked path is exact for this model (see ``output_layer``), and a wrapper around
``log`` adds the OTR metrics to every training and evaluation log.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from .loss import count_sequences, otr_loss, otr_loss_from_hidden
from .metrics import StatsAccumulator
from .objective import DEFAULT_COMPILE, Objective, validate_normalization
from .output_layer import OutputLayer, resolve_output_layer

# Under "axolotl." so Axolotl's own log configuration shows these lines.
LOG = logging.getLogger("axolotl.otr")

SAMPLER_STATE_FILE = "otr_sampler_state_rank{rank}.pt"


@dataclass(frozen=True)
class OTRSettings:
    """Everything the trainer hook needs, read once from the Axolotl config."""

    objective: Objective
    normalization: str = "token"
    fused: bool = True
    chunk_size: int | None = None
    seed: int = 42
    compile: bool = DEFAULT_COMPILE

    def __post_init__(self) -> None:
        validate_normalization(self.normalization)

    @classmethod
    def from_cfg(cls, cfg: Any) -> OTRSettings:
        def get(key: str, default: Any) -> Any:
            value = cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key, None)
            return default if value is None else value

        objective = Objective(
            objective=get("otr_objective", "otr"),
            num_samples=get("otr_num_samples", Objective.num_samples),
            temperature=get("otr_temperature", Objective.temperature),
            beta=get("otr_beta", Objective.beta),
            estimator=get("otr_estimator", "sampled"),
            sft_mix=get("otr_sft_mix", Objective.sft_mix),
        )
        return cls(
            objective=objective,
            normalization=get("otr_normalization", "token"),
            fused=bool(get("otr_fused", True)),
            chunk_size=get("otr_chunk_size", None),
            seed=int(get("otr_seed", get("seed", 42))),
            compile=get("otr_compile", DEFAULT_COMPILE),
        )


class OTRTrainerHook:
    """The OTR loss, metrics and sampler state attached to one trainer."""

    def __init__(self, trainer: Any, settings: OTRSettings) -> None:
        self.trainer = trainer
        self.settings = settings
        self.accumulator = StatsAccumulator()
        self.output_layer = self._choose_path()
        self._generator: torch.Generator | None = None
        self._pending_sampler_state: torch.Tensor | None = None
        self._position_ids: torch.Tensor | None = None
        self._use_hidden = False
        self._phase = "train"
        self._window_sequences: int | None = None

    # ---- installation -------------------------------------------------------------
    def install(self) -> OTRTrainerHook:
        trainer = self.trainer
        existing = getattr(trainer, "_otr_hook", None)
        if existing is not None:
            return existing
        if getattr(trainer, "compute_loss_func", None) is not None:
            raise ValueError(
                "otr: the trainer already has a compute_loss_func "
                f"({trainer.compute_loss_func!r}); another option or plugin replaces the "
                "loss, and OTR would silently override it. Disable one of them."
            )
        trainer.compute_loss_func = self.loss_func
        self._orig_compute_loss = trainer.compute_loss
        trainer.compute_loss = self.compute_loss
        self._orig_log = trainer.log
        trainer.log = self.log
        self._orig_load_rng_state = getattr(trainer, "_load_rng_state", None)
        if self._orig_load_rng_state is not None:
            trainer._load_rng_state = self._load_rng_state
        if self.settings.normalization == "sequence":
            self._orig_get_batch_samples = trainer.get_batch_samples
            trainer.get_batch_samples = self.get_batch_samples
        from transformers import TrainerCallback

        hook = self

        class _SaveSamplerState(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                hook.save_sampler_state(
                    os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
                )

        trainer.add_callback(_SaveSamplerState())
        trainer._otr_hook = self
        path = (
            "chunked from hidden states"
            if self.output_layer.weight_and_bias
            else (f"from full logits ({self.output_layer.reason})")
        )
        LOG.info("OTR on: %s; loss computed %s", self.settings, path)
        return self

    def _choose_path(self) -> OutputLayer:
        if not self.settings.fused:
            return OutputLayer(None, "otr_fused is false")
        trainer = self.trainer
        if getattr(trainer, "is_fsdp_enabled", False):
            return OutputLayer(None, "FSDP shards the lm_head outside the forward pass")
        if getattr(trainer, "is_deepspeed_enabled", False) and _zero3(trainer):
            return OutputLayer(None, "DeepSpeed ZeRO-3 partitions the lm_head")
        return resolve_output_layer(trainer.model)

    # ---- loss ---------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Record what the loss needs from the batch, then run the trainer's own path."""
        self._phase = "train" if model.training else "eval"
        self._position_ids = inputs.get("position_ids")
        self._use_hidden = (
            self.output_layer.weight_and_bias is not None and model.training and not return_outputs
        )
        if self._use_hidden:
            inputs = {**inputs, "logits_to_keep": 1, "output_hidden_states": True}
        return self._orig_compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )

    def loss_func(self, outputs, labels, num_items_in_batch=None):
        """The ``compute_loss_func`` the Trainer calls with the model outputs."""
        if labels is None:
            raise ValueError("otr: the batch has no labels; OTR needs target tokens")
        training = self._phase == "train"
        units = num_items_in_batch
        if self.settings.normalization == "sequence":
            units = self._window_sequences if training else None
        kwargs = dict(
            objective=self.settings.objective.objective,
            num_samples=self.settings.objective.num_samples,
            temperature=self.settings.objective.temperature,
            beta=self.settings.objective.beta,
            estimator=self.settings.objective.estimator,
            sft_mix=self.settings.objective.sft_mix,
            normalization=self.settings.normalization,
            num_items_in_batch=units,
            position_ids=self._position_ids,
            chunk_size=self.settings.chunk_size,
            compile=self.settings.compile,
            return_metrics=True,
        )
        if self._use_hidden:
            hidden = outputs.hidden_states[-1]
            weight, bias = self.output_layer.weight_and_bias()
            kwargs["generator"] = self.generator(hidden.device)
            loss, stats = otr_loss_from_hidden(hidden, weight, labels, lm_head_bias=bias, **kwargs)
        else:
            logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
            kwargs["generator"] = self.generator(logits.device)
            loss, stats = otr_loss(logits, labels, **kwargs)
        if training and units is None:
            # No window count: each micro-batch is its own mean, so average the window.
            loss = loss / self.trainer.current_gradient_accumulation_steps
        self.accumulator.add(self._phase, stats)
        return loss

    def get_batch_samples(self, *args, **kwargs):
        """Count the sequences of the accumulation window (``sequence`` normalization)."""
        batch_samples, num_items = self._orig_get_batch_samples(*args, **kwargs)
        count = sum(
            count_sequences(batch["labels"], batch.get("position_ids"))
            for batch in batch_samples
            if "labels" in batch
        )
        trainer = self.trainer
        if trainer.args.average_tokens_across_devices and trainer.args.world_size > 1:
            device = trainer.args.device
            count = int(trainer.accelerator.gather(torch.tensor([count], device=device)).sum())
        self._window_sequences = count
        return batch_samples, num_items

    # ---- sampler ------------------------------------------------------------------
    def generator(self, device: torch.device) -> torch.Generator:
        """The seeded token sampler of this process, created on the loss's device."""
        if self._generator is None or self._generator.device != device:
            rank = getattr(self.trainer.args, "process_index", 0)
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.settings.seed + 1_000_003 * rank)
            if self._pending_sampler_state is not None:
                self._generator.set_state(self._pending_sampler_state)
                self._pending_sampler_state = None
        return self._generator

    def save_sampler_state(self, checkpoint_dir: str) -> None:
        if self._generator is None or not os.path.isdir(checkpoint_dir):
            return
        rank = getattr(self.trainer.args, "process_index", 0)
        torch.save(
            self._generator.get_state(),
            os.path.join(checkpoint_dir, SAMPLER_STATE_FILE.format(rank=rank)),
        )

    def _load_rng_state(self, checkpoint: str | None, *args, **kwargs):
        result = self._orig_load_rng_state(checkpoint, *args, **kwargs)
        if checkpoint is not None:
            rank = getattr(self.trainer.args, "process_index", 0)
            path = os.path.join(checkpoint, SAMPLER_STATE_FILE.format(rank=rank))
            if os.path.isfile(path):
                self._pending_sampler_state = torch.load(path)
                self._generator = None
                LOG.info("OTR sampler state restored from %s", path)
            else:
                LOG.warning("OTR: no sampler state in %s; sampling restarts from the seed", path)
        return result

    # ---- logging ------------------------------------------------------------------
    def log(self, logs: dict[str, float], *args, **kwargs):
        """Add the OTR metrics of the steps since the last log, then log as usual."""
        if "loss" in logs:
            logs.update(self.accumulator.pop_metrics("train", "", self._reduce))
        elif any(key.startswith("eval_") for key in logs):
            logs.update(self.accumulator.pop_metrics("eval", "eval_", self._reduce))
        return self._orig_log(logs, *args, **kwargs)

    def _reduce(self, stats: torch.Tensor) -> torch.Tensor:
        accelerator = getattr(self.trainer, "accelerator", None)
        if accelerator is None or accelerator.num_processes <= 1:
            return stats
        return accelerator.reduce(stats, reduction="sum")


def _zero3(trainer: Any) -> bool:
    plugin = getattr(getattr(trainer.accelerator, "state", None), "deepspeed_plugin", None)
    return bool(plugin is not None and getattr(plugin, "zero_stage", 0) == 3)


def install_otr(trainer: Any, settings: OTRSettings) -> OTRTrainerHook:
    """Attach OTR to ``trainer`` (idempotent: a second call returns the first hook)."""
    return OTRTrainerHook(trainer, settings).install()
