"""Evaluation protocols: whose prompts a task is rendered with and how its answers are scored.

``data.protocol`` picks one for every task of a data config:

* ``lm_eval`` (default): the prompts of lm-eval's stock task YAMLs (``moelab.data.tasks``), each choice's
  text scored by its log-likelihood after the prompt.
* ``moe_peft``: the protocol that scored the MixLoRA paper's Tables 1 and 2 (methods.md §3.3, "MoE-PEFT
  training/evaluation habits"). MoE-PEFT's evaluator (``moe_peft/evaluator.py``: ``EvaluateConfig.prepare``,
  ``_dispatch_task_in``, ``_compute_metrcis``) renders each row as a "Please choose the correct answer ..."
  prompt ending in ``Answer:`` (the ``loading_data`` method of each task class in
  ``moe_peft/tasks/qa_tasks.py``), runs the prompt, takes the logits at its last position, keeps only the
  task's label tokens and predicts their argmax. A label's token is the last token of ``" " + label``
  (``tokenizer.encode(" " + label)[-1]``), over the task's whole label list: ARC's has nine labels
  (``1``–``4`` and ``A``–``E``) whatever the row offers. Training text is the same prompt, a space and the
  gold label. This holds for MoE-PEFT 2.0.2 and for 1.0.1, the version the paper's numbers came from: the
  two differ in these files only in how the datasets are loaded (``trust_remote_code``) and in import paths.

How moelab reproduces it. Each task keeps moelab's normalised row ``{"query", "choices", "gold"}``:
``query`` is MoE-PEFT's prompt, ``choices`` its label list, ``gold`` the index MoE-PEFT's evaluator
compares with. lm-eval then scores ``query + continuation`` for every label, where the continuation is a
string whose only token after the prompt is MoE-PEFT's label token, so that each choice's log-likelihood is
the log-softmax of the last-position logits at that token: the argmax over choices is MoE-PEFT's
prediction exactly (log-softmax shifts every logit of a position by the same amount). Which string does
that depends on the tokenizer, so it is found when the model's tokenizer is known (:func:`label_continuations`)
and checked on dev and test prompts (:data:`CHECKED_PROMPTS`): ``" A"``, ``" true"`` for the word and letter
labels, and the bare digit ``"1"`` for ARC's digit labels in tokenizers that split digits (Llama-2, Llama-3,
SmolLM2: ``" 1"`` is two tokens there, and MoE-PEFT compares the digit token). The strings go into the task's
lm-eval config (``<task>.<split>.scoring.json`` beside the split's file, so that ``scripts/evaluate.py`` re-scores
the same way). ``data.label_scoring`` chooses the rule:

* ``last_token`` (default): MoE-PEFT's rule, as above. A label for which no string gives exactly that one
  token after every prompt stops the run with an error naming the field.
* ``text``: lm-eval's log-likelihood of ``" " + label`` over all its tokens, moelab's way of scoring
  answer texts. It equals ``last_token`` for a label that is one token after the prompt; it differs for
  ARC's digit labels (summed over the space and the digit, where MoE-PEFT reads the digit token where the
  space would be), which are about 4% of ARC-Easy's and 1% of ARC-Challenge's rows.

Both report ``acc`` only: MoE-PEFT reports accuracy, and lm-eval's per-character ``acc_norm`` has no
counterpart in it. Where ``label_scoring`` made a difference, results.json says so per task
(``data.tasks.<task>.scoring``).

What else ``moe_peft`` sets, and what it does not reproduce:

* Tokens. MoE-PEFT encodes training and evaluation text with the tokenizer's special tokens (a leading BOS
  for Llama and Gemma; ``moe_peft/tokenizer.py``, ``Tokenizer.encode``); moelab's training sequences keep
  them under every protocol, and lm-eval (0.4.13) encodes prompts with the tokenizer's defaults, as MoE-PEFT
  does.
* WinoGrande trains on the ``winogrande_debiased`` configuration (9,248 rows, the count in the paper's App.
  A.2 Table 4) on the hub; every configuration shares the same 1,267-row validation split that is scored.
* Training loss. MoE-PEFT trains on the whole padded sequence (``moe_peft/dispatcher.py``,
  ``get_train_data``: ``labels = tokens``, no −100), prompt, answer and padding alike, with the mean
  cross-entropy of each micro-batch over all its positions. The experiments that use this protocol set
  ``data.loss_on_answer_only: false`` (the prompt is trained) and ``data.append_eos: false`` (MoE-PEFT
  appends no EOS). Not reproduced: the padding tokens as targets (moelab always masks padding, whose share
  depends on how batches are formed), and the normalisation (moelab divides the summed cross-entropy by the
  supervised tokens of the whole optimiser step).
* Truncation. MoE-PEFT cuts sequences beyond ``cutoff_len`` (512 in its MixLoRA template, for training and
  evaluation) from the right, moelab from the left (``data.max_length``) and lm-eval not below the model's
  length. Almost no prompt is that long (BoolQ's carries no passage): with the Llama-2 tokenizer only 3 of
  PIQA's 1,838 validation prompts are, which MoE-PEFT scores at a position inside their solutions and moelab
  at the end of the whole prompt; every other task's prompts stay below 430 tokens.
* Data order, batching (MoE-PEFT's ``optim`` dispatch strategy) and seeds are not reproduced.

A task MoE-PEFT does not define (the tiny test tasks, SciQ, a JSON-lines file of normalised rows) keeps its
``lm_eval`` rendering under ``moe_peft``, and results.json records ``protocol: lm_eval`` for it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .files import atomic_write_text

PROTOCOLS = ("lm_eval", "moe_peft")
LABEL_SCORING = ("last_token", "text")
PREFIX = "moe_peft_"
# dev or test prompts per task the label continuations are checked on (spread over the file): every prompt of a
# task ends in the same text ("\nAnswer:", "\nCorrect solution:"), so the boundary tokenises alike in all
CHECKED_PROMPTS = 256

# Label lists: the ``labels`` each task class of moe_peft/tasks/qa_tasks.py passes to QuestionAnswerTask.
ARC_LABELS = ["1", "2", "3", "4", "A", "B", "C", "D", "E"]
BOOLQ_LABELS = ["true", "false"]
LETTERS = ["A", "B", "C", "D", "E"]


# ------------------------------------------------------------------------------- MoE-PEFT's prompts
# Each renders one dataset row as MoE-PEFT's evaluation prompt (its training text is the prompt, a space and
# the gold label); the qa_tasks.py class and method it follows is named in each docstring.


def _question_with_options(question: str, labels: list[str], texts: list[str]) -> str:
    options = "".join(f" ({label}) {text}" for label, text in zip(labels, texts, strict=True))
    return f"Please choose the correct answer to the question: {question}{options}\nAnswer:"


def _arc(row: dict) -> dict:
    """``ARC.loading_data``: the options inline; the label list is all nine of ARC's keys."""
    choices = row["choices"]
    return {"query": _question_with_options(row["question"], choices["label"], choices["text"]),
            "choices": list(ARC_LABELS), "gold": ARC_LABELS.index(row["answerKey"])}


def _openbookqa(row: dict) -> dict:
    """``OpenBookQA.loading_data``: ARC's layout on ``question_stem``, labels A–D."""
    choices, labels = row["choices"], LETTERS[:4]
    return {"query": _question_with_options(row["question_stem"], choices["label"], choices["text"]),
            "choices": labels, "gold": labels.index(row["answerKey"])}


def _commonsense_qa(row: dict) -> dict:
    """``CommonSenseQA.loading_data``: ARC's layout, labels A–E."""
    choices = row["choices"]
    return {"query": _question_with_options(row["question"], choices["label"], choices["text"]),
            "choices": list(LETTERS), "gold": LETTERS.index(row["answerKey"])}


def _boolq(row: dict) -> dict:
    """``BoolQ.loading_data``: the question alone (no passage), labels true/false in that order."""
    return {"query": f"Please answer the following question with true or false: {row['question']}?\nAnswer:",
            "choices": list(BOOLQ_LABELS), "gold": 0 if row["answer"] else 1}


def _piqa(row: dict) -> dict:
    """``PIQA.loading_data``: the goal, the two solutions as (A) and (B), and ``Correct solution:``."""
    query = ("Below is a common task along with two possible solutions labeled (A) and (B). Please select the "
             f"appropriate solution to achieve the task:\n{row['goal']}\n\n(A) {row['sol1']}\n(B) {row['sol2']}\n"
             "\nCorrect solution:")
    return {"query": query, "choices": LETTERS[:2], "gold": int(row["label"])}


def _siqa(row: dict) -> dict:
    """``SIQA.loading_data``: context and question on one line, the answers as (A)–(C) lines."""
    query = (f"Please choose the correct answer to the question.\nQuestion: {row['context']} {row['question']}"
             f"\n(A) {row['answerA']}\n(B) {row['answerB']}\n(C) {row['answerC']}\nAnswer:")
    return {"query": query, "choices": LETTERS[:3], "gold": int(row["label"]) - 1}


def _hellaswag(row: dict) -> dict:
    """``HellaSwag.loading_data``: activity label and the raw ``ctx``, the raw endings as (A)–(D) lines (no
    clean-up of the ``[title]``-style markers, unlike lm-eval's stock task)."""
    endings = "".join(f"\n({label}) {text}" for label, text in zip(LETTERS[:4], row["endings"], strict=True))
    query = ("Please choose the correct ending to complete the given sentence.\n"
             f"Sentence: {row['activity_label']}. {row['ctx']}{endings}\nAnswer:")
    return {"query": query, "choices": LETTERS[:4], "gold": int(row["label"])}


def _winogrande(row: dict) -> dict:
    """``WinoGrande.loading_data``: the sentence with its blank, the two options as (A) and (B)."""
    query = ("Please choose the correct answer to fill in the blank to complete the given sentence.\n"
             f"Sentence: {row['sentence']}\n(A) {row['option1']}\n(B) {row['option2']}\nAnswer:")
    return {"query": query, "choices": LETTERS[:2], "gold": int(row["answer"]) - 1}


# moelab's task format -> its MoE-PEFT rendering (registered in moelab.data.tasks.FORMATTERS)
FORMATTERS: dict[str, Callable[[dict], dict]] = {
    PREFIX + name: formatter for name, formatter in {
        "arc": _arc, "boolq": _boolq, "openbookqa": _openbookqa, "piqa": _piqa, "siqa": _siqa,
        "hellaswag": _hellaswag, "winogrande": _winogrande, "commonsense_qa": _commonsense_qa}.items()}
# the hub configuration MoE-PEFT trains on, where it differs from moelab's
HUB_CONFIGS = {"winogrande": "winogrande_debiased"}


def check_protocol(protocol: str, label_scoring: str = "last_token") -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"data.protocol ({protocol!r}) must be one of {list(PROTOCOLS)}")
    if label_scoring not in LABEL_SCORING:
        raise ValueError(f"data.label_scoring ({label_scoring!r}) must be one of {list(LABEL_SCORING)}")


def is_label_format(fmt: str) -> bool:
    """Whether rows of this format are scored as MoE-PEFT's labels (accuracy only)."""
    return fmt.startswith(PREFIX)


def protocol_of(fmt: str) -> str:
    return "moe_peft" if is_label_format(fmt) else "lm_eval"


def with_protocol(spec, protocol: str):
    """``spec`` (a :class:`moelab.data.tasks.TaskSpec`) rendered under ``protocol``: unchanged for ``lm_eval``
    and for tasks MoE-PEFT does not define; else its MoE-PEFT format, accuracy as headline, and MoE-PEFT's
    training configuration on the hub."""
    check_protocol(protocol)
    if protocol == "lm_eval" or PREFIX + spec.format not in FORMATTERS:
        return spec
    changes: dict[str, Any] = {"format": PREFIX + spec.format, "metric": "acc"}
    if spec.source == "hub" and spec.format in HUB_CONFIGS:
        changes["hub_config"] = HUB_CONFIGS[spec.format]
    return dataclasses.replace(spec, **changes)


# ------------------------------------------------------------------------------- label tokens


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids with the tokenizer's default special tokens: how MoE-PEFT's ``Tokenizer.encode`` and lm-eval's
    ``HFLM.tok_encode`` (``add_bos_token`` unset, moelab's case) both encode."""
    return tokenizer(texts)["input_ids"]


def moe_peft_label_token(tokenizer, label: str) -> int:
    """The token MoE-PEFT's evaluator compares for ``label`` (``EvaluateConfig.prepare``)."""
    return _encode(tokenizer, [" " + label])[0][-1]


def continuation_tokens(tokenizer, contexts: list[str], continuation: str,
                        alone: list[list[int]] | None = None) -> list[list[int] | None]:
    """For each context, the tokens lm-eval scores for ``continuation`` (``_encode_pair``: the tokens of
    context + continuation after as many tokens as the context has alone); None where the context's own
    tokens are not a prefix of the joint ones, since lm-eval's scored sequence then differs from the prompt
    MoE-PEFT runs. ``alone``: the contexts' own tokens, when already known."""
    alone = _encode(tokenizer, contexts) if alone is None else alone
    joint = _encode(tokenizer, [context + continuation for context in contexts])
    return [whole[len(own):] if whole[:len(own)] == own else None for own, whole in zip(alone, joint, strict=True)]


def label_continuations(tokenizer, contexts: list[str], labels: list[str], rule: str) -> tuple[list[str], str]:
    """The continuation lm-eval scores for each label after the prompts ``contexts``, and one line on how the
    scores relate to MoE-PEFT's. Under ``last_token`` each continuation is ``" " + label`` or ``label``,
    whichever gives exactly MoE-PEFT's label token after every prompt (ValueError when neither does); under
    ``text`` it is ``" " + label``."""
    check_protocol("moe_peft", rule)
    chosen, exact, split = [], True, []
    alone = _encode(tokenizer, contexts)
    for label in labels:
        token = moe_peft_label_token(tokenizer, label)
        candidates = [" " + label, label] if rule == "last_token" else [" " + label]
        for candidate in candidates:
            if all(tokens == [token] for tokens in continuation_tokens(tokenizer, contexts, candidate, alone)):
                chosen.append(candidate)
                break
        else:
            if rule == "last_token":
                raise ValueError(
                    f"data.label_scoring (last_token): no continuation of the prompt is exactly MoE-PEFT's token "
                    f"for label {label!r} (token {token}, the last of {' ' + label!r}) with this tokenizer; "
                    "data.label_scoring=text scores the label's text instead")
            chosen.append(" " + label)
            exact = False
            split.append(label)
    if exact:
        kept = [label for label, text in zip(labels, chosen, strict=True) if text != " " + label]
        how = f" ({', '.join(kept)} without the space before it)" if kept else ""
        return chosen, (f"MoE-PEFT's: each label's log-probability at the prompt's last position, at its last "
                        f"token{how}; checked on {len(contexts)} prompts")
    return chosen, (f"label text: {', '.join(split)} span several tokens or another token after the prompt, "
                    "so their log-likelihood is not MoE-PEFT's last-position score (data.label_scoring=text)")


def scoring_path(data_path: Path) -> Path:
    """Where a data file's lm-eval overrides live: ``<task>.<split>.scoring.json`` beside ``<task>.<split>.jsonl``."""
    data_path = Path(data_path)
    return data_path.with_name(data_path.stem + ".scoring.json")


def write_scoring(tokenizer, examples: list[dict], rule: str, data_path: Path) -> tuple[dict[str, Any], str]:
    """Resolve a label-format task's continuations for ``tokenizer`` on the ``examples`` of one split; return its
    lm-eval config overrides, also written beside ``data_path`` (atomically: every process of a run writes
    the same file), and the line results.json records."""
    labels = examples[0]["choices"]
    if any(example["choices"] != labels for example in examples):
        raise ValueError(f"{data_path}: rows of a MoE-PEFT task must share one label list")
    step = max(1, -(-len(examples) // CHECKED_PROMPTS))
    contexts = [example["query"] for example in examples[::step]]
    continuations, report = label_continuations(tokenizer, contexts, labels, rule)
    overrides: dict[str, Any] = {"metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    if rule == "last_token":
        overrides.update(doc_to_choice=continuations, target_delimiter="")
    atomic_write_text(scoring_path(data_path), json.dumps(overrides, indent=2) + "\n")
    return overrides, report
