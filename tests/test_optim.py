"""Optimization axes: optimizers, initializations and lr schedules against known answers, each wired into
training (it changes the weights), resumable exactly, and hashed only where it can change the weights."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.config import ConfigError, build_config
from pipeline.optim import INITS, LR_SCHEDULES, OPTIMIZERS, build_optimizer, lr_at, lr_cosine, lr_warmup
from pipeline.vae import build_vae

from .test_train import QUIET, _cfg, _history, _weights, straight_and_resumed_weights

DEFAULT_HASH = build_config().result_hash()


def test_lr_schedules_on_known_answers():
    assert [lr_warmup(s, 100, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_warmup(0, 100, 0) == 1.0
    # Cosine after a 10-step warm-up over 110 steps: 1 at its start, ½ halfway, 0 at the end.
    assert lr_cosine(9, 110, 10) == 1.0 and lr_cosine(10, 110, 10) == 1.0
    assert lr_cosine(60, 110, 10) == pytest.approx(0.5) and lr_cosine(110, 110, 10) == pytest.approx(0.0, abs=1e-12)
    assert lr_cosine(35, 110, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    tc = build_config(overrides=["train.lr=0.01", "train.lr_schedule=warmup", "train.lr_warmup_steps=4"]).train
    assert lr_at(1, 100, tc) == pytest.approx(0.005)


def _layers(model):
    return [m for net in (model.encoder, model.decoder) for m in net.modules()
            if isinstance(m, nn.Linear | nn.Conv2d | nn.ConvTranspose2d)]


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_inits_draw_from_their_distributions_and_leave_the_prior_alone(arch):
    cfg = build_config(overrides=[f"model.arch={arch}", "prior.name=vamp", "prior.init=noise", "prior.components=5",
                                  "objective.free_bits=total"])
    torch.manual_seed(0)
    model = build_vae(cfg)
    prior_before = {k: v.clone() for k, v in model.prior.state_dict().items() if not k.startswith("encoder.")}
    INITS["xavier"](model)
    for layer in _layers(model):
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(layer.weight)
        bound = math.sqrt(6 / (fan_in + fan_out))  # Glorot & Bengio 2010: U[−b, b]
        assert float(layer.weight.detach().abs().max()) <= bound and float(layer.weight.detach().abs().max()) > 0.9 * bound
        assert not layer.bias.any()
    INITS["kaiming"](model)
    big = [layer for layer in _layers(model) if layer.weight.numel() >= 20_000]
    assert big
    for layer in big:
        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(layer.weight)
        assert float(layer.weight.detach().std()) == pytest.approx(math.sqrt(2 / fan_in), rel=0.05)  # He et al. 2015
    assert all(torch.equal(v, model.prior.state_dict()[k]) for k, v in prior_before.items())


def test_each_optimizer_is_what_it_says_with_its_own_options():
    model = nn.Linear(3, 2)
    dev = torch.device("cpu")
    built = {name: build_optimizer(model, build_config(overrides=[f"train.optimizer={name}"]).train, dev)
             for name in OPTIMIZERS}
    assert [type(o).__name__ for o in built.values()] == ["Adam", "AdamW", "RMSprop", "SGD"]
    assert built["adamw"].defaults["weight_decay"] == 0.01 and built["sgd"].defaults["momentum"] == 0.9
    assert built["adam"].defaults["weight_decay"] == 0 and built["rmsprop"].defaults["momentum"] == 0


def test_new_options_are_hashed_only_where_they_are_read():
    assert build_config(overrides=["train.optimizer=adam", "train.init=default", "train.lr_schedule=constant"]) \
        .result_hash() == DEFAULT_HASH
    for unread in ("train.weight_decay=0.5", "train.momentum=0.5", "train.lr_warmup_steps=7"):
        assert build_config(overrides=[unread]).result_hash() == DEFAULT_HASH, unread
    assert build_config(overrides=["train.optimizer=sgd", "train.momentum=0.5"]).result_hash() != \
        build_config(overrides=["train.optimizer=sgd"]).result_hash()
    assert build_config(overrides=["train.lr_schedule=cosine", "train.lr_warmup_steps=7"]).result_hash() != \
        build_config(overrides=["train.lr_schedule=cosine"]).result_hash()
    for key, bad in (("train.optimizer", "lion"), ("train.init", "orthogonal"), ("train.lr_schedule", "step")):
        with pytest.raises(ConfigError, match=rf"{key}='{bad}' is not one of"):
            build_config(overrides=[f"{key}={bad}"])
    assert set(LR_SCHEDULES) == {"constant", "warmup", "cosine"} and set(INITS) == {"default", "xavier", "kaiming"}


@pytest.mark.parametrize("axes", [
    ("train.optimizer=adamw", "train.init=xavier", "train.lr_schedule=cosine", "train.lr_warmup_steps=3"),
    ("train.optimizer=rmsprop", "train.init=kaiming", "train.lr_schedule=warmup", "train.lr_warmup_steps=5"),
    ("train.optimizer=sgd", "train.lr=0.01", "train.init=kaiming", "train.lr_schedule=cosine", "train.lr_warmup_steps=0"),
])
def test_each_optimizer_init_and_schedule_trains_and_resumes_exactly(home, monkeypatch, axes):
    from pipeline.stages import train_stage

    cfg = _cfg(*axes, "tracking.enabled=false")  # resume with tracking is tested in test_train
    straight, resumed = straight_and_resumed_weights(home, monkeypatch, cfg)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert all(torch.isfinite(v).all() for v in straight.values())
    train_stage(_cfg("tracking.enabled=false"), run_dir=home / "default", **QUIET)
    assert any(not torch.equal(straight[k], v) for k, v in _weights(home / "default").items())


def test_the_logged_lr_follows_the_schedule_at_every_step(home):
    from pipeline.stages import train_stage

    cfg = _cfg("train.lr_schedule=cosine", "train.lr_warmup_steps=4", "train.lr=0.002")
    result = train_stage(cfg, **QUIET)
    logged = _history(result.run_id, "train/lr")
    assert [s for s, _ in logged] == list(range(16))
    assert [v for _, v in logged] == pytest.approx([lr_at(s, 16, cfg.train) for s in range(16)], rel=1e-6)
    assert logged[0][1] == pytest.approx(0.0005) and logged[-1][1] < 0.0001
