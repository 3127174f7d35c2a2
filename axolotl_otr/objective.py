"""The settings of one OTR run: allowed values, defaults and their checks, defined once.

Pure Python on purpose: the loss (pure torch), the Axolotl config schema (pydantic, in
``args.py``) and the trainer all read the choices, defaults and bounds from here, so they
can never disagree about what is valid. What each setting means: ``docs/algorithm.md``.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

OBJECTIVES = ("otr", "dft", "sft")
ESTIMATORS = ("sampled", "exact")
NORMALIZATIONS = ("token", "sequence")

DEFAULT_OBJECTIVE = "otr"
DEFAULT_NUM_SAMPLES = 256  # the paper's K
DEFAULT_TEMPERATURE = 1.3  # kappa, reported for the paper by a secondary summary
DEFAULT_BETA = -0.1  # this project's choice for the paper's "slightly negative" beta
DEFAULT_ESTIMATOR = "sampled"
DEFAULT_SFT_MIX = 0.0  # lambda: share of plain cross-entropy mixed into the OTR weights
DEFAULT_NORMALIZATION = "token"
DEFAULT_FUSED = True
DEFAULT_SEED = 42  # Axolotl's own default ``seed``

MAX_NUM_SAMPLES = 1 << 20
MAX_TEMPERATURE = 100.0
MIN_BETA = -1.0  # below this the unlikelihood push dominates the target term
# otr_compile: torch.compile the per-chunk math. Off: on CPU it was not faster
# (bench/loss_speed.py --compile), and on a GPU it has not been measured yet.
DEFAULT_COMPILE = False


# The plugin's config keys, as ``args.OTRArgs`` declares them (a unit test pins the two).
CONFIG_KEYS = (
    "otr",
    "otr_num_samples",
    "otr_temperature",
    "otr_beta",
    "otr_estimator",
    "otr_normalization",
    "otr_objective",
    "otr_sft_mix",
    "otr_fused",
    "otr_chunk_size",
    "otr_compile",
    "otr_seed",
)


class OTRConfigError(ValueError):
    """A bad OTR setting; the message names the config key and its allowed range."""


@dataclass(frozen=True)
class Objective:
    """What the weighted negative log-likelihood rewards (validated on creation).

    ``kind`` picks the weight scheme: ``otr`` (the paper), ``dft`` (-sg(pi(y)) log pi(y))
    or ``sft`` (plain cross-entropy), so all three run through the same code and compare
    on equal footing. It is the first positional argument: ``Objective("sft")``.
    """

    kind: str = DEFAULT_OBJECTIVE
    num_samples: int = DEFAULT_NUM_SAMPLES
    temperature: float = DEFAULT_TEMPERATURE
    beta: float = DEFAULT_BETA
    estimator: str = DEFAULT_ESTIMATOR
    sft_mix: float = DEFAULT_SFT_MIX

    def __post_init__(self) -> None:
        check_choice("otr_objective", self.kind, OBJECTIVES)
        check_num_samples(self.num_samples)
        check_temperature(self.temperature)
        check_beta(self.beta)
        check_choice("otr_estimator", self.estimator, ESTIMATORS)
        check_sft_mix(self.sft_mix)
        check_sft_mix_objective(self.sft_mix, self.kind)


@dataclass(frozen=True)
class OTRSettings:
    """Everything one OTR run needs: the objective and how the loss is computed.

    The loss reads ``objective``, ``normalization``, ``chunk_size`` and ``compile``; the
    trainer also ``fused`` (hidden-state path where exact) and ``seed`` (of the token sampler).
    """

    objective: Objective = field(default_factory=Objective)
    normalization: str = DEFAULT_NORMALIZATION
    fused: bool = DEFAULT_FUSED
    chunk_size: int | None = None
    seed: int = DEFAULT_SEED
    compile: bool = DEFAULT_COMPILE  # torch.compile the per-chunk math (otr_compile)

    def __post_init__(self) -> None:
        if not isinstance(self.objective, Objective):
            raise OTRConfigError(f"objective must be an Objective, got {self.objective!r}")
        check_choice("otr_normalization", self.normalization, NORMALIZATIONS)
        check_chunk_size(self.chunk_size)
        check_compile(self.compile)

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any] | Any) -> OTRSettings:
        """Read the ``otr_*`` keys of an Axolotl config; unset keys take the defaults."""

        def get(key: str, default: Any) -> Any:
            value = cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key, None)
            return default if value is None else value

        objective = Objective(
            get("otr_objective", DEFAULT_OBJECTIVE),
            num_samples=get("otr_num_samples", DEFAULT_NUM_SAMPLES),
            temperature=get("otr_temperature", DEFAULT_TEMPERATURE),
            beta=get("otr_beta", DEFAULT_BETA),
            estimator=get("otr_estimator", DEFAULT_ESTIMATOR),
            sft_mix=get("otr_sft_mix", DEFAULT_SFT_MIX),
        )
        return cls(
            objective=objective,
            normalization=get("otr_normalization", DEFAULT_NORMALIZATION),
            fused=bool(get("otr_fused", DEFAULT_FUSED)),
            chunk_size=get("otr_chunk_size", None),
            seed=int(get("otr_seed", get("seed", DEFAULT_SEED))),
            compile=get("otr_compile", DEFAULT_COMPILE),
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


def check_sft_mix_objective(sft_mix: float, kind: str) -> None:
    """lambda mixes cross-entropy into the OTR weights, so it needs the OTR objective."""
    if sft_mix and kind != "otr":
        raise OTRConfigError(
            f"otr_sft_mix mixes cross-entropy into the OTR weights; it needs "
            f"otr_objective: otr, got otr_objective: {kind!r} with otr_sft_mix: {sft_mix}"
        )


def check_seed(value: object) -> int | None:
    """The sampler's seed: an integer, or None for Axolotl's ``seed``."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise OTRConfigError(f"otr_seed must be an integer or null, got {value!r}")
    return value


def check_chunk_size(value: object) -> int | None:
    """Positions per loss chunk: a positive integer, or None for the automatic size."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise OTRConfigError(f"otr_chunk_size must be a positive integer or null, got {value!r}")
    return value


def check_compile(value: object) -> bool:
    """otr_compile must be a true boolean (a YAML typo like "ture" must not pass)."""
    if not isinstance(value, bool):
        raise OTRConfigError(f"otr_compile must be true or false, got {value!r}")
    return value


def _finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_number(value: object, integer: bool) -> object:
    """A string that reads as a number of the key's kind becomes that number; any other
    value is returned as it is, for the key's check to accept or refuse.

    One rule for every numeric key: PyYAML reads ``2e0`` or ``1e-3`` (no dot) as strings,
    and Axolotl's own numeric keys (``learning_rate``) accept those, so a quoted or
    dot-less number is read, never half-accepted. An integer key reads integer strings
    only (``"256"``; ``"1e3"`` or ``"8.0"`` stay strings and are refused like 8.0 is).
    """
    if not isinstance(value, str):
        return value
    try:
        return int(value.strip()) if integer else float(value.strip())
    except ValueError:
        return value


def is_otr_key(key: object) -> bool:
    """Whether a config key is meant for this plugin: its first word starts with ``otr``
    or one of its words is ``otr``, in any case, with ``_``, ``-``, ``.`` or spaces
    between words (``OTR``, ``Otr_beta``, ``otr-beta``, ``use_otr``; not ``nemotron_h``)."""
    words = [w for w in re.split(r"[_\-.\s]+", str(key).lower()) if w]
    return bool(words) and (words[0].startswith("otr") or "otr" in words)


def closest_key(key: object) -> str:
    """The plugin key nearest to ``key`` once spelt in lower case with underscores."""
    spelt = re.sub(r"[\-.\s]+", "_", str(key).strip().lower())
    if spelt in CONFIG_KEYS:
        return spelt
    return difflib.get_close_matches(spelt, CONFIG_KEYS, n=1, cutoff=0.0)[0]


def check_known_keys(keys: Iterable[object]) -> None:
    """Refuse top-level config keys meant for OTR that are not the plugin's: Axolotl
    drops keys no schema declares, so a misspelt one would train with the default."""
    unknown = [key for key in keys if key not in CONFIG_KEYS and is_otr_key(key)]
    if unknown:
        raise OTRConfigError(
            "; ".join(
                f"unknown config key `{key!s}`: Axolotl would drop it silently and train "
                f"without it; did you mean `{closest_key(key)}`?"
                for key in unknown
            )
        )
