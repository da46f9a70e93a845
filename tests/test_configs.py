"""Every file under conf/ composes and instantiates; bad values fail before any model is loaded."""

import inspect

import pytest
from conftest import CONF, compose_config
from hydra.errors import ConfigCompositionException
from hydra.utils import get_method, instantiate
from omegaconf import OmegaConf

from moelab.adapters import AdapterConfigError, ConfigError
from moelab.modules.training import adapter_config, run

TINY = ("model=tiny_random", "data=tiny")


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


def test_the_root_config_composes_with_its_defaults():
    cfg = compose_config()
    assert cfg.model.name == "smollm2_135m" and cfg.adapter.name == "lora"
    assert cfg.run_name == "lora-seed0" and "lora" in cfg.tags


@pytest.mark.parametrize("name", options("model"))
def test_model_configs_bind_to_their_loader(name):
    cfg = compose_config(f"model={name}", "data=tiny")
    values = OmegaConf.to_container(cfg.model, resolve=True)
    loader = get_method(values.pop("_target_"))
    inspect.signature(loader).bind(**values)  # every key is a parameter of the loader


@pytest.mark.parametrize("name", options("adapter"))
def test_adapter_configs_validate(name):
    config = adapter_config(compose_config(*TINY, f"adapter={name}"))
    assert type(config).__name__.endswith("Config")


@pytest.mark.parametrize("name", options("data"))
def test_data_configs_instantiate(name):
    datamodule = instantiate(compose_config("model=tiny_random", f"data={name}").data)
    assert datamodule.task_names


@pytest.mark.parametrize("name", options("trainer"))
def test_trainer_configs(name):
    cfg = compose_config(*TINY, f"trainer={name}", "paths.output_dir=/tmp/moelab-test-trainer")
    if cfg.trainer.accelerator == "cpu":
        trainer = instantiate(cfg.trainer, logger=False, callbacks=[])
        assert trainer.max_steps == cfg.trainer.max_steps
    elif "strategy" in cfg.trainer:
        assert instantiate(cfg.trainer.strategy) is not None
    else:
        assert get_method(cfg.trainer._target_)


@pytest.mark.parametrize("group", ["logger", "callbacks", "module"])
def test_other_groups_instantiate(group, tmp_path):
    for name in options(group):
        cfg = compose_config(*TINY, f"{group}={name}", f"paths.output_dir={tmp_path}")
        node = cfg.get(group)
        if group == "module":
            assert callable(instantiate(node))
        else:
            assert all(instantiate(item) is not None for item in (node or {}).values())


@pytest.mark.parametrize("name", options("debug"))
def test_debug_configs_compose(name):
    assert compose_config(*TINY, f"debug={name}").trainer.max_steps >= 1


def test_a_typo_in_an_override_fails_at_composition():
    with pytest.raises(ConfigCompositionException, match="rr"):
        compose_config(*TINY, "adapter.rr=4")


@pytest.fixture
def no_model_loading(monkeypatch):
    """Any attempt to build the model fails the test: errors must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad config was reported")
    monkeypatch.setattr("moelab.modules.models.build_tiny_random", refuse)


@pytest.mark.parametrize("override,error,message", [
    ("+adapter.rr=4", AdapterConfigError, r"unknown field\(s\) \['rr'\]"),
    ("adapter.r=0", AdapterConfigError, r"r \(0\) must be a positive integer"),
    ("adapter.name=nope", AdapterConfigError, "unknown adapter 'nope'"),
    # an error raised by a _target_ (which Hydra wraps) comes out as the one-line ConfigError, naming the field
    ("data.test_fraction=2", ConfigError, r"data.test_fraction \(2\) must be in \(0, 1\)"),
    ("data.tasks=[tiny_parity,typo_task]", ConfigError, "unknown task 'typo_task'"),
])
def test_bad_values_fail_before_the_model_loads(override, error, message, tmp_path, no_model_loading):
    cfg = compose_config(*TINY, override, f"paths.output_dir={tmp_path}", "logger=csv")
    with pytest.raises(error, match=message):
        run(cfg)
    assert (tmp_path / "error.txt").exists(), "the failure is written into the run folder"
