"""Shared fixtures: an isolated pipeline home per test, with the prepared dataset linked in."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def prepared_data_dir(tmp_path_factory) -> Path:
    """The repo's prepared data (``make setup`` makes it), else prepared once into a temp dir."""
    from pipeline.data import DataError, prepare, processed_dir

    repo_data = REPO / "data"
    if (processed_dir("fashion-mnist", 5000, 0, repo_data) / "manifest.json").exists():
        return repo_data
    root = tmp_path_factory.mktemp("data")
    try:
        prepare("fashion-mnist", root=root, log=lambda *_: None)
    except DataError as e:
        if os.environ.get("CI"):
            pytest.fail(f"Fashion-MNIST must be available in CI (make setup prepares it): {e}")
        pytest.skip(f"Fashion-MNIST not available: {e}")
    return root


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store with no runs, built once: MLflow's migrations take ~3 s per new store, and
    most tests need one. (Store creation itself is tested on bare homes.)"""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    SqlAlchemyStore(f"sqlite:///{db}", (db.parent / "mlruns").as_uri()).engine.dispose()
    return db


@pytest.fixture
def home(tmp_path, monkeypatch, prepared_data_dir, empty_store) -> Path:
    """A fresh VAE_PIPELINE_HOME (own mlflow.db, runs/) sharing the prepared dataset."""
    import shutil

    (tmp_path / "data").symlink_to(prepared_data_dir, target_is_directory=True)
    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    monkeypatch.setenv("VAE_PIPELINE_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.fixture
def bare_home(tmp_path, monkeypatch) -> Path:
    """A home with no data at all."""
    monkeypatch.setenv("VAE_PIPELINE_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def free_port() -> int:
    """A loopback port nothing listens on now (the OS picks it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["VAE_PIPELINE_HOME"] = str(home)
    env["PYTHONPATH"] = str(REPO)
    return env
