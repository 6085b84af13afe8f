"""Config validation: every bad key or value is named, with what is allowed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.config import ConfigError, build_config, load_config
from pipeline.likelihoods import LIKELIHOODS

from .conftest import REPO, subprocess_env


def test_defaults_validate_and_hash_is_stable():
    a, b = build_config(), build_config({})
    assert a == b and a.result_hash() == b.result_hash()
    assert build_config(overrides=["objective.beta=4"]).result_hash() != a.result_hash()
    # Device and tracking do not change the result, so they do not change the hash.
    assert build_config(overrides=["train.device=cpu", "tracking.experiment=x"]).result_hash() == a.result_hash()


# The hashes of the first release: run directories of unfinished studies are named after them.
DEFAULT_HASH = "4d686b607071"
DEMO_TRIAL_HASHES = ["2439b0285085", "cc645970a913", "08fc540d92ed", "7fd92afdde94"]
# For every weight-changing key added after the first release: a non-default value and the overrides
# under which it matters. A new key must be added here: the test below fails until it is.
ADDED_KEY_VALUES = {
    "prior.name": ("mog", ["objective.free_bits=total"]),
    "prior.components": (11, ["prior.name=vamp"]),
    "prior.init": ("noise", ["prior.name=vamp"]),
    "model.encoder": ("conv", []),
    "model.decoder": ("pixelcnn", ["data.binarize=static"]),
    "model.kernel_size": (3, ["model.decoder=pixelcnn", "data.binarize=static"]),
    "train.grid_images_autoregressive": None,  # images drawn after each epoch with their own generator
    "data.augment": ("noise", []),
    "data.max_shift": (3, ["data.augment=shift"]),
    "data.intensity_scale": (0.3, ["data.augment=intensity"]),
    "data.intensity_offset": (0.2, ["data.augment=intensity"]),
    "data.noise_std": (0.2, ["data.augment=noise"]),
    "train.optimizer": ("sgd", []),
    "train.momentum": (0.5, ["train.optimizer=sgd"]),
    "train.weight_decay": (0.1, ["train.optimizer=adamw"]),
    "train.init": ("xavier", []),
    "train.lr_schedule": ("cosine", []),
    "train.lr_warmup_steps": (7, ["train.lr_schedule=warmup"]),
    "data.image_size": (16, []),
    "data.channels": (3, []),
    # Read only for a source without a test split: a path (any folder passes config load).
    "data.test_fraction": (0.2, [f"data.dataset={REPO / 'studies'}"]),
}


def test_existing_configs_keep_their_hashes_after_keys_were_added():
    from pipeline.studyspec import expand_trials, load_study

    assert build_config().result_hash() == DEFAULT_HASH
    assert [t.config_hash for t in expand_trials(load_study(REPO / "studies" / "demo.yaml"))] == DEMO_TRIAL_HASHES
    # Writing an added key at its default is the old config: same hash, same run directory.
    assert build_config(overrides=["prior.name=standard_normal", "prior.components=10"]).result_hash() == DEFAULT_HASH
    # A prior option the standard normal does not read cannot change its weights, nor the hash.
    assert build_config(overrides=["prior.components=50", "prior.init=noise"]).result_hash() == DEFAULT_HASH
    mog = ["prior.name=mog", "objective.free_bits=total"]
    assert build_config(overrides=[*mog, "prior.init=noise"]).result_hash() == build_config(overrides=mog).result_hash()


def test_model_arch_is_shorthand_for_encoder_and_decoder_with_one_hash_per_model():
    def model_of(*overrides):
        m = build_config(overrides=list(overrides)).model
        return m.encoder_name, m.decoder_name

    assert model_of() == ("mlp", "mlp") and model_of("model.arch=conv") == ("conv", "conv")
    assert model_of("model.arch=conv", "model.decoder=mlp") == ("conv", "mlp")
    assert model_of("model.arch=conv", "model.encoder=mlp") == ("mlp", "conv")
    # The same model spelled either way is the same run; different models are different runs.
    same = [["model.arch=conv"], ["model.encoder=conv", "model.decoder=conv"], ["model.arch=mlp", "model.encoder=conv",
                                                                                 "model.decoder=conv"]]
    assert len({build_config(overrides=o).result_hash() for o in same}) == 1
    mixed = [["model.encoder=conv"], ["model.decoder=conv"], ["model.arch=conv"], []]
    assert len({build_config(overrides=o).result_hash() for o in mixed}) == 4
    assert build_config(overrides=["model.encoder=conv"]).result_hash() == \
        build_config(overrides=["model.arch=conv", "model.decoder=mlp"]).result_hash()
    # A dumped config reloads to the same model, and an arch override on it still works.
    cfg = build_config(overrides=["model.decoder=pixelcnn", "data.binarize=static"])
    assert build_config(cfg.to_dict()).result_hash() == cfg.result_hash()
    assert build_config(cfg.to_dict(), ["model.arch=conv"]).model.encoder_name == "conv"
    # kernel_size is read by the PixelCNN alone.
    assert build_config(overrides=["model.arch=conv", "model.kernel_size=7"]).result_hash() == \
        build_config(overrides=["model.arch=conv"]).result_hash()


def test_every_weight_changing_key_changes_the_hash():
    from pipeline.config import HASHED_SINCE_V1, RunConfig, flatten

    keys = set(flatten(RunConfig().to_dict()))
    not_weights = {"train.device"} | {k for k in keys if k.split(".")[0] in ("tracking", "eval")}
    assert keys - HASHED_SINCE_V1 - not_weights == set(ADDED_KEY_VALUES), \
        "a key was added: give it a non-default value in ADDED_KEY_VALUES"
    for key, entry in ADDED_KEY_VALUES.items():
        if entry is None:  # changes no weight: must not change the hash either
            assert build_config(overrides=[f"{key}=3"]).result_hash() == DEFAULT_HASH, key
            continue
        value, context = entry
        assert build_config(overrides=[*context, f"{key}={value}"]).result_hash() != \
            build_config(overrides=context).result_hash(), key
    v1_changes = {"objective.beta": 2.0, "model.latent_dim": 8, "train.seed": 1, "data.train_subset": 100,
                  "train.grad_clip": None, "likelihood.scale": 0.2, "train.precision": "bf16"}
    hashes = {build_config(overrides={key: value}).result_hash() for key, value in v1_changes.items()}
    assert len(hashes | {DEFAULT_HASH}) == len(v1_changes) + 1  # each changes the hash, each differently


def test_unknown_key_names_itself_and_the_allowed_keys():
    with pytest.raises(ConfigError) as e:
        build_config(overrides=["model.latnt_dim=8"])
    msg = str(e.value)
    assert "model.latnt_dim" in msg and "latent_dim" in msg and "decoder_depth" in msg


def test_unknown_section_names_the_allowed_sections():
    with pytest.raises(ConfigError) as e:
        build_config({"modle": {"latent_dim": 3}})
    assert "'modle'" in str(e.value) and "objective" in str(e.value)


def test_likelihood_outside_the_registry_lists_the_registry():
    with pytest.raises(ConfigError) as e:
        build_config({"likelihood": "gausian"})
    msg = str(e.value)
    assert "likelihood.name='gausian'" in msg
    assert all(name in msg for name in LIKELIHOODS)


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("objective.schedule=cosine", ["objective.schedule", "cyclical", "sigmoid"]),
        ("objective.free_bits=perdim", ["objective.free_bits", "per_dim", "total"]),
        ("model.arch=resnet", ["model.arch", "mlp", "conv"]),
        ("model.decoder_depth=13", ["model.decoder_depth", "12"]),
        ("objective.beta=-1", ["objective.beta"]),
        ("train.device=tpu", ["train.device", "cuda"]),
        ("data.dataset=cifar100", ["data.dataset", "fashion-mnist", "mnist", "cifar10", "a path"]),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(override, needles):
    with pytest.raises(ConfigError) as e:
        build_config(overrides=[override])
    assert all(n in str(e.value) for n in needles), str(e.value)


def test_overrides_parse_yaml_scalars_and_the_likelihood_shorthand():
    cfg = build_config(
        {"likelihood": "laplace"},
        ["objective.beta=1e-3", "train.grad_clip=null", "likelihood.scale=0.05", "data.train_subset=256"],
    )
    assert cfg.likelihood.name == "laplace" and cfg.likelihood.scale == 0.05
    assert cfg.objective.beta == 1e-3 and cfg.train.grad_clip is None and cfg.data.train_subset == 256


def test_override_without_equals_is_explained():
    with pytest.raises(ConfigError, match="key=value"):
        build_config(overrides=["objective.beta"])


def test_binarize_requires_bernoulli():
    with pytest.raises(ConfigError, match="data.binarize"):
        build_config({"likelihood": "gaussian", "data": {"binarize": "dynamic"}})


def test_files_missing_or_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: {latent_dim: [}\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    load_config(path)


def test_cli_reports_a_bad_key_before_anything_runs(bare_home):
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "--set", "objective.bta=2"],
        capture_output=True, text=True, env=subprocess_env(bare_home), cwd=bare_home, timeout=120,
    )
    assert proc.returncode == 2
    assert "objective.bta" in proc.stderr and "beta" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (bare_home / "mlflow.db").exists() and not (bare_home / "runs").exists()


@pytest.mark.parametrize("override", ["objective.beta=.inf", "train.lr=.nan", "likelihood.min_log_sigma=-.inf",
                                      "train.grad_clip=.inf", "likelihood.scale=1e400"])
def test_non_finite_values_are_rejected_naming_the_key(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as e:
        build_config(overrides=[override])
    msg = str(e.value)
    assert f"{key}=" in msg and "finite" in msg and msg.count("\n") == 1, msg


@pytest.mark.parametrize("value", ["abc", 2.5, 1, 0])
def test_eval_train_subset_errors_name_the_key_once(value):
    with pytest.raises(ConfigError) as e:
        build_config(overrides={"eval.train_subset": value})
    lines = str(e.value).splitlines()
    assert len(lines) == 2 and lines[1].strip().startswith(f"eval.train_subset={value!r} must be true"), lines
