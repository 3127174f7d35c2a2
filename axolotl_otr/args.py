"""Pydantic schema of the plugin's config keys, merged by Axolotl into its own config.

Choices, defaults and bounds come from ``objective.py``, the same place the loss and the
trainer read them, so a bad value fails at config load with a message naming the key and
the allowed range. What the keys mean: ``docs/algorithm.md``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

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
    check_beta,
    check_chunk_size,
    check_compile,
    check_num_samples,
    check_sft_mix,
    check_sft_mix_objective,
    check_temperature,
)

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

    @field_validator("otr_num_samples", mode="before")
    @classmethod
    def _check_num_samples(cls, value: Any) -> Any:
        return check_num_samples(value)

    @field_validator("otr_temperature")
    @classmethod
    def _check_temperature(cls, value: float) -> float:
        return check_temperature(value)

    @field_validator("otr_beta")
    @classmethod
    def _check_beta(cls, value: float) -> float:
        return check_beta(value)

    @field_validator("otr_sft_mix")
    @classmethod
    def _check_sft_mix(cls, value: float) -> float:
        return check_sft_mix(value)

    @field_validator("otr_chunk_size")
    @classmethod
    def _check_chunk_size(cls, value: int | None) -> int | None:
        return check_chunk_size(value)

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
    def _refuse_conflicting_losses(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("otr"):
            return data
        for key, reason in CONFLICTING_OPTIONS.items():
            if data.get(key):
                raise ValueError(
                    f"otr: true cannot be combined with {key}: {reason}. "
                    f"Set {key} to false/null, or otr to false."
                )
        return data
