"""The public OTR loss, in the Hugging Face causal-LM convention.

Labels are aligned with ``input_ids`` and shifted here; ``ignore_index`` positions are
skipped; with ``position_ids`` (sample packing) no target is scored across a packed
sequence boundary. Normalization follows ``docs/algorithm.md``: by default the summed
per-token loss is divided by ``num_items_in_batch`` (the trainer's count of target
tokens in the whole global batch), so gradient accumulation and data parallelism give
the gradient of one big batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels.fused import fused_linear_loss, fused_logits_loss
from .kernels.transform import LogitTransform
from .metrics import stats_to_metrics
from .objective import (
    DEFAULT_BETA,
    DEFAULT_COMPILE,
    DEFAULT_ESTIMATOR,
    DEFAULT_NORMALIZATION,
    DEFAULT_NUM_SAMPLES,
    DEFAULT_OBJECTIVE,
    DEFAULT_SFT_MIX,
    DEFAULT_TEMPERATURE,
    NORMALIZATIONS,
    Objective,
    OTRConfigError,
    OTRSettings,
    check_choice,
)

IGNORE_INDEX = -100


@dataclass
class Targets:
    """The scored positions of a batch, flattened to rows of [batch * seq]."""

    rows: torch.Tensor  # [N] int64 row index into the flattened batch
    tokens: torch.Tensor  # [N] int64 target token id
    scale: torch.Tensor  # [N] fp32 normalization weight
    count: int  # N
    sequences: int | None = None  # (packed) sequences with a target; ``sequence`` mode only


def select_targets(
    labels: torch.Tensor,
    *,
    normalization: str = "token",
    num_items_in_batch: int | float | torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> Targets:
    """Shift labels, drop ignored and cross-boundary targets, and weight each position.

    ``num_items_in_batch`` counts the normalization units of the global batch: target
    tokens for ``token``, sequences for ``sequence`` (the paper's mean over sequences of
    each sequence's mean token loss). Without it the local batch is its own global batch.
    """
    check_choice("otr_normalization", normalization, NORMALIZATIONS)
    if labels.dim() == 1:
        labels = labels.unsqueeze(0)
    if labels.dim() != 2:
        raise ValueError(f"labels must be [batch, seq], got shape {tuple(labels.shape)}")
    shifted = torch.full_like(labels, ignore_index)
    shifted[:, :-1] = labels[:, 1:]
    starts = None
    if position_ids is not None:
        position_ids = _broadcast_positions(position_ids, labels)
        starts = position_ids == 0
        shifted[:, :-1].masked_fill_(starts[:, 1:], ignore_index)
    flat = shifted.reshape(-1)
    rows = (flat != ignore_index).nonzero().view(-1)
    tokens = flat.index_select(0, rows)
    count = rows.numel()
    if normalization == "token":
        denom = _as_float(num_items_in_batch, default=count)
        scale = torch.full((count,), 1.0, dtype=torch.float32, device=labels.device)
        scale /= max(denom, 1e-12) if count else 1.0
        return Targets(rows=rows, tokens=tokens, scale=scale, count=count)

    segment = sequence_ids(labels.shape, starts, labels.device).view(-1)[rows]
    per_segment = torch.bincount(segment)
    sequences = int((per_segment > 0).sum())
    denom = _as_float(num_items_in_batch, default=sequences)
    scale = 1.0 / (per_segment[segment].to(torch.float32) * max(denom, 1e-12))
    return Targets(rows=rows, tokens=tokens, scale=scale, count=count, sequences=sequences)


def _broadcast_positions(position_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``position_ids`` as [batch, seq]: one [seq] or [1, seq] row applies to every row."""
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    if (
        position_ids.dim() != 2
        or position_ids.shape[-1] != labels.shape[-1]
        or (position_ids.shape[0] not in (1, labels.shape[0]))
    ):
        raise ValueError(
            f"position_ids {tuple(position_ids.shape)} do not fit labels "
            f"{tuple(labels.shape)}: expected [batch, seq] or [1, seq]"
        )
    return position_ids.to(labels.device).expand(labels.shape)


def sequence_ids(
    shape: torch.Size, starts: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """Id of the (packed) sequence each position belongs to, unique across the batch."""
    new_seq = torch.zeros(shape, dtype=torch.bool, device=device)
    if starts is not None:
        new_seq |= starts
    new_seq[:, 0] = True
    return new_seq.view(-1).cumsum(0).view(shape) - 1


def count_sequences(
    labels: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> int:
    """Number of (packed) sequences with at least one target: ``sequence`` mode's unit."""
    return select_targets(
        labels, normalization="sequence", position_ids=position_ids, ignore_index=ignore_index
    ).sequences


def _as_float(value: int | float | torch.Tensor | None, default: int) -> float:
    if value is None:
        return float(default)
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"num_items_in_batch must be a number or a one-element tensor, got shape "
                f"{tuple(value.shape)}"
            )
        value = value.item()
    return float(value)


def otr_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    temperature: float = DEFAULT_TEMPERATURE,
    beta: float = DEFAULT_BETA,
    estimator: str = DEFAULT_ESTIMATOR,
    normalization: str = DEFAULT_NORMALIZATION,
    num_items_in_batch: int | torch.Tensor | None = None,
    objective: str = DEFAULT_OBJECTIVE,
    sft_mix: float = DEFAULT_SFT_MIX,
    position_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    return_metrics: bool = False,
    compile: bool = DEFAULT_COMPILE,
):
    """One-Token Rollout loss of causal-LM ``logits`` [batch, seq, vocab].

    The keywords are the settings of ``docs/algorithm.md`` (``objective`` is
    ``Objective.kind``). Returns the scalar loss, or ``(loss, stats)`` with
    ``return_metrics=True``, where ``stats`` is the summed statistics vector
    (``STAT_NAMES``; turn it into means with ``stats_to_metrics``). A batch without any
    target token gives a zero loss that is still connected to ``logits`` (zero gradient).
    """
    settings = OTRSettings(
        Objective(objective, num_samples, temperature, beta, estimator, sft_mix),
        normalization=normalization,
        chunk_size=chunk_size,
        compile=compile,
    )
    loss, stats = weighted_loss(
        logits, labels, settings, num_items_in_batch=num_items_in_batch,
        position_ids=position_ids, generator=generator, ignore_index=ignore_index,
    )  # fmt: skip
    return (loss, stats) if return_metrics else loss


def otr_loss_from_hidden(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    lm_head_bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    temperature: float = DEFAULT_TEMPERATURE,
    beta: float = DEFAULT_BETA,
    estimator: str = DEFAULT_ESTIMATOR,
    normalization: str = DEFAULT_NORMALIZATION,
    num_items_in_batch: int | torch.Tensor | None = None,
    objective: str = DEFAULT_OBJECTIVE,
    sft_mix: float = DEFAULT_SFT_MIX,
    position_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    return_metrics: bool = False,
    compile: bool = DEFAULT_COMPILE,
):
    """``otr_loss`` of ``hidden_states @ lm_head_weight.T (+ bias)``, never holding the
    logits of the whole batch: they are computed, used and dropped chunk by chunk.
    ``lm_head_weight`` may be any differentiable tensor (tied, or base + LoRA delta).
    ``logit_scale`` and ``logit_softcap``: the model's logits are
    ``softcap * tanh(scale * r / softcap)`` (or ``scale * r``) of the output layer's
    ``r = h W^T + b``, as in Cohere/Granite (scale) and Gemma 2 (soft-cap 30)."""
    settings = OTRSettings(
        Objective(objective, num_samples, temperature, beta, estimator, sft_mix),
        normalization=normalization,
        chunk_size=chunk_size,
        compile=compile,
    )
    loss, stats = weighted_loss(
        hidden_states, labels, settings, lm_head=(lm_head_weight, lm_head_bias),
        num_items_in_batch=num_items_in_batch, position_ids=position_ids,
        generator=generator, ignore_index=ignore_index,
        logit_transform=LogitTransform(logit_scale, logit_softcap),
    )  # fmt: skip
    return (loss, stats) if return_metrics else loss


def weighted_loss(
    activations: torch.Tensor,
    labels: torch.Tensor,
    settings: OTRSettings,
    *,
    lm_head: tuple | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    ignore_index: int = IGNORE_INDEX,
    logit_transform: LogitTransform | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss and summed statistics for already validated ``settings``.

    ``activations`` are logits [batch, seq, vocab], or hidden states [batch, seq, D] when
    ``lm_head`` gives the output layer's (weight, bias), or (weight, bias, (A, B)) with a
    LoRA adapter kept low-rank (``output_layer``: A [r, D], B [V, r] with its scaling).
    ``logit_transform`` (hidden states only): the model's logits are that transform of
    the output layer's output (``transform.py``; measured by ``exactness.py``).
    The trainer calls this directly with its one settings object;
    ``otr_loss``/``otr_loss_from_hidden`` build that object from their keywords.
    """
    vocab_size = lm_head[0].shape[0] if lm_head is not None else activations.shape[-1]
    # As the HF loss does: with the model split over devices (device_map: auto) the
    # activations sit on the last one, the batch on the first.
    labels = labels.to(activations.device)
    if position_ids is not None:
        position_ids = position_ids.to(activations.device)
    if activations.dim() == 2:
        activations = activations.unsqueeze(0)
    if activations.dim() != 3 or activations.shape[:2].numel() != labels.numel():
        raise ValueError(
            f"logits/hidden states {tuple(activations.shape)} and labels "
            f"{tuple(labels.shape)} do not match: expected [batch, seq, D] and [batch, seq]"
        )
    targets = select_targets(
        labels.reshape(activations.shape[:2]),
        normalization=settings.normalization,
        num_items_in_batch=num_items_in_batch,
        position_ids=position_ids,
        ignore_index=ignore_index,
    )
    _check_vocab(targets, vocab_size, ignore_index)
    flat = activations.reshape(-1, activations.shape[-1])
    # chunk_size None: fused.default_chunk_size picks it for the device.
    parts = (
        targets.rows, targets.tokens, targets.scale, settings.objective, generator,
        settings.chunk_size, settings.compile,
    )  # fmt: skip
    if lm_head is None:
        if logit_transform is not None and not logit_transform.is_identity:
            raise ValueError("a logit transform applies to hidden states; logits are final")
        return fused_logits_loss(flat, *parts)
    if not torch.is_grad_enabled():
        # An autograd Function sees requires_grad, not the grad mode: under no_grad
        # (evaluation) it would still fill an fp32 [V, D] weight gradient.
        lm_head = _detached(lm_head)
        flat = flat.detach()
    weight, bias, *low_rank = lm_head
    return fused_linear_loss(
        flat, weight, bias, *parts, low_rank=low_rank[0] if low_rank else None,
        transform=logit_transform,
    )  # fmt: skip


def _detached(value):
    """``value`` (a tensor, None, or nested tuples of them) cut from the autograd graph."""
    if isinstance(value, tuple):
        return tuple(_detached(v) for v in value)
    return value.detach() if isinstance(value, torch.Tensor) else value


def _check_vocab(targets: Targets, vocab_size: int, ignore_index: int) -> None:
    """Every target id must be a token of the vocabulary (one host sync for both bounds)."""
    if not targets.count:
        return
    low, high = torch.stack(torch.aminmax(targets.tokens)).tolist()
    if low < 0:
        raise ValueError(f"labels contain negative ids other than ignore_index={ignore_index}")
    if high >= vocab_size:
        raise ValueError(
            f"a label id ({high}) is outside the vocabulary (size {vocab_size}); "
            "the tokenizer and the model do not match"
        )


__all__ = [
    "OTRConfigError",
    "weighted_loss",
    "count_sequences",
    "otr_loss",
    "otr_loss_from_hidden",
    "select_targets",
    "stats_to_metrics",
]
