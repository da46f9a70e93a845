"""Every experiment composes and validates for every method its sweep lists, and passes a smoke run with the
model swapped for tiny_random and the data for the tiny tasks (lightning-hydra-template's ``experiment=glob(*)``
test, in process); every stored ``paper:`` block is well formed. The demo's sweep over all methods runs in
test_sweeps.py."""

import pytest
from conftest import CONF, compose_config
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from moelab.adapters import registered_adapters
from moelab.modules.budget import plan_budget
from moelab.modules.training import adapter_config, run

EXPERIMENTS = sorted(path.stem for path in (CONF / "experiment").glob("*.yaml"))
TINY_TASKS = ["tiny_arithmetic", "tiny_capitals", "tiny_parity"]


def sweep_params(experiment: str) -> dict[str, str]:
    """The sweep an experiment declares (``hydra.sweeper.params``)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    return {str(key): str(value) for key, value in (cfg.hydra.sweeper.params or {}).items()}


def swept_adapters(experiment: str) -> list[str]:
    return sweep_params(experiment)["adapter"].split(",")


CASES = [pytest.param(experiment, option, id=f"{experiment}-{option}")
         for experiment in EXPERIMENTS for option in swept_adapters(experiment)]


def method_of(experiment: str, option: str) -> str:
    """The registered method an adapter option of a sweep configures, or a skip saying why there is none."""
    if not (CONF / "adapter" / f"{option}.yaml").exists():
        pytest.skip(f"conf/adapter/{option}.yaml does not exist yet")
    method = compose_config(f"experiment={experiment}", f"adapter={option}").adapter.name
    if method not in registered_adapters():
        pytest.skip(f"method {method!r} is not registered yet")
    return method


def test_there_is_an_experiment_per_paper_table_and_the_demo():
    assert {"offline_commonsense", "mixlora_table1_llama2_7b", "mixlora_table1_gemma_2b", "mixlora_table2_llama2_7b",
            "furina_commonsense_llama3_2_3b", "lora_mixer_commonsense_llama3_8b",
            "mole_composition"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment,option", CASES)
def test_every_swept_method_composes_and_validates(experiment, option):
    method_of(experiment, option)
    cfg = compose_config(f"experiment={experiment}", f"adapter={option}")
    config = adapter_config(cfg)  # the method's own validation, naming any bad field
    plan_budget(cfg.get("budget"), config)
    assert instantiate(cfg.data).task_names == list(cfg.data.tasks)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_smoke_run(experiment, tmp_path, tmp_path_factory):
    """The experiment as configured, with the tiny model and data and a budget scaled down with the model, on
    the last method its sweep lists (the paper's own method in the paper tables)."""
    option = swept_adapters(experiment)[-1]
    method = method_of(experiment, option)
    single_task = "data.tasks" in sweep_params(experiment)
    tasks = TINY_TASKS[:1] if single_task else TINY_TASKS
    composed = compose_config(f"experiment={experiment}")
    budget = ["budget.reference.r=4"] if composed.get("budget") else []
    budget += ["top_layers=[1]"] if "top_layers" in composed else []  # the tiny model has two layers
    cfg = compose_config(f"experiment={experiment}", f"adapter={option}", "model=tiny_random", "data=tiny",
                         f"data.tasks=[{','.join(tasks)}]", "trainer=default", "trainer.max_steps=2", "eval.limit=4",
                         "data.max_test_examples=4", *budget, "logger=csv", f"paths.output_dir={tmp_path}",
                         f"paths.cache_dir={tmp_path_factory.getbasetemp() / 'experiment-cache'}")
    results = run(cfg)
    assert results["status"] == "ok" and results["method"] == method
    assert set(results["scores"]) == set(tasks)
    assert results["timings"]["train_steps"] == 2  # optimiser steps, each of accumulate_grad_batches micro-batches
    assert results["config"].get("paper") == (cfg.get("paper") and dict(cfg.paper)), "published numbers travel"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_paper_blocks_are_well_formed(experiment):
    paper = compose_config(f"experiment={experiment}").get("paper")
    if paper is None:
        pytest.skip(f"{experiment} stores no published numbers")
    assert paper.source and paper.table and paper.model and paper.tasks and paper.note
    methods = {compose_config(f"experiment={experiment}", f"adapter={option}").adapter.name
               for option in swept_adapters(experiment) if (CONF / "adapter" / f"{option}.yaml").exists()}
    entries = {**paper.methods, **({"base": paper.base} if paper.get("base") else {})}
    assert set(paper.methods) <= methods | set(registered_adapters()), "published rows attach to swept methods"
    for name, entry in entries.items():
        scores = entry.get("scores") or {}
        assert scores or entry.get("average") is not None, f"{name}: no published number"
        assert set(scores) <= set(paper.tasks), f"{name}: a score for a task the paper block does not list"
        assert all(0 < value <= 100 for value in [*scores.values(), entry.get("average") or 50]), name
