"""Every override the README shows works as written: each `key=value` in its inline code and code blocks is
composed with the real configs and validated, and the ones that change how a run trains (module, adapter,
budget, debug presets, checkpoints) are trained for a step on the tiny model. A new override in the README
is picked up here by itself."""

import re

import pytest
from conftest import ROOT, compose_config

from moelab.modules.training import adapter_config, run
from moelab.modules.validation import validate

README = (ROOT / "README.md").read_text()
# What needs a GPU, a cluster, several processes or the model hub: composed and validated only.
CHECK_ONLY = {"trainer=gpu", "trainer=ddp", "trainer=fsdp", "trainer=ddp_cpu", "trainer.devices=4",
              "logger.wandb.offline=false", "data=commonsense8_hub", "experiment=offline_commonsense",
              "hparams_search=optuna", "model=llama2_7b", "model=llama3_2_3b", "model=qwen2_5_0_5b", "model=gemma_2b",
              "model=smollm2_135m_hub", "resume=/path/to/last.ckpt"}
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
            for value in re.split(r"\s\|\s", values):
                token = f"{key}={value.split(',')[0]}"
                token = PLACEHOLDERS.get(token, token)
                if "<" not in token and "..." not in token and token not in found:
                    found.append(token)
    return found


OVERRIDES = readme_overrides()
TINY = ["model=tiny_random", "data=tiny", "trainer.max_steps=1", "eval.enabled=false", "logger=none", "callbacks=none"]


def test_the_readme_shows_the_overrides_this_test_knows():
    assert len(OVERRIDES) >= 25 and {"budget=lora_all_r80", "resume=never", "module.activation_checkpointing=true",
                                     "adapter.aux_loss_scope=local", "debug=fdr"} <= set(OVERRIDES)


@pytest.mark.parametrize("override", OVERRIDES)
def test_each_readme_override_works_as_written(override, tmp_path):
    paths = [f"paths.output_dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    if override in CHECK_ONLY or not override.startswith(TRAINED):
        cfg = compose_config(override, *paths)
        validate(cfg)
        adapter_config(cfg)
        return
    results = run(compose_config(*TINY, override, *paths))
    assert results["status"] == "ok" and results["timings"]["train_steps"] >= 1
