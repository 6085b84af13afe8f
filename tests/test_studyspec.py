"""Study files: validation before anything runs, and the trials fixed designs expand to."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError
from pipeline.likelihoods import LIKELIHOODS
from pipeline.studyspec import design_points, expand_trials, load_study, parse_study

from .conftest import REPO

SHIPPED = sorted((REPO / "studies").glob("*.yaml"))
MINIMAL = {
    "name": "t",
    "sampler": "grid",
    "space": {"objective.beta": [1, 4]},
    "objectives": [{"metric": "test/iwae_nll", "direction": "minimize"}],
}


def _with(**changes):
    return {**MINIMAL, **changes}


def test_the_issue_s_studies_are_shipped():
    names = {p.stem for p in SHIPPED}
    assert {"demo", "beta", "annealing", "free_bits", "decoder_depth", "likelihood", "prior", "full_factorial",
            "search_tpe", "pareto", "autoregressive", "autoregressive_gpu", "augmentation", "latent_capacity",
            "optimization"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_study_validates(path):
    spec = load_study(path)
    assert spec.name == path.stem
    if spec.sampler in ("grid", "ofat"):
        trials = expand_trials(spec)
        assert len({t.config_hash for t in trials}) == len(trials)  # every trial is a distinct run
    # The CPU-sized autoregressive study fits its 45-minute budget with 2 seeds; its GPU variant has 3.
    if path.stem not in ("demo", "search_tpe", "pareto", "autoregressive"):
        assert len(spec.seeds) >= 3
    if path.stem == "autoregressive":
        assert len(spec.seeds) >= 2


def test_unknown_top_level_key_names_itself_and_the_allowed_keys():
    with pytest.raises(ConfigError) as e:
        parse_study(_with(seed=[0, 1]))
    assert "'seed'" in str(e.value) and "seeds" in str(e.value) and "objectives" in str(e.value)


def test_mistyped_config_key_in_space_names_the_allowed_keys():
    with pytest.raises(ConfigError) as e:
        parse_study(_with(space={"objective.bta": [1, 2]}))
    msg = str(e.value)
    assert "objective.bta" in msg and "beta" in msg and "free_bits" in msg


def test_level_outside_a_registry_lists_the_registry():
    with pytest.raises(ConfigError) as e:
        parse_study(_with(space={"likelihood": ["bernoulli", "gausian"]}))
    msg = str(e.value)
    assert "gausian" in msg and all(name in msg for name in LIKELIHOODS)


def test_bad_base_value_is_named():
    with pytest.raises(ConfigError, match="model.decoder_depth"):
        parse_study(_with(base={"model.decoder_depth": 13}))


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"sampler": "grd"}, "grid"),
        ({"space": {"objective.beta": {"low": 0.1, "high": 4}}}, "needs a list of levels"),
        ({"pruner": "median"}, "not allowed with sampler grid"),
        ({"sampler": "tpe"}, "n_trials"),
        ({"n_trials": 5}, "remove n_trials"),
        ({"sampler": "nsga2", "n_trials": 5}, "at least two"),
        ({"sampler": "ofat"}, "baseline"),
        ({"objectives": [{"metric": "test/iwae", "direction": "minimize"}]}, "test/iwae_nll"),
        ({"objectives": [{"metric": "test/iwae_nll", "direction": "min"}]}, "maximize"),
        ({"seeds": [0, 0]}, "repeats"),
        ({"space": {"train.seed": [0, 1]}}, "seeds go in `seeds`"),
        ({"space": {"objective.beta": {"low": 1, "high": 0.5}}, "sampler": "random", "n_trials": 3}, "below high"),
    ],
)
def test_design_rules_are_explained(changes, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_study(_with(**changes))


def test_not_a_mapping_or_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        parse_study(["a"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_study(tmp_path / "nope.yaml")


def test_grid_is_the_full_factorial_times_seeds_with_stable_indices():
    spec = parse_study(_with(space={"objective.beta": [1, 4, 16], "likelihood": ["bernoulli", "laplace"]}, seeds=[0, 1]))
    trials = expand_trials(spec)
    assert len(trials) == 3 * 2 * 2 and [t.index for t in trials] == list(range(12))
    assert trials == expand_trials(spec)  # stable
    first = trials[0]
    assert first.point == {"objective.beta": 1, "likelihood.name": "bernoulli"} and first.seed == 0
    cfg = first.config()
    assert cfg.objective.beta == 1 and cfg.train.seed == 0 and cfg.tracking.experiment == "t"
    assert trials[1].seed == 1 and trials[1].point == first.point


def test_ofat_moves_one_factor_at_a_time_around_the_baseline():
    spec = parse_study(_with(
        sampler="ofat",
        space={"objective.beta": [0.5, 1, 4], "model.decoder_depth": [1, 3]},
        baseline={"objective.beta": 1, "model.decoder_depth": 1},
    ))
    points = design_points(spec)
    assert points == [
        {"objective.beta": 1, "model.decoder_depth": 1},
        {"objective.beta": 0.5, "model.decoder_depth": 1},
        {"objective.beta": 4, "model.decoder_depth": 1},
        {"objective.beta": 1, "model.decoder_depth": 3},
    ]


def test_plan_cli_lists_trials_and_rejects_a_bad_study(tmp_path):
    import subprocess
    import sys

    ok = subprocess.run([sys.executable, "-m", "pipeline", "plan", str(REPO / "studies" / "demo.yaml")],
                        capture_output=True, text=True, cwd=REPO, timeout=120)
    assert ok.returncode == 0 and "4 trials" in ok.stdout and "#3" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsampler: grid\nspace: {model.latnt_dim: [4]}\n"
                   "objectives: [{metric: test/iwae_nll, direction: minimize}]\n")
    err = subprocess.run([sys.executable, "-m", "pipeline", "plan", str(bad)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert err.returncode == 2 and "model.latnt_dim" in err.stderr and "latent_dim" in err.stderr
    assert "Traceback" not in err.stderr


@pytest.mark.parametrize("bad, message", [
    ({"low": 0.1, "high": 1.0, "log": True, "step": 0.1}, "log and step cannot be combined"),
    ({"low": 1, "high": 6, "step": 0}, "must be positive"),
])
def test_a_range_that_optuna_could_not_sample_is_refused_on_load(bad, message):
    from pipeline.config import ConfigError
    from pipeline.studyspec import parse_study

    with pytest.raises(ConfigError, match=message):
        parse_study({"name": "r", "sampler": "tpe", "n_trials": 3, "space": {"objective.beta": bad},
                     "objectives": [{"metric": "test/iwae_nll", "direction": "minimize"}]})


def test_exclude_leaves_combinations_out_of_a_grid_and_keeps_the_order():
    spec = parse_study(_with(space={"prior.name": ["standard_normal", "mog"], "objective.free_bits": ["none", "per_dim"]},
                             exclude=[{"prior.name": "mog", "objective.free_bits": ["per_dim"]}]))
    assert design_points(spec) == [
        {"prior.name": "standard_normal", "objective.free_bits": "none"},
        {"prior.name": "standard_normal", "objective.free_bits": "per_dim"},
        {"prior.name": "mog", "objective.free_bits": "none"},
    ]


def test_clashing_levels_are_named_with_the_fix_before_anything_runs():
    space = {"prior.name": ["standard_normal", "vamp"], "objective.free_bits": ["none", "per_dim"]}
    with pytest.raises(ConfigError) as err:
        parse_study(_with(space=space))
    text = str(err.value)
    assert "1 point(s)" in text and "prior.name='vamp', objective.free_bits='per_dim'" in text and "exclude:" in text
    with pytest.raises(ConfigError, match="remove one of the clashing levels"):
        parse_study(_with(sampler="random", n_trials=4, space=space))
    # An objective that only a factorizing prior records is refused for the others.
    with pytest.raises(ConfigError, match="test/collapsed_dims is a per-dimension KL measure"):
        parse_study(_with(space={"prior.name": ["standard_normal", "mog"]},
                          objectives=[{"metric": "test/collapsed_dims", "direction": "minimize"}]))


@pytest.mark.parametrize(("changes", "needle"), [
    ({"sampler": "tpe", "n_trials": 3, "exclude": [{"objective.beta": 1}]}, "cannot leave combinations out"),
    ({"exclude": [{"model.latent_dim": 4}]}, "not a factor of this study"),
    ({"exclude": [{"objective.beta": 3}]}, "not among its levels"),
    ({"exclude": [{"objective.beta": [1, 4]}]}, "exclude leaves no point"),
])
def test_bad_exclude_rules_are_explained(changes, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_study(_with(**changes))


def test_full_factorial_keeps_the_trials_it_had_before_the_prior_factor():
    """An upgrade must not renumber a running study: the standard-normal block of the grid is the old grid,
    trial for trial (index, point and config hash, hence run directory)."""
    import yaml

    data = yaml.safe_load((REPO / "studies" / "full_factorial.yaml").read_text())
    assert next(iter(data["space"])) == "prior.name" and data["space"]["prior.name"][0] == "standard_normal"
    old = {**data, "space": {k: v for k, v in data["space"].items() if k != "prior.name"}}
    old.pop("exclude")
    before, after = expand_trials(parse_study(old)), expand_trials(parse_study(data))
    assert len(before) == 864 * 3 and len(after) == (864 + 2 * 576) * 3
    for b, a in zip(before, after):
        assert (a.index, a.seed, a.config_hash) == (b.index, b.seed, b.config_hash)
        assert a.point == {"prior.name": "standard_normal", **b.point}
    assert not any(t.point["prior.name"] != "standard_normal" and t.point["objective.free_bits"] == "per_dim"
                   for t in after)


@pytest.mark.parametrize("levels, repeated", [([1, 2, 1], "1"), ([1, 1.0], "1"), (["mlp", "conv", "mlp"], "'mlp'"),
                                              ([None, 100, None], "None")])
def test_repeated_levels_are_rejected_naming_them(levels, repeated):
    key = "model.arch" if isinstance(levels[0], str) else "train.grad_clip" if levels[0] is None else "objective.beta"
    with pytest.raises(ConfigError) as e:
        parse_study(_with(space={key: levels}))
    msg = str(e.value)
    assert f"space.{key}" in msg and f"lists {repeated} more than once" in msg, msg


def test_a_non_finite_level_or_range_is_rejected():
    with pytest.raises(ConfigError, match="objective.beta"):
        parse_study(_with(space={"objective.beta": [1, float("inf")]}))
    with pytest.raises(ConfigError, match="finite"):
        parse_study(_with(sampler="tpe", n_trials=3, space={"objective.beta": {"low": 0.1, "high": float("inf")}}))


def test_augment_levels_that_are_one_config_are_one_level():
    with pytest.raises(ConfigError, match=r"space.data.augment: .* lists 'shift\+noise' more than once"):
        parse_study(_with(space={"data.augment": ["noise+shift", "shift+noise"]}))


@pytest.mark.parametrize("objective, base, levels, why", [
    ("test_aug/elbo", {}, {"data.augment": ["none", "noise"]}, "trains without augmentation"),
    ("trainset/elbo", {"eval.train_subset": False}, {"objective.beta": [1, 4]}, "eval.train_subset=false"),
])
def test_an_objective_some_points_never_record_is_refused(objective, base, levels, why):
    with pytest.raises(ConfigError) as e:
        parse_study(_with(base=base, space=levels, objectives=[{"metric": objective, "direction": "maximize"}]))
    assert objective in str(e.value) and why in str(e.value), str(e.value)
    ok = parse_study(_with(space={"data.augment": ["shift", "noise"]},
                           objectives=[{"metric": objective, "direction": "maximize"}]))
    assert len(expand_trials(ok)) == 2
