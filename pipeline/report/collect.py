"""MLflow + Optuna → pandas: the tables a report is drawn from, and nothing else.

One row per MLflow child run (a trial's config and seed), one row per logical trial (what Optuna
says happened to it, including trials that never started), binned training curves and the per
dimension KL vectors. A study that is still running, partly failed or pruned is read as it is.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import RunConfig
from pipeline.metric_table import is_eval_key
from pipeline.studyspec import Range, StudySpec, design_points, expand_trials, point_key
from pipeline.vae.decoders import DECODERS

CURVE_KEYS = ("train/kl", "train/recon_nll")
CURVE_BINS = 200  # step bins over the longest run: plotting 10⁴ noisy steps per run says no more

# How a factor is named in labels; keys not listed fall back to their last component.
FACTOR_NAMES = {
    "objective.beta": ("β", "β (KL weight)"),
    "objective.schedule": ("schedule", "β schedule"),
    "objective.free_bits": ("free bits", "free-bits mode"),
    "objective.free_bits_lambda": ("λ", "free-bits λ (nats)"),
    "objective.warmup_steps": ("warm-up", "β warm-up (optimizer steps)"),
    "likelihood.name": ("likelihood", "decoder likelihood"),
    "model.decoder_depth": ("dec. depth", "decoder depth (blocks)"),
    "model.encoder_depth": ("enc. depth", "encoder depth (blocks)"),
    "model.latent_dim": ("d", "latent dimensions"),
    "model.hidden_dim": ("hidden", "hidden units"),
    "model.arch": ("arch", "architecture"),
    "model.encoder": ("encoder", "encoder family"),
    "model.decoder": ("decoder", "decoder family"),
    "model.kernel_size": ("kernel", "masked kernel size (pixels)"),
    "model.channels": ("channels", "channels"),
    "prior.name": ("prior", "prior p(z)"),
    "prior.components": ("K", "prior components"),
    "train.epochs": ("epochs", "training epochs"),
    "train.lr": ("lr", "learning rate"),
    "train.batch_size": ("batch", "batch size (images)"),
    "train.optimizer": ("optimizer", "optimizer"),
    "train.init": ("init", "weight initialization"),
    "train.lr_schedule": ("lr schedule", "learning-rate schedule"),
    "data.augment": ("augment", "training augmentation"),
}


@dataclass(frozen=True)
class Factor:
    key: str
    short: str  # in config labels: "β=4, likelihood=bernoulli"
    label: str  # axis label, with its unit
    kind: str  # "categorical" (names), "numeric" (a list of numbers), "continuous" (a search range)
    levels: tuple  # display order: numbers ascending, names as the study lists them; () when continuous
    log: bool = False  # a search range sampled on a log scale
    integer: bool = False  # a search range of whole numbers (e.g. decoder depth)

    @property
    def numeric(self) -> bool:
        return self.kind != "categorical"


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def factors_of(spec: StudySpec) -> list[Factor]:
    out = []
    for key, levels in spec.space.items():
        short, label = FACTOR_NAMES.get(key, (key.rsplit(".", 1)[-1].replace("_", " "),) * 2)
        if isinstance(levels, Range):
            out.append(Factor(key, short, label, "continuous", (), levels.log, levels.is_int))
            continue
        if key in spec.baseline and spec.baseline[key] not in levels:
            levels = [*levels, spec.baseline[key]]
        if all(_is_number(v) for v in levels):
            out.append(Factor(key, short, label, "numeric", tuple(sorted(set(levels)))))
        else:
            out.append(Factor(key, short, label, "categorical", tuple(dict.fromkeys(levels))))
    return out


def coerce_level(raw: Any, factor: Factor) -> Any:
    """An MLflow param (a string) back to the study's level: '16.0' → 16 when the level is 16."""
    if raw is None:
        return None
    for level in factor.levels:
        if str(level) == str(raw):
            return level
        if _is_number(level):
            try:
                if math.isclose(float(raw), float(level)):
                    return level
            except ValueError:
                pass
    try:
        number = float(raw)
    except ValueError:
        return raw
    return int(number) if number.is_integer() and factor.kind != "continuous" else number


def fmt_level(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def config_label(point: dict[str, Any], factors: list[Factor]) -> str:
    return ", ".join(f"{f.short}={fmt_level(point.get(f.key))}" for f in factors)


@dataclass
class StudyData:
    """Everything a report shows, read once."""

    spec: StudySpec
    factors: list[Factor]
    runs: pd.DataFrame  # one row per child run
    trials: pd.DataFrame  # one row per logical trial, expected or seen
    curves: pd.DataFrame  # run_id, key, step, value: bin means of the per-step training curves
    kl_per_dim: dict[str, np.ndarray]  # run_id → mean KL per latent dimension (nats); factorizing priors only
    parent_run_id: str | None
    notes: list[str] = field(default_factory=list)  # what could not be read, for the report to say
    compute_seconds: float = math.nan  # summed Optuna attempts, start to finish (NaN: no Optuna storage)
    collected_at: float = field(default_factory=time.time)
    _cache: Path | None = None

    def artifact(self, run_id: str, name: str) -> Path | None:
        """An eval artifact of a run (e.g. 'test_samples.png'): from its run directory, else from MLflow."""
        row = self.runs.loc[self.runs.run_id == run_id]
        run_dir = row.run_dir.iloc[0] if len(row) else None
        if isinstance(run_dir, str) and (Path(run_dir) / "eval" / name).is_file():
            return Path(run_dir) / "eval" / name
        from pipeline.tracking import download_artifact

        if self._cache is None:
            self._cache = Path(tempfile.mkdtemp(prefix="vae-report-"))
        return download_artifact(run_id, f"eval/{name}", self._cache / run_id)

    def close(self) -> None:
        if self._cache is not None:
            shutil.rmtree(self._cache, ignore_errors=True)
            self._cache = None


# How decoder families are written in the report.
DECODER_NAMES = {"mlp": "MLP", "conv": "conv", "pixelcnn": "PixelCNN"}
# Remedies against collapse, in the order the report lists them (no remedy first).
REMEDY_KINDS = ("none", "free bits", "KL annealing", "free bits + KL annealing")


@functools.cache
def _config_defaults() -> dict[str, Any]:
    return RunConfig().flat()


def _param(params: dict[str, str], key: str) -> Any:
    """A run's config value: its MLflow param, else the default (a run from before the key existed ran
    with the value the key was introduced with, which is its default); None is logged as "None"."""
    raw = params.get(key)
    if raw is None:
        return _config_defaults().get(key)
    return None if raw == "None" else raw


def decoder_of(params: dict[str, str], pixel_by_pixel: float | None = None) -> dict[str, Any]:
    """A run's effective decoder: family, whether it draws pixel by pixel, rows above a pixel it sees.

    `model.decoder` is None (or absent, before it existed) when it is the family `model.arch` names.
    An autoregressive masked stack sees `decoder_depth · (kernel_size // 2)` rows above the pixel it
    predicts (`PixelCNNDecoder.rows_above`); a feed-forward decoder sees no pixel of x at all: 0. A
    decoder this version does not know is autoregressive when its evaluation drew pixel by pixel, and
    its receptive field is then unknown (NaN)."""
    name = str(_param(params, "model.decoder") or _param(params, "model.arch"))
    entry = DECODERS.get(name)
    autoregressive = entry.autoregressive if entry is not None else pixel_by_pixel == 1
    depth = int(float(_param(params, "model.decoder_depth")))
    kernel = int(float(_param(params, "model.kernel_size")))
    family = DECODER_NAMES.get(name, name)
    if not autoregressive:
        rows, label = 0, f"{family} (no autoregression)"
    elif entry is None:  # its reach is not ours to guess
        rows, label = math.nan, f"{family} (autoregressive, receptive field unknown)"
    else:
        rows = depth * (kernel // 2)
        label = f"{family}, {rows} row{'' if rows == 1 else 's'} above (depth {depth}, k {kernel})"
    return {"decoder": name, "autoregressive": autoregressive, "rows_above": rows, "decoder_label": label}


def remedy_of(params: dict[str, str]) -> dict[str, Any]:
    """The remedy against collapse a run trained with: free bits, KL annealing, both or none, named
    with its settings, plus a β other than 1 (a plain β-VAE is no remedy but changes every number)."""
    free_bits = str(_param(params, "objective.free_bits"))
    schedule = str(_param(params, "objective.schedule"))
    beta = float(_param(params, "objective.beta"))
    parts = []
    if free_bits != "none":
        lam = float(_param(params, "objective.free_bits_lambda"))
        parts.append(f"free bits λ={lam:g} nats" + ("/dim" if free_bits == "per_dim" else f" ({free_bits})"))
    if schedule != "constant":
        span = (f"{int(float(_param(params, 'objective.cycles')))} cycles" if schedule == "cyclical" else
                f"over {int(float(_param(params, 'objective.warmup_steps')))} steps")
        parts.append(f"KL annealing ({schedule}, {span})")
    kind = REMEDY_KINDS[(free_bits != "none") + 2 * (schedule != "constant")]
    if beta != 1:
        parts.append(f"β={beta:g}")
    return {"remedy": " + ".join(parts) or "none", "remedy_kind": kind}


def _runs_table(spec: StudySpec, factors: list[Factor], records: list[dict]) -> pd.DataFrame:
    rows = []
    now_ms = time.time() * 1000
    for rec in records:
        tags, params, metrics = rec["tags"], rec["params"], rec["metrics"]
        if tags.get("role") == "study":
            continue
        point = {f.key: coerce_level(params.get(f.key), f) for f in factors}
        status = rec["status"]
        if status == "KILLED" and tags.get("pruned") == "true":
            status = "PRUNED"
        end_ms = rec["end_ms"] or (now_ms if status == "RUNNING" else None)
        seed = tags.get("seed", params.get("train.seed"))
        rows.append({
            "run_id": rec["run_id"], "status": status,
            "trial": int(tags["trial"]) if tags.get("trial", "").isdigit() else -1,
            "seed": int(seed) if seed is not None else -1,
            "point": tags.get("point") or point_key(point),
            "failure_reason": tags.get("failure_reason"),
            "duration_s": (end_ms - rec["start_ms"]) / 1000 if end_ms and rec["start_ms"] else math.nan,
            "run_dir": tags.get("run_dir"),
            # Set by evaluation when the dataset has no labels (pipeline.evaluate.CLASS_FEATURES_UNAVAILABLE).
            "class_features": tags.get("class_feature_metrics"),
            "latent_dim": int(float(params["model.latent_dim"])) if "model.latent_dim" in params else -1,
            "prior": params.get("prior.name", "standard_normal"),  # runs from before priors existed
            "config": config_label(point, factors),
            **decoder_of(params, metrics.get("test/pixel_by_pixel")),
            **remedy_of(params),
            **point,
            **{k: v for k, v in metrics.items() if is_eval_key(k)},
        })
    cols = ["run_id", "status", "trial", "seed", "point", "failure_reason", "duration_s", "run_dir", "class_features",
            "latent_dim",
            "prior", "config", "decoder", "autoregressive", "rows_above", "decoder_label", "remedy", "remedy_kind",
            *(f.key for f in factors)]
    runs = pd.DataFrame(rows, columns=None if rows else cols)
    return runs.sort_values(["trial", "seed"], kind="stable").reset_index(drop=True) if rows else runs


def _optuna_trials(spec: StudySpec, storage: str | None, notes: list[str]) -> tuple[dict[int, dict], str | None, float]:
    """Latest Optuna attempt per logical trial index ({index: {state, reason, run_id, seconds, params}}),
    the parent MLflow run id the study keeps, and the seconds all attempts took (NaN without Optuna)."""
    from pipeline.study import open_storage, open_study, study_dir

    if storage is None and not (study_dir(spec) / "optuna.journal").exists():
        notes.append(f"No Optuna storage at {study_dir(spec) / 'optuna.journal'}: trial states come from MLflow alone.")
        return {}, None, math.nan
    try:
        study = open_study(spec, open_storage(spec, storage))
    except Exception as e:  # the report still says what MLflow knows
        notes.append(f"The Optuna storage could not be read ({type(e).__name__}): trial states come from MLflow alone.")
        return {}, None, math.nan
    latest: dict[int, Any] = {}
    spent = 0.0
    now = time.time()
    for t in study.get_trials(deepcopy=False):
        if t.datetime_start is not None:  # every attempt, failed and resumed ones too: compute spent
            end = t.datetime_complete.timestamp() if t.datetime_complete else now
            spent += max(0.0, end - t.datetime_start.timestamp())
        idx = t.user_attrs.get("trial_index", t.number)
        if idx not in latest or t.number > latest[idx].number:
            latest[idx] = t
    out = {}
    for idx, t in latest.items():
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        out[int(idx)] = {"state": t.state.name, "reason": t.user_attrs.get("failure_reason"),
                         "mlflow_run_id": t.user_attrs.get("mlflow_run_id"), "seconds": seconds,
                         "params": dict(t.params)}
    return out, study.user_attrs.get("mlflow_parent_run_id"), spent


# Logical trial states, as the report counts them.
STATES = ("complete", "pruned", "failed", "running", "missing")
_FROM_OPTUNA = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "missing"}
_FROM_MLFLOW = {"FINISHED": "complete", "PRUNED": "pruned", "FAILED": "failed", "KILLED": "failed", "RUNNING": "running",
                "SCHEDULED": "missing"}


def _trials_table(spec: StudySpec, factors: list[Factor], runs: pd.DataFrame, optuna: dict[int, dict]) -> pd.DataFrame:
    """One row per logical trial: what the design expects, what Optuna recorded, what MLflow holds."""
    expected: dict[int, tuple[dict, int | None]] = {}
    if spec.sampler in ("grid", "ofat"):
        expected = {t.index: (t.point, t.seed) for t in expand_trials(spec)}
    else:
        expected = {i: ({}, None) for i in range(spec.n_trials or 0)}
    indices = sorted(set(expected) | set(optuna) | {int(t) for t in runs.get("trial", []) if t >= 0})
    rows = []
    for idx in indices:
        point, seed = expected.get(idx, ({}, None))
        mine = runs[runs.trial == idx] if len(runs) else runs
        if not point and len(mine):
            point = {f.key: mine.iloc[0][f.key] for f in factors}
        o = optuna.get(idx)
        if o is not None:
            state, reason = _FROM_OPTUNA.get(o["state"], "missing"), o["reason"]
            if not point and o["params"]:
                point = {f.key: o["params"].get(f.key) for f in factors}
        elif len(mine):
            statuses = [_FROM_MLFLOW.get(s, "missing") for s in mine.status]
            state = next((s for s in ("running", "failed", "pruned", "missing") if s in statuses), "complete")
            reason = next((r for r in mine.failure_reason if isinstance(r, str)), None)
        else:
            state, reason = "missing", None
        rows.append({
            "trial": idx, "seed": seed if seed is not None else (int(mine.seed.iloc[0]) if len(mine) == 1 else None),
            "config": config_label(point, factors) if point else "(not drawn yet)",
            "state": state, "reason": reason if state in ("failed", "pruned") or reason == "worker_died" else None,
            "runs": len(mine),
        })
    return pd.DataFrame(rows, columns=["trial", "seed", "config", "state", "reason", "runs"])


def _kl_vectors(data: StudyData) -> dict[str, np.ndarray]:
    out = {}
    for run_id in data.runs.loc[data.runs.status == "FINISHED", "run_id"]:
        path = data.artifact(run_id, "kl_per_dim.json")
        if path is None:
            continue
        try:
            # Strict JSON writes a NaN as null (pipeline.evaluate.strict_json); as a float array it is NaN again.
            out[run_id] = np.asarray(json.loads(path.read_text()), dtype=float)
        except (OSError, ValueError):
            continue
    return out


def baseline_point(spec: StudySpec) -> dict[str, Any] | None:
    """The reference config: the OFAT baseline, a grid's `baseline` if given, else the first design point.

    Searches have no design: None (the report then compares against the best config)."""
    if spec.sampler == "ofat" or (spec.sampler == "grid" and spec.baseline):
        points = design_points(spec)
        match = [p for p in points if all(p.get(k) == v for k, v in spec.baseline.items())]
        return match[0] if match else dict(spec.baseline)
    if spec.sampler == "grid":
        return design_points(spec)[0]
    return None


def _parent_run_id(spec: StudySpec) -> str | None:
    from pipeline.study import study_dir

    try:
        return json.loads((study_dir(spec) / "parent.json").read_text())["run_id"]
    except (OSError, ValueError, KeyError):
        return None


def collect(spec: StudySpec, storage: str | None = None) -> StudyData:
    """Read a study from MLflow (runs, latest test metrics, curves, KL vectors) and Optuna (trial states)."""
    from pipeline.tracking import binned_metric_histories, study_parent_run, study_runs

    factors = factors_of(spec)
    notes: list[str] = []
    runs = _runs_table(spec, factors, study_runs(spec.name, spec.name))
    optuna_trials, parent, seconds = _optuna_trials(spec, storage, notes)
    trials = _trials_table(spec, factors, runs, optuna_trials)
    run_ids = list(runs.run_id) if len(runs) else []
    curves = pd.DataFrame(binned_metric_histories(run_ids, list(CURVE_KEYS), CURVE_BINS),
                          columns=["run_id", "key", "step", "value"])
    parent = parent or _parent_run_id(spec) or study_parent_run(spec.name)
    data = StudyData(spec, factors, runs, trials, curves, {}, parent, notes)
    data.compute_seconds = seconds
    data.kl_per_dim = _kl_vectors(data)
    return data
