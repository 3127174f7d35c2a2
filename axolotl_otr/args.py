"""Pydantic schema of the plugin's config keys, merged by Axolotl into its own config.

Choices, defaults and bounds come from ``objective.py``, the same place the loss and the
trainer read them, so a bad value fails at config load with a message naming the key and
the allowed range. What the keys mean: ``docs/algorithm.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .objective import (
    DEFAULT_BETA,
    DEFAULT_COMPILE,
    DEFAULT_ESTIMATOR,
    DEFAULT_FUSED,
    DEFAULT_NORMALIZATION,
    DEFAULT_NUM_SAMPLES,
    DEFAULT_OBJECTIVE,
    DEFAULT_SFT_MIX,
    DEFAULT_TEMPERATURE,
    ESTIMATORS,
    NORMALIZATIONS,
    OBJECTIVES,
    OTRConfigError,
    check_beta,
    check_chunk_size,
    check_compile,
    check_known_keys,
    check_num_samples,
    check_seed,
    check_sft_mix,
    check_sft_mix_objective,
    check_temperature,
    read_number,
)

# The numeric keys: (integer key, the check of objective.py that names its range).
NUMERIC_KEYS = {
    "otr_num_samples": (True, check_num_samples),
    "otr_temperature": (False, check_temperature),
    "otr_beta": (False, check_beta),
    "otr_sft_mix": (False, check_sft_mix),
    "otr_chunk_size": (True, check_chunk_size),
    "otr_seed": (True, check_seed),
}

# Axolotl options that replace the loss function or the lm_head/loss computation.
# With OTR on they would either silently bypass OTR or be bypassed by it, so they are
# refused with the reason.
CONFLICTING_OPTIONS = {
    "cut_cross_entropy": "Cut Cross-Entropy computes plain CE inside the model forward",
    "liger_fused_linear_cross_entropy": "Liger's fused linear CE computes plain CE "
    "inside the model forward; OTR has its own fused, chunked lm_head path",
    "liger_cross_entropy": "Liger's CE kernel replaces the model's CE, which OTR does not use",
    "chunked_cross_entropy": "chunked CE patches the model's CE, which OTR does not use; "
    "OTR already computes its loss chunk by chunk",
    "use_eaft": "EAFT installs its own loss function in the same trainer slot as OTR",
    "use_dft": "Axolotl's DFT loss (0.21+) installs its own loss function in the same "
    "trainer slot as OTR; run DFT through the plugin with otr_objective: dft",
    "orpo_alpha": "ORPO computes its own loss in the trainer",
    "rl": "preference/RL trainers (DPO, KTO, ORPO, GRPO...) have their own losses",
    "kd_trainer": "knowledge distillation has its own trainer loss",
    "reward_model": "reward-model training has no token-level targets",
    "process_reward_model": "process reward models have no token-level targets",
}


class OTRArgs(BaseModel):
    """Config keys of One-Token Rollout (see README and docs/algorithm.md)."""

    otr: bool | None = Field(
        default=None,
        json_schema_extra={"description": "Train with One-Token Rollout instead of CE."},
    )
    otr_num_samples: int = Field(
        default=DEFAULT_NUM_SAMPLES,
        json_schema_extra={"description": "K: tokens sampled per position."},
    )
    otr_temperature: float = Field(
        default=DEFAULT_TEMPERATURE,
        json_schema_extra={"description": "kappa: temperature of the rollout policy."},
    )
    otr_beta: float = Field(
        default=DEFAULT_BETA,
        json_schema_extra={"description": "Reward of a sampled token that is not the target."},
    )
    otr_estimator: Literal[ESTIMATORS] = Field(
        default=DEFAULT_ESTIMATOR,
        json_schema_extra={"description": "'sampled' (the paper) or 'exact' (its expectation)."},
    )
    otr_normalization: Literal[NORMALIZATIONS] = Field(
        default=DEFAULT_NORMALIZATION,
        json_schema_extra={
            "description": "'token': mean over all target tokens of the "
            "global batch; 'sequence': the paper's per-sequence 1/T."
        },
    )
    otr_objective: Literal[OBJECTIVES] = Field(
        default=DEFAULT_OBJECTIVE,
        json_schema_extra={
            "description": "Weight scheme; 'dft'/'sft' run DFT or plain CE "
            "through the same code path, for comparisons."
        },
    )
    otr_sft_mix: float = Field(
        default=DEFAULT_SFT_MIX,
        json_schema_extra={
            "description": "lambda in [0, 1]: weights lambda * one_hot(y) + "
            "(1 - lambda) * OTR weights; 0 is pure OTR. Only with otr_objective: otr."
        },
    )
    otr_fused: bool = Field(
        default=DEFAULT_FUSED,
        json_schema_extra={
            "description": "Compute the loss chunk by chunk from hidden "
            "states without full logits, where the model allows it."
        },
    )
    otr_chunk_size: int | None = Field(
        default=None,
        json_schema_extra={"description": "Positions per loss chunk (default: automatic)."},
    )
    otr_compile: bool = Field(
        default=DEFAULT_COMPILE,
        json_schema_extra={
            "description": "torch.compile the per-chunk loss math (Inductor fuses its "
            "passes); costs a compile at the first step."
        },
    )
    otr_seed: int | None = Field(
        default=None,
        json_schema_extra={"description": "Seed of the token sampler (default: `seed`)."},
    )

    # Numeric keys: one rule for all (objective.read_number), checked before pydantic's
    # own lax conversion could turn `true` into 1 or 64.0 into 64 for some keys only.
    @field_validator(*NUMERIC_KEYS, mode="before")
    @classmethod
    def _check_number(cls, value: Any, info: ValidationInfo) -> Any:
        integer, check = NUMERIC_KEYS[info.field_name]
        return check(read_number(value, integer=integer))

    @field_validator("otr_compile", mode="before")
    @classmethod
    def _check_compile(cls, value: Any) -> Any:
        return check_compile(value)

    @model_validator(mode="after")
    def _sft_mix_needs_otr_objective(self) -> OTRArgs:
        check_sft_mix_objective(self.otr_sft_mix, self.otr_objective)
        return self

    @model_validator(mode="before")
    @classmethod
    def _refuse_unknown_otr_keys(cls, data: Any) -> Any:
        # Merged into Axolotl's config model, this sees every top-level key.
        if isinstance(data, Mapping):
            check_known_keys(data.keys())
        return data

    @model_validator(mode="before")
    @classmethod
    def _refuse_conflicting_losses(cls, data: Any) -> Any:
        if not isinstance(data, Mapping) or not data.get("otr"):
            return data
        for key, reason in CONFLICTING_OPTIONS.items():
            if data.get(key):
                raise ValueError(
                    f"otr: true cannot be combined with {key}: {reason}. "
                    f"Delete the `{key}` line from the config, or set otr: false."
                )
        return data


def check_config(cfg: Mapping[str, Any]) -> None:
    """Refuse a raw (unparsed) config whose OTR keys are wrong, in one line.

    The plugin calls this from Axolotl's ``register`` hook, before Axolotl validates the
    config: the same checks as ``OTRArgs`` (unknown otr-ish keys, ranges, conflicting
    options), raised as one ``OTRConfigError`` so that the message is the last line of the
    traceback (a pydantic ``ValidationError`` adds its own lines after it).
    """
    check_known_keys(cfg.keys())
    ours = {k: cfg[k] for k in cfg.keys() if k in OTRArgs.model_fields or k in CONFLICTING_OPTIONS}
    try:
        OTRArgs.model_validate(ours)
    except ValidationError as error:
        raise OTRConfigError("; ".join(_message(e) for e in error.errors())) from None


def _message(error: dict) -> str:
    """One pydantic error as a line: our own checks' message, or pydantic's with the key."""
    raised = error.get("ctx", {}).get("error")
    if isinstance(raised, Exception):
        return str(raised)
    key = ".".join(str(part) for part in error["loc"])
    return f"{key}: {error['msg']}, got {error.get('input')!r}"
