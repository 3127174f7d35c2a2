"""Every shipped YAML in examples/configs/ validates through Axolotl's own config loader.

`axolotl.cli.config.load_cfg` is the path `axolotl train` takes: plugin registration,
the merged pydantic schema (Axolotl's and this plugin's), normalization. It reads the
model's config (never its weights) and writes output_dir/debug.log, and nothing else
on the way needs the network or a GPU. So only what cannot exist here is swapped:

- ``base_model``: a hub id -> a local tiny model *of the same architecture*
  (the tiny Llama for Llama configs; a tiny config of the same model_type for the
  others: Qwen2, Qwen3, Gemma 3 text, Mistral, Phi-3, SmolLM3), so
  Axolotl's model-type-dependent checks and hooks still see the right model type;
- dataset paths: hub datasets -> the tiny local alpaca jsonl (prompt ``type`` kept);
- ``output_dir``, ``dataset_prepared_path``: into this test's tmp dir.

The CUDA settings (bf16, flash_attention_2, load_in_4bit, sample packing, paged/fused
optimizers) are NOT swapped: load_cfg does not need CUDA for them, and the GPU probe
is replaced by the GPU the configs target (one sm_90, bf16-capable card), so Axolotl
validates them as it would on that machine instead of warning that bf16 "will fail".
Nothing here trains; a GPU run is what these files have not had.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from axolotl_otr.args import OTRArgs
from tests.support.family_configs import FAMILY_CONFIGS

# One xdist worker runs the whole file: its module fixture is built once (Makefile).
pytestmark = pytest.mark.xdist_group("test_example_configs")

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "examples" / "configs"
EXAMPLES = sorted(CONFIG_DIR.glob("*.yml"))
# The CPU configs (trained here: `make demo`, `make demo-tiny`); the rest target GPUs.
CPU_CONFIGS = ("tiny-cpu-lora.yml", "smollm2-135m-otr-lora.yml")
# The OTR versions of Axolotl's own examples (tests/family_configs.py): settings as in
# Axolotl's example, checked by their own tests (tests/e2e/test_family_configs.py).
FAMILY = [path for path in EXAMPLES if path.name in FAMILY_CONFIGS]
# The multi-GPU versions of an Axolotl example (issue 34): its settings, an engine added.
SHARDED = [path for path in EXAMPLES if re.search(r"-(fsdp2|zero3)\.yml$", path.name)]
SHARED = [
    path
    for path in EXAMPLES
    if path.name not in CPU_CONFIGS and path not in FAMILY and path not in SHARDED
]
DEMO_CONFIG = CONFIG_DIR / "smollm2-135m-otr-lora.yml"

# base_model -> the Hugging Face model_type of that checkpoint (a new base model
# must be added here, so its tiny stand-in has the right architecture).
ARCHITECTURES = [
    (re.compile(r"^Qwen/Qwen2\.5-"), "qwen2"),
    (re.compile(r"(^|/)(Meta-)?Llama-3", re.IGNORECASE), "llama"),
    (re.compile(r"^\./\.cache/tiny/model$"), "llama"),
    (re.compile(r"^\./\.cache/smollm2-135m-instruct-v2$"), "llama"),  # SmolLM2 is a Llama
    (re.compile(r"^Qwen/Qwen3-"), "qwen3"),
    (re.compile(r"^google/gemma-3-1b"), "gemma3_text"),  # the 1B (and 270m) are text-only
    (re.compile(r"^mistralai/Mistral-7B"), "mistral"),
    (re.compile(r"^microsoft/Phi-3"), "phi3"),
    (re.compile(r"^HuggingFaceTB/SmolLM3-"), "smollm3"),
]
# The stand-ins' tying, as released (config only: load_cfg never builds the model).
TIED = {"qwen2": True, "qwen3": False, "gemma3_text": True, "mistral": False, "phi3": False}
TIED["smollm3"] = True

# The keys the shared configs spell out, each at its documented default.
SPELLED_OUT = (
    "otr_num_samples",
    "otr_temperature",
    "otr_beta",
    "otr_estimator",
    "otr_normalization",
    "otr_objective",
    "otr_fused",
)
# Settings that need CUDA at training time, kept as written and checked after loading.
CUDA_SETTINGS = ("bf16", "attn_implementation", "load_in_4bit", "load_in_8bit", "adapter")
DECODER_LAYER = {"qwen2": "Qwen2DecoderLayer", "llama": "LlamaDecoderLayer"}


def target_gpus(n_gpu: int) -> tuple[dict, dict]:
    """What Axolotl's GPU probe reports on the machines these configs are written for."""
    return (
        {"bf16": True, "fp8": True, "tf32": True, "n_gpu": n_gpu, "compute_capability": "sm_90"},
        {"torch_version": "2.13.0"},
    )


def architecture(base_model: str) -> str:
    for pattern, model_type in ARCHITECTURES:
        if pattern.search(base_model):
            return model_type
    raise AssertionError(f"no tiny stand-in architecture known for base_model {base_model!r}")


@pytest.fixture(autouse=True)
def restore_environment():
    """load_cfg exports settings (ACCELERATE_MIXED_PRECISION=bf16, FSDP variables...) to
    os.environ for the accelerate launcher; left behind, they would change every later
    Trainer in this pytest process (tests/hf/test_mixin.py compares gradients)."""
    saved = os.environ.copy()
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def tiny_models(tiny_dir, tmp_path_factory) -> dict[str, Path]:
    """model_type -> a local tiny model dir of that architecture."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    llama = tiny_dir / "model"
    source = AutoConfig.from_pretrained(llama)
    sizes = {
        key: getattr(source, key)
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
        )
    }
    models = {"llama": llama}
    for model_type, tied in TIED.items():
        folder = models[model_type] = tmp_path_factory.mktemp(f"tiny-{model_type}")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(llama / name, folder / name)
        config = AutoConfig.for_model(model_type, tie_word_embeddings=tied, **sizes)
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]]
        config.save_pretrained(folder)
    return models


@pytest.fixture
def load_example(tiny_dir, tiny_models, tmp_path, monkeypatch):
    """Load an example through Axolotl's load_cfg with only the unreachable parts swapped."""
    import axolotl.cli.config as axolotl_config
    import axolotl.utils.config as axolotl_utils_config
    import axolotl.utils.trainer as axolotl_trainer

    def load(path: Path, n_gpu: int = 1, **overrides):
        monkeypatch.setattr(axolotl_config, "gpu_capabilities", lambda: target_gpus(n_gpu))
        # After validation, load_cfg prepares the launcher's environment; for DeepSpeed
        # that starts a process group (NCCL, in this pytest process). Only that step is
        # replaced: it records the ZeRO stage Axolotl read from the config's JSON.
        monkeypatch.setattr(
            axolotl_trainer,
            "setup_deepspeed_env",
            lambda cfg, stage=None: deepspeed_envs.append(stage),
        )
        # A `deepspeed:` path is relative to where `axolotl train` runs: the repository root.
        monkeypatch.chdir(REPO)
        # `bf16: auto` (Axolotl's own examples) asks torch directly; the same card answers.
        monkeypatch.setattr(axolotl_utils_config, "is_torch_bf16_gpu_available", lambda: True)
        raw = yaml.safe_load(path.read_text())
        cfg = dict(raw)
        tiny_model = tiny_models[architecture(raw["base_model"])]
        cfg["base_model"] = str(tiny_model)
        for key in ("base_model_config", "tokenizer_config"):
            if cfg.get(key):
                cfg[key] = str(tiny_model)
        cfg["datasets"] = [
            {**dataset, "path": str(tiny_dir / "data" / "train.jsonl"), "ds_type": "json"}
            for dataset in raw["datasets"]
        ]
        cfg["output_dir"] = str(tmp_path / "out")
        cfg["dataset_prepared_path"] = str(tmp_path / "prepared")
        cfg.update(overrides)
        written = tmp_path / path.name
        written.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return raw, axolotl_config.load_cfg(str(written))

    deepspeed_envs: list = []
    load.deepspeed_envs = deepspeed_envs
    return load


def test_the_shared_configs_are_there():
    names = {path.name for path in SHARED}
    for model in ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b", "llama-3.1-8b"):
        for adapter in ("lora", "qlora"):
            assert f"{model}-otr-{adapter}.yml" in names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_example_validates_with_axolotl_and_keeps_its_otr_keys(load_example, path):
    raw, cfg = load_example(path, n_gpu=2 if path in SHARDED else 1)
    assert cfg.model_config_type == architecture(raw["base_model"])

    otr_keys = {key: value for key, value in raw.items() if key.startswith("otr")}
    assert otr_keys.get("otr") is True
    for key, value in otr_keys.items():
        assert cfg[key] == value, (key, cfg[key], value)
    for key in CUDA_SETTINGS:
        if key in raw:
            expected = True if raw[key] == "auto" else raw[key]  # auto: the probed bf16 card
            assert cfg[key] == expected, (key, cfg[key], raw[key])
    assert cfg.sample_packing == raw["sample_packing"]
    assert [d["type"] for d in cfg.datasets] == [d["type"] for d in raw["datasets"]]

    from axolotl.integrations.base import PluginManager

    assert "axolotl_otr.OTRPlugin" in PluginManager.get_instance().plugins


@pytest.mark.parametrize("path", SHARED, ids=lambda path: path.name)
def test_shared_config_spells_out_the_defaults_and_is_honest_about_checks(path):
    raw = yaml.safe_load(path.read_text())
    defaults = OTRArgs()
    for key in SPELLED_OUT:
        assert raw[key] == getattr(defaults, key), key
    assert raw["plugins"] == ["axolotl_otr"]
    assert raw["bf16"] is True and raw["sample_packing"] is True
    assert raw["attn_implementation"] == "flash_attention_2"
    assert not raw.get("flash_attention")  # 0.19 refuses it next to attn_implementation
    qlora = path.stem.endswith("-qlora")
    assert raw["adapter"] == ("qlora" if qlora else "lora")
    assert raw["load_in_4bit"] is qlora
    text = path.read_text()
    assert "ESTIMATE (not measured)" in text
    assert "validated with Axolotl 0.19.0's config loader on CPU; not trained here" in text
    assert path.name in (CONFIG_DIR / "README.md").read_text()


def readme_fsdp_block() -> dict:
    blocks = re.findall(r"```yaml\n(.*?)```", (CONFIG_DIR / "README.md").read_text(), re.S)
    (block,) = [yaml.safe_load(b) for b in blocks if "fsdp_config" in b]
    return block


@pytest.mark.parametrize("path", SHARED, ids=lambda path: path.name)
def test_readme_fsdp_block_validates_on_two_gpus(load_example, path):
    # (The DeepSpeed line cannot be checked here: validating it imports deepspeed.)
    fsdp = readme_fsdp_block()
    layer = DECODER_LAYER[architecture(yaml.safe_load(path.read_text())["base_model"])]
    fsdp["fsdp_config"]["transformer_layer_cls_to_wrap"] = layer
    _, cfg = load_example(path, n_gpu=2, **fsdp)
    assert cfg.fsdp_version == 2
    assert cfg.fsdp_config.transformer_layer_cls_to_wrap == layer
    assert cfg.otr is True


# Keys that pick the engine; a sharded pair's files differ in these alone.
ENGINE_KEYS = ("fsdp", "fsdp_version", "fsdp_config", "deepspeed")


def test_the_sharded_configs_are_there():
    names = {path.name for path in SHARDED}
    assert {"llama-3-70b-otr-qlora-fsdp2.yml", "llama-3-70b-otr-qlora-zero3.yml"} <= names


@pytest.mark.parametrize("path", SHARDED, ids=lambda path: path.name)
def test_sharded_config_loads_its_engine_on_two_gpus_with_a_frozen_head(load_example, path):
    """What docs/multi-gpu.md promises these files: the engine their name says, and a
    frozen lm_head (an adapter that neither targets nor saves it), the case OTR keeps on
    the hidden-state path under FSDP2 and ZeRO-3."""
    raw, cfg = load_example(path, n_gpu=2)
    assert cfg.adapter in ("lora", "qlora")
    assert "lm_head" not in (cfg.lora_target_modules or [])
    assert "lm_head" not in (cfg.lora_modules_to_save or [])
    if path.stem.endswith("-fsdp2"):
        assert cfg.fsdp_version == 2 and cfg.fsdp_config.reshard_after_forward is True
        assert not raw.get("fsdp") and not cfg.deepspeed  # FSDP2 keys only
        assert load_example.deepspeed_envs == []
    else:
        # The JSON ships next to the examples and Axolotl read its stage from it.
        assert (REPO / raw["deepspeed"]).parent == CONFIG_DIR / "deepspeed"
        assert cfg.deepspeed["zero_optimization"]["stage"] == 3
        assert load_example.deepspeed_envs == [3]
        assert not cfg.fsdp_config
    assert path.name in (CONFIG_DIR / "README.md").read_text()


def test_a_sharded_pair_differs_only_in_the_engine():
    """The FSDP2 and ZeRO-3 files of one example say so in their headers."""
    pairs: dict[str, list[dict]] = {}
    for path in SHARDED:
        raw = yaml.safe_load(path.read_text())
        stem = re.sub(r"-(fsdp2|zero3)$", "", path.stem)
        pairs.setdefault(stem, []).append({k: v for k, v in raw.items() if k not in ENGINE_KEYS})
    assert pairs
    for stem, configs in pairs.items():
        assert len(configs) == 2 and configs[0] == configs[1], stem


def test_a_bad_otr_value_in_an_example_still_fails_at_load(load_example):
    # The swaps leave the plugin's own validation in the loop (its register hook refuses
    # the value in one line, before Axolotl's pydantic model would).
    with pytest.raises(ValueError, match="otr_temperature must be in"):
        load_example(SHARED[0], otr_temperature=0)


def test_the_demo_config_sets_every_otr_key_with_a_reason():
    """The config users copy: every plugin key at a deliberate value with a comment, a
    local base_model (the converted folder), the model's own chat template on chat data."""
    text = DEMO_CONFIG.read_text()
    raw = yaml.safe_load(text)
    keys = set(OTRArgs.model_fields)
    assert {key for key in raw if key.startswith("otr")} == keys
    for key in keys:
        (line,) = [line for line in text.splitlines() if line.startswith(f"{key}:")]
        assert "#" in line and line.split("#", 1)[1].strip(), f"{key} has no comment"
    assert raw["otr"] is True and raw["plugins"] == ["axolotl_otr"]
    assert raw["chat_template"] == "tokenizer_default"
    (dataset,) = raw["datasets"]
    assert dataset["type"] == "chat_template" and dataset["roles_to_train"] == ["assistant"]

    from examples.smollm2 import demo
    from examples.smollm2.smollm2_model import MODEL_DIR

    assert (REPO / raw["base_model"]).resolve() == Path(MODEL_DIR).resolve()
    assert (REPO / dataset["path"]).resolve() == (REPO / demo.DATA_DIR / "train.jsonl").resolve()
    assert demo.CONFIG == DEMO_CONFIG


def test_every_example_config_spells_the_plugin_as_the_readmes_two_lines():
    """One spelling: the README's "add two lines" block is what every shipped config
    writes (the long form, ``axolotl_otr.OTRPlugin``, trains in
    tests/e2e/test_axolotl_train.py)."""
    blocks = re.findall(r"```yaml\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    parsed = [cfg for cfg in map(yaml.safe_load, blocks) if isinstance(cfg, dict)]
    (two_lines,) = [cfg for cfg in parsed if set(cfg) == {"plugins", "otr"}]
    (spelling,) = two_lines["plugins"]
    for path in EXAMPLES:
        plugins = yaml.safe_load(path.read_text())["plugins"]
        assert [p for p in plugins if p.startswith("axolotl_otr")] == [spelling], path.name
