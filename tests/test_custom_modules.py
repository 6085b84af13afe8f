"""Encoders and decoders by import path (pipeline/vae/custom.py): loading, the dummy-batch check, hashes,
source digests, and real training runs with the classes of tests/custom_nets.py."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.config import ConfigError, build_config
from pipeline.stages import train_stage
from pipeline.studyspec import expand_trials, parse_study
from pipeline.vae import build_vae
from pipeline.vae.custom import CustomModuleError, record_sources, source_digest, source_file

from . import custom_nets
from .conftest import REPO
from .test_config import DEFAULT_HASH

NETS = "tests.custom_nets"
NETS_FILE = REPO / "tests" / "custom_nets.py"
GREY = (1, 28, 28)
TINY = [f"model.encoder={NETS}:TinyEncoder", f"model.decoder={NETS}:TinyDecoder"]
QUIET = dict(log=lambda *_: None, progress=False)


def _config_error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as e:
        build_config(overrides=list(overrides))
    return str(e.value)


def _build_error(*overrides: str, shape=GREY) -> str:
    cfg = build_config(overrides=list(overrides))
    with pytest.raises(CustomModuleError) as e:
        build_vae(cfg, image_shape=shape)
    return str(e.value)


# --- config load -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("override", "needles"), [
    ("model.encoder=tests.custom_nets:Tiny-Encoder", ["model.encoder=", "not an import path", "module.path:ClassName"]),
    ("model.decoder=tests.no_such_nets:TinyDecoder",
     ["model.decoder=", "cannot import module 'tests.no_such_nets'", "ModuleNotFoundError", "PYTHONPATH"]),
    ("model.encoder=tests.custom_nets:TinyEncodr",
     ["model.encoder=", "has no attribute 'TinyEncodr'", "custom_nets.py", "TinyEncoder, TinyPixelDecoder"]),
    ("model.encoder=tests.custom_nets:NotAModule", ["model.encoder=", "the class NotAModule", "not a subclass of torch.nn.Module"]),
    ("model.encoder=tests.custom_nets:not_a_class", ["model.encoder=", "is a function", "not a subclass of torch.nn.Module"]),
    ("model.encoder=resnet", ["model.encoder='resnet'", "conv, mlp", "module.path:ClassName"]),
])
def test_a_bad_import_path_fails_at_load_naming_the_key(override, needles):
    msg = _config_error(override)
    assert all(n in msg for n in needles), msg


def test_a_missing_import_inside_the_users_module_is_not_taken_for_the_module_itself(tmp_path, monkeypatch):
    # byo_nets_v2 imports byo_nets, which is missing: a name that is a prefix of the module's, not its package.
    (tmp_path / "byo_nets_v2.py").write_text("import byo_nets\nfrom torch import nn\n\n\nclass Enc(nn.Module):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    msg = _config_error("model.encoder=byo_nets_v2:Enc")
    assert "importing module 'byo_nets_v2' failed" in msg and "install what it imports ('byo_nets')" in msg, msg
    assert "byo_nets_v2.py:1" in msg and "cannot import module" not in msg
    # A missing parent package is still the module's own absence.
    msg = _config_error("model.encoder=byo_no_such_pkg.nets:Enc")
    assert "cannot import module 'byo_no_such_pkg.nets'" in msg and "PYTHONPATH" in msg, msg


def test_constructor_arguments_are_checked_at_load():
    # A built-in family takes no constructor arguments: they would be silently ignored.
    msg = _config_error("model.encoder_args.width=8")
    assert "model.encoder_args={'width': 8}" in msg and "model.encoder='mlp'" in msg and "built-in family" in msg
    msg = _config_error("model.arch=conv", f"model.encoder={NETS}:TinyEncoder", "model.decoder_args.width=8")
    assert "model.decoder_args" in msg and "model.decoder='conv'" in msg
    # A misspelt argument is named with the constructor's signature.
    msg = _config_error(*TINY, "model.encoder_args.widht=8")
    assert "TinyEncoder(latent_dim, image_shape, width=32)" in msg and "'widht'" in msg
    # What the pipeline passes cannot be set again, and values are scalars.
    assert "sets latent_dim, which the pipeline passes itself" in _config_error(*TINY, "model.encoder_args.latent_dim=4")
    msg = _config_error(*TINY, "model.decoder_args.width=[8, 16]")
    assert "model.decoder_args.width=[8, 16] is a list" in msg and "scalars" in msg
    cfg = build_config(overrides=[*TINY, "model.encoder_args.width=8"])
    assert cfg.model.encoder_args == {"width": 8} and cfg.model.decoder_args == {}


def test_an_autoregressive_custom_decoder_needs_a_likelihood_sampled_per_value():
    msg = _config_error(f"model.decoder={NETS}:TinyPixelDecoder", "likelihood.name=gaussian")
    assert "bernoulli, categorical, discretized_logistic, not 'gaussian'" in msg
    msg = _config_error(f"model.decoder={NETS}:TinyPixelDecoder")  # bernoulli on grey levels
    assert "needs binary pixels" in msg


# --- the dummy-batch check ---------------------------------------------------------------------------
@pytest.mark.parametrize(("override", "needles"), [
    (f"model.encoder={NETS}:WrongMuEncoder", ["model.encoder='tests.custom_nets:WrongMuEncoder'", "mu has shape (2, 21)",
                                               "expected (2, 20)"]),
    (f"model.encoder={NETS}:TensorEncoder", ["returned a tensor of shape (2, 40)", "expected (mu, logvar)", "DiagonalGaussian"]),
    (f"model.encoder={NETS}:NaNEncoder", ["logvar has 40 non-finite value(s)"]),
    (f"model.decoder={NETS}:WrongShapeDecoder", ["model.decoder='tests.custom_nets:WrongShapeDecoder'",
                                                  "has shape (2, 1, 28, 28), expected (2, 1, 1, 28, 28)"]),
    (f"model.decoder={NETS}:RaisingDecoder", ["model.decoder='tests.custom_nets:RaisingDecoder' raised RuntimeError in forward "
                                               "on a (2, 20) batch: ", "custom_nets.py:"]),
])
def test_a_module_breaking_the_protocol_is_named_before_training(override, needles):
    msg = _build_error(override)
    assert all(n in msg for n in needles), msg
    assert "Traceback" not in msg


def test_the_decoder_gets_the_likelihoods_parameter_count():
    # categorical: 256 logits per pixel; WrongShapeDecoder drops that axis.
    msg = _build_error(f"model.decoder={NETS}:WrongShapeDecoder", "likelihood.name=categorical")
    assert "expected (2, 256, 1, 28, 28)" in msg and "params_per_pixel=256" in msg


def test_an_exception_in_a_constructor_is_one_clear_error():
    msg = _build_error(f"model.decoder={NETS}:TinyPixelDecoder", "data.binarize=dynamic", shape=(3, 28, 28))
    assert "raised ValueError in its constructor TinyPixelDecoder(latent_dim=20, image_shape=(3, 28, 28), " \
           "params_per_pixel=1)" in msg and "models grey images" in msg and "custom_nets.py:" in msg


def test_an_autoregressive_decoder_must_be_causal_and_keep_its_declared_reach():
    msg = _build_error(f"model.decoder={NETS}:NonCausalPixelDecoder", "data.binarize=dynamic")
    assert "not causal" in msg and "pixel (14, 14)" in msg
    msg = _build_error(f"model.decoder={NETS}:OverclaimingPixelDecoder", "data.binarize=dynamic")
    assert "rows_above=1" in msg and "declare a larger value" in msg
    # The pipeline's own PixelCNN is causal, channel by channel in colour: the check lets it through.
    cfg = build_config(overrides=[f"model.decoder={NETS}:PipelinePixelCNN", "likelihood.name=categorical"])
    assert build_vae(cfg, image_shape=(3, 16, 16)).autoregressive


def test_the_check_leaves_the_rng_and_the_weights_as_plain_construction_would():
    torch.manual_seed(3)
    direct_encoder = custom_nets.TinyEncoder(20, GREY)
    direct_decoder = custom_nets.TinyDecoder(20, GREY, 1)
    after_direct = torch.rand(4)
    torch.manual_seed(3)
    model = build_vae(build_config(overrides=TINY), image_shape=GREY)
    assert torch.equal(torch.rand(4), after_direct)
    state = model.state_dict()
    assert all(torch.equal(state[f"encoder.net.{k}"], v) for k, v in direct_encoder.state_dict().items())
    assert all(torch.equal(state[f"decoder.net.{k}"], v) for k, v in direct_decoder.state_dict().items())
    assert model.training and model.encoder.net.training


def test_custom_autoregressive_sampling_matches_its_teacher_forced_likelihood():
    """Sampling pads each crop to the whole image (no rows_above) or crops a window (rows_above = 2): both
    must draw the same pixels from the same conditionals as one teacher-forced pass scores."""
    overrides = ["data.binarize=dynamic", "model.latent_dim=4"]
    whole = build_vae(build_config(overrides=[*overrides, f"model.decoder={NETS}:TinyPixelDecoder"]), image_shape=(1, 12, 12))
    windowed = build_vae(build_config(overrides=[*overrides, f"model.decoder={NETS}:WindowedPixelDecoder"]),
                         image_shape=(1, 12, 12))
    windowed.load_state_dict(whole.state_dict())
    assert (whole.decoder.rows_above, windowed.decoder.rows_above) == (12, 2)
    z = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    x_whole, log_px_whole = whole.sample_pixels(z, torch.Generator().manual_seed(1))
    x_window, log_px_window = windowed.sample_pixels(z, torch.Generator().manual_seed(1))
    assert torch.equal(x_whole, x_window)
    assert torch.allclose(log_px_whole, log_px_window, atol=1e-4)
    with torch.no_grad():
        assert torch.allclose(-whole.recon_nll(x_whole, z), log_px_whole, atol=1e-4)


# --- hashes and names --------------------------------------------------------------------------------
def test_custom_modules_and_their_arguments_enter_the_hash_and_nothing_else_moves():
    assert build_config(overrides=["model.encoder_args={}", "model.decoder_args={}"]).result_hash() == DEFAULT_HASH
    tiny = build_config(overrides=TINY).result_hash()
    widths = {build_config(overrides=[*TINY, f"model.encoder_args.width={w}"]).result_hash() for w in (8, 16)}
    assert len(widths | {tiny, DEFAULT_HASH}) == 4
    nested = build_config({"model": {"encoder": f"{NETS}:TinyEncoder", "decoder": f"{NETS}:TinyDecoder",
                                     "encoder_args": {"width": 8}}})
    assert nested.result_hash() == build_config(overrides=[*TINY, "model.encoder_args.width=8"]).result_hash()
    assert build_config(nested.to_dict()).result_hash() == nested.result_hash()  # config.yaml reloads to the same run
    # A custom decoder reads no model.kernel_size, so it leaves the hash alone (as for the conv family).
    assert build_config(overrides=[*TINY, "model.kernel_size=7"]).result_hash() == tiny
    assert build_config(overrides=TINY).describe().startswith("TinyEncoder→TinyDecoder bernoulli")


def test_a_study_varies_constructor_arguments_by_dotted_key():
    spec = parse_study({"name": "byo", "base": {"model.encoder": f"{NETS}:TinyEncoder"}, "sampler": "grid",
                        "space": {"model.encoder_args.width": [8, 16]},
                        "objectives": [{"metric": "test/iwae_nll", "direction": "minimize"}]})
    trials = expand_trials(spec)
    assert [t.overrides["model.encoder_args.width"] for t in trials] == [8, 16]
    assert len({build_config({}, t.overrides).result_hash() for t in trials}) == 2
    with pytest.raises(ConfigError, match=r"space.model.encoder_args.widht=8.*'widht'"):
        parse_study({"name": "byo", "base": {"model.encoder": f"{NETS}:TinyEncoder"}, "sampler": "grid",
                     "space": {"model.encoder_args.widht": [8]},
                     "objectives": [{"metric": "test/iwae_nll", "direction": "minimize"}]})


def test_python_m_pipeline_from_the_repo_root_imports_the_users_module(tmp_path):
    study = tmp_path / "byo.yaml"
    study.write_text(json.dumps({"name": "byo", "base": {"model.encoder": f"{NETS}:TinyEncoder",
                                                         "model.decoder": f"{NETS}:TinyDecoder"},
                                 "sampler": "grid", "space": {"model.decoder_args.width": [8, 16]},
                                 "objectives": [{"metric": "test/iwae_nll", "direction": "minimize"}]}))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["VAE_PIPELINE_HOME"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-m", "pipeline", "plan", str(study)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "2 trials" in out.stdout and "model.decoder_args.width=16" in out.stdout


# --- traceability ------------------------------------------------------------------------------------
def test_source_digest_is_the_sha256_of_the_module_file():
    assert source_digest(custom_nets.TinyEncoder) == hashlib.sha256(NETS_FILE.read_bytes()).hexdigest()
    assert source_file(custom_nets.TinyEncoder) == str(NETS_FILE.resolve())
    orphan = type("Orphan", (nn.Module,), {"__module__": "no_such_module_anywhere"})
    assert source_file(orphan) == "unavailable" and source_digest(orphan) == "unavailable"


def test_a_resumed_run_keeps_its_starting_digest_and_warns_when_the_source_changed(tmp_path):
    m = build_config(overrides=TINY).model
    digest = hashlib.sha256(NETS_FILE.read_bytes()).hexdigest()
    tags = record_sources(m, tmp_path, resuming=False, log=lambda *_: None)
    assert tags["model.encoder_source_sha256"] == tags["model.decoder_source_sha256"] == digest
    assert json.loads((tmp_path / "model_sources.json").read_text()) == tags
    lines: list[str] = []
    assert record_sources(m, tmp_path, resuming=True, log=lines.append) == tags and lines == []
    old = "0" * 64
    (tmp_path / "model_sources.json").write_text(json.dumps({**tags, "model.encoder_source_sha256": old}))
    resumed = record_sources(m, tmp_path, resuming=True, log=lines.append)
    assert resumed["model.encoder_source_sha256"] == old and resumed["model.encoder_source_sha256_at_resume"] == digest
    assert len(lines) == 1 and "warning" in lines[0] and old in lines[0] and digest in lines[0]
    # A fresh start (or --restart) records the sources it starts with.
    assert record_sources(m, tmp_path, resuming=False, log=lines.append) == tags and len(lines) == 1
    # Built-in families: no tags, no file.
    assert record_sources(build_config().model, tmp_path / "builtin", resuming=False, log=lines.append) == {}
    assert not (tmp_path / "builtin").exists()


# --- real runs ---------------------------------------------------------------------------------------
RUN_SMALL = ["data.train_subset=256", "train.batch_size=64", "train.epochs=1", "model.latent_dim=4",
             "train.grid_images=4", "eval.test_subset=64", "eval.iwae_k=4", "eval.n_samples=32", "eval.mi_batch=64",
             "eval.batch_size=64", "eval.train_subset=false", "tracking.experiment=byo"]


def test_a_custom_encoder_and_decoder_train_evaluate_and_are_traceable(home):
    from pipeline.tracking import get_run

    cfg = build_config(overrides=[*RUN_SMALL, *TINY, "model.encoder_args.width=8", "model.decoder_args.width=8"])
    result = train_stage(cfg, **QUIET)
    assert result.status == "finished"
    run = get_run(result.run_id)
    digest = hashlib.sha256(NETS_FILE.read_bytes()).hexdigest()
    assert run.data.tags["model.encoder_source_sha256"] == run.data.tags["model.decoder_source_sha256"] == digest
    assert run.data.tags["model.decoder_source_file"] == str(NETS_FILE.resolve())
    assert run.data.params["model.encoder_args.width"] == "8" and run.data.params["model.encoder"] == f"{NETS}:TinyEncoder"
    assert math.isfinite(run.data.metrics["test/iwae_nll"]) and math.isfinite(run.data.metrics["test/elbo"])
    assert "test/active_units" in run.data.metrics
    assert json.loads((Path(result.run_dir) / "model_sources.json").read_text())["model.encoder_source_sha256"] == digest


def test_a_custom_module_run_resumes_bitwise_under_its_stable_state_dict_keys(home, monkeypatch):
    from .test_train import _cfg, straight_and_resumed_weights

    cfg = _cfg(*TINY, "model.encoder_args.width=8", "model.decoder_args.width=8", "tracking.enabled=false")
    straight, resumed = straight_and_resumed_weights(home, monkeypatch, cfg)
    assert any(k.startswith("encoder.net.") for k in straight) and any(k.startswith("decoder.net.") for k in straight)
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_custom_autoregressive_decoder_trains_and_is_sampled_pixel_by_pixel(home):
    from pipeline.tracking import get_run

    cfg = build_config(overrides=[*RUN_SMALL, f"model.decoder={NETS}:TinyPixelDecoder", "model.decoder_args.width=8",
                                  "data.binarize=dynamic", "model.hidden_dim=32", "eval.n_samples=2",
                                  "train.grid_images_autoregressive=2"])
    result = train_stage(cfg, **QUIET)
    run = get_run(result.run_id)
    assert result.status == "finished" and math.isfinite(run.data.metrics["test/iwae_nll"])
    assert run.data.metrics["test/pixel_by_pixel"] == 1 and run.data.params["eval.n_samples"] == "2"
    assert "model.encoder_source_sha256" not in run.data.tags  # the encoder is the built-in MLP
    assert "model.decoder_source_sha256" in run.data.tags


def test_the_report_knows_a_custom_decoder_is_autoregressive():
    from pipeline.report.analysis import names_autoregressive_decoder

    def spec(decoders):
        return parse_study({"name": "byo", "base": {"data.binarize": "dynamic"}, "sampler": "grid",
                            "space": {"model.decoder": decoders},
                            "objectives": [{"metric": "test/iwae_nll", "direction": "minimize"}]})

    assert names_autoregressive_decoder(spec([f"{NETS}:TinyPixelDecoder", "mlp"]))
    assert not names_autoregressive_decoder(spec([f"{NETS}:TinyDecoder", "conv"]))
