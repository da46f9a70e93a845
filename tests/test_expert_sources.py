"""Expert sources and stages shared by MoLE and LoRA-Mixer (composition.py, experts.py's loading section):
PEFT and moelab LoRA folders loaded as experts against PEFT / moelab themselves, errors that name the file,
frozen-but-saved experts, the two-stage schedule (what each stage moves, through the real trainer),
routing-site grouping, and an end-to-end run."""

import functools
import itertools
import json

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config, randomize_adapter, tiny_model, token_batch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from moelab.adapters import (
    AdapterConfigError,
    adapter_parameters,
    adapter_state_dict,
    inject,
    load_adapter_state_dict,
    routed_modules,
)
from moelab.adapters.composition import HARD, SOFT, ComposedLinear, ExpertsConfig, composed_layers, site_key
from moelab.adapters.experts import read_trained_lora, stack_trained_loras
from moelab.adapters.lora import LoraConfig
from moelab.adapters.lora_mixer import LoraMixerConfig
from moelab.adapters.mole import MoleConfig
from moelab.modules.models import build_tiny_random
from moelab.modules.training import run, save_adapter

PEFT_A = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "rank_pattern": {"v_proj": 2},
          "alpha_pattern": {"layers.1.self_attn.q_proj": 3}}
PEFT_B = {"r": 6, "lora_alpha": 12, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "use_rslora": True}


def save_peft_lora(folder, seed: int, model_sizes: dict | None = None, **lora_config):
    """A PEFT LoRA on the tiny model with random non-zero B, saved with ``save_pretrained``; returns the model."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    model, _ = tiny_model(**(model_sizes or {}))
    peft_model = get_peft_model(model, PeftLoraConfig(**lora_config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    peft_model.save_pretrained(str(folder))
    return peft_model.eval()


def save_moelab_lora(run_dir, seed: int, targets=("q_proj", "v_proj")):
    """A moelab run folder of method lora (written by the trainer's own writer) with random weights."""
    base = build_tiny_random()
    adapter = inject(base.model, LoraConfig(target_modules=list(targets), r=8, lora_alpha=16))
    randomize_adapter(base.model, scale=0.2, seed=seed)
    cfg = OmegaConf.create({"model": {"_target_": "moelab.modules.models.build_tiny_random"}})
    save_adapter(run_dir / "adapter", base, adapter, cfg)
    return base.model.eval()


def loaded(config_class, paths, **fields):
    model, _ = tiny_model()
    adapter = inject(model, config_class(experts={"source": "load", "paths": [str(p) for p in paths]}, **fields))
    return model.eval(), adapter


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    models = {"peft_a": save_peft_lora(root / "peft_a", 1, **PEFT_A),
              "peft_b": save_peft_lora(root / "peft_b", 2, **PEFT_B),
              "moelab": save_moelab_lora(root / "run", 3)}
    return {"peft_a": root / "peft_a", "peft_b": root / "peft_b", "moelab": root / "run"}, models


# ---------------------------------------------------------------------------------------------- loading


def test_peft_experts_give_peft_deltas_per_layer(folders):
    paths, models = folders
    model, _ = loaded(MoleConfig, [paths["peft_a"], paths["peft_b"]])
    layers = dict(composed_layers(model))
    assert len(layers) == 8  # q, k, v, o of both layers: the union of what the two LoRAs adapt
    compared = 0
    for expert, key in enumerate(("peft_a", "peft_b")):
        for name, peft_layer in models[key].base_model.model.named_modules():
            if not hasattr(peft_layer, "get_delta_weight") or "default" not in getattr(peft_layer, "lora_A", {}):
                continue
            ours = layers[name].experts.delta_weight(F.one_hot(torch.tensor(expert), 2))
            torch.testing.assert_close(ours, peft_layer.get_delta_weight("default"), rtol=0, atol=1e-6)
            compared += 1
    assert compared == 2 * 2 + 4 * 2, "every PEFT LoRA layer compared: A's q, v and B's q, k, v, o in two layers"
    q0 = layers["model.layers.0.self_attn.q_proj"].experts
    assert q0.rank == 6 and q0.lora_A[0, 4:].abs().sum() == 0, "ranks zero-padded to the largest"
    assert q0.scaling.tolist() == pytest.approx([8 / 4, 12 / 6 ** 0.5])  # α/r, and rsLoRA's α/√r
    assert layers["model.layers.1.self_attn.q_proj"].experts.scaling[0] == pytest.approx(3 / 4)  # alpha_pattern
    assert layers["model.layers.0.self_attn.k_proj"].experts.scaling[0] == 0, "LoRA A does not adapt k_proj"


def test_a_forced_peft_expert_gives_the_peft_model_logits(folders):
    paths, models = folders
    batch = token_batch()
    expected = logits(models["peft_a"], batch)
    single, _ = loaded(MoleConfig, [paths["peft_a"]])  # one expert: the gate weight is 1
    torch.testing.assert_close(logits(single, batch), expected, rtol=0, atol=1e-5)
    pair, _ = loaded(MoleConfig, [paths["peft_a"], paths["peft_b"]], masked_experts=[1])  # B masked away
    torch.testing.assert_close(logits(pair, batch), expected, rtol=0, atol=1e-5)
    base, _ = tiny_model()
    assert (logits(base, batch) - expected).abs().max() > 1e-2, "the LoRA must change the logits"


def test_a_moelab_lora_run_as_expert_gives_that_runs_logits(folders):
    paths, models = folders
    batch = token_batch()
    model, _ = loaded(MoleConfig, [paths["moelab"]])
    torch.testing.assert_close(logits(model, batch), logits(models["moelab"], batch), rtol=0, atol=1e-5)
    lora = read_trained_lora(paths["moelab"] / "adapter")  # the adapter folder itself works too
    assert lora.format == "moelab" and len(lora.modules) == 4


def test_loaded_experts_are_frozen_saved_and_round_trip(folders):
    paths, _ = folders
    batch = token_batch()
    model, adapter = loaded(LoraMixerConfig, [paths["peft_a"], paths["moelab"]], top_k=2)
    for _, layer in composed_layers(model):
        assert not any(p.requires_grad for p in layer.experts.parameters())
    trainable = {id(p) for p in adapter.trainable_parameters(model)}
    routers = {id(p) for _, layer in composed_layers(model) if layer.is_leader for p in layer.site.parameters()}
    assert trainable == routers, "plug-in mode trains the routers only"
    state = adapter_state_dict(model)
    assert any(key.endswith("experts.lora_A") for key in state), "loaded experts are part of the adapter state"
    with torch.no_grad():
        for _, parameter in adapter_parameters(model):
            parameter.add_(0.05)
    state = {key: value.clone() for key, value in adapter_state_dict(model).items()}
    reloaded, _ = loaded(LoraMixerConfig, [paths["peft_a"], paths["moelab"]], top_k=2)
    load_adapter_state_dict(reloaded, state)
    torch.testing.assert_close(logits(reloaded, batch), logits(model, batch), rtol=0, atol=1e-6)


def test_loaded_experts_that_train_softly_are_anchored_at_injection(folders):
    paths, _ = folders
    model, adapter = loaded(LoraMixerConfig, [paths["peft_a"], paths["moelab"]], top_k=2, preserve_experts=[0],
                            train_experts_in_soft_stage=True)
    for _, layer in composed_layers(model):  # plug-in mode starts in stage soft: θ^(0) = the loaded LoRA
        assert layer.anchors.captured and torch.equal(layer.anchors.lora_A, layer.experts.lora_A[[0]])
    model.train()
    batch = token_batch()
    adapter.set_context(model, batch["task_ids"], batch["attention_mask"].bool())
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert adapter.aux_losses(model)["preserve"].item() == 0.0


# ---------------------------------------------------------------------------------------------- errors


def test_missing_or_foreign_folders_fail_in_the_config_naming_them(tmp_path):
    with pytest.raises(AdapterConfigError, match=f"expert LoRA {tmp_path / 'nope'}: no adapter_config.json"):
        MoleConfig(experts={"source": "load", "paths": [str(tmp_path / "nope")]})
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "adapter_config.json").write_text(json.dumps({"method": "mixlora"}))
    (foreign / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(AdapterConfigError, match="method 'mixlora'; only 'lora' runs"):
        MoleConfig(experts={"source": "load", "paths": [str(foreign)]})
    (foreign / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True}))
    with pytest.raises(AdapterConfigError, match=r"PEFT option\(s\) \['use_dora'\]"):
        LoraMixerConfig(experts={"source": "load", "paths": [str(foreign)]}, top_k=1)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_16", "olora", "corda", "loftq"])
def test_peft_initialisations_that_rewrite_the_base_weights_are_refused(init, tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "init_lora_weights": init}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(AdapterConfigError, match=rf"{tmp_path}: PEFT option init_lora_weights='{init}' rewrites"):
        MoleConfig(experts={"source": "load", "paths": [str(tmp_path)]})
    for harmless in (True, False, "gaussian", "orthogonal"):  # they shape only the LoRA's own starting values
        (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "init_lora_weights": harmless}))
        MoleConfig(experts={"source": "load", "paths": [str(tmp_path)]})


def test_stacking_a_module_that_no_lora_adapts_names_the_module(folders):
    paths, _ = folders
    lora = read_trained_lora(paths["peft_a"])  # q_proj and v_proj only
    with pytest.raises(AdapterConfigError, match="no expert LoRA adapts 'model.layers.0.self_attn.k_proj'"):
        stack_trained_loras([lora], "model.layers.0.self_attn.k_proj", nn.Linear(64, 64))


def test_a_shape_mismatch_fails_at_injection_naming_the_file(tmp_path):
    save_peft_lora(tmp_path / "wide", 0, model_sizes={"hidden_size": 32, "intermediate_size": 64}, r=2,
                   lora_alpha=2, target_modules=["q_proj"])
    config = MoleConfig(experts={"source": "load", "paths": [str(tmp_path / "wide")]})
    with pytest.raises(AdapterConfigError, match=f"expert LoRA {tmp_path / 'wide'}: model.layers.0.self_attn.q_proj"):
        inject(tiny_model()[0], config)


def test_a_lora_on_untargeted_modules_fails_naming_the_file(tmp_path):
    save_peft_lora(tmp_path / "ffn", 0, r=2, lora_alpha=2, target_modules=["q_proj", "up_proj"])
    config = MoleConfig(experts={"source": "load", "paths": [str(tmp_path / "ffn")]})
    with pytest.raises(AdapterConfigError, match="ffn adapts 'model.layers.0.mlp.up_proj', which target_modules"):
        inject(tiny_model()[0], config)
    model, _ = tiny_model()
    inject(model, MoleConfig(experts=config.experts, target_modules="all-linear"))
    assert len(list(composed_layers(model))) == 4


def test_bad_expert_fields_name_the_field():
    with pytest.raises(AdapterConfigError, match="experts.source"):
        ExpertsConfig(source="hub", tasks=["a"])
    with pytest.raises(AdapterConfigError, match="experts.num_experts or experts.tasks"):
        ExpertsConfig()
    with pytest.raises(AdapterConfigError, match=r"experts.num_experts \(2\) must be >= the number of data tasks"):
        ExpertsConfig(tasks=["a", "b", "c"], num_experts=2)
    with pytest.raises(AdapterConfigError, match=r"experts: unknown field\(s\) \['rank'\]"):
        MoleConfig(experts={"rank": 4, "tasks": ["a"]})


# ---------------------------------------------------------------------------------------------- stages


@pytest.mark.parametrize("fields,max_steps,length", [
    ({}, 5, 4), ({}, 3, 2), ({}, 2, 1), ({"stage1_fraction": 0.1}, 5, 1), ({"stage1_steps": 3}, 5, 3),
    ({"stage1_steps": 3}, -1, 3),
])
def test_stage_one_length(fields, max_steps, length):
    assert ExpertsConfig(tasks=["a"], **fields).stage1_length(max_steps) == length


def test_stage_lengths_that_leave_no_soft_stage_fail():
    with pytest.raises(AdapterConfigError, match="stage1_steps"):
        ExpertsConfig(tasks=["a"], stage1_steps=5).stage1_length(5)
    for max_steps in (-1, 1):
        with pytest.raises(AdapterConfigError, match=r"stage1_fraction needs trainer.max_steps >= 2"):
            ExpertsConfig(tasks=["a"]).stage1_length(max_steps)


def test_stages_switch_what_trains_and_how_examples_route():
    model, _ = tiny_model()
    adapter = inject(model, MoleConfig(experts={"tasks": ["a", "b", "c"]}))
    assert adapter.stage_schedule(10) == [(0, HARD), (8, SOFT)]
    layers = [layer for _, layer in composed_layers(model)]
    experts = {id(p) for layer in layers for p in layer.experts.parameters()}
    sites = {id(p) for layer in layers if layer.is_leader for p in layer.site.parameters()}
    trainable = {id(p) for p in adapter.trainable_parameters(model)}
    assert trainable == experts | sites and all(p.requires_grad for p in adapter.trainable_parameters(model))
    assert {id(p) for p in adapter.frozen_parameters(model)} == sites, "stage hard freezes the sites"
    model.train()
    batch = token_batch(batch=3, seq=5)
    adapter.set_context(model, batch["task_ids"], batch["attention_mask"].bool())
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for _, site in routed_modules(model):
        torch.testing.assert_close(site.routing.probs, F.one_hot(batch["task_ids"].repeat_interleave(5), 3).float())
    adapter.set_context(model, None, None)
    with pytest.raises(RuntimeError, match="hard routing"):
        model(input_ids=batch["input_ids"])
    adapter.enter_stage(model, SOFT)
    assert all(p.requires_grad for p in adapter.trainable_parameters(model)), "DDP's set of parameters never changes"
    assert {id(p) for p in adapter.frozen_parameters(model)} == experts, "stage soft freezes the experts"


class AdapterSnapshots(L.Callback):
    """The experts' and the routing sites' tensors before training and after every optimiser step."""

    def __init__(self) -> None:
        self.steps: list[tuple[str | None, dict[str, list[torch.Tensor]]]] = []

    def _take(self, module, stage) -> None:
        layers = [layer for _, layer in composed_layers(module.model)]
        self.steps.append((stage, {
            "experts": [p.detach().clone() for layer in layers for p in layer.experts.parameters()],
            "sites": [p.detach().clone() for layer in layers if layer.is_leader for p in layer.site.parameters()]}))

    def on_train_start(self, trainer, module) -> None:
        self._take(module, None)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._take(module, module.stage)


@pytest.mark.parametrize("config_class", [MoleConfig, LoraMixerConfig])
def test_the_trainer_moves_only_the_experts_then_only_the_sites(config_class, tmp_path):
    """Experts trained in the run (source=train) through AdapterLM and Lightning's Trainer: stage hard moves
    the experts and leaves the gates / routers bitwise alone, stage soft the other way round."""
    from moelab.modules.lm_module import AdapterLM

    model, _ = tiny_model()
    adapter = inject(model, config_class(experts={"tasks": ["a", "b", "c"], "stage1_steps": 2}))
    module = AdapterLM(model, adapter, optimizer=functools.partial(torch.optim.AdamW, lr=1e-2), num_tasks=3)
    snapshots = AdapterSnapshots()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[snapshots],
                        default_root_dir=tmp_path)
    batches = [token_batch(batch=3, seq=10, seed=seed) for seed in range(4)]
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    assert [stage for stage, _ in snapshots.steps[1:]] == [HARD, HARD, SOFT, SOFT]
    for (_, before), (stage, after) in itertools.pairwise(snapshots.steps):
        moved = {part: any(not torch.equal(a, b) for a, b in zip(before[part], after[part], strict=True))
                 for part in ("experts", "sites")}
        assert moved == {"experts": stage == HARD, "sites": stage == SOFT}, stage


# ---------------------------------------------------------------------------------------------- sites


@pytest.mark.parametrize("level,block_layers,key", [
    ("matrix", 1, "model.layers.5.self_attn.q_proj"), ("layer", 1, "model.layers.5"),
    ("block", 4, "model.layers.block1"), ("network", 1, ""),
])
def test_site_keys(level, block_layers, key):
    assert site_key("model.layers.5.self_attn.q_proj", level, block_layers) == key


def test_followers_reuse_their_leaders_weights():
    model, _ = tiny_model()
    adapter = inject(model, MoleConfig(experts={"tasks": ["a", "b", "c"], "lora_dropout": 0.0}))
    adapter.enter_stage(model, SOFT)
    with torch.no_grad():
        for _, parameter in adapter_parameters(model):
            parameter.normal_(0, 0.3)
    layers = dict(composed_layers(model))
    seen = {}
    for name in ("model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"):
        layers[name].register_forward_hook(lambda m, args, out, name=name: seen.update({name: (args[0], out)}))
    model.eval()
    logits(model, token_batch())
    leader = layers["model.layers.1.self_attn.q_proj"]
    follower = layers["model.layers.1.self_attn.k_proj"]
    assert isinstance(follower, ComposedLinear) and not follower.is_leader and follower.routing is None
    x, out = seen["model.layers.1.self_attn.k_proj"]
    gates = leader.routing.probs.reshape(*x.shape[:2], -1)
    expected = follower.base_layer(x) + follower.experts.reference(x, gates)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("method,extra", [("mole", ()), ("lora_mixer", ("adapter.top_k=2",))])
def test_training_with_experts_loaded_from_folders(method, extra, folders, tmp_path, capsys):
    paths, _ = folders
    cfg = compose_config("model=tiny_random", "data=tiny", f"adapter={method}", "trainer.max_steps=3",
                         "adapter.experts.source=load", f"adapter.experts.paths=[{paths['peft_a']},{paths['moelab']}]",
                         *extra, "eval.limit=4", "eval.base=false", "logger=none", "callbacks=none",
                         f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}")
    results = run(cfg)
    assert "adapter stage 'soft'" in capsys.readouterr().out
    assert results["status"] == "ok" and results["label"] == f"{method} [reconstruction]"
    assert results["timings"]["train_steps"] == 3 and results["scored_as"] == "unmerged"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["fidelity"] == "reconstruction" and 0 <= saved["routing"]["train"]["routing/entropy"] <= 1
    assert saved["routing"]["dev"]["routing/dead_experts"] >= 0
