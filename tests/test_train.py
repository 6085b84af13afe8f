"""The training stage end to end on real Fashion-MNIST subsets, with a real MLflow store."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline import train as train_mod
from pipeline.checkpoint import CHECKPOINT, load_checkpoint
from pipeline.config import build_config
from pipeline.likelihoods import LIKELIHOODS, Likelihood, LogProb, bernoulli_log_prob, bernoulli_mean
from pipeline.stages import train_stage
from pipeline.train import EPOCH_KEYS, PER_STEP_KEYS, SIGMA_KEY

from .conftest import subprocess_env

QUIET = dict(log=lambda *_: None, progress=False)
SMALL = [
    "data.train_subset=512",
    "train.batch_size=64",
    "train.epochs=2",
    "tracking.flush_every=3",  # 8 steps per epoch: flushes of 3, 3, 2
    "train.grid_images=16",
    "model.hidden_dim=64",
    "model.latent_dim=4",
    "eval.enabled=false",  # evaluation has its own tests
]


def _cfg(*extra, experiment="t"):
    return build_config(overrides=[*SMALL, f"tracking.experiment={experiment}", *extra])


def _history(run_id, key):
    from pipeline.tracking import metric_history

    return metric_history(run_id, key)


def _assert_one_point_per_step(run_id, keys, total_steps):
    for key in keys:
        steps = [s for s, _ in _history(run_id, key)]
        assert steps == list(range(total_steps)), f"{key}: {len(steps)} points, steps {steps[:5]}…"


def _weights(run_dir):
    return load_checkpoint(run_dir / CHECKPOINT)["model"]


def test_two_epoch_run_tracks_every_step_once(home):
    from pipeline.tracking import get_run

    cfg = _cfg("likelihood.name=gaussian_learned", "objective.schedule=linear", "objective.warmup_steps=10")
    result = train_stage(cfg, **QUIET)
    assert result.status == "finished" and result.steps_done == 16
    _assert_one_point_per_step(result.run_id, PER_STEP_KEYS + (SIGMA_KEY,), 16)
    for key in EPOCH_KEYS:
        assert [s for s, _ in _history(result.run_id, key)] == [8, 16]
    # Validation scores held-out data with the σ the last epoch learned, kept in the checkpoint.
    sigmas = [v for _, v in _history(result.run_id, SIGMA_KEY)]
    assert load_checkpoint(Path(result.run_dir) / CHECKPOINT)["sigma_star"] == pytest.approx(
        sum(sigmas[8:]) / 8, rel=1e-6)
    betas = [v for _, v in _history(result.run_id, "train/beta")]
    assert betas[0] == 0.0 and betas[5] == pytest.approx(0.5) and betas[15] == pytest.approx(1.0)
    # ELBO is logged with its sign: −(recon + KL), with the raw KL (not the penalized one).
    recon, kl, elbo = (dict(_history(result.run_id, k)) for k in ("train/recon_nll", "train/kl", "train/elbo"))
    assert all(elbo[s] == pytest.approx(-(recon[s] + kl[s]), rel=1e-5) for s in range(16))

    run = get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["objective.schedule"] == "linear" and run.data.params["likelihood.name"] == "gaussian_learned"
    for tag in ("git_commit", "dataset_manifest_sha256", "device", "torch_version", "config_hash"):
        assert run.data.tags[tag]
    artifacts = _artifact_paths(result.run_id)
    assert {"config.yaml", "checkpoint/checkpoint.pt", "images/epoch_002_reconstructions.png", "images/epoch_002_samples.png"} <= artifacts


def _artifact_paths(run_id):
    from pipeline.tracking import client

    c, out, todo = client(), set(), [None]
    while todo:
        for f in c.list_artifacts(run_id, todo.pop()):
            (todo.append(f.path) if f.is_dir else out.add(f.path))
    return out


def test_finished_run_is_skipped_on_rerun(home):
    cfg = _cfg("tracking.enabled=false")
    first = train_stage(cfg, **QUIET)
    mtime = (first.run_dir and os.stat(os.path.join(first.run_dir, CHECKPOINT)).st_mtime_ns)
    again = train_stage(cfg, **QUIET)
    assert again.status == "skipped"
    assert os.stat(os.path.join(first.run_dir, CHECKPOINT)).st_mtime_ns == mtime


class _CrashAfter(Exception):
    pass


def straight_and_resumed_weights(home, monkeypatch, cfg) -> tuple[dict, dict]:
    """State dicts of a 2-epoch run trained straight and of the same run interrupted at epoch 2, step 5
    of 8 (Ctrl-C), then resumed from its epoch-1 checkpoint by rerunning the stage."""
    train_stage(cfg, run_dir=home / "straight", **QUIET)
    real_step, calls = train_mod.train_step, {"n": 0}

    def crashing_step(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 8 + 5:
            raise KeyboardInterrupt
        return real_step(*a, **kw)

    monkeypatch.setattr(train_mod, "train_step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        train_stage(cfg, run_dir=home / "resumed", **QUIET)
    monkeypatch.setattr(train_mod, "train_step", real_step)
    assert load_checkpoint(home / "resumed" / CHECKPOINT)["epoch"] == 1
    assert train_stage(cfg, run_dir=home / "resumed", **QUIET).status == "finished"
    return _weights(home / "straight"), _weights(home / "resumed")


def test_resume_after_a_mid_epoch_crash_is_bitwise_exact_with_no_duplicate_points(home, monkeypatch):
    # The reference: 2 epochs straight.
    train_stage(_cfg("tracking.enabled=false"), run_dir=home / "straight", **QUIET)

    # Crash during epoch 2, after some of its steps were already flushed to MLflow.
    cfg = _cfg()
    real_step = train_mod.train_step
    calls = {"n": 0}

    def crashing_step(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 8 + 7:  # epoch 2, step 7 of 8: flushes of 3 and 3 already sent
            raise _CrashAfter()
        return real_step(*a, **kw)

    monkeypatch.setattr(train_mod, "train_step", crashing_step)
    with pytest.raises(_CrashAfter):
        train_stage(cfg, run_dir=home / "resumed", **QUIET)
    assert load_checkpoint(home / "resumed" / CHECKPOINT)["epoch"] == 1
    monkeypatch.setattr(train_mod, "train_step", real_step)

    resumed = train_stage(cfg, run_dir=home / "resumed", **QUIET)
    assert resumed.status == "finished"
    a, b = _weights(home / "straight"), _weights(home / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _assert_one_point_per_step(resumed.run_id, PER_STEP_KEYS, 16)
    for key in EPOCH_KEYS:
        assert [s for s, _ in _history(resumed.run_id, key)] == [8, 16]
    from pipeline.tracking import get_run

    run = get_run(resumed.run_id)
    assert run.info.status == "FINISHED"
    assert "failure_reason" not in run.data.tags  # the crashed attempt's reason is gone once it finished


def test_sigkill_then_the_same_command_resumes_into_the_same_run(home):
    # A real crash: the CLI in a subprocess, killed once the first epoch's checkpoint exists.
    run_dir = home / "killed"
    cmd = [sys.executable, "-m", "pipeline", "train", "--no-progress", "--run-dir", str(run_dir)]
    cmd += [x for s in _cfg_args(["data.train_subset=2048", "train.epochs=3", "tracking.flush_every=7"]) for x in ("--set", s)]
    env = subprocess_env(home)
    proc = subprocess.Popen(cmd, env=env, cwd=home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not (run_dir / CHECKPOINT).exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert load_checkpoint(run_dir / CHECKPOINT)["epoch"] < 3
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]

    out = subprocess.run(cmd, env=env, cwd=home, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert run_id in out.stdout  # re-attached to the same MLflow run
    steps = 3 * (2048 // 64)
    _assert_one_point_per_step(run_id, PER_STEP_KEYS, steps)
    from pipeline.tracking import get_run

    assert get_run(run_id).info.status == "FINISHED"
    straight = train_stage(build_config(overrides=[*_cfg_args(["data.train_subset=2048", "train.epochs=3"]), "tracking.enabled=false"]),
                           run_dir=home / "straight", **QUIET)
    a, b = _weights(home / "straight"), _weights(run_dir)
    assert straight.status == "finished" and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_ends_the_run_killed_with_one_line_and_exit_143(home):
    # What SLURM sends before it kills a job: handled like Ctrl-C, not a silent death. (Resuming after it is
    # resuming after any interruption: the SIGKILL test above.)
    run_dir = home / "terminated"
    cmd = [sys.executable, "-m", "pipeline", "train", "--no-progress", "--run-dir", str(run_dir)]
    cmd += [x for s in _cfg_args(["data.train_subset=1024", "train.epochs=4"]) for x in ("--set", s)]
    env = subprocess_env(home)
    proc = subprocess.Popen(cmd, env=env, cwd=home, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run_dir / CHECKPOINT).exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM); rerun the same command" in err and "Traceback" not in err, err
    from pipeline.tracking import get_run

    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    run = get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["failure_reason"] == "interrupted"
    assert load_checkpoint(run_dir / CHECKPOINT)["epoch"] < 4  # the last complete epoch stays the checkpoint


def test_ctrl_c_during_evaluation_is_an_interruption_not_a_failed_evaluation(home, monkeypatch):
    from pipeline import stages
    from pipeline.tracking import get_run

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(stages, "evaluate_stage", interrupted)
    cfg = _cfg("eval.enabled=true")
    with pytest.raises(KeyboardInterrupt):
        train_stage(cfg, run_dir=home / "run", **QUIET)
    run = get_run(json.loads((home / "run" / "run.json").read_text())["run_id"])
    assert run.info.status == "KILLED" and run.data.tags["failure_reason"] == "interrupted"


def _cfg_args(extra):
    return [*SMALL, "tracking.experiment=t", *extra]


def _bernoulli_scaled_after_20_calls(monkeypatch, name: str, factor: float) -> str:
    """A registry entry whose log-likelihood is multiplied by `factor` after 20 calls: 8 steps + 5 val
    batches of epoch 1, then step 15."""
    calls = {"n": 0}

    def log_prob(params, x, opts):
        calls["n"] += 1
        lp = bernoulli_log_prob(params, x, opts)
        return LogProb(lp.log_px * factor) if calls["n"] > 20 else lp

    monkeypatch.setitem(LIKELIHOODS, name, Likelihood(1, log_prob, bernoulli_mean, True, "test"))
    return name


@pytest.fixture
def nan_likelihood(monkeypatch):
    """Turns non-finite at step 15."""
    return _bernoulli_scaled_after_20_calls(monkeypatch, "nan_after_20", float("nan"))


def test_divergence_ends_failed_with_reason_and_keeps_last_good_checkpoint(home, nan_likelihood):
    from pipeline.tracking import get_run

    cfg = _cfg(f"likelihood.name={nan_likelihood}")
    result = train_stage(cfg, **QUIET)
    assert result.status == "diverged"
    run = get_run(result.run_id)
    assert run.info.status == "FAILED" and run.data.tags["failure_reason"] == "diverged"
    # Epoch 1 is 8 steps plus a 5-batch validation pass; the 21st call is step 15, in epoch 2.
    ck = load_checkpoint(result.run_dir and Path(result.run_dir) / CHECKPOINT)
    assert ck["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    # Only finite points were logged, one per step, up to the divergence.
    steps = [s for s, _ in _history(result.run_id, "train/loss")]
    assert result.diverged_at_step == 15 and steps == list(range(15))
    # The stage does not silently retry a diverged run.
    assert train_stage(cfg, **QUIET).status == "diverged"


def test_the_divergence_guard_on_known_answers():
    from pipeline.train import DivergenceGuard

    g = DivergenceGuard()
    assert g.update([500.0] * 19 + [520.0], 0) is None and g.limit == 500 + 1000 * 500
    # One wild stretch shorter than the window, then back: not diverged, and the count starts over.
    assert g.update([1e9] * 49 + [400.0], 20) is None and g.above_since is None
    assert g.update([1e9] * 49, 70) is None
    resumed = DivergenceGuard(g.state())  # what a checkpoint keeps
    assert g.update([1e12], 119) == 70 and resumed.update([1e12], 119) == 70
    # A negative early level (a learned-variance likelihood) still gets a limit above it.
    neg = DivergenceGuard()
    neg.update([-2000.0] * 20, 0)
    assert neg.limit == -2000 + 1000 * 2000 and neg.update([1e5] * 50, 20) is None


@pytest.fixture
def exploding_likelihood(monkeypatch):
    """Finite but exploding: the NLL grows ×10⁶ from step 15."""
    return _bernoulli_scaled_after_20_calls(monkeypatch, "explodes_after_20", 1e6)


def test_finite_divergence_ends_diverged_like_a_nan(home, exploding_likelihood, monkeypatch):
    from pipeline import train as train_module
    from pipeline.tracking import get_run

    # The real early span and window are longer than this run of 24 steps.
    monkeypatch.setattr(train_module.DivergenceGuard, "EARLY_STEPS", 5)
    monkeypatch.setattr(train_module.DivergenceGuard, "WINDOW", 5)
    cfg = _cfg(f"likelihood.name={exploding_likelihood}", "train.epochs=3")
    result = train_stage(cfg, **QUIET)
    assert result.status == "diverged" and result.diverged_at_step == 15
    run = get_run(result.run_id)
    assert run.info.status == "FAILED" and run.data.tags["failure_reason"] == "diverged"
    assert run.data.tags["diverged_at_step"] == "15"
    assert train_stage(cfg, **QUIET).status == "diverged"  # not silently retried


@pytest.mark.parametrize("likelihood", sorted(LIKELIHOODS))
@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_every_likelihood_and_arch_trains_without_nan(home, likelihood, arch):
    cfg = build_config(overrides=[
        "data.train_subset=128", "train.batch_size=64", "train.epochs=1", "tracking.enabled=false",
        "train.grid_images=4", f"likelihood.name={likelihood}", f"model.arch={arch}", "model.channels=8",
        "model.hidden_dim=32", "model.decoder_depth=3", "objective.free_bits=per_dim", "objective.free_bits_lambda=0.1",
        "eval.test_subset=64", "eval.iwae_k=4", "eval.n_samples=32", "eval.mi_batch=64",
    ])
    result = train_stage(cfg, **QUIET)
    assert result.status == "finished" and torch.isfinite(torch.tensor(list(result.val.values()))).all()
    evaluated = json.loads((Path(result.run_dir) / "metrics.json").read_text())["metrics"]
    # Bernoulli on grey levels is not a likelihood of 8-bit data: it alone has no bits/dim.
    no_bpd = {"test/bits_per_dim"} if likelihood == "bernoulli" else set()
    assert all(math.isfinite(v) for k, v in evaluated.items() if k not in no_bpd), evaluated


def test_bf16_autocast_runs(home):
    result = train_stage(_cfg("tracking.enabled=false", "train.precision=bf16", "train.epochs=1"), **QUIET)
    assert result.status == "finished"


def _recorder():
    """A sink with tracking's NullRun interface that keeps every point in memory."""
    from pipeline.tracking import NullRun

    class Recorder(NullRun):
        def __init__(self):
            self.rows = []

        def log_metrics(self, rows):
            self.rows += rows

        def log_columns(self, columns):
            self.rows += [(k, v, first + i) for k, first, values in columns for i, v in enumerate(values)]

    return Recorder()


# The first five steps of the default config (and of a mixture prior) on the first 640 training images,
# as the code computed them when the VAE core was introduced (bitwise equal to the code before it).
# Floating point differs between CPU models, so the pin is a tolerance, not a digest: any change of
# initialization, RNG draws or loss terms moves these by far more than 1e-3.
PINNED_FIRST_STEPS = {
    (): {"train/loss": [550.4454, 533.9007, 520.7914, 505.5763, 490.2431],
         "train/kl": [0.1584, 0.7758, 1.3679, 1.684, 2.9356]},
    ("prior.name=mog", "objective.free_bits=total"): {"train/loss": [554.9684, 537.5233, 523.2402, 505.2549, 491.1577],
                                                      "train/kl": [4.4685, 3.8369, 3.8661, 3.6737, 5.4621]},
}


@pytest.mark.parametrize("extra", list(PINNED_FIRST_STEPS), ids=["default", "mog"])
def test_the_first_steps_losses_are_pinned(home, extra):
    from pipeline.data import ensure_splits
    from pipeline.train import fit

    cfg = build_config(overrides=["data.train_subset=640", "train.epochs=1", "train.grid_images=4",
                                  "tracking.flush_every=5", *extra])
    sink = _recorder()
    fit(cfg, home / "pinned", sink, splits=ensure_splits(cfg.data, log=QUIET["log"]), **QUIET)
    for key, expected in PINNED_FIRST_STEPS[extra].items():
        got = [v for k, v, step in sink.rows if k == key and step < 5]
        assert got == pytest.approx(expected, rel=1e-3, abs=1e-3), key


def test_restart_ends_the_discarded_run_if_it_was_left_running(home):
    from pipeline.tracking import client, get_run

    cfg = _cfg()
    first = train_stage(cfg, run_dir=home / "run", **QUIET)
    client().update_run(first.run_id, status="RUNNING")  # as a SIGKILLed attempt leaves it
    second = train_stage(cfg, run_dir=home / "run", mode="restart", **QUIET)
    assert second.run_id != first.run_id and get_run(second.run_id).info.status == "FINISHED"
    old = get_run(first.run_id)
    assert old.info.status == "KILLED" and old.data.tags["failure_reason"] == "restarted"


def test_a_run_directory_that_cannot_be_written_leaves_no_mlflow_run_running(home, monkeypatch):
    """Root ignores file modes, so the read-only run directory is simulated where run.json is written."""
    from pipeline import stages
    from pipeline.tracking import client

    real_write = stages.atomic_write_json

    def read_only(obj, path):
        if path.name == "run.json":
            raise OSError(30, "Read-only file system", str(path))
        return real_write(obj, path)

    monkeypatch.setattr(stages, "atomic_write_json", read_only)
    with pytest.raises(OSError, match="Read-only"):
        train_stage(_cfg(experiment="ro"), run_dir=home / "ro", **QUIET)
    c = client()
    (run,) = c.search_runs([c.get_experiment_by_name("ro").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["failure_reason"] == "error: OSError"


@pytest.mark.parametrize("errno_, expected", [(28, "no space left on the device holding /data/x/checkpoint.pt"),
                                              (30, "cannot write /data/x/checkpoint.pt: Read-only file system")])
def test_a_disk_error_is_one_line_naming_the_file_and_the_fix(monkeypatch, capsys, errno_, expected):
    from pipeline import cli

    def failing(args):
        raise OSError(errno_, "No space left on device" if errno_ == 28 else "Read-only file system",
                      "/data/x/checkpoint.pt")

    monkeypatch.setattr(cli, "_cmd_train", failing)
    monkeypatch.setattr(cli, "raise_on_sigterm", lambda: None)  # keep pytest's own SIGTERM handling
    assert cli.main(["train"]) == cli.EXIT_IO
    err = capsys.readouterr().err
    assert err.startswith(f"error: {expected}") and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_damaged_checkpoint_is_one_clear_error_naming_it_and_the_fix(home, monkeypatch, capsys):
    from pipeline import cli
    from pipeline.checkpoint import CheckpointError

    cfg = _cfg("tracking.enabled=false")
    train_stage(cfg, run_dir=home / "run", **QUIET)
    (home / "run" / "result.json").unlink()  # as if killed before the end: the checkpoint is read again
    ckpt = home / "run" / CHECKPOINT
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # cut short
    with pytest.raises(CheckpointError, match=r"checkpoint.pt: this checkpoint cannot be read .*--restart"):
        train_stage(cfg, run_dir=home / "run", **QUIET)
    monkeypatch.setattr(cli, "raise_on_sigterm", lambda: None)
    args = ["train", "--run-dir", str(home / "run"), *[x for s in [*SMALL, "tracking.enabled=false"] for x in ("--set", s)]]
    assert cli.main(args) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith(f"error: {ckpt}: this checkpoint cannot be read") and "Traceback" not in err
    assert train_stage(cfg, run_dir=home / "run", mode="restart", **QUIET).status == "finished"


def test_a_bogus_run_id_is_one_clear_error(home, monkeypatch, capsys):
    from pipeline import cli
    from pipeline.tracking import client

    client().search_experiments()  # a store exists, without that run
    monkeypatch.setattr(cli, "raise_on_sigterm", lambda: None)
    assert cli.main(["evaluate", "--run", "0123456789abcdef0123456789abcdef"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "no MLflow run '0123456789abcdef0123456789abcdef' in sqlite:" in err and "Traceback" not in err


def test_a_damaged_classifier_cache_is_trained_again(home, monkeypatch, tmp_path):
    from pipeline import classifier as C
    from pipeline.data import ensure_splits

    cfg = _cfg()
    splits = ensure_splits(cfg.data, log=lambda *_: None)
    real_dir = C.classifier_dir(cfg.data)
    for name in (C.CLASSIFIER_FILE, C.CLASSIFIER_INFO):  # a private copy: the real cache is shared by the suite
        shutil.copy(real_dir / name, tmp_path / name)
    monkeypatch.setattr(C, "classifier_dir", lambda data_cfg: tmp_path)
    (tmp_path / C.CLASSIFIER_FILE).write_bytes(b"PK\x03\x04 truncated")
    trained = []

    def quick_train(splits, device, log=print):  # the real recipe takes ~15 s; what is tested is the recovery
        trained.append(1)
        return C.FeatureClassifier(), 0.5

    monkeypatch.setattr(C, "train_classifier", quick_train)
    messages: list[str] = []
    model, info = C.ensure_classifier(cfg.data, splits, torch.device("cpu"), log=messages.append)
    assert trained == [1] and info["test_accuracy"] == 0.5 and any("cannot be read" in m for m in messages)
    assert isinstance(model, C.FeatureClassifier)


def test_leftovers_of_killed_writes_are_removed_and_a_run_tracked_elsewhere_says_so(home, monkeypatch):
    cfg = _cfg()
    first = train_stage(cfg, run_dir=home / "run", **QUIET)
    leftover = home / "run" / ".checkpoint.pt.k1ll3d.tmp"  # what SIGKILL mid-checkpoint leaves
    leftover.write_bytes(b"\0" * 100_000)
    messages: list[str] = []
    assert train_stage(cfg, run_dir=home / "run", log=messages.append, progress=False).status == "skipped"
    assert not leftover.exists() and (home / "run" / CHECKPOINT).exists()
    assert f"MLflow run {first.run_id}" in messages[-1] and "not in the current store" not in messages[-1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'other.db'}")
    messages.clear()
    train_stage(cfg, run_dir=home / "run", log=messages.append, progress=False)
    assert f"its MLflow run {first.run_id} is not in the current store sqlite:///{home / 'other.db'}" in messages[-1]


def test_running_out_of_memory_is_one_line_and_other_runtime_errors_keep_their_traceback(monkeypatch, capsys):
    from pipeline import cli

    monkeypatch.setattr(cli, "raise_on_sigterm", lambda: None)

    def oom(args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 34359738368 bytes")

    monkeypatch.setattr(cli, "_cmd_train", oom)
    assert cli.main(["train"]) == cli.EXIT_IO
    assert capsys.readouterr().err.startswith("error: out of memory; lower train.batch_size")

    def bug(args):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(cli, "_cmd_train", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        cli.main(["train"])


def test_a_run_created_by_an_attempt_killed_before_run_json_is_ended_by_the_next(home):
    from pipeline.tracking import MlflowRun, get_run

    cfg = _cfg(experiment="orphan")
    run_dir = (home / "run").resolve()
    orphan = MlflowRun("orphan", tags={"run_dir": str(run_dir)})  # what the SIGKILLed attempt left RUNNING
    result = train_stage(cfg, run_dir=run_dir, **QUIET)
    assert result.run_id != orphan.run_id and get_run(result.run_id).info.status == "FINISHED"
    left = get_run(orphan.run_id)
    assert left.info.status == "KILLED" and left.data.tags["failure_reason"] == "orphaned"


def test_an_epoch_that_waits_for_a_slow_store_says_so_and_keeps_every_point(home):
    """Back-pressure, not thinning: when the store cannot keep up, training waits and the log tells how long."""
    from pipeline.data import ensure_splits
    from pipeline.train import fit

    cfg = build_config(overrides=["data.train_subset=640", "train.epochs=2", "train.grid_images=4",
                                  "tracking.flush_every=5"])
    sink = _recorder()
    real_flush = sink.flush

    def slow_flush():  # the first epoch's checkpoint waits 30 s for its points (as counted by the sink)
        sink.store_wait_s += 30.0 if sink.store_wait_s == 0 else 0.0
        real_flush()

    sink.flush = slow_flush
    lines = []
    fit(cfg, home / "slow", sink, splits=ensure_splits(cfg.data, log=QUIET["log"]), log=lines.append, progress=False)
    waits = [line for line in lines if "waiting for the tracking store" in line]
    assert len(waits) == 1 and waits[0].startswith("[train] epoch 1: 30.0 s of ")
    steps = [step for k, _, step in sink.rows if k == "train/loss"]
    assert steps == list(range(2 * 640 // cfg.train.batch_size))
