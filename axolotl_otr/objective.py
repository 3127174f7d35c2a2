"""The settings of one training objective (OTR, DFT or SFT) and their allowed ranges.

Pure Python on purpose: the loss (pure torch) and the Axolotl config schema (pydantic)
both read the bounds from here, so the two can never disagree about what is valid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

OBJECTIVES = ("otr", "dft", "sft")
ESTIMATORS = ("sampled", "exact")
NORMALIZATIONS = ("token", "sequence")

DEFAULT_NUM_SAMPLES = 256  # the paper's K
DEFAULT_TEMPERATURE = 1.3  # kappa, reported for the paper by a secondary summary
DEFAULT_BETA = -0.1  # this project's choice for the paper's "slightly negative" beta

MAX_NUM_SAMPLES = 1 << 20
MAX_TEMPERATURE = 100.0
MIN_BETA = -1.0  # below this the unlikelihood push dominates the target term
DEFAULT_SFT_MIX = 0.0  # lambda: share of plain cross-entropy mixed into the OTR weights
# otr_compile: torch.compile the per-chunk math. Off: on CPU it was not faster
# (bench/loss_speed.py --compile), and on a GPU it has not been measured yet.
DEFAULT_COMPILE = False


class OTRConfigError(ValueError):
    """A bad OTR setting; the message names the config key and its allowed range."""


@dataclass(frozen=True)
class Objective:
    """What the weighted negative log-likelihood rewards.

    ``objective`` picks the weight scheme: ``otr`` (the paper), ``dft``
    (-sg(pi(y)) log pi(y)) or ``sft`` (plain cross-entropy), so all three are computed
    by the same code and compared on equal footing.
    """

    objective: str = "otr"
    num_samples: int = DEFAULT_NUM_SAMPLES
    temperature: float = DEFAULT_TEMPERATURE
    beta: float = DEFAULT_BETA
    estimator: str = "sampled"
    sft_mix: float = DEFAULT_SFT_MIX

    def __post_init__(self) -> None:
        validate_objective(
            self.objective,
            self.num_samples,
            self.temperature,
            self.beta,
            self.estimator,
            self.sft_mix,
        )


def validate_objective(
    objective: str,
    num_samples: int,
    temperature: float,
    beta: float,
    estimator: str,
    sft_mix: float = DEFAULT_SFT_MIX,
) -> None:
    """Raise OTRConfigError naming the config key of the first bad value."""
    check_choice("otr_objective", objective, OBJECTIVES)
    check_num_samples(num_samples)
    check_temperature(temperature)
    check_beta(beta)
    check_choice("otr_estimator", estimator, ESTIMATORS)
    check_sft_mix(sft_mix)
    if sft_mix and objective != "otr":
        raise OTRConfigError(
            f"otr_sft_mix mixes cross-entropy into the OTR weights; it needs "
            f"otr_objective: otr, got otr_objective: {objective!r} with otr_sft_mix: {sft_mix}"
        )


def check_choice(key: str, value: object, allowed: tuple[str, ...]) -> object:
    """Raise OTRConfigError unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise OTRConfigError(f"{key} must be one of {allowed}, got {value!r}")
    return value


def check_num_samples(value: object) -> int:
    """K must be a true integer (not a bool) in [1, MAX_NUM_SAMPLES]."""
    if isinstance(value, bool) or not isinstance(value, int) or not (1 <= value <= MAX_NUM_SAMPLES):
        raise OTRConfigError(
            f"otr_num_samples must be an integer in [1, {MAX_NUM_SAMPLES}], got {value!r}"
        )
    return value


def check_temperature(value: object) -> float:
    """kappa must be finite and in (0, MAX_TEMPERATURE]."""
    if not _finite_number(value) or not 0.0 < value <= MAX_TEMPERATURE:
        raise OTRConfigError(f"otr_temperature must be in (0, {MAX_TEMPERATURE}], got {value!r}")
    return value


def check_beta(value: object) -> float:
    """beta must be finite and in [MIN_BETA, 1): beta = 1 rewards every token alike."""
    if not _finite_number(value) or not MIN_BETA <= value < 1.0:
        raise OTRConfigError(f"otr_beta must be in [{MIN_BETA}, 1), got {value!r}")
    return value


def check_sft_mix(value: object) -> float:
    """lambda must be finite and in [0, 1]: 0 is pure OTR, 1 is plain cross-entropy."""
    if not _finite_number(value) or not 0.0 <= value <= 1.0:
        raise OTRConfigError(f"otr_sft_mix must be in [0, 1], got {value!r}")
    return value


def check_compile(value: object) -> bool:
    """otr_compile must be a true boolean (a YAML typo like "ture" must not pass)."""
    if not isinstance(value, bool):
        raise OTRConfigError(f"otr_compile must be true or false, got {value!r}")
    return value


def validate_normalization(normalization: str) -> None:
    """Raise OTRConfigError unless ``normalization`` is a known mode."""
    check_choice("otr_normalization", normalization, NORMALIZATIONS)


def _finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
