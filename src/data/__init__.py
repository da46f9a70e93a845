"""Task mixtures, prompt formats, held-out splits and the local lm-eval task templates."""

from .datamodule import TaskMixtureDataModule, prompt_and_answer
from .tasks import CATALOGUE, DataFormatError, TaskSpec, load_examples, resolve_task

__all__ = ["CATALOGUE", "DataFormatError", "TaskMixtureDataModule", "TaskSpec", "load_examples", "prompt_and_answer",
           "resolve_task"]
