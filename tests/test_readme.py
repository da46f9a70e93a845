"""Every override the README shows works as written: each `key=value` in its inline code and code blocks is
composed with the real configs and validated, and the ones that change how a run trains (module, adapter,
budget, debug presets, checkpoints) are trained for two steps (one per stage) on the tiny model, with a
method that has the field where the default LoRA lacks it. A new override in the README is picked up here
by itself."""

import re

import pytest
from conftest import ROOT, compose_config
from omegaconf import OmegaConf

from moelab.adapters import registered_adapters
from moelab.modules.training import adapter_config, run
from moelab.modules.validation import validate

README = (ROOT / "README.md").read_text()
# What needs a GPU, a cluster, several processes or the model hub: composed and validated only.
CHECK_ONLY = {"trainer=gpu", "trainer=ddp", "trainer=fsdp", "trainer=ddp_cpu", "trainer.devices=4",
              "logger.wandb.offline=false", "data=commonsense8_hub", "experiment=offline_commonsense",
              "hparams_search=optuna", "model=llama2_7b", "model=llama3_2_3b", "model=qwen2_5_0_5b", "model=gemma_2b",
              "model=smollm2_135m_hub", "resume=/path/to/last.ckpt",
              "adapter.layers_to_transform=[26,27,28,29]"}  # SmolLM2's top layers; the tiny model has two
# Overrides that change how a run trains: these train for a step; the others are composed and validated.
TRAINED = ("module.", "adapter", "budget=", "debug=", "checkpoint_every=", "resume=never")
# Placeholders the README writes in angle brackets or dots, and the value a test gives them.
PLACEHOLDERS = {"adapter.layers_to_transform=[...]": "adapter.layers_to_transform=[1]"}


def readme_overrides() -> list[str]:
    """``key=value`` tokens of the README's code (``a | b`` alternatives and ``a,b`` sweeps split into single
    values); launcher settings (``hydra...``) and make variables are left to their own tests."""
    spans = re.findall(r"`([^`\n]+)`", README) + re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    found = []
    for span in spans:
        for match in re.finditer(r"(?<![\w./-])([a-z_][\w.]*(?:/[\w]+)?)=((?:[^\s|`]|\s\|\s)+)", span):
            key, values = match.group(1), match.group(2)
            if key.startswith("hydra") or key.isupper():
                continue
            for value in re.split(r"\s\|\s", values.strip('"')):
                value = value if value.startswith("[") else value.split(",")[0]  # a sweep's first value
                token = f"{key}={value}"
                token = PLACEHOLDERS.get(token, token)
                if "<" not in token and "..." not in token and token not in found:
                    found.append(token)
    return found


OVERRIDES = readme_overrides()
ABSENT = object()
TINY = ["model=tiny_random", "data=tiny", "trainer.max_steps=2", "eval.enabled=false", "logger=none", "callbacks=none"]


def test_the_readme_shows_the_overrides_this_test_knows():
    assert len(OVERRIDES) >= 25 and {"budget=lora_all_r80", "resume=never", "module.activation_checkpointing=true",
                                     "adapter.aux_loss_scope=local", "debug=fdr"} <= set(OVERRIDES)


def method_for(override: str) -> list[str]:
    """An adapter override for a field the default method lacks (``adapter.expert_compute``): the first
    method whose config has it."""
    key = override.split("=", 1)[0]
    if not key.startswith("adapter.") or OmegaConf.select(compose_config(), key, default=ABSENT) is not ABSENT:
        return []
    for method in sorted(registered_adapters()):
        if OmegaConf.select(compose_config(f"adapter={method}"), key, default=ABSENT) is not ABSENT:
            return [f"adapter={method}"]
    raise AssertionError(f"no method's config has {key}")


@pytest.mark.parametrize("override", OVERRIDES)
def test_each_readme_override_works_as_written(override, tmp_path):
    paths = [f"paths.output_dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    method = method_for(override)
    if override in CHECK_ONLY or not override.startswith(TRAINED):
        cfg = compose_config(*method, override, *paths)
        validate(cfg)
        adapter_config(cfg)
        return
    results = run(compose_config(*TINY, *method, override, *paths))
    assert results["status"] == "ok" and results["timings"]["train_steps"] >= 1
