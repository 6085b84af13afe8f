"""Faults in the suite: a tiny study SIGKILLed over and over at seeded moments, then finished by the same
command, must end exactly as an uninterrupted one; a full disk must end in one clear error and a clean
resume once space is freed."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.checkpoint import CHECKPOINT, load_checkpoint

from .conftest import subprocess_env
from .test_study import TINY_BASE, _check_study_integrity, _mlflow_runs, _optuna_trials

FAULT_BASE = {**TINY_BASE, "train.epochs": 2}  # 4 steps an epoch: a checkpoint mid-run to be killed around
POINTS = {"objective.beta": [1, 8]}


def _write(home: Path, name: str, base: dict) -> Path:
    path = home / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "sampler": "grid", "base": base, "space": POINTS, "seeds": [0],
                                    "objectives": [{"metric": "test/active_units", "direction": "maximize"}]}))
    return path


def _snapshot(root: Path, pattern: str) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.glob(pattern) if p.exists()}


def _kill_when(home: Path, cmd: list[str], pattern: str | None, delay: float, patience: float = 6.0) -> str:
    """Run `cmd`; SIGKILL it once a file matching `pattern` (under home) appears or changes (or after
    `patience` seconds, when that phase is already past), or after `delay` seconds when there is no pattern.
    Returns what happened: killed, or finished first."""
    before = _snapshot(home, pattern) if pattern else {}
    proc = subprocess.Popen(cmd, env=subprocess_env(home), cwd=home, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + (delay if pattern is None else patience)
    while proc.poll() is None and time.time() < deadline:
        if pattern is not None and _snapshot(home, pattern).items() - before.items():
            break
        time.sleep(0.005)
    if proc.poll() is not None:
        return "finished"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return "killed"


@pytest.mark.slow
def test_a_study_killed_at_a_dozen_seeded_moments_ends_as_an_uninterrupted_one(home):
    """Kills aimed at every phase (store creation, checkpoints, evaluation, results, the parent run's close)
    plus seeded random moments; after each the same command runs again, and at the end every invariant of
    an uninterrupted study holds, weights included."""
    from pipeline.config import build_config
    from pipeline.stages import train_stage
    from pipeline.studyspec import expand_trials, load_study
    from pipeline.tracking import client

    (home / "mlflow.db").unlink()  # the first kill lands while the study creates its store
    rng = random.Random(20261130)
    path = _write(home, "faults", FAULT_BASE)
    cmd = [sys.executable, "-m", "pipeline", "study", str(path)]
    trials = "runs/faults/trials"
    moments = [
        ("mlflow.db.creating-*", 0), (None, rng.uniform(2, 6)),
        (f"{trials}/0000-*/{CHECKPOINT}", 0), (f"{trials}/0000-*/eval/*.png", 0), (f"{trials}/0000-*/metrics.json", 0),
        (None, rng.uniform(1, 8)),
        (f"{trials}/0001-*/{CHECKPOINT}", 0), (f"{trials}/0001-*/eval/*.png", 0), (f"{trials}/0001-*/metrics.json", 0),
        (f"{trials}/0001-*/result.json", 0),  # the last trial done: before the parent run is closed
        (None, rng.uniform(0.5, 5)),
    ]
    t0 = time.time()
    outcomes = [(_kill_when(home, cmd, pattern, delay), round(time.time() - t0, 1)) for pattern, delay in moments]
    assert [o for o, _ in outcomes].count("killed") >= 10, outcomes
    final = subprocess.run(cmd, env=subprocess_env(home), cwd=home, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stdout + final.stderr

    trials_seen = _optuna_trials(home, "faults")
    assert not [t for t in trials_seen if t.state.name in ("RUNNING", "WAITING")]
    assert sorted(t.user_attrs["trial_index"] for t in trials_seen if t.state.name == "COMPLETE") == [0, 1]
    everything = _mlflow_runs("faults")
    assert not [r for r in everything if r.info.status == "RUNNING"]  # parent included
    parents = [r for r in everything if r.data.tags.get("role") == "study"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    runs = [r for r in everything if r.data.tags.get("role") != "study"]
    # One FINISHED run per trial; anything else is a run an attempt was killed before recording, ended since.
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert sorted(r.data.tags["trial"] for r in finished) == ["0", "1"]
    assert all(r.data.tags.get("failure_reason") == "orphaned" for r in runs if r.info.status != "FINISHED")
    c = client()
    for run in finished:  # one point per (key, step) for every key, test/ ones included; every step there
        for key in run.data.metrics:
            steps = [m.step for m in c.get_metric_history(run.info.run_id, key)]
            assert len(steps) == len(set(steps)), (key, steps)
        assert sorted(m.step for m in c.get_metric_history(run.info.run_id, "train/loss")) == list(range(8))

    # The weights of every trial equal an uninterrupted training of the same config.
    spec = load_study(path)
    for ts in expand_trials(spec):
        saved = yaml.safe_load((next((home / trials).glob(f"{ts.index:04d}-*")) / "config.yaml").read_text())
        cfg = build_config(saved, ["tracking.enabled=false", "eval.enabled=false"])
        straight = train_stage(cfg, run_dir=home / "straight" / str(ts.index), log=lambda *_: None, progress=False)
        a = load_checkpoint(Path(straight.run_dir) / CHECKPOINT)["model"]
        b = load_checkpoint(next((home / trials).glob(f"{ts.index:04d}-*")) / CHECKPOINT)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), ts.index


def _can_mount_tmpfs(where: Path) -> bool:
    if os.geteuid() != 0:
        return False
    where.mkdir(parents=True, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", str(where)], check=True)
    return ok


@pytest.mark.slow
def test_a_full_disk_ends_in_one_clear_error_and_resumes_cleanly_once_space_is_freed(tmp_path, prepared_data_dir):
    disk = tmp_path / "disk"
    if not _can_mount_tmpfs(disk):
        if os.environ.get("CI") and os.geteuid() == 0:
            pytest.fail("CI runs as root but cannot mount a tmpfs for the full-disk test")
        pytest.skip("mounting a tmpfs needs root (and a container that allows it)")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], check=True)
    try:
        home = disk / "home"
        home.mkdir()
        (home / "data").symlink_to(prepared_data_dir, target_is_directory=True)
        path = _write(home, "fulldisk", FAULT_BASE)
        env = {**subprocess_env(home), "VAE_PIPELINE_HOME": str(home)}
        cmd = [sys.executable, "-m", "pipeline", "study", str(path)]
        ballast = disk / "ballast"
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        ballast.write_bytes(b"\0" * (free - 3 * 2**20))  # 3 MB left: the store and a run fill it

        out = subprocess.run(cmd, env=env, cwd=home, capture_output=True, text=True, timeout=300)
        assert out.returncode != 0, out.stdout + out.stderr
        assert "Traceback" not in out.stderr, out.stderr
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and ("no space left" in last or "full" in last), out.stderr

        ballast.unlink()
        out = subprocess.run(cmd, env=env, cwd=home, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("VAE_PIPELINE_HOME", str(home))
            mp.delenv("MLFLOW_TRACKING_URI", raising=False)
            _check_study_integrity(home, "fulldisk", 2, steps_per_trial=8)
            assert not [r for r in _mlflow_runs("fulldisk") if r.info.status == "RUNNING"]
        assert not list(home.rglob(".*.tmp"))  # no temp file of a write the full disk interrupted
        assert json.loads((home / "runs" / "fulldisk" / "parent.json").read_text())["run_id"]
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
