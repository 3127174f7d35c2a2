"""Two short LoRA trainings (the CE control, then OTR) under one engine, launched by torchrun.

Usage: python -m torch.distributed.run --nproc_per_node N -m tests.distributed.engine_worker
        ENGINE MODEL ADAPTER OUT (MICRO_BATCH ACCUMULATION | one-rank)
ENGINE: ddp, fsdp2, zero2 or zero3. With ``one-rank``: the one-rank check under that
engine instead (``one_rank``). Both runs start from the saved LoRA adapter ADAPTER on the
base model MODEL, on the same 16 examples, for 2 optimizer steps; the OTR run uses a small
chunk (several chunks per micro-batch). Every rank gathers the trained LoRA weights whole
(a collective under FSDP2 and ZeRO-3); rank 0 saves, per run, the logged metrics, those
weights, the evaluation metrics after training (8 more sequences), the loss path and the
lm_head gathers the loss made, to OUT.

What a machine without GPUs lacks, patched here in the test and never in the package:
- DeepSpeed: the HF Trainer sizes DeepSpeed's batch from accelerate's state, which on a
  CPU machine counts one process (``train_batch_size ... 4 != 4 * 1 * 2``). The state is
  set up first as DeepSpeed's over gloo (``ACCELERATE_USE_DEEPSPEED=true``,
  ``PartialState(backend="gloo")``) and the Trainer told to use it
  (``accelerator_config.use_configured_state``). DeepSpeed's CPU accelerator compiles a
  small C++ op on first use; torch caches it (``~/.cache/torch_extensions``).
- FSDP2: accelerate 1.13 turns FSDP on only for GPU-like process groups, so on CPU the
  Trainer would silently train DDP. After the Trainer is built (before OTR attaches and
  before ``train()`` wraps the model) accelerate's state is switched to FSDP with the
  plugin the Trainer made from its own ``fsdp`` arguments.
- ZeRO-2: its optimizer step runs in no-grad mode (``_zero2_step_without_grad``).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

ENGINES = ("ddp", "fsdp2", "zero2", "zero3")
STEPS = 2
CHUNK = 16  # positions per chunk: several chunks per micro-batch


def deepspeed_config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        # every parameter partitioned, the tiny lm_head too (below the default 1e5
        # elements ZeRO-3 would keep it whole, and the loss would gather nothing)
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
    }


def _engine_args(engine: str) -> dict:
    if engine.startswith("zero"):
        return {
            "deepspeed": deepspeed_config(int(engine[-1])),
            "accelerator_config": {"use_configured_state": True},
        }
    if engine == "fsdp2":
        return {
            "fsdp": "full_shard auto_wrap",
            "fsdp_config": {
                "version": 2,
                "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                "reshard_after_forward": True,
            },
        }
    return {}


def _switch_to_fsdp(trainer) -> None:
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    trainer.is_fsdp_enabled = True


def _count_head_gathers(model, sharded) -> list[int]:
    """ZeRO-3: the all-gathers of the lm_head that DeepSpeed really makes inside each loss
    (one entry per loss), counted at DeepSpeed's own entry points (every partitioned
    parameter's ``all_gather`` and ``all_gather_coalesced``: ``GatheredParameters`` and
    the engine's hooks call them) when the head is among the parameters and still only a
    partition, not the plugin's own count."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    head = list(sharded.head.parameters())
    per_loss: list[int] = []
    inside = [False]

    def spy(param, name: str) -> None:
        method = getattr(param, name)

        def counting(*args, **kwargs):
            params = kwargs.get("param_list", kwargs.get("params"))
            params = params if params is not None else (args[0] if args else [param])
            if inside[0] and any(
                q is h and q.ds_status == ZeroParamStatus.NOT_AVAILABLE
                for q in params
                for h in head
            ):
                per_loss[-1] += 1
            return method(*args, **kwargs)

        setattr(param, name, counting)

    for param in (p for p in model.parameters() if hasattr(p, "ds_id")):
        spy(param, "all_gather")
        spy(param, "all_gather_coalesced")
    full = sharded.full

    @contextmanager
    def counted_full():
        per_loss.append(0)
        inside[0] = True
        try:
            with full():
                yield
        finally:
            inside[0] = False

    sharded.full = counted_full
    return per_loss


def _head_unit_gather_counter():
    """FSDP2: a callback that counts the all-gathers of the FSDP unit that owns the lm_head
    (the root under the transformer auto-wrap: embeddings, final norm and head in one
    all-gather), per optimizer step in training and in total in evaluation, for OTR and
    the CE control alike. It hooks in through FSDP2's public ``set_custom_all_gather``
    with torch's own default all-gather, counted, once the Trainer has wrapped the model
    (``on_train_begin``)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather
    from transformers import TrainerCallback

    class Counting(DefaultAllGather):
        calls = 0

        def __call__(self, *args, **kwargs):
            Counting.calls += 1
            return super().__call__(*args, **kwargs)

    class HeadUnitGathers(TrainerCallback):
        def __init__(self):
            self.per_step: list[int] = []
            self.unit_found = False
            self._seen = 0

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            head = next(m for name, m in model.named_modules() if name.endswith("lm_head"))
            owner = None
            for module in model.modules():  # depth first: the last match is the nearest
                if isinstance(module, FSDPModule) and any(m is head for m in module.modules()):
                    owner = module
            if owner is None:
                raise RuntimeError("FSDP2: no unit owns the lm_head after wrapping")
            owner.set_custom_all_gather(Counting())
            self.unit_found = True

        def on_step_end(self, args, state, control, **kwargs):
            self.per_step.append(Counting.calls - self._seen)
            self._seen = Counting.calls

        def since_training(self) -> int:
            return Counting.calls - self._seen

    return HeadUnitGathers()


def _zero2_step_without_grad():
    """ZeRO-1/2 on gloo: a callback that runs DeepSpeed's optimizer step in no-grad mode,
    once the engine exists (``on_train_begin``). After each step DeepSpeed 0.18.9
    all-gathers the updated partitions into its flat bit16 buffers; accelerate calls
    that step from its ``backward`` (grad mode on), and gloo's all-gather writes into
    split views of its output, which autograd refuses in grad mode ("Output 0 of Split
    is a view and is being modified inplace"; NCCL writes the buffer directly, and the
    step's arithmetic makes no gradient). Only this test's optimizer instance is wrapped."""
    import torch
    from transformers import TrainerCallback

    class StepWithoutGrad(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            zero = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
            zero.step = torch.no_grad()(zero.step)

    return StepWithoutGrad()


def _whole_lora_weights(model) -> dict:
    """Every LoRA weight, whole, on every rank (FSDP2 and ZeRO-3 gather them)."""
    import torch
    from torch.distributed.tensor import DTensor

    weights = {}
    for name, param in model.named_parameters():
        if "lora_" not in name:
            continue
        if isinstance(param, DTensor):
            weights[name] = param.full_tensor().detach().clone()
        elif hasattr(param, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([param]):
                weights[name] = param.data.detach().clone()
        else:
            weights[name] = param.detach().clone()
        weights[name] = weights[name].to(torch.float32)
    return weights


def _dtensor_probe():
    """A callback that records whether a LoRA parameter of the model the Trainer trains is
    a DTensor at a step's end (``seen``): FSDP2 really sharded it, not a silent DDP."""
    from torch.distributed.tensor import DTensor
    from transformers import TrainerCallback

    class DTensorProbe(TrainerCallback):
        seen = False

        def on_step_end(self, args, state, control, model=None, **kwargs):
            lora = (p for name, p in model.named_parameters() if "lora_" in name)
            self.seen = self.seen or any(isinstance(p, DTensor) for p in lora)

    return DTensorProbe()


def build(engine: str, model_dir: str, adapter: str, out: Path, micro_batch: int, acc: int, otr):
    """The Trainer of one run (OTR attached when ``otr``), the adapter loaded on the base
    model after the arguments; and whether ZeRO-3 partitioned the model as it loaded."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, Trainer

    from axolotl_otr.objective import Objective, OTRSettings
    from axolotl_otr.trainer import install_otr
    from tests.support.trainer_setup import make_examples, trainer_args

    if engine.startswith("zero"):
        # A second DeepSpeed Trainer in one process: accelerate refuses a second
        # DeepSpeed plugin on its shared state, and transformers keeps the first run's
        # DeepSpeed configuration. Both are reset here, so the two runs start alike (the
        # process group stays).
        from accelerate.state import AcceleratorState
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        AcceleratorState._reset_state()
        unset_hf_deepspeed_config()
    args = trainer_args(
        out.parent / f"trainer-{'otr' if otr else 'ce'}",
        micro_batch,
        acc,
        per_device_eval_batch_size=micro_batch * acc,  # one evaluation batch per process
        max_steps=STEPS,
        learning_rate=1e-2,
        **_engine_args(engine),
    )
    # Loaded after the arguments, as under Axolotl: ZeRO-3 partitions it as it loads
    # (zero.Init), before the Trainer wraps it.
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    partitioned = any(hasattr(p, "ds_id") for p in model.parameters())
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=make_examples(16, 512),
        eval_dataset=make_examples(8, 512, seed=1),
    )
    if engine == "fsdp2":
        _switch_to_fsdp(trainer)
    if otr:
        install_otr(trainer, OTRSettings(Objective(estimator="exact"), chunk_size=CHUNK))
    if engine == "zero2":
        trainer.add_callback(_zero2_step_without_grad())
    return trainer, partitioned


def train(engine: str, model_dir: str, adapter: str, out: Path, micro_batch: int, acc: int, otr):
    """One training run; what rank 0 saves of it."""
    from tests.support.trainer_setup import LogRecorder

    trainer, partitioned = build(engine, model_dir, adapter, out, micro_batch, acc, otr)
    model = trainer.model
    per_loss = None
    if otr:
        sharded = getattr(trainer.output_layer, "sharded", None)
        if engine == "zero3" and sharded is not None:
            per_loss = _count_head_gathers(model, sharded)
    logs = LogRecorder()
    trainer.add_callback(logs)
    dtensors = _dtensor_probe()
    trainer.add_callback(dtensors)
    unit_gathers = _head_unit_gather_counter() if engine == "fsdp2" else None
    if unit_gathers is not None:
        trainer.add_callback(unit_gathers)
    trainer.train()
    # evaluation takes the training's route (the hidden-state path when no logits are kept)
    metrics = trainer.evaluate()
    record = {
        "logs": logs.logs,
        "eval": {k: v for k, v in metrics.items() if k == "eval_loss" or "otr/" in k},
        "weights": _whole_lora_weights(trainer.model),
        "world": trainer.args.world_size,
        "partitioned_at_load": partitioned,
        "lora_dtensor_in_training": dtensors.seen,
    }
    if unit_gathers is not None:
        record["head_unit_gathers_per_step"] = unit_gathers.per_step
        record["head_unit_gathers_in_eval"] = unit_gathers.since_training()
    if otr:
        layer = trainer.output_layer
        record["fused"] = layer.weight_and_bias is not None
        record["reason"] = layer.reason
        sharded = getattr(layer, "sharded", None)  # (absent before issue 34)
        record["sharded"] = None if sharded is None else sharded.engine
        # FSDP2: the unit that owns the head was found in the model the Trainer ran
        record["unit_found"] = getattr(sharded, "unit", None) is not None
        record["head_gathers_per_loss"] = per_loss
    return record


# The one-rank calls (tests/distributed/test_eval_ranks.py) that return under plain CE
# with a sharded engine: the others run a forward (prediction_step, compute_loss) or
# gather the state dict (save_model), collectives of the engine for CE as for OTR.
NO_COLLECTIVE_CALLS = (
    "log_eval_keys", "log_training_keys", "get_eval_dataloader", "get_train_dataloader",
)  # fmt: skip


def one_rank(engine: str, model_dir: str, adapter: str, out: Path) -> dict:
    """Rank 0 alone makes each of ``NO_COLLECTIVE_CALLS`` after training, for the CE
    control and OTR, while the other ranks wait outside any collective (exit 3 after
    ``eval_worker.WAIT_S``); every rank evaluates before and after the stray calls."""

    from tests.distributed.eval_worker import ONE_RANK_CALLS, rank_zero_alone

    saved: dict = {"calls": {}, "evals": {}}
    for variant, otr in (("ce", False), ("otr", True)):
        trainer, _ = build(engine, model_dir, adapter, out, 2, 2, otr)
        trainer.train()  # the model wrapped by the engine, as when callbacks run
        before = trainer.evaluate()
        calls = {name: ONE_RANK_CALLS[name] for name in NO_COLLECTIVE_CALLS}
        rank_zero_alone(trainer, calls, None, out, variant, f"{engine}-{variant}", saved)
        saved["evals"][variant] = {"before": before, "after": trainer.evaluate()}
    return saved


def main() -> None:
    engine, model_dir, adapter, out = sys.argv[1:5]
    if engine not in ENGINES:
        raise SystemExit(f"engine {engine!r} not in {ENGINES}")
    if engine.startswith("zero"):
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        from accelerate import PartialState

        PartialState(backend="gloo")
    import torch

    out = Path(out)
    if sys.argv[5:] == ["one-rank"]:
        saved = one_rank(engine, model_dir, adapter, out)
        if int(os.environ.get("RANK", "0")) == 0:
            torch.save(saved, out)
        return
    micro_batch, acc = sys.argv[5:7]
    runs = {
        name: train(engine, model_dir, adapter, out, int(micro_batch), int(acc), otr)
        for name, otr in (("ce", False), ("otr", True))
    }
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(runs, out)


if __name__ == "__main__":
    main()
