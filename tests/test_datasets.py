"""Your data: image folders, .npy/.npz arrays and torchvision's layouts, prepared, verified and cached.

The second real dataset is scikit-learn's copy of the UCI handwritten digits (1,797 labelled 8×8 images),
exported here to a PNG folder (one subfolder per class) and to an .npz archive.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import ConfigError, build_config
from pipeline.data import DataError, image_shape, load_splits, prepare, prepared_dir

QUIET = dict(log=lambda *_: None)


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images * (255 / 16)).round().astype(np.uint8), d.target.astype(np.int64)  # 17 grey levels → 0…255


def export_digits(root) -> tuple:
    """The digits as a PNG folder with one subfolder per class, and as digits.npz (images, labels)."""
    images, labels = digits_arrays()
    folder = root / "digits"
    for i, (image, label) in enumerate(zip(images, labels)):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / str(label) / f"{i:04d}.png")
    np.savez(root / "digits.npz", images=images, labels=labels)
    return folder, root / "digits.npz"


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return export_digits(tmp_path_factory.mktemp("digits"))


def _all_images(s) -> set[bytes]:
    return {bytes(x.numpy().tobytes()) for x in torch.cat([s.train_x, s.val_x, s.test_x])}


def test_digits_folder_and_npz_prepare_to_the_same_images_with_labels(digits, tmp_path):
    folder, npz = digits
    images, labels = digits_arrays()
    splits = {}
    for source in (folder, npz):
        out = prepare(str(source), val_size=150, root=tmp_path, **QUIET)
        s = load_splits(str(source), 150, root=tmp_path)
        manifest = json.loads((out / "manifest.json").read_text())
        assert s.train_x.shape[1:] == (1, 8, 8) and s.train_x.dtype == torch.uint8
        assert manifest["counts"] == {"train": 1797 - 180 - 150, "val": 150, "test": 180}  # test: 10% of 1,797
        assert manifest["image_shape"] == [1, 8, 8] and manifest["has_labels"] and manifest["n_classes"] == 10
        assert manifest["test_split"].startswith("0.1 of")
        assert s.has_labels and s.n_classes == 10
        # Every image keeps its label: look each prepared image up in the originals.
        by_bytes = {}
        for image, label in zip(images, labels):
            by_bytes.setdefault(image.tobytes(), set()).add(int(label))
        for x, y in ((s.train_x, s.train_y), (s.test_x, s.test_y)):
            assert all(int(label) in by_bytes[img.numpy().tobytes()] for img, label in zip(x[:, 0], y))
        splits[source] = s
    # Both sources hold the same 1,797 images (as a multiset of distinct images).
    assert _all_images(splits[folder]) == _all_images(splits[npz]) == {im.tobytes() for im in images[:, None]}
    manifest = json.loads((prepared_dir(build_config({"data": {"dataset": str(folder), "val_size": 150}}).data,
                                        tmp_path) / "manifest.json").read_text())
    files = manifest["source_files"]
    assert len(files) == 1797
    assert files["3/0003.png"]["sha256"] == hashlib.sha256((folder / "3" / "0003.png").read_bytes()).hexdigest()


def test_splits_are_seeded(digits, tmp_path):
    _, npz = digits
    prepare(str(npz), val_size=100, split_seed=1, root=tmp_path / "a", **QUIET)
    prepare(str(npz), val_size=100, split_seed=1, root=tmp_path / "b", **QUIET)
    prepare(str(npz), val_size=100, split_seed=2, root=tmp_path / "a", **QUIET)
    a, b = load_splits(str(npz), 100, 1, root=tmp_path / "a"), load_splits(str(npz), 100, 1, root=tmp_path / "b")
    other = load_splits(str(npz), 100, 2, root=tmp_path / "a")
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_x, b.test_x) and torch.equal(a.val_y, b.val_y)
    assert not torch.equal(a.test_x, other.test_x)


def _png_folder(root, n=24, size=(10, 12), mode="L", classes=None, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
        target = root / classes[i % len(classes)] if classes else root
        target.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(target / f"img{i:03d}.png")
    return root


def test_a_changed_source_file_invalidates_the_cache_and_says_which(tmp_path):
    folder = _png_folder(tmp_path / "imgs", n=30, size=(8, 8))
    root = tmp_path / "data"
    prepare(str(folder), val_size=5, root=root, **QUIET)
    before = load_splits(str(folder), 5, root=root)
    messages: list[str] = []
    os.utime(folder / "img003.png")  # touched, same bytes: still cached
    prepare(str(folder), val_size=5, root=root, log=messages.append)
    assert "cached" in messages[-1]
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(folder / "img003.png")
    Image.fromarray(np.full((8, 8), 9, np.uint8)).save(folder / "new.png")
    prepare(str(folder), val_size=5, root=root, log=messages.append)
    changed = next(m for m in messages if "changed since it was prepared" in m)
    assert "1 changed: img003.png" in changed and "1 added: new.png" in changed
    after = load_splits(str(folder), 5, root=root)
    assert after.manifest["splits_sha256"] != before.manifest["splits_sha256"]
    assert sum(len(x) for x in (after.train_x, after.val_x, after.test_x)) == 31
    (folder / "img010.png").unlink()
    prepare(str(folder), val_size=5, root=root, log=messages.append)
    assert "1 removed: img010.png" in messages[-2]


def test_a_flat_folder_has_no_labels(tmp_path):
    folder = _png_folder(tmp_path / "flat", n=20, size=(16, 16))
    prepare(str(folder), val_size=4, root=tmp_path, **QUIET)
    s = load_splits(str(folder), 4, root=tmp_path)
    assert s.train_y is None and s.test_y is None and not s.has_labels and s.n_classes == 0
    assert s.manifest["has_labels"] is False and s.train_x.shape[1:] == (1, 16, 16)


def test_colour_channels_and_size_conversions(tmp_path):
    folder = _png_folder(tmp_path / "rgb", n=20, size=(40, 32), mode="RGB", classes=["cat", "dog"])
    Image.fromarray(np.zeros((32, 40), np.uint8)).save(folder / "cat" / "grey.jpg")  # a grey JPEG among RGB PNGs
    root = tmp_path / "data"
    prepare(str(folder), val_size=3, image_size=16, root=root, **QUIET)
    s = load_splits(str(folder), 3, root=root, image_size=16)
    assert s.train_x.shape[1:] == (3, 16, 16) and s.manifest["classes"] == ["cat", "dog"]
    # 40×32 → shorter side 32 to 16 (20×16), centre crop 16×16: compare one image with PIL doing the same.
    img = Image.open(folder / "dog" / "img001.png").resize((20, 16), Image.BILINEAR).crop((2, 0, 18, 16))
    expected = np.asarray(img).transpose(2, 0, 1)
    assert any(np.array_equal(x.numpy(), expected) for x in torch.cat([s.train_x, s.val_x, s.test_x]))
    prepare(str(folder), val_size=3, image_size=16, channels=1, root=root, **QUIET)
    grey = load_splits(str(folder), 3, root=root, image_size=16, channels=1)
    assert grey.train_x.shape[1:] == (1, 16, 16)
    cfg = build_config({"data": {"dataset": str(folder), "val_size": 3, "image_size": 16, "channels": 1}})
    assert image_shape(cfg.data) == (1, 16, 16)


def test_npy_layouts(tmp_path):
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, (30, 12, 12, 3), dtype=np.uint8)
    np.save(tmp_path / "nhwc.npy", nhwc)
    np.save(tmp_path / "nchw.npy", nhwc.transpose(0, 3, 1, 2))
    prepare(str(tmp_path / "nhwc.npy"), val_size=5, root=tmp_path, **QUIET)
    a = load_splits(str(tmp_path / "nhwc.npy"), 5, root=tmp_path)
    prepare(str(tmp_path / "nchw.npy"), val_size=5, root=tmp_path, **QUIET)
    b = load_splits(str(tmp_path / "nchw.npy"), 5, root=tmp_path)
    assert a.train_x.shape[1:] == (3, 12, 12) and torch.equal(a.train_x, b.train_x) and a.train_y is None


@pytest.mark.parametrize("case, message", [
    ("mixed_sizes", "set data.image_size"),
    ("too_big", "sides from 8 to 64"),
    ("float_npy", "must be uint8"),
    ("npz_keys", "name the images one of"),
    ("both_layouts", "keep one layout"),
    ("val_too_big", "10% would be data.val_size=2"),
])
def test_bad_sources_get_one_clear_error_and_write_nothing(tmp_path, case, message):
    if case == "mixed_sizes":
        source = _png_folder(tmp_path / "s", n=5, size=(8, 8))
        Image.fromarray(np.zeros((9, 9), np.uint8)).save(source / "odd.png")
    elif case == "too_big":
        source = _png_folder(tmp_path / "s", n=5, size=(100, 100))
    elif case == "float_npy":
        source = tmp_path / "x.npy"
        np.save(source, np.zeros((10, 8, 8), np.float32))
    elif case == "npz_keys":
        source = tmp_path / "x.npz"
        np.savez(source, a=np.zeros((10, 8, 8), np.uint8), b=np.zeros(10, np.int64))
    elif case == "both_layouts":
        source = _png_folder(tmp_path / "s", n=5, size=(8, 8))
        _png_folder(source / "class_a", n=2, size=(8, 8))
    else:
        source = _png_folder(tmp_path / "s", n=30, size=(8, 8))
    val = 27 if case == "val_too_big" else 2
    with pytest.raises(DataError, match=message) as e:
        prepare(str(source), val_size=val, root=tmp_path / "data", **QUIET)
    assert "Traceback" not in str(e.value)
    assert not (tmp_path / "data" / "processed").exists() or not any((tmp_path / "data" / "processed").rglob("*.pt"))


def test_a_missing_path_fails_at_config_load_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="data.dataset.*no such file or directory"):
        build_config({"data": {"dataset": str(tmp_path / "nope")}})
    with pytest.raises(ConfigError, match="not one of: fashion-mnist, mnist, cifar10, svhn, celeba"):
        build_config({"data": {"dataset": "fashoin-mnist"}})
    with pytest.raises(ConfigError, match="data.image_size"):
        build_config({"data": {"image_size": 128}})
    # A size the conv family cannot take fails at load, before any data is read.
    with pytest.raises(ConfigError, match="conv encoder/decoder cannot take 1×9×9 images.*data.image_size"):
        build_config({"data": {"image_size": 9}, "model": {"arch": "conv"}})
    assert build_config({"data": {"image_size": 9}}).data.image_size == 9  # the MLP takes any size


def test_new_data_keys_leave_existing_hashes_alone():
    base = build_config({})
    assert build_config({"data": {"test_fraction": 0.1, "image_size": None, "channels": None}}).result_hash() \
        == base.result_hash()
    assert build_config({"data": {"channels": 3}}).result_hash() != base.result_hash()
    # A named dataset has its own test split: the fraction for sources without one changes nothing.
    assert build_config({"data": {"test_fraction": 0.3}}).result_hash() == base.result_hash()


# --- torchvision's layouts, on files written here (no download) ----------------------------------------
def _cifar_dir(root):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [*((f"data_batch_{i}", 4) for i in range(1, 6)), ("test_batch", 6)]:
        with open(d / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"labels": list(rng.integers(0, 10, n))}, f)
    return root


def test_cifar10_svhn_and_celeba_layouts(tmp_path):
    from scipy.io import savemat

    raw = _cifar_dir(tmp_path / "cifar")
    prepare("cifar10", raw_dir=raw, val_size=4, root=tmp_path / "data", **QUIET)
    s = load_splits("cifar10", 4, root=tmp_path / "data")
    with open(raw / "cifar-10-batches-py" / "test_batch", "rb") as f:
        test_batch = pickle.load(f, encoding="bytes")
    assert s.train_x.shape == (16, 3, 32, 32) and s.n_classes == 10 and s.manifest["classes"][0] == "airplane"
    assert torch.equal(s.test_x, torch.from_numpy(test_batch[b"data"].reshape(-1, 3, 32, 32)))

    svhn = tmp_path / "svhn"
    svhn.mkdir()
    rng = np.random.default_rng(1)
    for name, n in (("train", 12), ("test", 5)):
        y = np.arange(n) % 10
        y[y == 0] = 10  # SVHN stores the digit 0 as 10
        savemat(svhn / f"{name}_32x32.mat", {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                                              "y": y.reshape(-1, 1)})
    prepare("svhn", raw_dir=svhn, val_size=2, channels=1, root=tmp_path / "data", **QUIET)
    s = load_splits("svhn", 2, root=tmp_path / "data", channels=1)
    assert s.train_x.shape[1:] == (1, 32, 32)
    assert sorted(s.test_y.tolist()) == [0, 1, 2, 3, 4]  # the stored 10 is the digit 0

    celeba = tmp_path / "celeba_root" / "celeba"
    (celeba / "img_align_celeba").mkdir(parents=True)
    lines = []
    for i in range(9):
        name = f"{i:06d}.jpg"
        Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)).save(celeba / "img_align_celeba" / name)
        lines.append(f"{name} {0 if i < 5 else 1 if i < 7 else 2}")
    (celeba / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    prepare("celeba", raw_dir=celeba.parent, val_size=2, root=tmp_path / "data", **QUIET)
    s = load_splits("celeba", 2, root=tmp_path / "data")
    assert s.train_x.shape == (5, 3, 64, 64) and s.test_x.shape == (2, 3, 64, 64) and not s.has_labels


def test_named_datasets_say_how_to_get_them_without_touching_the_network(tmp_path):
    for name in ("cifar10", "svhn", "celeba"):
        with pytest.raises(DataError, match=f"--dataset {name} --download"):
            prepare(name, root=tmp_path, **QUIET)
