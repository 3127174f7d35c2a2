"""The public OTR loss, in the Hugging Face causal-LM convention.

Labels are aligned with ``input_ids`` and shifted here; ``ignore_index`` positions are
skipped; with ``position_ids`` (sample packing) no target is scored across a packed
sequence boundary. Normalization follows ``shared/OTR.md``: by default the summed
per-token loss is divided by ``num_items_in_batch`` (the trainer's count of target
tokens in the whole global batch), so gradient accumulation and data parallelism give
the gradient of one big batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .chunk_math import STAT_NAMES
from .fused import fused_linear_loss, fused_logits_loss
from .objective import (
    DEFAULT_BETA,
    DEFAULT_NUM_SAMPLES,
    DEFAULT_SFT_MIX,
    DEFAULT_TEMPERATURE,
    Objective,
    OTRConfigError,
    validate_normalization,
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
    validate_normalization(normalization)
    if labels.dim() == 1:
        labels = labels.unsqueeze(0)
    if labels.dim() != 2:
        raise ValueError(f"labels must be [batch, seq], got shape {tuple(labels.shape)}")
    shifted = torch.full_like(labels, ignore_index)
    shifted[:, :-1] = labels[:, 1:]
    starts = None
    if position_ids is not None:
        position_ids = position_ids.reshape(labels.shape).to(labels.device)
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
        value = value.item()
    return float(value)


def _objective(objective, num_samples, temperature, beta, estimator, sft_mix) -> Objective:
    return Objective(
        objective=objective,
        num_samples=num_samples,
        temperature=temperature,
        beta=beta,
        estimator=estimator,
        sft_mix=sft_mix,
    )


def stats_to_metrics(stats: torch.Tensor) -> dict[str, float]:
    """Means per target token from the summed statistics of any number of batches."""
    values = stats.detach().double().cpu().tolist()
    tokens = values[0]
    metrics = {"tokens": tokens}
    for name, total in zip(STAT_NAMES[1:], values[1:], strict=True):
        metrics[name] = total / tokens if tokens else float("nan")
    return metrics


def otr_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    temperature: float = DEFAULT_TEMPERATURE,
    beta: float = DEFAULT_BETA,
    estimator: str = "sampled",
    normalization: str = "token",
    num_items_in_batch: int | torch.Tensor | None = None,
    objective: str = "otr",
    sft_mix: float = DEFAULT_SFT_MIX,
    position_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    return_metrics: bool = False,
    compile: bool = False,
):
    """One-Token Rollout loss of causal-LM ``logits`` [batch, seq, vocab].

    Returns the scalar loss, or ``(loss, stats)`` with ``return_metrics=True``, where
    ``stats`` is the summed statistics vector (``STAT_NAMES``; turn it into means with
    ``stats_to_metrics``). A batch without any target token gives a zero loss that is
    still connected to ``logits`` (zero gradient). ``compile`` runs the per-chunk math
    through ``torch.compile`` (config key ``otr_compile``).
    """
    flat, targets, obj, chunk = _prepare(
        logits, labels, logits.shape[-1], objective, num_samples, temperature, beta,
        estimator, sft_mix, normalization, num_items_in_batch, position_ids, ignore_index,
        chunk_size,
    )  # fmt: skip
    loss, stats = fused_logits_loss(
        flat, targets.rows, targets.tokens, targets.scale, obj, generator, chunk, compile
    )
    return (loss, stats) if return_metrics else loss


def otr_loss_from_hidden(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    lm_head_bias: torch.Tensor | None = None,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    temperature: float = DEFAULT_TEMPERATURE,
    beta: float = DEFAULT_BETA,
    estimator: str = "sampled",
    normalization: str = "token",
    num_items_in_batch: int | torch.Tensor | None = None,
    objective: str = "otr",
    sft_mix: float = DEFAULT_SFT_MIX,
    position_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    return_metrics: bool = False,
    compile: bool = False,
):
    """``otr_loss`` of ``hidden_states @ lm_head_weight.T (+ bias)``, never holding the
    logits of the whole batch: they are computed, used and dropped chunk by chunk.
    ``lm_head_weight`` may be any differentiable tensor (tied, or base + LoRA delta)."""
    flat, targets, obj, chunk = _prepare(
        hidden_states, labels, lm_head_weight.shape[0], objective, num_samples, temperature,
        beta, estimator, sft_mix, normalization, num_items_in_batch, position_ids,
        ignore_index, chunk_size,
    )  # fmt: skip
    loss, stats = fused_linear_loss(
        flat,
        lm_head_weight,
        lm_head_bias,
        targets.rows,
        targets.tokens,
        targets.scale,
        obj,
        generator,
        chunk,
        compile,
    )
    return (loss, stats) if return_metrics else loss


def _prepare(
    activations: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    objective: str,
    num_samples: int,
    temperature: float,
    beta: float,
    estimator: str,
    sft_mix: float,
    normalization: str,
    num_items_in_batch: int | float | torch.Tensor | None,
    position_ids: torch.Tensor | None,
    ignore_index: int,
    chunk_size: int | None,
) -> tuple[torch.Tensor, Targets, Objective, int | None]:
    """Validate the settings and shapes; flatten [batch, seq, D] to rows; pick targets."""
    obj = _objective(objective, num_samples, temperature, beta, estimator, sft_mix)
    if activations.dim() == 2:
        activations = activations.unsqueeze(0)
    if activations.dim() != 3 or activations.shape[:2].numel() != labels.numel():
        raise ValueError(
            f"logits/hidden states {tuple(activations.shape)} and labels "
            f"{tuple(labels.shape)} do not match: expected [batch, seq, D] and [batch, seq]"
        )
    targets = select_targets(
        labels.reshape(activations.shape[:2]),
        normalization=normalization,
        num_items_in_batch=num_items_in_batch,
        position_ids=position_ids,
        ignore_index=ignore_index,
    )
    _check_vocab(targets, vocab_size, ignore_index)
    flat = activations.reshape(-1, activations.shape[-1])
    return flat, targets, obj, chunk_size  # None: fused.default_chunk_size, per device


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
    "count_sequences",
    "otr_loss",
    "otr_loss_from_hidden",
    "select_targets",
    "stats_to_metrics",
]
