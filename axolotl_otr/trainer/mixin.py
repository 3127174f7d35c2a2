"""OTR in a Hugging Face / Axolotl trainer, through the Trainer's documented extension points.

Choice: a trainer mixin (``OTRTrainerMixin``), the way Axolotl's own integrations (KD)
change a trainer. It overrides public methods the Trainer documents as overridable
(``compute_loss``, ``log``, ``get_batch_samples``, ``evaluation_loop``) and always calls
``super()``, so Axolotl's and the HF Trainer's own logic keeps running around it. The
loss itself sits in the Trainer's documented ``compute_loss_func`` slot, so the Trainer
keeps counting ``num_items_in_batch`` over the whole accumulation window and scaling for
data parallelism exactly as it does for cross-entropy. The sampler's seed travels with
checkpoints through a stateful callback (``sampler.py``). The hidden-state path takes the
final hidden state through a forward hook that lives for one ``compute_loss`` call
(``capture.py``). Nothing private is touched and no method of an object is replaced.

Collectives: the OTR metrics are summed over processes only where every process is,
at the Trainer's own training log (made by every process while ``control.should_log``)
and at the end of ``evaluation_loop``; never in a log call that one process makes alone
(Axolotl's bench evaluation logs ``eval_bench_*`` keys on rank 0 only). Outside an
evaluation loop, ``prediction_step`` counts the batch's tokens on this process only
(Axolotl's prediction table calls it on rank 0 alone), and its statistics stay out of
the ``eval_otr/*`` sums, which only the loop's own batches make (``docs/multi-gpu.md``).
The first optimizer step's statistics (the base model on the fine-tuning data) are kept
apart and summed once, at the first training log (or the end-of-training log), where
every process is too; only the main process prints the line that places them on the
measured map (``map_reading.py``).

- Axolotl: the plugin returns ``with_otr(AxolotlTrainer)`` from ``get_trainer_cls`` and
  attaches the settings in ``post_trainer_create``.
- A plain ``transformers.Trainer``: ``install_otr(trainer, settings)`` (or construct
  ``with_otr(Trainer)(...)`` and call ``attach_otr(settings)``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from .. import map_reading
from ..loss import count_sequences, weighted_loss
from ..metrics import FIRST_WINDOW, FIRST_WINDOW_KEYS, StatsAccumulator
from ..model.capture import FinalHidden, capture_final_hidden, final_hidden_recorder
from ..model.loss_path import choose_loss_path
from ..model.output_layer import OutputLayer
from ..model.router_loss import router_loss
from ..objective import OTRSettings
from ..scaling import (
    auxiliary_loss,
    count_across_processes,
    global_count,
    window_loss,
    world_factor,
)
from .perplexity import without_loss_perplexity
from .run_guard import RunGuard
from .sampler import OTRSamplerState, StepSampler
from .training_choices import select_best_on_ce

# Under "axolotl." so Axolotl's own log configuration shows these lines.
LOG = logging.getLogger("axolotl.otr")


@dataclass(frozen=True)
class _Call:
    """What one ``compute_loss`` call tells the loss function about its batch."""

    phase: str  # "train" or "eval"
    position_ids: torch.Tensor | None
    hidden: FinalHidden | None  # the captured final hidden state (None: full logits)
    model: torch.nn.Module


class OTRTrainerMixin:
    """Trains with the OTR loss once ``attach_otr`` gave it settings (inert before)."""

    otr_settings: OTRSettings | None = None
    _otr_loss_only = False  # inside an evaluation loop that keeps no logits
    # The metric_for_best_model the user's config names (the plugin sets it before
    # attaching): TrainingArguments hold "loss" both when it is named and when it is not.
    otr_named_best_metric: str | None = None
    _otr_in_eval_loop = False  # inside evaluation_loop, which every process runs

    def attach_otr(self, settings: OTRSettings) -> OTRTrainerMixin:
        """Turn OTR on with ``settings`` (a second call with the same settings is a no-op)."""
        if self.otr_settings is not None:
            if self.otr_settings != settings:
                raise ValueError(
                    f"otr: this trainer already trains with {self.otr_settings}; "
                    f"refusing to switch to {settings}"
                )
            return self
        if getattr(self, "compute_loss_func", None) is not None:
            raise ValueError(
                "otr: the trainer already has a compute_loss_func "
                f"({self.compute_loss_func!r}); another option or plugin replaces the "
                "loss, and OTR would silently override it. Disable one of them."
            )
        self.otr_settings = settings
        if self.args.n_gpu > 1 and not self.args.average_tokens_across_devices:
            if settings.normalization == "token":
                raise ValueError(
                    f"otr: DataParallel over {self.args.n_gpu} GPUs in one process with "
                    "average_tokens_across_devices false: the Trainer hands the loss "
                    "floor(tokens / n_gpu), not the token count. Set "
                    "average_tokens_across_devices: true, or launch one process per GPU "
                    "(torchrun / accelerate launch)."
                )
        counted = count_across_processes(self.args)  # Axolotl sets it false: scaling.py
        if counted is not None:
            LOG.info(counted)
        path = choose_loss_path(self, settings.fused)  # model/loss_path.py
        self.otr_output_layer, self._otr_decoder = path.layer, path.decoder
        if path.fused:
            # Its hook on the decoder exists before any (compiled) forward: capture.py.
            final_hidden_recorder(self._otr_decoder)
        self.otr_metrics = StatsAccumulator()
        self.otr_sampler = StepSampler(settings.seed, self.args.process_index)
        self._otr_call: _Call | None = None
        self._otr_window_sequences: int | None = None
        self._otr_first_window_read = False
        self.compute_loss_func = self._otr_loss_func
        self.add_callback(OTRSamplerState(settings.seed))
        self.add_callback(RunGuard(self))  # no targets, NaN, collapse: run_guard.py
        # Not the OTR loss: training_choices.py.
        best = select_best_on_ce(self.args, named=self.otr_named_best_metric)
        if best is not None:  # a change of what the user's run keeps: say it loudly
            LOG.warning(best)
        LOG.info(
            "OTR on (%s): %s; loss computed %s", type(self).__name__, settings, path.describe()
        )
        return self

    @property
    def output_layer(self) -> OutputLayer:
        """The lm_head accessor of the hidden-state path (``weight_and_bias`` None: logits)."""
        return self.otr_output_layer

    # ---- loss ---------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.otr_settings is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # Training, and evaluation whose logits are thrown away (no compute_metrics),
        # take the chunked path; a prediction loop that keeps the logits needs them all.
        hidden = self.otr_output_layer.weight_and_bias is not None and (
            (model.training and not return_outputs) or (not model.training and self._otr_loss_only)
        )
        if hidden:
            # The lm_head runs on the last position only; the loss projects the rest
            # chunk by chunk from the captured hidden state.
            inputs = {**inputs, "logits_to_keep": 1}
            self.otr_output_layer.before_forward(model)  # FSDP2: model/sharding.py
        capture = capture_final_hidden(self._otr_decoder) if hidden else nullcontext()
        with capture as final_hidden:
            self._otr_call = _Call(
                phase="train" if model.training else "eval",
                position_ids=inputs.get("position_ids"),
                hidden=final_hidden,
                model=model,
            )
            try:
                return super().compute_loss(
                    model, inputs, return_outputs=return_outputs,
                    num_items_in_batch=num_items_in_batch,
                )  # fmt: skip
            finally:
                self._otr_call = None

    def _otr_loss_func(self, outputs, labels, num_items_in_batch=None):
        """The ``compute_loss_func`` the Trainer calls with the model outputs."""
        call = self._otr_call
        if call is None:
            raise RuntimeError("otr: the loss function was called outside compute_loss")
        if labels is None:
            raise ValueError("otr: the batch has no labels; OTR needs target tokens")
        settings = self.otr_settings
        training = call.phase == "train"
        units = global_count(num_items_in_batch)
        if settings.normalization == "sequence":
            units = self._otr_window_sequences if training else None
        # Under FSDP2 / ZeRO-3 the whole lm_head exists in this block only, once per
        # micro-batch (model/sharding.py).
        whole = self.otr_output_layer.whole() if call.hidden is not None else nullcontext()
        with whole:
            if call.hidden is not None:
                lm_head = self.otr_output_layer.weight_and_bias()  # detached under no_grad
                # With device_map the lm_head (tied: next to the embeddings) may sit on
                # another device than the decoder's output; its own forward moves it too.
                activations = call.hidden.take().to(lm_head[0].device)
            else:
                activations = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
                lm_head = None
            generator = self.otr_sampler.generator(
                activations.device, call.phase, self.state.global_step
            )
            # The chunk GEMMs in the autocast dtype the forward ran under (accelerate's mixed
            # precision covers model.forward, not this loss; sums stay fp32): capture.py
            amp = call.hidden.autocast() if call.hidden is not None else nullcontext()
            with amp:
                loss, stats = weighted_loss(
                    activations, labels, settings, lm_head=lm_head, num_items_in_batch=units,
                    position_ids=call.position_ids, generator=generator,
                    # The model's own logits already carry its transform (scale, soft-cap).
                    logit_transform=None if lm_head is None else self.otr_output_layer.transform,
                )  # fmt: skip
        steps = self._otr_accumulation_steps() if training else 1
        world = world_factor(
            num_items_in_batch,
            average_tokens_across_devices=self.args.average_tokens_across_devices,
            n_gpu=self.args.n_gpu,
            num_processes=self.accelerator.num_processes,
            tp_size=getattr(getattr(self.accelerator, "parallelism_config", None), "tp_size", 1),
        )
        loss = window_loss(
            loss, counted=units is not None, steps=steps, world=world, n_gpu=self.args.n_gpu
        )
        aux = router_loss(outputs, call.model)
        if aux is not None:
            loss = loss + auxiliary_loss(aux.to(loss.device), steps=steps, world=world)
        if training or self._otr_in_eval_loop:
            # An eval-mode call outside the loop (a callback's prediction_step) is not
            # part of any evaluation: its batch stays out of the next eval_otr/*.
            self.otr_metrics.add(call.phase, stats)
        if training and self.state.global_step == 0 and not self._otr_first_window_read:
            # Before the first update: the base model's measures on the fine-tuning data.
            self.otr_metrics.add(FIRST_WINDOW, stats)
        return loss

    def _otr_accumulation_steps(self) -> int:
        return getattr(
            self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps
        )

    def get_batch_samples(self, *args, **kwargs):
        """Count the sequences of the accumulation window (``sequence`` normalization)."""
        batch_samples, num_items = super().get_batch_samples(*args, **kwargs)
        if self.otr_settings is not None and self.otr_settings.normalization == "sequence":
            count = sum(
                count_sequences(batch["labels"], batch.get("position_ids"))
                for batch in batch_samples
                if "labels" in batch
            )
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                device = self.args.device
                count = int(self.accelerator.gather(torch.tensor([count], device=device)).sum())
            self._otr_window_sequences = count
        return batch_samples, num_items

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The Trainer's step; outside ``evaluation_loop`` without a collective.

        With a ``compute_loss_func`` the Trainer counts the batch's target tokens over
        all processes (a gather) before the loss. Inside ``evaluation_loop`` every process
        is there and the count is right. Outside it the caller may be one process alone
        (Axolotl's ``LogPredictionCallback`` on rank 0), where the gather would wait for
        ever: count on this process only, the loss is then this batch's own mean.
        """
        if self.otr_settings is None or self._otr_in_eval_loop or self.args.world_size <= 1:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        with _local_token_counts(self.args):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    # ---- logging ------------------------------------------------------------------
    def log(self, logs: dict[str, float], *args, **kwargs):
        """Add the OTR training metrics of the steps since the last log, then log as usual.

        Only the Trainer's training log reduces over processes: it logs ``loss`` on every
        process while ``control.should_log`` (reset by the callbacks' ``on_log`` right
        after), and ``train_loss`` at the end of ``train()``. A log one process makes
        alone (a callback's, even with a ``loss`` key) enters no collective; the sums
        wait for the next training log. Evaluation metrics are added in
        ``evaluation_loop``, which every process runs.
        """
        training_log = "loss" in logs and self.control.should_log
        if self.otr_settings is not None and training_log:
            logs.update(self.otr_metrics.pop_metrics("train", "", self._otr_reduce))
        # The run's first training log, or its end-of-training log if it never logged
        # a loss: both are made by every process.
        first = training_log or "train_loss" in logs
        if self.otr_settings is not None and first and not self._otr_first_window_read:
            logs.update(self._otr_read_first_window())
        if self.otr_settings is not None:  # no exp(OTR loss) as "ppl": perplexity.py
            logs = without_loss_perplexity(self, logs)
        return super().log(logs, *args, **kwargs)

    def _otr_read_first_window(self) -> dict[str, float]:
        """The first window's measures (summed over processes) and, on the main process,
        the line that places them on the measured map. Nothing for a resumed run: its first
        window was not at step 0, so its model is no longer the base model."""
        self._otr_first_window_read = True
        means = self.otr_metrics.pop_means(FIRST_WINDOW, self._otr_reduce)
        if not means["tokens"]:
            return {}
        if self.is_world_process_zero():
            # A map that cannot be read costs its line, never the run.
            try:
                otr_map = map_reading.load_map()
                LOG.info(map_reading.map_line(means["p_target"], means["argmax_share"], otr_map))
            except Exception as err:  # noqa: BLE001
                LOG.warning("OTR map: not read (%s: %s)", type(err).__name__, err)
            else:
                LOG.debug(_full_reading(means, otr_map))
        return {key: round(means[name], 6) for name, key in FIRST_WINDOW_KEYS.items()}

    def evaluation_loop(
        self,
        dataloader,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ):
        """The Trainer's loop, then the OTR metrics of its batches, summed over processes."""
        loss_only = prediction_loss_only
        self._otr_loss_only = self.args.prediction_loss_only if loss_only is None else loss_only
        self._otr_in_eval_loop = True
        if self.otr_settings is not None:
            # Only this loop's batches: nothing left by a loop that raised.
            self.otr_metrics.discard("eval")
        try:
            output = super().evaluation_loop(
                dataloader, description, prediction_loss_only=prediction_loss_only,
                ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix,
            )  # fmt: skip
        finally:
            self._otr_loss_only = False
            self._otr_in_eval_loop = False
        if self.otr_settings is not None:
            prefix = f"{metric_key_prefix}_"
            output.metrics.update(self.otr_metrics.pop_metrics("eval", prefix, self._otr_reduce))
        return output

    def _otr_reduce(self, stats: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes <= 1:
            return stats
        return self.accelerator.reduce(stats.to(self.accelerator.device), reduction="sum")


def _full_reading(means: dict[str, float], otr_map: dict[str, Any]) -> str:
    """The map's full reasoning for the debug log (any error: a line saying so)."""
    try:
        return map_reading.read_map(
            means["p_target"], means["argmax_share"], otr_map, tokens=int(means["tokens"])
        )
    except Exception as err:  # noqa: BLE001
        return f"OTR map: no full reading ({type(err).__name__}: {err})"


@contextmanager
def _local_token_counts(args) -> Iterator[None]:
    """The Trainer counts tokens on this process only (``average_tokens_across_devices``
    off, the documented switch of that gather) for the duration of the block."""
    previous = args.average_tokens_across_devices
    args.average_tokens_across_devices = False
    try:
        yield
    finally:
        args.average_tokens_across_devices = previous


@functools.cache
def with_otr(trainer_cls: type) -> type:
    """``trainer_cls`` with OTR: a subclass whose MRO puts ``OTRTrainerMixin`` first."""
    if issubclass(trainer_cls, OTRTrainerMixin):
        return trainer_cls
    return type(f"OTR{trainer_cls.__name__}", (OTRTrainerMixin, trainer_cls), {})


def install_otr(trainer: Any, settings: OTRSettings) -> OTRTrainerMixin:
    """Attach OTR to an existing ``transformers.Trainer`` (or subclass) instance.

    The instance becomes an instance of ``with_otr(type(trainer))``: a subclass that adds
    overrides of public methods; none of the instance's methods are replaced. Returns the
    trainer (idempotent for the same settings).
    """
    if not isinstance(trainer, OTRTrainerMixin):
        trainer.__class__ = with_otr(type(trainer))
    return trainer.attach_otr(settings)
