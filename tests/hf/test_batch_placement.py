"""Where the loss's inputs come from when one process drives several devices.

- ``device_map: auto`` over two GPUs: the logits (or hidden states) sit on the last
  device, the batch's labels and ``position_ids`` on the first. The loss moves them, as
  the HF loss does. Without two devices the labels are a tensor that behaves as if it
  lived elsewhere: any use other than moving it to the activations' device fails the
  way a real device mix fails.
- DataParallel (one process, several GPUs): the Trainer hands ``num_items_in_batch`` as
  [n_gpu, 1] (the count repeated per replica) and multiplies the loss by n_gpu; the
  loss of the gathered batch must still be the loss of one big batch.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from axolotl_otr.loss import otr_loss, otr_loss_from_hidden
from axolotl_otr.objective import Objective, OTRSettings
from axolotl_otr.trainer import install_otr
from tests.support.trainer_setup import build_trainer, make_examples

VOCAB = 512
ALLOWED = {torch.Tensor.dim, torch.Tensor.numel, torch.Tensor.size}
PROPERTIES = {torch.Tensor.shape.__get__, torch.Tensor.ndim.__get__}


class Elsewhere(torch.Tensor):
    """A CPU tensor that acts as if it were on another device: it can only be moved."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            if func is torch.Tensor.device.__get__:
                return torch.device("meta")
            if func in ALLOWED or func in PROPERTIES:
                return func(*args, **kwargs)
            if func is torch.Tensor.to:
                target = kwargs.get("device", args[1] if len(args) > 1 else None)
                if isinstance(target, torch.Tensor):
                    target = target.device
                if isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu":
                    return args[0].clone()
        raise RuntimeError(
            f"Expected all tensors to be on the same device ({func.__name__} got a tensor "
            "of another device)"
        )


def elsewhere(tensor: torch.Tensor) -> Elsewhere:
    return tensor.as_subclass(Elsewhere)


def batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 32, (2, 10), generator=gen)
    labels[:, :2] = -100
    positions = torch.cat([torch.arange(4), torch.arange(6)]).expand(2, 10)
    return labels, positions


def test_the_fake_device_fails_like_a_real_device_mix():
    labels, _ = batch()
    with pytest.raises(RuntimeError, match="same device"):
        torch.zeros(3).index_select(0, elsewhere(labels[0, :3].clamp(0, 2)))
    assert type(elsewhere(labels).to("cpu")) is torch.Tensor


@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_labels_and_positions_on_another_device_are_moved(path):
    labels, positions = batch()
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 10, 16, generator=gen, requires_grad=True)
    weight = torch.randn(32, 16, generator=gen, requires_grad=True)

    def loss_of(labels, positions):
        common = dict(position_ids=positions, estimator="exact", num_items_in_batch=torch.tensor(9))
        if path == "logits":
            return otr_loss(hidden @ weight.T, labels, **common)
        return otr_loss_from_hidden(hidden, weight, labels, **common)

    expected = loss_of(labels, positions)
    got = loss_of(elsewhere(labels), elsewhere(positions))
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_a_count_of_several_elements_outside_the_trainer_is_a_clear_error():
    labels, _ = batch()
    with pytest.raises(ValueError, match="one-element tensor"):
        otr_loss(torch.randn(2, 10, 32), labels, num_items_in_batch=torch.tensor([[8], [8]]))


def _compute_loss(trainer, inputs, items):
    trainer.model.train()
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, dict(inputs), num_items_in_batch=items).item()


@pytest.mark.parametrize("normalization", ["token", "sequence"])
@pytest.mark.parametrize("fused", [True, False])
def test_data_parallel_count_per_replica_gives_the_one_batch_loss(
    tiny_dir, tmp_path, fused, normalization
):
    examples = make_examples(4, VOCAB)
    inputs = {k: torch.stack([e[k] for e in examples]) for k in examples[0]}
    items = int((inputs["labels"][:, 1:] != -100).sum())
    settings = OTRSettings(Objective(estimator="exact"), normalization=normalization, fused=fused)
    trainer, _, _ = build_trainer(
        tiny_dir / "model", tmp_path, examples, micro_batch=4, accumulation=1, settings=settings
    )
    single = _compute_loss(trainer, inputs, torch.tensor(items))
    # What the Trainer passes and does with 2 GPUs in one process: the count repeated as
    # [n_gpu, 1], the loss multiplied by n_gpu (transformers' TrainingArguments keeps the
    # GPU count in ``_n_gpu``; set here since this machine has none).
    trainer.args._n_gpu = 2
    replicated = torch.tensor(items).unsqueeze(0).expand(2, -1)
    assert replicated.shape == (2, 1)
    assert _compute_loss(trainer, inputs, replicated) == pytest.approx(single, rel=1e-6)


def _data_parallel_trainer(tiny_dir, tmp_path, settings, **args):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "model")
    training_args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **args)
    training_args._n_gpu = 2  # as on a 2-GPU machine without torchrun
    return install_otr(Trainer(model=model, args=training_args), settings)


def test_data_parallel_uses_the_gathered_logits(tiny_dir, tmp_path):
    trainer = _data_parallel_trainer(tiny_dir, tmp_path, OTRSettings(Objective()))
    assert trainer.output_layer.weight_and_bias is None
    assert "DataParallel" in trainer.output_layer.reason


def test_data_parallel_without_averaged_counts_is_refused_in_token_mode(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="average_tokens_across_devices"):
        _data_parallel_trainer(
            tiny_dir, tmp_path, OTRSettings(Objective()), average_tokens_across_devices=False
        )
    sequence = OTRSettings(Objective(), normalization="sequence")
    trainer = _data_parallel_trainer(
        tiny_dir, tmp_path, sequence, average_tokens_across_devices=False
    )
    assert trainer.otr_settings is sequence
