"""Parameter budgets: the search, validation before any model loads, sizing on the tiny model (checked
against counts on real weights), and the budget block a run writes."""

import dataclasses
import json

import pytest
from conftest import CONF, compose_config, tiny_model

from moelab.adapters import AdapterConfigError, config_from_dict, count_parameters, inject
from moelab.adapters.lora import Lora, LoraConfig
from moelab.modules.budget import _get, _replaced, closest_value, meta_skeleton, plan_budget
from moelab.modules.training import adapter_config, run

ALL_SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
REFERENCE = {"reference": {"name": "lora", "r": 4, "target_modules": ALL_SEVEN}, "scale_with": ["lora_alpha"]}


def real_count(name: str, values: dict) -> int:
    """Trainable parameters of a method injected into the tiny model with its real weights."""
    model, _ = tiny_model()
    inject(model, config_from_dict(name, values))
    return count_parameters(model)["trainable"]


def test_closest_value_brackets_then_bisects():
    calls = []

    def count(v):
        calls.append(v)
        return 10 * v + 3

    assert closest_value(count, 60, "r") == 6  # 63 is 3 away, 53 is 7 away
    assert len(calls) == len(set(calls)), "each value is counted once"
    assert closest_value(count, 58, "r") == 5  # a tie (53, 63) goes to the smaller value
    assert closest_value(count, 1, "r") == 1
    with pytest.raises(AdapterConfigError, match="no r up to"):
        closest_value(lambda v: 7, 100, "r")


def test_the_skeleton_holds_no_weights(tiny):
    model, _ = tiny
    skeleton = meta_skeleton(model)
    assert all(p.is_meta for p in skeleton.parameters())
    assert count_parameters(skeleton)["base"] == count_parameters(model)["base"]


def test_lora_is_sized_to_the_reference_count_with_alpha_in_proportion(tiny):
    model, _ = tiny
    lora = LoraConfig(r=8, lora_alpha=16.0, target_modules=["q_proj", "v_proj"])
    config, report = plan_budget(REFERENCE, lora).fit(model)
    target = real_count("lora", {"r": 4, "target_modules": ALL_SEVEN})
    # per layer: r·(4·128 + 3·192) on all seven vs r·2·128 on q, v: r = 4 · 1088 / 256 = 17 matches exactly
    assert report["target"] == target and config.r == 17 and report["achieved"] == target
    assert config.lora_alpha == 34.0 and report["scaled"] == {"lora_alpha": [16.0, 34.0]}
    assert report["relative_error"] == 0 and report["configured"] == 8 and report["sized"]
    assert "lora(r=4" in report["rule"] and f"{target:,}" in report["rule"]


def test_a_routed_method_gets_the_value_whose_real_count_is_closest(tiny):
    model, _ = tiny
    mixlora = adapter_config(compose_config("model=tiny_random", "data=tiny", "adapter=mixlora"))
    config, report = plan_budget({"reference": {"name": "lora", "r": 32, "target_modules": ALL_SEVEN}},
                                 mixlora).fit(model)
    distance = {r: abs(real_count("mixlora", {"r": r}) - report["target"]) for r in range(1, 12)}
    assert config.r == min(distance, key=distance.get)
    assert report["achieved"] == real_count("mixlora", {"r": config.r}), "meta counts equal real counts"
    assert config.lora_alpha == 32, "no scale_with: alpha stays"


def test_dotted_budget_fields_reach_nested_configs():
    @dataclasses.dataclass
    class Inner:
        r: int = 4
        lora_alpha: float = 8.0

    @dataclasses.dataclass
    class Outer:
        experts: Inner = dataclasses.field(default_factory=Inner)
        host: dict = dataclasses.field(default_factory=lambda: {"r": 2})

    outer = Outer()
    assert _replaced(outer, "experts.r", 9).experts == Inner(9, 8.0) and outer.experts.r == 4
    assert _get(_replaced(outer, "host.r", 5), "host.r") == 5 and outer.host == {"r": 2}


@pytest.mark.parametrize("budget,message", [
    ({"reference": {"name": "lora"}, "rank": 4}, r"budget: unknown field\(s\) \['rank'\]"),
    ({"reference": {"r": 4}}, "budget.reference.name must name"),
    ({"reference": {"name": "lora", "rr": 4}}, r"budget.reference: adapter 'lora': unknown field\(s\) \['rr'\]"),
    ({"reference": {"name": "lora"}, "scale_with": ["lora_alpa"]}, r"\['lora_alpa'\] is no field"),
])
def test_bad_budgets_fail_naming_the_field(budget, message):
    with pytest.raises(AdapterConfigError, match=message):
        plan_budget(budget, LoraConfig())


def test_a_method_whose_budget_field_is_missing_is_refused(monkeypatch):
    monkeypatch.setattr(Lora, "budget_field", "rank")
    with pytest.raises(AdapterConfigError, match="lora's budget_field 'rank' is not a field of LoraConfig"):
        plan_budget(REFERENCE, LoraConfig())
    assert plan_budget(None, LoraConfig()) is None


@pytest.mark.parametrize("name", sorted(path.stem for path in (CONF / "budget").glob("*.yaml")))
def test_budget_configs_name_a_reference_adapter_config(name):
    cfg = compose_config("model=tiny_random", "data=tiny", f"budget={name}")
    plan = plan_budget(cfg.budget, adapter_config(cfg))
    assert plan.reference_name == cfg.budget.reference.name and plan.scale_with == ["lora_alpha", "expert_alpha"]
    if name != "lora":
        assert plan.reference.r == int(name.rsplit("_r", 1)[1]), "the file name says the reference rank"


def test_a_budgeted_run_records_the_rule_and_saves_the_sized_adapter(tmp_path):
    results = run(compose_config("model=tiny_random", "data=tiny", "adapter=lora", "budget=lora_all_r80",
                                 "trainer.max_steps=1", "eval.enabled=false", "logger=none", "callbacks=none",
                                 f"paths.output_dir={tmp_path}"))
    budget = results["budget"]
    assert budget["reference"]["r"] == 80 and budget["field"] == "r" and budget["value"] == 340  # 80 · 1088 / 256
    assert results["parameters"]["trainable"] == budget["achieved"] == budget["target"]
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["config"]["r"] == 340 and saved["config"]["lora_alpha"] == 16 * 340 / 8
