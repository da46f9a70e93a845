"""Settings that silence third-party progress bars and chatter. Libraries read them when they are imported,
so the entry point applies them before importing anything else; importing this module imports nothing heavy."""

import os

QUIET_ENVIRONMENT = {"TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
                     "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false"}


def quiet_environment(verbose: bool) -> None:
    """Set the variables (unless the user set them) when the run is not ``verbose``."""
    if not verbose:
        for variable, value in QUIET_ENVIRONMENT.items():
            os.environ.setdefault(variable, value)
