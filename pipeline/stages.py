"""The train stage as users run it: train a config, then evaluate it, in one MLflow run; cached.

It sits above ``train`` (the loop) and ``evaluate`` (the diagnostics), which do not import each
other. ``train_stage`` picks the run directory, attaches the MLflow run, skips finished work,
resumes interrupted work, evaluates on the test set and records how the run ended.
"""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
from dataclasses import asdict
from pathlib import Path

import torch

from pipeline import paths, system_metrics
from pipeline.checkpoint import CHECKPOINT, load_checkpoint
from pipeline.config import RunConfig
from pipeline.data import ensure_splits, prepared_dir
from pipeline.errors import PipelineError, masked
from pipeline.evaluate import default_iwae_k, default_n_samples, evaluate_stage, record_saved_evaluation
from pipeline.fileio import atomic_write_json, remove_leftovers
from pipeline.runtime import resolve_device
from pipeline.train import DivergedError, StopEarly, TrainResult, fit
from pipeline.vae.custom import decoder_entry, record_sources

RESULT = "result.json"
RUN_INFO = "run.json"


class RunDirError(PipelineError, RuntimeError):
    """The run directory's state conflicts with what was asked."""


def default_run_dir(cfg: RunConfig) -> Path:
    return paths.runs_dir() / cfg.tracking.experiment / (cfg.tracking.run_name or cfg.result_hash())


def _git_commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def train_stage(
    cfg: RunConfig,
    run_dir: str | Path | None = None,
    *,
    mode: str = "auto",
    log=print,
    progress: bool | None = None,
    parent_run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
    on_epoch=None,
    on_run=None,
) -> TrainResult:
    """Train one config, cached and resumable.

    mode: ``auto`` skips a finished run and resumes an interrupted one; ``resume`` insists on a
    checkpoint to resume; ``restart`` discards what the run directory holds. ``on_epoch``: see
    ``fit``; a run it stops ends with status ``pruned`` (final, like ``diverged``). ``on_run(run_id)``
    is called once the MLflow run is attached, before any training (a study records it at once).
    """
    if mode not in ("auto", "resume", "restart"):
        raise ValueError(f"mode={mode!r} is not one of: auto, resume, restart")
    run_dir = (Path(run_dir) if run_dir else default_run_dir(cfg)).resolve()
    ckpt_path, result_path, info_path = run_dir / CHECKPOINT, run_dir / RESULT, run_dir / RUN_INFO

    if cfg.tracking.enabled:
        from pipeline.tracking import check_reachable

        check_reachable()  # one clear error in seconds, before anything asks the store (or retries for minutes)
    if run_dir.is_dir():
        remove_leftovers(run_dir)  # this stage owns its run directory (a study claims it first)
    if mode == "restart":
        _retire(_read_json(info_path), cfg, log)
        for p in (ckpt_path, result_path, info_path):
            p.unlink(missing_ok=True)
    done = _read_json(result_path)
    if done is not None:
        if done.get("config_hash") not in (None, cfg.result_hash()):
            raise RunDirError(f"{run_dir} holds a run of a different config; choose another run directory or --restart")
        if done["status"] == "finished":
            log(f"[train] already finished: {run_dir} ({_where_tracked(done.get('run_id'), cfg)}); "
                "--restart to train again")
            return TrainResult(**{**{k: done.get(k) for k in TrainResult.__dataclass_fields__}, "status": "skipped"})
        if done["status"] == "diverged":
            log(f"[train] this run diverged at step {done.get('diverged_at_step')}; --restart to try again")
            return TrainResult(**{k: done.get(k) for k in TrainResult.__dataclass_fields__})
        if done["status"] == "pruned":
            log(f"[train] this run was pruned after epoch {done.get('epochs_done')}; --restart to train it again")
            return TrainResult(**{k: done.get(k) for k in TrainResult.__dataclass_fields__})
    if ckpt_path.exists():
        ck_hash = load_checkpoint(ckpt_path).get("config_hash")
        if ck_hash != cfg.result_hash():
            raise RunDirError(
                f"{ckpt_path} was trained with a different config (hash {ck_hash}, now {cfg.result_hash()}); "
                "choose another run directory or pass --restart to discard it"
            )
    elif mode == "resume":
        raise RunDirError(f"nothing to resume: {ckpt_path} does not exist; drop --resume to start this run")

    splits = ensure_splits(cfg.data, log=log)
    info = _read_json(info_path) or {}
    sink = _open_sink(cfg, info.get("run_id"), parent_run_id, {"run_dir": str(run_dir), **(extra_tags or {})})
    if cfg.tracking.system_metrics:
        # Stopped by sink.end, which every exit below reaches (the failure paths through _end_quietly).
        sink = system_metrics.monitored(sink, log)
    try:
        _attach(cfg, sink, info, run_dir, splits, on_run, extra_tags, log)
    except BaseException as e:
        # The MLflow run exists from here on: it must not stay RUNNING because, say, the run directory is
        # read-only. Ended, it is re-attached by the next attempt through run.json, or left as a record.
        interrupted = isinstance(e, KeyboardInterrupt)
        _end_quietly(sink, "KILLED" if interrupted else "FAILED", "interrupted" if interrupted else f"error: {type(e).__name__}")
        raise

    try:
        result = fit(cfg, run_dir, sink, resume=ckpt_path.exists(), splits=splits, log=log, progress=progress,
                     on_epoch=on_epoch)
        sink.log_artifact(ckpt_path, "checkpoint")  # in here: a store failing now ends the run FAILED, not RUNNING
    except StopEarly as e:
        sink.end("KILLED", tags={"pruned": "true", "pruned_at_epoch": str(e.epoch)})
        ck = load_checkpoint(ckpt_path)
        result = TrainResult(str(run_dir), sink.run_id, "pruned", ck["epoch"], ck["step"])
        atomic_write_json({**asdict(result), "config_hash": cfg.result_hash()}, result_path)
        log(f"[train] {e}; MLflow run {sink.run_id} ended KILLED, tagged pruned")
        return result
    except DivergedError as e:
        sink.end("FAILED", tags={"failure_reason": "diverged", "diverged_at_step": str(e.step)})
        result = TrainResult(str(run_dir), sink.run_id, "diverged", e.epoch - 1, e.step, diverged_at_step=e.step)
        atomic_write_json({**asdict(result), "config_hash": cfg.result_hash()}, result_path)
        kept = f"last good checkpoint kept at {ckpt_path}" if ckpt_path.exists() else "no epoch finished, so no checkpoint"
        log(f"[train] DIVERGED: {e}; {kept}. MLflow run {sink.run_id} is marked FAILED (failure_reason=diverged)")
        return result
    except KeyboardInterrupt:
        _end_quietly(sink, "KILLED", "interrupted")
        raise
    except BaseException as e:
        _end_quietly(sink, "FAILED", f"error: {type(e).__name__}")
        raise

    try:
        e = cfg.eval
        settings = {"k": e.iwae_k, "batch_size": e.batch_size, "mi_batch": e.mi_batch, "n_samples": e.n_samples,
                    "test_subset": e.test_subset, "train_subset": e.train_subset}
        if e.enabled and not record_saved_evaluation(ckpt_path, result.steps_done, sink, settings, log):
            evaluate_stage(ckpt_path, **settings, device=cfg.train.device, log=log, sink=sink, splits=splits)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: an interruption, not a failed evaluation
        _end_quietly(sink, "KILLED", "interrupted")
        raise
    except BaseException as exc:
        # Training is complete and checkpointed; a rerun skips to evaluating again.
        _end_quietly(sink, "FAILED", f"evaluation error: {type(exc).__name__}")
        raise
    sink.end("FINISHED")
    atomic_write_json({**asdict(result), "config_hash": cfg.result_hash()}, result_path)
    return result


def _end_quietly(sink, status: str, reason: str) -> None:
    """End the run on a failure path; if the store fails too (a full disk holds mlflow.db as well), the
    original error is the one to report, so the store's is dropped."""
    with contextlib.suppress(Exception):
        sink.end(status, tags={"failure_reason": reason})


def _attach(cfg: RunConfig, sink, info: dict, run_dir: Path, splits, on_run, extra_tags, log) -> None:
    """Bind the run directory and the MLflow run to each other (run.json), and give the run its params,
    tags and config."""
    info_path = run_dir / RUN_INFO
    atomic_write_json({"run_id": sink.run_id, "config_hash": cfg.result_hash()}, info_path)
    if on_run and sink.run_id:
        on_run(sink.run_id)
    device = resolve_device(cfg.train.device)
    if info.get("run_id") and sink.run_id != info["run_id"] and cfg.tracking.enabled:
        # The run this directory belongs to is not in the current store (another MLFLOW_TRACKING_URI,
        # a deleted mlflow.db): go on in a new run, and say that it lacks the earlier history.
        log(f"[train] warning: MLflow run {info['run_id']} not found in {_store_hint()}; "
            f"continuing in new run {sink.run_id} without the history before the checkpoint")
        sink.set_tags({"partial_history": "true", "previous_run_id": info["run_id"]})
    params = cfg.flat()
    # Record the values evaluation will use, not "auto".
    autoregressive = decoder_entry(cfg.model.decoder_name).autoregressive
    if params["eval.iwae_k"] is None:
        params["eval.iwae_k"] = default_iwae_k(device, autoregressive)
    if params["eval.n_samples"] is None:
        params["eval.n_samples"] = default_n_samples(device, autoregressive, math.prod(splits.train_x.shape[1:]))
    sink.log_params(params)  # skips keys already there, so a re-attached run is completed
    sink.set_tags(
        {
            "git_commit": _git_commit(),
            "dataset_manifest_sha256": splits.manifest_sha256,
            "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
            "torch_version": torch.__version__,
            "config_hash": cfg.result_hash(),
            "run_dir": str(run_dir),
            # A custom encoder's/decoder's source digest and file, as the run started with them.
            **record_sources(cfg.model, run_dir, (run_dir / CHECKPOINT).exists(), log),
            **(extra_tags or {}),
        }
    )
    d = cfg.data  # the runs table's Dataset column; logged once, so a resumed run is left as it is
    sink.log_dataset_input(d.dataset, splits.manifest_sha256, prepared_dir(d), splits.manifest)
    config_path = run_dir / "config.yaml"
    _write_config(cfg, config_path)
    sink.log_artifact(config_path)


def _where_tracked(run_id: str | None, cfg: RunConfig) -> str:
    """Where a finished run's numbers are: its MLflow run, or a warning when the current store lacks it."""
    if not run_id or not cfg.tracking.enabled:
        return "not tracked in MLflow"
    from pipeline.tracking import client, tracking_uri

    try:
        client().get_run(run_id)
        return f"MLflow run {run_id}"
    except Exception:
        return (f"its MLflow run {run_id} is not in the current store {masked(tracking_uri())}: it was tracked in "
                "another one; set MLFLOW_TRACKING_URI back to it, or --restart to train it again into this one")


def _retire(info: dict | None, cfg: RunConfig, log) -> None:
    """--restart starts a new MLflow run: end the discarded one if it was left RUNNING (a killed attempt),
    so no run of ours stays RUNNING forever."""
    run_id = (info or {}).get("run_id")
    if not run_id or not cfg.tracking.enabled:
        return
    from pipeline.tracking import client

    try:
        c = client()
        if c.get_run(run_id).info.status != "RUNNING":
            return
        c.set_tag(run_id, "failure_reason", "restarted")
        c.set_terminated(run_id, status="KILLED")
    except Exception:  # not in this store, or deleted: nothing to end here
        return
    log(f"[train] --restart: ended the discarded MLflow run {run_id} (KILLED, failure_reason=restarted)")


def _store_hint() -> str:
    from pipeline.tracking import tracking_uri

    return tracking_uri()


def _write_config(cfg: RunConfig, path: Path) -> None:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _open_sink(cfg: RunConfig, run_id: str | None, parent_run_id: str | None, tags: dict[str, str]):
    """The run's MLflow run: re-attached by id, else created with its run directory among its first tags, so
    that one created by an attempt killed before it wrote run.json can still be found and ended."""
    if not cfg.tracking.enabled:
        from pipeline.tracking import NullRun

        return NullRun()
    from pipeline.tracking import MlflowRun, end_orphans

    sink = MlflowRun(
        cfg.tracking.experiment,
        run_name=cfg.tracking.run_name or cfg.describe(),
        run_id=run_id,
        parent_run_id=parent_run_id,
        tags=tags,  # a re-attached run just gets them set again
    )
    if not sink.resumed:
        end_orphans(cfg.tracking.experiment, tags["run_dir"], keep=sink.run_id)
    return sink
