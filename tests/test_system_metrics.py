"""tracking.system_metrics: MLflow's system-metrics monitor in our runs, on a real store, through kills and restarts."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import pytest

from pipeline.config import ConfigError, build_config
from pipeline.stages import train_stage
from pipeline.system_metrics import CPU_KEY, MEMORY_KEY, THREAD_NAME

from .conftest import REPO, free_port, subprocess_env
from .test_config import DEFAULT_HASH, DEMO_TRIAL_HASHES

SAMPLING_S = "0.2"  # seconds between samples in these tests (MLflow's env var), so a short run gets several
TINY = ["data.train_subset=512", "train.batch_size=64", "train.grid_images=4", "model.hidden_dim=32",
        "model.latent_dim=4", "eval.enabled=false", "tracking.experiment=sysm"]


def _monitor_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME and t.is_alive()]


def _steps(run_id: str, key: str) -> list[int]:
    from pipeline.tracking import client

    return [m.step for m in sorted(client().get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))]


def test_off_by_default_outside_the_hash_and_accepted_in_study_files(tmp_path):
    import yaml

    from pipeline.studyspec import expand_trials, parse_study

    assert build_config().tracking.system_metrics is False
    # The tracking section is not hashed: turning the monitor on keeps every run directory where it was.
    assert build_config().result_hash() == DEFAULT_HASH
    assert build_config(overrides=["tracking.system_metrics=true"]).result_hash() == DEFAULT_HASH
    demo = yaml.safe_load((REPO / "studies" / "demo.yaml").read_text())
    demo["base"] = {**demo["base"], "tracking.system_metrics": True}
    trials = expand_trials(parse_study(demo, "demo+system_metrics"))
    assert [t.config_hash for t in trials] == DEMO_TRIAL_HASHES
    assert all(t.config().tracking.system_metrics is True for t in trials)
    with pytest.raises(ConfigError, match="tracking.system_metrics"):
        parse_study({**demo, "base": {**demo["base"], "tracking.system_metrics": "sometimes"}}, "bad.yaml")


def test_a_sigkilled_training_resumed_continues_the_system_metric_steps_in_the_same_run(home, monkeypatch):
    # A real crash: the CLI in a subprocess with the monitor on, SIGKILLed once a few system points are
    # stored; then the same config again (here in-process), which re-attaches the run through run.json.
    from pipeline.tracking import client, get_run

    fast = "0.1"  # the crash must come before the subprocess's 8 short epochs are over
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", fast)
    overrides = [*TINY, "train.epochs=8", "tracking.system_metrics=true"]
    run_dir = home / "killed"
    cmd = [sys.executable, "-m", "pipeline", "train", "--no-progress", "--run-dir", str(run_dir)]
    cmd += [x for s in overrides for x in ("--set", s)]
    env = {**subprocess_env(home), "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": fast}
    proc = subprocess.Popen(cmd, env=env, cwd=home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_id, before_kill, deadline = None, [], time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if run_id is None and (run_dir / "run.json").exists():
            run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
        if run_id:
            before_kill = _steps(run_id, CPU_KEY)
            if len(before_kill) >= 3:
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{out}"
    assert len(before_kill) >= 3, out
    assert get_run(run_id).info.status == "RUNNING"  # what a SIGKILL leaves
    crashed = _steps(run_id, CPU_KEY)  # what the first attempt stored (a point may land after the poll)
    # One line says what is recorded and, on a machine without an NVIDIA GPU, why there is no GPU series;
    # MLflow's own "Skip logging GPU metrics. Set logger level to DEBUG…" is not printed.
    assert "[train] system metrics every 0.1 s into the MLflow run as system/…" in out, out
    assert "Skip logging GPU metrics" not in out and "Started monitoring system metrics" not in out, out

    lines = []
    result = train_stage(build_config(overrides=overrides), run_dir=run_dir, log=lines.append, progress=False)
    assert result.status == "finished" and result.run_id == run_id
    assert sum("[train] system metrics every" in line for line in lines) == 1
    runs = client().search_runs([client().get_experiment_by_name("sysm").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # one run, not one per attempt
    assert get_run(run_id).info.status == "FINISHED"
    for key in (CPU_KEY, MEMORY_KEY):
        steps = _steps(run_id, key)
        # Both parts in one series: consecutive steps from 0, none twice, the restart's after the crash's.
        assert steps == list(range(len(steps))), f"{key}: {steps}"
    steps = _steps(run_id, CPU_KEY)
    assert len(steps) > len(crashed) and steps[: len(crashed)] == crashed, (crashed, steps)
    # Each part's first reading covers an interval of real work (psutil's per-thread baseline is taken first),
    # not MLflow's unprimed 0.0.
    cpu = dict((m.step, m.value) for m in client().get_metric_history(run_id, CPU_KEY))
    assert cpu[0] > 0 and cpu[len(crashed)] > 0, cpu
    assert not _monitor_threads()


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize(("raised", "status", "reason"), [
    (None, "FINISHED", None),
    (_Boom, "FAILED", "error: _Boom"),
    (KeyboardInterrupt, "KILLED", "interrupted"),
])
def test_the_monitor_stops_with_the_run_on_every_exit(home, monkeypatch, raised, status, reason):
    from pipeline.tracking import get_run

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", SAMPLING_S)
    seen = []

    def on_epoch(row):
        seen.append(len(_monitor_threads()))
        time.sleep(0.6)  # let the monitor take a few samples before this attempt ends
        if raised is not None and row["epoch"] == 2:
            raise raised()

    cfg = build_config(overrides=[*TINY, "train.epochs=2", "tracking.system_metrics=true"])
    run_dir = home / "run"
    if raised is None:
        train_stage(cfg, run_dir=run_dir, log=lambda *_: None, progress=False, on_epoch=on_epoch)
    else:
        with pytest.raises(raised):
            train_stage(cfg, run_dir=run_dir, log=lambda *_: None, progress=False, on_epoch=on_epoch)
    run = get_run(json.loads((run_dir / "run.json").read_text())["run_id"])
    assert seen == [1, 1]  # one monitor while the run is open
    assert not _monitor_threads()  # and none once it has ended, however it ended
    assert run.info.status == status and run.data.tags.get("failure_reason") == reason
    assert len(_steps(run.info.run_id, CPU_KEY)) >= 2


def test_off_means_no_monitor_and_no_system_metrics(home):
    from pipeline.tracking import get_run

    seen = []

    def train(run_dir, *overrides):
        cfg = build_config(overrides=[*TINY, "train.epochs=1", *overrides])
        return train_stage(cfg, run_dir=run_dir, log=lambda *_: None, progress=False,
                           on_epoch=lambda row: seen.append(len(_monitor_threads())))

    result = train(home / "default")
    assert not [k for k in get_run(result.run_id).data.metrics if k.startswith("system/")]
    # With tracking off there is no run to record into: the option does nothing.
    assert train(home / "untracked", "tracking.enabled=false", "tracking.system_metrics=true").run_id is None
    assert seen == [0, 0]


def _wait_for_points(run_id: str, n: int, timeout_s: float = 60.0) -> None:
    deadline = time.time() + timeout_s
    while len(_steps(run_id, CPU_KEY)) < n:
        assert time.time() < deadline, f"fewer than {n} system points after {timeout_s:g} s"
        time.sleep(0.1)


@pytest.fixture
def tracking_server(home, monkeypatch):
    """A real `mlflow server` on loopback (its own SQLite store), as MLFLOW_TRACKING_URI; stopped at the end."""
    import shutil
    import urllib.request

    shutil.copyfile(home / "mlflow.db", home / "server.db")  # an empty store with its schema: no migrations to wait for
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{home / 'server.db'}", "--artifacts-destination", str(home / "server-artifacts")]
    proc = subprocess.Popen(cmd, cwd=home, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            assert proc.poll() is None, "mlflow server exited"
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not come up in 120 s")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        yield url
    finally:
        import os

        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_through_a_tracking_server_a_reattached_run_continues_its_steps(tracking_server, monkeypatch):
    from pipeline.system_metrics import MonitoredRun, monitored
    from pipeline.tracking import MlflowRun, tracking_uri

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", SAMPLING_S)
    lines = []
    first = monitored(MlflowRun("sysm-http"), log=lines.append)
    assert isinstance(first, MonitoredRun) and tracking_uri() == tracking_server
    _wait_for_points(first.run_id, 2)
    first.end("KILLED")
    part1 = _steps(first.run_id, CPU_KEY)
    again = monitored(MlflowRun("sysm-http", run_id=first.run_id), log=lines.append)
    _wait_for_points(first.run_id, len(part1) + 2)
    again.end("FINISHED")
    steps = _steps(first.run_id, CPU_KEY)
    assert len(steps) >= len(part1) + 2 and steps == list(range(len(steps))), (part1, steps)
    assert not _monitor_threads() and len(lines) == 2
