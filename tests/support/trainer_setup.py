"""An HF Trainer around the tiny model with OTR installed, as the plugin installs it.

Used by the trainer-level tests (gradient accumulation, data parallel, resume, eval);
the same hook runs inside `axolotl train` (see tests/e2e/test_axolotl_train.py).
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

from axolotl_otr.objective import Objective, OTRSettings
from axolotl_otr.trainer import install_otr

SEQ_LEN = 24


def make_examples(n: int, vocab: int, seed: int = 0) -> list[dict]:
    """Fixed-length examples with different numbers of target tokens (prompt + padding)."""
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        length = 10 + (5 * i) % (SEQ_LEN - 10)
        prompt = 3 + i % 4
        ids = torch.randint(3, vocab, (SEQ_LEN,), generator=gen)
        labels = ids.clone()
        labels[:prompt] = -100
        labels[length:] = -100
        mask = torch.zeros(SEQ_LEN, dtype=torch.long)
        mask[:length] = 1
        examples.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
    return examples


class GradRecorder(TrainerCallback):
    """Copies every parameter's gradient just before each optimizer step."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append(
            {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        )


class LogRecorder(TrainerCallback):
    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def trainer_args(output_dir, micro_batch: int, accumulation: int, **overrides) -> TrainingArguments:
    """The tests' Trainer arguments: one step, CPU, seeded, no saving, logging or workers."""
    defaults = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=micro_batch,
        per_device_eval_batch_size=micro_batch,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        learning_rate=1e-3,
        max_grad_norm=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    return TrainingArguments(**{**defaults, **overrides})


def build_trainer(
    model_dir,
    output_dir,
    examples,
    *,
    micro_batch: int,
    accumulation: int,
    settings: OTRSettings | None = None,
    otr: bool = True,
    eval_examples=None,
    model_kwargs: dict | None = None,
    wrap_model=None,
    data_collator=None,
    **arg_overrides,
):
    torch.manual_seed(0)
    model_kwargs = {"torch_dtype": torch.float32, **(model_kwargs or {})}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **model_kwargs)
    if wrap_model is not None:
        model = wrap_model(model)
    trainer = Trainer(
        model=model,
        args=trainer_args(output_dir, micro_batch, accumulation, **arg_overrides),
        train_dataset=examples,
        eval_dataset=eval_examples,
        data_collator=data_collator,
    )
    if otr:  # otr=False: the same trainer with plain cross-entropy (a control)
        install_otr(trainer, settings or OTRSettings(Objective(estimator="exact")))
    grads, logs = GradRecorder(), LogRecorder()
    trainer.add_callback(grads)
    trainer.add_callback(logs)
    return trainer, grads, logs
