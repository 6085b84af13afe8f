"""Where the pipeline keeps its outputs. Absolute paths, so every process and stage agrees.

Everything lives under one home directory: ``$VAE_PIPELINE_HOME`` if set, else the current
directory (the repo root when run through ``make``).
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("VAE_PIPELINE_HOME") or os.getcwd()).resolve()


def data_dir() -> Path:
    return home() / "data"


def runs_dir() -> Path:
    return home() / "runs"


def mlflow_db() -> Path:
    return home() / "mlflow.db"


def mlflow_artifacts() -> Path:
    return home() / "mlruns"
