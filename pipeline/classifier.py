"""A small CNN trained once per dataset split: the frozen feature space for sample-quality metrics.

MNIST-family papers measure a Fréchet distance in the features of a classifier trained on the same
data, in place of Inception features (no ImageNet weights here, and they fit 28×28 greyscale badly).
Distances, KID and precision/recall (pipeline.metrics) are comparable only under the same frozen
classifier, so it is cached next to the split it was trained on, with its seed and test accuracy.
"""

from __future__ import annotations

import json
import math
import pickle
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data import DeviceData, Splits, processed_dir
from pipeline.fileio import atomic_torch_save, atomic_write_json

CLASSIFIER_FILE = "classifier.pt"
CLASSIFIER_INFO = "classifier.json"
FEATURE_DIM = 128
# Changing the network or its training changes every Fréchet distance: the cache is keyed on this.
RECIPE = "conv32-conv64-fc128/adam-2e-3-linear-decay/4-epochs/batch-128/seed-0"


class FeatureClassifier(nn.Module):
    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 28 → 14
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 14 → 7
            nn.Flatten(), nn.Linear(64 * 7 * 7, FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 28, 28) in [0, 1] → (B, 128)
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@torch.no_grad()
def predict(model: FeatureClassifier, images: torch.Tensor, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, 128), predicted labels (N,)) for images in [0, 1], in batches."""
    feats, preds = [], []
    for chunk in images.split(batch_size):
        f = model.features(chunk)
        feats.append(f)
        preds.append(model.head(f).argmax(1))
    return torch.cat(feats), torch.cat(preds)


def train_classifier(splits: Splits, device: torch.device, *, seed: int = 0, epochs: int = 4, batch_size: int = 128,
                     lr: float = 2e-3, log=print) -> tuple[FeatureClassifier, float]:
    """Train on the train split; return the model (eval mode) and its accuracy on the test split."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = FeatureClassifier().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    train = DeviceData(splits.train_x, device)
    labels = splits.train_y.to(device)
    steps = math.ceil(train.n / batch_size)
    # Linear decay to zero: a few epochs reach ≥ 90% test accuracy on Fashion-MNIST.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / (epochs * steps))
    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(train.n, generator=gen).to(device)
        for i in range(steps):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            loss = F.cross_entropy(model(train.batch(idx)), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        log(f"[classifier] epoch {epoch}/{epochs} done ({time.perf_counter() - t0:.0f} s)")
    model.eval()
    test = DeviceData(splits.test_x, device)
    _, pred = predict(model, test.batch(torch.arange(test.n, device=device)))
    accuracy = float((pred.cpu() == splits.test_y).float().mean())
    return model, accuracy


def classifier_dir(data_cfg) -> Path:
    return processed_dir(data_cfg.dataset, data_cfg.val_size, data_cfg.split_seed)


def ensure_classifier(data_cfg, splits: Splits, device: torch.device, log=print,
                      retrain_if_damaged: bool = True) -> tuple[FeatureClassifier, dict]:
    """Load the split's cached classifier, training it first if there is none (or the split changed)."""
    d = classifier_dir(data_cfg)
    path, info_path = d / CLASSIFIER_FILE, d / CLASSIFIER_INFO
    info = None
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError):
        pass
    stale = info is None or info.get("splits_sha256") != splits.manifest["splits_sha256"] or info.get("recipe") != RECIPE
    if stale or not path.exists():
        log(f"[classifier] training the feature classifier for {data_cfg.dataset} (once per split)")
        model, acc = train_classifier(splits, device, log=log)
        atomic_torch_save({k: v.cpu() for k, v in model.state_dict().items()}, path)
        info = {"test_accuracy": acc, "recipe": RECIPE, "feature_dim": FEATURE_DIM,
                "splits_sha256": splits.manifest["splits_sha256"]}
        atomic_write_json(info, info_path)  # written last: its presence marks a complete classifier
        log(f"[classifier] test accuracy {acc:.2%} → {path}")
    model = FeatureClassifier().to(device)
    try:
        model.load_state_dict(torch.load(path, map_location=device, weights_only=True))
    except (RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as e:  # a damaged cache: ours to rebuild
        if retrain_if_damaged is False:
            raise
        log(f"[classifier] {path} cannot be read ({type(e).__name__}); training it again")
        path.unlink(missing_ok=True)
        return ensure_classifier(data_cfg, splits, device, log, retrain_if_damaged=False)
    model.eval()
    return model, info
