"""Study files: YAML → a validated study specification, and grid/OFAT designs → logical trials.

A study file holds only what differs from the run defaults (README, "Study files"). Everything is checked at
load time, before anything runs: unknown keys name themselves and the allowed keys, every value of
every factor is validated as a full run config (so a likelihood or schedule outside its registry is
named with the allowed values), and objective metrics must be ones the pipeline records.

Trials of fixed designs (grid, ofat) are enumerated here with a stable index; each (config, seed) is
a trial of its own. Searches (tpe, random, nsga2) draw configs from the space; each trial's objective
is then the mean over the listed seeds. No Optuna here: the runner maps this onto it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline import augment
from pipeline.config import ConfigError, RunConfig, build_config
from pipeline.metric_table import OBJECTIVE_METRICS
from pipeline.vae.priors import PRIORS

SAMPLERS = ("grid", "ofat", "tpe", "random", "nsga2")
FIXED_DESIGNS = ("grid", "ofat")
PRUNERS = ("none", "median", "hyperband")

# Defined only for priors that factorize over latent dimensions (pipeline.evaluate leaves them out otherwise).
PER_DIMENSION_KL_METRICS = ("test/kl_dim_max", "test/collapsed_dims", "test/kl_active_fraction")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Range(_Strict):
    """A numeric interval for searches: floats, or ints when `step` is an int (e.g. decoder depth)."""

    low: float
    high: float
    log: bool = False
    step: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        if self.log and self.step not in (None, 1):
            raise ValueError("log and step cannot be combined (a log range is sampled continuously, or in steps of 1)")
        if self.step is not None and self.step <= 0:
            raise ValueError(f"step ({self.step}) must be positive")
        return self

    @property
    def is_int(self) -> bool:
        return self.step is not None and float(self.step).is_integer() and float(self.low).is_integer()


class Objective(_Strict):
    metric: str
    direction: Literal["minimize", "maximize"]

    @field_validator("metric")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in OBJECTIVE_METRICS:
            raise ValueError(f"objective metric {v!r} is not recorded by the pipeline; allowed: {', '.join(OBJECTIVE_METRICS)}")
        return v


class StudySpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    dataset: str = "fashion-mnist"
    base: dict[str, Any] = {}
    sampler: Literal["grid", "ofat", "tpe", "random", "nsga2"] = "grid"
    space: dict[str, list[Any] | Range]
    baseline: dict[str, Any] = {}
    # Fixed designs: points to leave out, each a {factor: level or [levels]} that a point matches when it
    # has one of the listed levels for every factor named (combinations that make no sense together).
    exclude: list[dict[str, Any]] = []
    seeds: list[int] = Field(default=[0], min_length=1)
    objectives: list[Objective] = Field(min_length=1)
    n_trials: int | None = Field(None, ge=1)
    pruner: Literal["none", "median", "hyperband"] = "none"

    @model_validator(mode="after")
    def _design_rules(self) -> StudySpec:
        if not self.space:
            raise ValueError("space: name at least one factor")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: {self.seeds} has repeats")
        fixed = self.sampler in FIXED_DESIGNS
        for key, levels in self.space.items():
            if isinstance(levels, list) and not levels:
                raise ValueError(f"space.{key}: give at least one level")
            repeats = _repeated(_canonical_levels(key, levels)) if isinstance(levels, list) else []
            if repeats:
                raise ValueError(f"space.{key}: {levels} lists {', '.join(map(repr, repeats))} more than once (1 and 1.0 "
                                 "are one level, and would train the same config twice); list each level once")
            if fixed and isinstance(levels, Range):
                raise ValueError(f"space.{key}: sampler {self.sampler} needs a list of levels, not a range")
        if fixed and self.n_trials is not None:
            raise ValueError(f"n_trials: sampler {self.sampler} runs every point of its design; remove n_trials")
        if not fixed and self.n_trials is None:
            raise ValueError(f"n_trials: sampler {self.sampler} needs the number of trials to run")
        if self.pruner != "none" and (fixed or self.sampler == "nsga2"):
            why = "grid and ofat run every point to the end" if fixed else "multi-objective trials cannot be pruned"
            raise ValueError(f"pruner: {self.pruner} is not allowed with sampler {self.sampler} ({why})")
        if self.sampler == "nsga2" and len(self.objectives) < 2:
            raise ValueError("objectives: nsga2 is multi-objective; give at least two")
        if self.sampler in ("tpe", "random") and len(self.objectives) != 1:
            raise ValueError(f"objectives: sampler {self.sampler} optimises one objective; use nsga2 for several")
        if self.sampler == "ofat":
            missing = [k for k in self.space if k not in self.baseline]
            extra = [k for k in self.baseline if k not in self.space]
            if missing or extra:
                raise ValueError(
                    "baseline: ofat needs exactly one baseline value per factor"
                    + (f"; missing {missing}" if missing else "") + (f"; not factors {extra}" if extra else "")
                )
        elif self.baseline and self.sampler != "grid":
            raise ValueError(f"baseline: only used by ofat and grid (as the reference config), not {self.sampler}")
        if self.exclude and not fixed:
            raise ValueError(f"exclude: sampler {self.sampler} draws points itself and cannot leave combinations out; "
                             "narrow the space instead, or use a grid")
        for i, rule in enumerate(self.exclude):
            if not rule:
                raise ValueError(f"exclude[{i}]: name at least one factor and its level(s)")
            for key, levels in rule.items():
                if key not in self.space:
                    raise ValueError(f"exclude[{i}].{key}: not a factor of this study ({', '.join(self.space)})")
                unknown = [v for v in _as_list(levels) if v not in self.space[key]]
                if unknown:
                    raise ValueError(f"exclude[{i}].{key}: {unknown} not among its levels {self.space[key]}")
        return self

    @property
    def factors(self) -> list[str]:
        return list(self.space)


@dataclass(frozen=True)
class TrialSpec:
    """One logical trial of a fixed design: a point of the design and a seed."""

    index: int
    point: dict[str, Any]  # factor → level
    seed: int
    overrides: dict[str, Any]  # everything applied onto the run defaults, seed included

    def config(self) -> RunConfig:
        return build_config({}, self.overrides)

    @property
    def config_hash(self) -> str:
        return self.config().result_hash()


def _canonical_levels(key: str, levels: list) -> list:
    """Levels as the config stores them, where it rewrites them (`noise+shift` is `shift+noise`)."""
    if key != "data.augment":
        return levels
    out = []
    for v in levels:
        try:
            out.append(augment.canonical(v))
        except ValueError:
            out.append(v)  # named by the config check of each level
    return out


def _repeated(levels: list) -> list:
    """Levels listed more than once (by ==, so 1 and 1.0 are the same level), each named once, as first written."""
    out: list = []
    for i, v in enumerate(levels):
        earlier = [w for w in levels[:i] if w == v]
        if earlier and not any(v == r for r in out):
            out.append(earlier[0])  # as first written
    return out


def _as_list(levels: Any) -> list:
    return levels if isinstance(levels, list) else [levels]


def excluded(point: dict[str, Any], rules: list[dict[str, Any]]) -> bool:
    """Whether a design point matches one of the study's `exclude` rules."""
    return any(all(point.get(k) in _as_list(v) for k, v in rule.items()) for rule in rules)


def _normalize_keys(d: dict[str, Any]) -> dict[str, Any]:
    # `likelihood: bernoulli` is shorthand for likelihood.name, as in run configs.
    return {("likelihood.name" if k == "likelihood" else k): v for k, v in d.items()}


def _check_config(overrides: dict[str, Any], where: str) -> None:
    try:
        build_config({}, overrides)
    except ConfigError as e:
        raise ConfigError(f"{where}: {str(e).removeprefix('invalid config:').strip()}") from None


def _format(err: ValidationError, path: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            model: type[BaseModel] = StudySpec
            parts = [str(p) for p in e["loc"]]
            if parts[0] == "objectives":
                model = Objective
            elif parts[0] == "space":
                model = Range
            allowed = ", ".join(sorted(model.model_fields))
            lines.append(f"unknown key {loc!r}; allowed keys: {allowed}")
        elif e["type"] == "literal_error":
            lines.append(f"{loc}={e.get('input')!r} is not one of: {e.get('ctx', {}).get('expected', '')}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{loc}: {msg}" if loc else msg)
    return f"{path}: invalid study:\n  " + "\n  ".join(lines)


def parse_study(data: dict[str, Any], path: str = "<study>") -> StudySpec:
    """Validate a study mapping completely, including every level as a run config."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a study file is a mapping (name, sampler, space, …), got {type(data).__name__}")
    data = dict(data)
    for key in ("base", "space", "baseline"):
        if isinstance(data.get(key), dict):
            data[key] = _normalize_keys(data[key])
    if isinstance(data.get("exclude"), list):
        data["exclude"] = [_normalize_keys(r) if isinstance(r, dict) else r for r in data["exclude"]]
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format(e, path)) from None

    base = {"data.dataset": spec.dataset, "tracking.experiment": spec.name, **spec.base}
    _check_config(base, f"{path}: base")
    for key, levels in spec.space.items():
        if key in ("train.seed", "tracking.experiment") or key.startswith("tracking."):
            raise ConfigError(f"{path}: space.{key}: seeds go in `seeds`, tracking is set by the study")
        values = levels if isinstance(levels, list) else [levels.low, levels.high]
        if isinstance(levels, Range) and levels.is_int:
            values = [int(levels.low), int(levels.high)]
        for v in values:
            _check_config({**base, key: v}, f"{path}: space.{key}={v!r}")
    for key, v in spec.baseline.items():
        _check_config({**base, key: v}, f"{path}: baseline.{key}={v!r}")
    _check_combinations(spec, base, path)
    return spec


def _check_combinations(spec: StudySpec, base: dict[str, Any], path: str) -> None:
    """Levels valid one by one can still clash (e.g. free bits per dimension with a mixture prior): every
    point of a fixed design, or every combination of a search's listed levels, must be a valid config."""
    if spec.sampler in FIXED_DESIGNS:
        points = design_points(spec)
    else:
        listed = {k: v for k, v in spec.space.items() if isinstance(v, list)}
        points = [dict(zip(listed, combo)) for combo in itertools.product(*listed.values())]
    if not points:
        raise ConfigError(f"{path}: exclude leaves no point of the design to run")
    per_dim = [o.metric for o in spec.objectives if o.metric in PER_DIMENSION_KL_METRICS]
    test_aug = [o.metric for o in spec.objectives if o.metric.startswith("test_aug/")]
    trainset = [o.metric for o in spec.objectives if o.metric.startswith("trainset/")]
    bad = []
    for point in points:
        try:
            cfg = build_config({}, {**base, **point})
        except ConfigError as e:
            bad.append((point, str(e).removeprefix("invalid config:").strip()))
            continue
        if per_dim and not PRIORS[cfg.prior.name].factorized:
            bad.append((point, f"objective {per_dim[0]} is a per-dimension KL measure, undefined for prior.name="
                               f"{cfg.prior.name!r} (it does not factorize); use test/active_units or test/mutual_info"))
        if test_aug and cfg.data.augment == "none":
            bad.append((point, f"objective {test_aug[0]} is measured on augmented test images, and this point trains "
                               "without augmentation (data.augment=none); use the test/ metric"))
        if trainset and cfg.eval.train_subset is False:
            bad.append((point, f"objective {trainset[0]} is measured on training images, and eval.train_subset=false "
                               "turns that evaluation off"))
    if not bad:
        return
    shown = "\n  ".join(f"{', '.join(f'{k}={v!r}' for k, v in p.items())}: {why}" for p, why in bad[:3])
    more = f"\n  … and {len(bad) - 3} more" if len(bad) > 3 else ""
    fix = ("leave such combinations out with `exclude:` (e.g. exclude: [{prior.name: [mog, vamp], "
           "objective.free_bits: per_dim}]) or change the levels" if spec.sampler in FIXED_DESIGNS else
           "a search may draw any combination of its levels: remove one of the clashing levels")
    raise ConfigError(f"{path}: {len(bad)} point(s) of the design are not valid configs:\n  {shown}{more}\n  {fix}")


def load_study(path: str | Path) -> StudySpec:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file {str(path)!r} does not exist (shipped studies are in studies/)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return parse_study(data, str(path))


def base_overrides(spec: StudySpec) -> dict[str, Any]:
    return {"data.dataset": spec.dataset, "tracking.experiment": spec.name, **spec.base}


def design_points(spec: StudySpec) -> list[dict[str, Any]]:
    """The points of a fixed design, in a stable order."""
    if spec.sampler == "grid":
        keys = spec.factors
        points = [dict(zip(keys, combo)) for combo in itertools.product(*(spec.space[k] for k in keys))]
        return [p for p in points if not excluded(p, spec.exclude)]
    if spec.sampler == "ofat":
        # The baseline, then each factor moved alone through its other levels (the classic ablation).
        points = [dict(spec.baseline)]
        for key in spec.factors:
            for level in spec.space[key]:
                if level != spec.baseline[key] and not excluded({**spec.baseline, key: level}, spec.exclude):
                    points.append({**spec.baseline, key: level})
        return points
    raise ValueError(f"sampler {spec.sampler} has no fixed design; it draws points from the space")


def expand_trials(spec: StudySpec) -> list[TrialSpec]:
    """Every logical trial of a fixed design: each point × each seed, indexed stably."""
    trials = []
    for point in design_points(spec):
        for seed in spec.seeds:
            overrides = {**base_overrides(spec), **point, "train.seed": seed}
            trials.append(TrialSpec(len(trials), point, seed, overrides))
    return trials


def point_key(point: dict[str, Any]) -> str:
    """A short stable id for a design point (independent of the seed)."""
    blob = json.dumps(point, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]
