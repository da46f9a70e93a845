"""How a training run can stop other than by finishing: importable without Lightning, for the entry points."""


class TrainingDiverged(FloatingPointError):
    """The run left the numbers: a non-finite loss or gradient, or adapter weights that ran away. The run is
    recorded with status ``diverged``."""
