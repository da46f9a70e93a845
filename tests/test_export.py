"""Merged export of trained runs (LoRA, FURINA): a plain transformers checkpoint and a PEFT LoRA that load
without moelab and reproduce the in-memory merged model; safe-merge refusals; idempotent merging."""

import json
import os
import runpy
import shutil
import subprocess
import sys
import textwrap
import warnings
from unittest import mock

import pytest
import torch
from conftest import ROOT, compose_config, tiny_model, token_batch
from safetensors.torch import load_file, save_file

from moelab.adapters import MergeError, adapter_layers, inject, merge, merge_and_unload, register
from moelab.adapters.base import _REGISTRY
from moelab.adapters.lora import Lora, LoraConfig
from moelab.modules.export import export_merged, peft_lora
from moelab.modules.models import build_tiny_random
from moelab.modules.runs import load_trained
from moelab.modules.training import run

METHODS = ("furina", "lora")
IDS = token_batch(batch=2, seq=16, seed=3)["input_ids"]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
# not conf/eval's defaults, so that scripts/evaluate.py visibly scores with the run's own protocol
RUN_EVAL_PROTOCOL = ("eval.num_fewshot=1", "eval.max_length=96", "eval.batch_size=4", "eval.limit=5")

# Loads the exports the way a user without moelab would. Any import of moelab fails loudly at once (a
# meta-path finder that raises, not ImportError, so that no optional-import fallback swallows it), every
# attempt is recorded, and the check afterwards also catches a moelab module that was already loaded.
VANILLA = textwrap.dedent("""
    import sys
    attempts = []
    class NoMoelab:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "moelab":
                attempts.append(name)
                raise RuntimeError(f"the export needs moelab: something imported {name}")
            return None
    sys.meta_path.insert(0, NoMoelab())
    try:
        import moelab
    except RuntimeError:
        attempts.clear()  # the blocker works
    else:
        raise AssertionError("the moelab import blocker is not active")
    from pathlib import Path
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    root, ids = Path(sys.argv[1]), torch.load(sys.argv[2])
    out = {}
    for method in sys.argv[3:]:
        export = root / f"{method}-export"
        merged = AutoModelForCausalLM.from_pretrained(export).eval()
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), export / "peft").eval()
        with torch.no_grad():
            out[f"{method}/merged"], out[f"{method}/peft"] = merged(ids).logits, peft(ids).logits
        out[f"{method}/tokens"] = torch.tensor(AutoTokenizer.from_pretrained(export).encode("12+30="))
    assert not attempts, f"moelab imports were attempted: {attempts}"
    assert not [name for name in sys.modules if name.split(".")[0] == "moelab"], "moelab was imported"
    torch.save(out, root / "vanilla.pt")
""")


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny FURINA and LoRA runs trained end to end (3 steps at lr 1e-2, so that the update matters), the
    FURINA one exported by scripts/export_merged.py (run in this process), the LoRA one by the function,
    and the tiny base saved for PEFT."""
    root = tmp_path_factory.mktemp("export")
    threads = torch.get_num_threads()
    for method in METHODS:
        # one thread: tiny matmuls gain nothing from two, and lose a lot when another process holds a core
        run(compose_config("model=tiny_random", "data=tiny", f"adapter={method}", "trainer.max_steps=3",
                           "module.optimizer.lr=1e-2", "eval.enabled=false", "logger=none", "callbacks=none",
                           "trainer.limit_val_batches=1", "threads=1", *RUN_EVAL_PROTOCOL,
                           f"paths.output_dir={root / method}"))
    torch.set_num_threads(threads)
    script = ROOT / "scripts" / "export_merged.py"
    argv = [str(script), str(root / "furina"), str(root / "furina-export"), "--peft"]
    with mock.patch.object(sys, "argv", argv), pytest.raises(SystemExit) as exited:
        runpy.run_path(str(script), run_name="__main__")
    assert exited.value.code == 0
    export_merged(root / "lora", root / "lora-export", peft=True)
    build_tiny_random().model.save_pretrained(root / "base")
    return root


@pytest.fixture(scope="module")
def vanilla(runs):
    torch.save(IDS, runs / "ids.pt")
    command = [sys.executable, "-c", VANILLA, str(runs), str(runs / "ids.pt"), *METHODS]
    completed = subprocess.run(command, cwd=runs, env=ONE_THREAD, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return torch.load(runs / "vanilla.pt")


@pytest.mark.parametrize("method", METHODS)
def test_exports_load_without_moelab_and_reproduce_the_merged_model(runs, vanilla, method):
    base, _ = load_trained(runs / method)
    unmerged = logits(base.model)
    merged = logits(merge_and_unload(base.model, safe_merge=True))
    assert (unmerged - logits(tiny_model()[0])).abs().max() > 1e-3, "the trained adapter must matter"
    assert (vanilla[f"{method}/merged"] - merged).abs().max() <= 1e-5
    assert (vanilla[f"{method}/peft"] - merged).abs().max() <= 1e-5
    assert vanilla[f"{method}/tokens"].tolist() == base.tokenizer.encode("12+30=")


@pytest.mark.parametrize("method,rank", [("furina", 8 * 16), ("lora", 8)])
def test_peft_files_describe_the_whole_adapter_at_scale_one(runs, method, rank):
    folder = runs / f"{method}-export" / "peft"
    config = json.loads((folder / "adapter_config.json").read_text())
    base, _ = load_trained(runs / method)
    layers = dict(adapter_layers(base.model))
    assert config["peft_type"] == "LORA" and config["r"] == rank and config["lora_alpha"] == rank
    assert sorted(config["target_modules"]) == sorted({name.rsplit(".", 1)[-1] for name in layers})
    assert config["base_model_name_or_path"] is None, "the tiny base is built in process, it has no path"
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    assert set(tensors) == {f"base_model.model.{name}.lora_{kind}.weight" for name in layers for kind in "AB"}
    for name, layer in layers.items():
        lora_A, lora_B = (tensors[f"base_model.model.{name}.lora_{kind}.weight"] for kind in "AB")
        assert lora_A.shape[0] == lora_B.shape[1] == rank
        torch.testing.assert_close(lora_B @ lora_A, layer.get_delta_weight(), rtol=1e-5, atol=1e-6)


def test_merging_twice_warns_and_changes_nothing(runs):
    base, _ = load_trained(runs / "furina")
    merge(base.model, safe_merge=True)
    once = logits(base.model)
    weights = {k: v.clone() for k, v in base.model.state_dict().items()}
    with pytest.warns(UserWarning, match="already merged"):
        merge(base.model, safe_merge=True)
    assert all(torch.equal(v, weights[k]) for k, v in base.model.state_dict().items())
    assert torch.equal(logits(base.model), once)


def test_nan_in_an_adapter_tensor_fails_the_export_and_leaves_everything_untouched(runs, tmp_path):
    poisoned = tmp_path / "poisoned"
    shutil.copytree(runs / "furina", poisoned)
    weights = poisoned / "adapter" / "adapter_model.safetensors"
    state = load_file(str(weights))
    key = next(k for k in state if k.endswith("magnitude"))
    state[key][3] = float("nan")
    save_file(state, str(weights))
    with pytest.raises(MergeError, match="NaN"):
        export_merged(poisoned, tmp_path / "out", peft=True)
    assert not (tmp_path / "out").exists(), "nothing may be written"

    base, _ = load_trained(poisoned)
    before = {k: v.clone() for k, v in base.model.state_dict().items() if "base_layer" in k}
    with pytest.raises(MergeError, match="NaN"):
        merge_and_unload(base.model, safe_merge=True)
    assert all(torch.equal(v, before[k]) for k, v in base.model.state_dict().items() if k in before)
    assert not any(layer.merged for _, layer in adapter_layers(base.model))


@pytest.fixture
def unmergeable_probe():
    class UnmergeableProbe(Lora):
        name = "unmergeable_probe"
        mergeable = False
        merge_refusal = "its experts are picked per token"

    register(UnmergeableProbe)
    yield
    _REGISTRY.pop("unmergeable_probe")


def test_a_method_that_routes_on_the_input_is_refused_before_loading(unmergeable_probe, tmp_path):
    (tmp_path / "adapter").mkdir()
    # no model config and no weights: the refusal must come before anything is loaded
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"method": "unmergeable_probe"}))
    with pytest.raises(MergeError, match="unmergeable_probe .* cannot be exported .* picked per token "
                                         r"\(input-dependent routing\)"):
        export_merged(tmp_path, tmp_path / "out")


def test_ambiguous_short_target_names_become_full_paths():
    from peft import get_peft_model, set_peft_model_state_dict

    model, _ = tiny_model()
    inject(model, LoraConfig(target_modules=["layers.0.self_attn.q_proj"], init_lora_weights="random"))
    config, tensors = peft_lora(model, None)
    assert config.target_modules == {"model.layers.0.self_attn.q_proj"}, "q_proj alone would adapt layer 1 too"
    theirs = get_peft_model(tiny_model()[0], config)
    set_peft_model_state_dict(theirs, tensors)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(logits(theirs), logits(model), rtol=0, atol=1e-5)


def evaluate_script(run_dir, *options: str) -> dict:
    """scripts/evaluate.py run in this process with lm-eval replaced: the arguments it would score with."""
    script = ROOT / "scripts" / "evaluate.py"
    with mock.patch("moelab.modules.evaluation.lm_eval_scores", return_value={"t": {"acc": 0.5}}) as scorer, \
            mock.patch.object(sys, "argv", [str(script), str(run_dir), *options]), \
            pytest.raises(SystemExit) as exited:
        runpy.run_path(str(script), run_name="__main__")
    assert exited.value.code == 0
    return scorer.call_args.kwargs


def test_evaluate_scores_with_the_runs_own_protocol_unless_overridden(runs):
    assert evaluate_script(runs / "lora") == {"limit": 5, "num_fewshot": 1, "max_length": 96, "batch_size": 4}
    overridden = evaluate_script(runs / "lora", "--max-length", "64", "--limit", "2")
    assert overridden == {"limit": 2, "num_fewshot": 1, "max_length": 64, "batch_size": 4}
    report = json.loads((runs / "lora" / "evaluation.json").read_text())
    assert report["protocol"] == overridden and report["overridden"] == ["limit", "max_length"]
