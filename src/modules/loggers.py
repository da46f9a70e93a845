"""A CSV logger that a resumed run continues instead of wiping.

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` when it starts, so a resumed run would keep
only the steps after the resume. This one keeps the file; :func:`drop_rows_from` first removes the rows
that the interrupted run logged after its checkpoint, which the resumed run logs again.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from moelab.data.files import atomic_write_text


class _ContinuingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        """Keep what is there: new rows are appended (a new key rewrites the file with its old rows)."""
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = list(csv.DictReader(file).fieldnames or [])


class ResumableCSVLogger(CSVLogger):
    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment


def drop_rows_from(metrics_file: Path, step: int) -> None:
    """Remove the rows logged at ``step`` or later from a metrics CSV (no-op when there is no file)."""
    if not metrics_file.exists():
        return
    with open(metrics_file, newline="") as file:
        reader = csv.DictReader(file)
        fields, rows = reader.fieldnames or [], list(reader)
    kept = [row for row in rows if not row.get("step") or int(float(row["step"])) < step]
    if len(kept) == len(rows):
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(kept)
    atomic_write_text(metrics_file, buffer.getvalue())
