"""A small CNN trained once per dataset split: the frozen feature space for sample-quality metrics.

MNIST-family papers measure a Fréchet distance in the features of a classifier trained on the same
data, in place of Inception features (no ImageNet weights here, and they fit 28×28 greyscale badly).
Distances, KID and precision/recall (pipeline.metrics) are comparable only under the same frozen
classifier, so it is cached next to the split it was trained on, with its seed and test accuracy.
Other image shapes (C×H×W, 8 to 64 pixels a side) get the same network with C input channels; a
dataset without labels has no classifier (ensure_classifier says so).
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

from pipeline.data import DeviceData, Splits, prepared_dir
from pipeline.errors import PipelineError
from pipeline.fileio import atomic_torch_save, atomic_write_json

CLASSIFIER_FILE = "classifier.pt"
CLASSIFIER_INFO = "classifier.json"
FEATURE_DIM = 128
# Changing the network or its training changes every Fréchet distance: the cache is keyed on this
# (and on the image shape and class count, which caches written before they were recorded had at
# their defaults below).
RECIPE = "conv32-conv64-fc128/adam-2e-3-linear-decay/4-epochs/batch-128/seed-0"
DEFAULT_IMAGE_SHAPE = (1, 28, 28)
DEFAULT_N_CLASSES = 10


class ClassifierUnavailable(PipelineError):
    """The feature classifier cannot be trained for these splits (they have no labels)."""


class FeatureClassifier(nn.Module):
    """Two 3×3 conv + 2×2 max-pool blocks (28 → 14 → 7; pooling floors odd sides) and a 128-unit layer."""

    def __init__(self, image_shape: tuple[int, int, int] = DEFAULT_IMAGE_SHAPE, n_classes: int = DEFAULT_N_CLASSES):
        super().__init__()
        n_colors, height, width = image_shape
        self.body = nn.Sequential(
            nn.Conv2d(n_colors, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 28 → 14
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 14 → 7
            nn.Flatten(), nn.Linear(64 * (height // 2 // 2) * (width // 2 // 2), FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) in [0, 1] → (B, 128)
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
    """Train on the train split's labels (0 … n_classes − 1, n_classes from the manifest); return the model
    (eval mode) and its accuracy on the test split."""
    image_shape, n_classes = _classifier_shape(splits)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = FeatureClassifier(image_shape, n_classes).to(device)
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


def _classifier_shape(splits: Splits) -> tuple[tuple[int, int, int], int]:
    """(image shape (C, H, W), number of classes) of the classifier for these splits."""
    if splits.train_y is None:
        raise ClassifierUnavailable(
            f"the dataset {splits.manifest.get('dataset', '')!r} has no labels: the feature classifier behind the "
            f"Fréchet distance, KID and precision/recall is trained on labelled images (an image folder with one "
            f"subfolder per class, or an .npz with labels)")
    n_classes = int(splits.manifest.get("n_classes", DEFAULT_N_CLASSES))
    if n_classes < 2:  # one logit: log-softmax is 0 whatever the weights, so training never moves them
        raise ClassifierUnavailable(
            f"the dataset {splits.manifest.get('dataset', '')!r} has {n_classes} class: a classifier learns nothing "
            f"from one class (its loss is 0 at any weights), and the Fréchet distance, KID and precision/recall in an "
            f"untrained network's features mean nothing; give it two or more classes, or put the images directly "
            f"in the folder (no labels)")
    return tuple(int(s) for s in splits.train_x.shape[1:]), n_classes


def classifier_dir(data_cfg) -> Path:
    return prepared_dir(data_cfg)


def ensure_classifier(data_cfg, splits: Splits, device: torch.device, log=print,
                      retrain_if_damaged: bool = True) -> tuple[FeatureClassifier, dict]:
    """Load the split's cached classifier, training it first if there is none (or the split, the image shape
    or the number of classes changed). ClassifierUnavailable when the splits have no labels."""
    image_shape, n_classes = _classifier_shape(splits)
    d = classifier_dir(data_cfg)
    path, info_path = d / CLASSIFIER_FILE, d / CLASSIFIER_INFO
    info = None
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError):
        pass
    stale = (info is None or info.get("splits_sha256") != splits.manifest["splits_sha256"] or info.get("recipe") != RECIPE
             or tuple(info.get("image_shape", DEFAULT_IMAGE_SHAPE)) != image_shape
             or info.get("n_classes", DEFAULT_N_CLASSES) != n_classes)
    if stale or not path.exists():
        log(f"[classifier] training the feature classifier for {data_cfg.dataset} (once per split)")
        model, acc = train_classifier(splits, device, log=log)
        atomic_torch_save({k: v.cpu() for k, v in model.state_dict().items()}, path)
        info = {"test_accuracy": acc, "recipe": RECIPE, "feature_dim": FEATURE_DIM,
                "splits_sha256": splits.manifest["splits_sha256"], "image_shape": list(image_shape),
                "n_classes": n_classes}
        atomic_write_json(info, info_path)  # written last: its presence marks a complete classifier
        log(f"[classifier] test accuracy {acc:.2%} → {path}")
    model = FeatureClassifier(image_shape, n_classes).to(device)
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
