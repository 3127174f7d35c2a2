"""Whether the hidden-state path computes this model's own logits: measured once, on it.

The chunked loss computes ``z = T(h W^T + b)`` from the decoder's final hidden state
``h`` and the lm_head's tensors, with ``T`` a ``LogitTransform`` (identity, a constant
scale, soft-capping). That is the model's own logits only if the model's forward does
exactly that after its decoder. Instead of a list of model types said to do so, the
trainer asks the model, when OTR is attached:

1. One forward pass of a short fixed input (``PROBE_LENGTH`` token ids derived from the
   vocabulary size, no random numbers), under ``no_grad``, in eval mode, without a KV
   cache. A forward hook on the decoder (the module whose output the fused path reads)
   keeps the first ``NATURAL_ROWS`` hidden states as they are and replaces the others by
   power-of-two multiples of them (exact in any float format), chosen so that their
   lm_head outputs reach ``PROBE_MAGNITUDES``: soft-capping or a scale that the natural
   rows of a small or untrained model would hide shows on those rows.
2. The lm_head's output of those same hidden states in float64 (the lm_head read in
   row blocks of ``BLOCK_BYTES``, LoRA factors included), and every candidate transform
   the config names (``SCALE_KEYS``, ``SOFTCAP_KEYS``, each scale and its inverse, and
   the identity) applied to it.
3. The candidate closest to the model's logits is used if its largest relative row error
   (``||model - T(r)|| / ||T(r)||``) is within ``tolerance`` of the dtype the model
   computed in; otherwise the logits path is used and the log says why.

The state the trainer relies on is left as it was: every module's train/eval mode, the
CPU and CUDA random number generators (``torch.random.fork_rng``), no cache is built,
no gradient is recorded, and the hook is removed. Every process runs the same input
through the same weights and reaches the same decision, with no collective.
Its cost is stated in ``docs/model-families.md`` (``bench/exactness_cost.py``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..kernels.transform import IDENTITY, LogitTransform
from .output_layer import OutputLayer, unwrap_peft

LOG = logging.getLogger("axolotl.otr")

PROBE_LENGTH = 8
NATURAL_ROWS = 4
# Target max |lm_head output| of the scaled rows (powers of two, so reached within 2x).
PROBE_MAGNITUDES = (4.0, 16.0, 64.0, 256.0)
# Float64 bytes of one row block of the lm_head in the reference product.
BLOCK_BYTES = 64 << 20
# Config keys of a constant logit scale (multiplied or divided: both are tried; Cohere
# multiplies by logit_scale, Granite and MiniCPM3 divide by logits_scaling, HyperCLOVA X
# multiplies by it, Falcon-H1 multiplies by lm_head_multiplier) and of soft-capping.
SCALE_KEYS = ("logit_scale", "logits_scaling", "lm_head_multiplier")
SOFTCAP_KEYS = ("final_logit_softcapping",)
# Relative error allowed above the dtype's own rounding: fp32 GEMMs may run in TF32.
MIN_TOLERANCE = 4e-3  # fp32 models under TF32 round h and W to ~1e-3 relative


@dataclass(frozen=True)
class ProbeResult:
    """What the check measured: the best candidate, its error, and what it cost."""

    transform: LogitTransform | None  # None: no candidate within tolerance
    error: float  # the best candidate's largest relative row error
    tolerance: float
    seconds: float
    reason: str = ""


def candidate_transforms(config) -> list[LogitTransform]:
    """Every transform the config suggests, identity first, without duplicates."""
    configs = [config]
    text = config.get_text_config() if hasattr(config, "get_text_config") else None
    if text is not None and text is not config:
        configs.append(text)
    scales, caps = [1.0], [None]
    for cfg in configs:
        for key in SCALE_KEYS:
            value = _positive(getattr(cfg, key, None))
            if value is not None:
                scales += [value, 1.0 / value]
        for key in SOFTCAP_KEYS:
            value = _positive(getattr(cfg, key, None))
            if value is not None:
                caps.append(value)
    found: list[LogitTransform] = []
    for cap in dict.fromkeys(caps):
        for scale in dict.fromkeys(scales):
            candidate = LogitTransform(scale, cap)
            if candidate not in found:
                found.append(candidate)
    return found


def _positive(value) -> float | None:
    """``value`` as a float when it is a positive finite number (config values vary)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if 0 < value < math.inf else None


def tolerance(*dtypes: torch.dtype) -> float:
    """Largest relative row error that still counts as the model's own logits: four
    machine epsilons of the least precise dtype the model computed in (bf16: 0.031,
    fp16: 0.0039), at least ``MIN_TOLERANCE``."""
    eps = max(torch.finfo(d).eps for d in dtypes if d.is_floating_point)
    return max(4.0 * eps, MIN_TOLERANCE)


def probe_ids(vocab_size: int, device: torch.device) -> torch.Tensor:
    """[1, PROBE_LENGTH] token ids spread over the vocabulary, the same on every process."""
    ids = [(17 + 7919 * i) % vocab_size for i in range(PROBE_LENGTH)]
    return torch.tensor([ids], dtype=torch.long, device=device)


@contextmanager
def undisturbed(model: nn.Module) -> Iterator[None]:
    """no_grad and eval mode for the block; afterwards every module's mode and the CPU
    and CUDA generators' states are what they were."""
    modes = [(module, module.training) for module in model.modules()]
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            model.eval()
            yield
    finally:
        for module, mode in modes:
            module.training = mode


class _ProbeHook:
    """Forward hook on the decoder: rows past ``NATURAL_ROWS`` become scaled copies."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.hidden: torch.Tensor | None = None
        self.calls = 0

    def __call__(self, _module, _args, output):
        self.calls += 1
        hidden = getattr(output, "last_hidden_state", None)
        tuple_output = hidden is None
        if tuple_output:
            hidden = output[0]
        probe = hidden.clone()
        natural = hidden[0, :NATURAL_ROWS]
        logits = natural.to(self.weight.device, self.weight.dtype) @ self.weight.t()
        peak = logits.float().abs().amax(-1).to(hidden.device)
        # Keep every scaled hidden state 16x inside the format's range.
        room = torch.finfo(hidden.dtype).max / 16 / natural.float().abs().amax(-1).clamp_min(1e-30)
        for row, target in enumerate(PROBE_MAGNITUDES):
            j = row % NATURAL_ROWS
            wanted = target / max(float(peak[j]), 1e-30)
            factor = 2.0 ** round(math.log2(min(wanted, float(room[j]))))
            probe[0, NATURAL_ROWS + row] = natural[j] * factor
        self.hidden = probe
        if tuple_output:
            return (probe, *output[1:])
        output.last_hidden_state = probe
        return output


def reference_outputs(hidden: torch.Tensor, layer: tuple) -> torch.Tensor:
    """The lm_head's output ``h W^T + b (+ (h A^T) B^T)`` of [P, D] ``hidden`` in float64,
    reading the weight in blocks of ``BLOCK_BYTES`` (never a float64 copy of all of it)."""
    weight, bias, *low_rank = layer
    vocab, width = weight.shape
    h = hidden.to(weight.device, torch.float64)
    out = torch.empty(h.shape[0], vocab, dtype=torch.float64, device=weight.device)
    rows = max(1, BLOCK_BYTES // (8 * width))
    for start in range(0, vocab, rows):
        stop = min(start + rows, vocab)
        torch.mm(h, weight[start:stop].to(torch.float64).t(), out=out[:, start:stop])
    if bias is not None:
        out += bias.to(torch.float64)
    if low_rank:
        a, b = low_rank[0]
        out += (h @ a.to(torch.float64).t()) @ b.to(torch.float64).t()
    return out


def probe(model: nn.Module, layer: OutputLayer, decoder: nn.Module) -> ProbeResult:
    """Run the check (module docstring) and return what it measured."""
    start = time.perf_counter()
    base = unwrap_peft(model)
    with undisturbed(model):
        head = layer.weight_and_bias()
        if any(t.device.type == "meta" for t in _tensors(head)):
            return ProbeResult(None, math.inf, 0.0, 0.0, "the lm_head is offloaded (meta)")
        embeddings = model.get_input_embeddings()
        # ZeRO-3 may hold only a partition here; ``ds_shape`` is the whole (sharding.py)
        vocab = getattr(embeddings.weight, "ds_shape", embeddings.weight.shape)[0]
        ids = probe_ids(vocab, embeddings.weight.device)
        hook = _ProbeHook(head[0])
        handle = decoder.register_forward_hook(hook)
        try:
            outputs = model(
                input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False,
                logits_to_keep=0,
            )  # fmt: skip
        finally:
            handle.remove()
        if hook.calls != 1:
            return ProbeResult(
                None, math.inf, 0.0, time.perf_counter() - start,
                f"the decoder ran {hook.calls} times in one forward pass",
            )  # fmt: skip
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        hidden = hook.hidden[0]
        want = logits[0].to(head[0].device, torch.float64)
        raw = reference_outputs(hidden, head)
        tol = tolerance(hidden.dtype, head[0].dtype, logits.dtype)
        if not torch.isfinite(want).all():
            return ProbeResult(
                None, math.inf, tol, time.perf_counter() - start,
                "the model's logits on the check's input are not finite",
            )  # fmt: skip
        best, best_error = None, math.inf
        for candidate in candidate_transforms(base.config):
            error = _row_error(want, candidate(raw))
            if error < best_error:
                best, best_error = candidate, error
    seconds = time.perf_counter() - start
    if best_error > tol:
        return ProbeResult(
            None, best_error, tol, seconds,
            f"its logits are not T(h W^T + b) for any transform the config names: the "
            f"closest, {best.describe()}, is off by {best_error:.2g} (relative) on the "
            f"check's input, above the {tol:.2g} its dtype allows",
        )  # fmt: skip
    return ProbeResult(best, best_error, tol, seconds)


def _row_error(want: torch.Tensor, got: torch.Tensor) -> float:
    """Largest relative error of a row: ||want - got|| / ||got|| (rows [P, V])."""
    num = (want - got).norm(dim=-1)
    den = got.norm(dim=-1).clamp_min(1e-30)
    return float((num / den).max())


def _tensors(value) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)


def verify_output_layer(model: nn.Module, layer: OutputLayer, decoder: nn.Module) -> OutputLayer:
    """``layer`` with the measured transform if the fused path computes the model's own
    logits, else the logits path with the reason (the check's error also counts as one:
    the logits path is always correct)."""
    try:
        result = probe(model, layer, decoder)
    except Exception as err:  # noqa: BLE001 - any failure leaves the always-exact path
        return OutputLayer(None, f"the exactness check failed ({type(err).__name__}: {err})")
    LOG.info(
        "OTR exactness check: %s (max relative row error %.2g, tolerance %.2g, %.0f ms)",
        result.transform.describe() if result.transform is not None else result.reason,
        result.error, result.tolerance, 1000 * result.seconds,
    )  # fmt: skip
    if result.transform is None:
        return OutputLayer(None, result.reason)
    return replace(layer, transform=result.transform)


__all__ = ["IDENTITY", "ProbeResult", "candidate_transforms", "probe", "verify_output_layer"]
