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


# --- found by the bad-input campaign -----------------------------------------------------------------
def test_hidden_files_are_skipped_and_class_folders_are_read_at_any_depth(tmp_path):
    folder = tmp_path / "classes"
    _png_folder(folder / "cat" / "indoor", n=6, size=(8, 8), seed=1)
    _png_folder(folder / "cat", n=4, size=(8, 8), seed=2)
    _png_folder(folder / "dog" / "a" / "b", n=5, size=(8, 8), seed=3)
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "cat" / "._img000.png").write_bytes(b"\0\5\26\7 macOS resource fork")  # not a PNG
    _png_folder(folder / "dog" / ".thumbnails", n=3, size=(8, 8))  # a hidden folder: not read
    prepare(str(folder), val_size=2, root=tmp_path / "data", **QUIET)
    s = load_splits(str(folder), 2, root=tmp_path / "data")
    assert s.manifest["classes"] == ["cat", "dog"]
    labels = torch.cat([s.train_y, s.val_y, s.test_y])
    assert (labels == 0).sum() == 10 and (labels == 1).sum() == 5  # ImageFolder: a class's images at any depth
    assert sorted(s.manifest["source_files"])[0] == "cat/img000.png" and "dog/a/b/img004.png" in s.manifest["source_files"]
    # A file added two levels down is a change of the source.
    messages: list[str] = []
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "dog" / "a" / "new.png")
    prepare(str(folder), val_size=2, root=tmp_path / "data", log=messages.append)
    assert "1 added: dog/a/new.png" in messages[0]


def test_split_layouts_train_without_test_is_refused_and_a_val_folder_is_said_to_be_unread(tmp_path):
    for part in ("train", "val"):
        _png_folder(tmp_path / "tv" / part, n=6, size=(8, 8))
    with pytest.raises(DataError, match="train/ subfolder but no test/ one"):  # not two classes "train" and "val"
        prepare(str(tmp_path / "tv"), val_size=2, root=tmp_path / "data", **QUIET)
    for part in ("train", "val", "test"):
        _png_folder(tmp_path / "tvt" / part, n=6, size=(8, 8))
    messages: list[str] = []
    prepare(str(tmp_path / "tvt"), val_size=2, root=tmp_path / "data", log=messages.append)
    assert any("val/ not read" in m for m in messages)
    assert load_splits(str(tmp_path / "tvt"), 2, root=tmp_path / "data").manifest["counts"] == \
        {"train": 4, "val": 2, "test": 6}


@pytest.mark.parametrize("case, message", [
    ("npy_named_npz", "is a .npy array, not a .npz archive; name it .npy"),
    ("npz_named_npy", "is a .npz archive, not a .npy array; name it .npz"),
    ("truncated_npz", "cannot be read as a .npz archive"),
    ("corrupt_npz_member", "cannot be read as a .npz archive.*CRC"),
    ("empty_npz", "holds no arrays"),
    ("empty_npy", "has no images"),
    ("empty_test_part", "the test part has no images"),
    ("bad_cifar_batch", "is not a CIFAR-10 batch"),
])
def test_damaged_arrays_get_one_clear_error_and_write_nothing(tmp_path, case, message):
    images = np.zeros((10, 8, 8), np.uint8)
    if case == "npy_named_npz":
        np.save(tmp_path / "x.npy", images)
        source = (tmp_path / "x.npy").rename(tmp_path / "x.npz")
    elif case == "npz_named_npy":
        np.savez(tmp_path / "x.npz", images=images)
        source = (tmp_path / "x.npz").rename(tmp_path / "x.npy")
    elif case in ("truncated_npz", "corrupt_npz_member"):
        source = tmp_path / "x.npz"
        np.savez(source, images=np.arange(10 * 64, dtype=np.uint8).reshape(10, 8, 8))
        blob = bytearray(source.read_bytes())
        if case == "truncated_npz":
            blob = blob[: len(blob) // 2]
        else:
            blob[200:260] = b"\xff" * 60  # inside the stored images.npy member
        source.write_bytes(bytes(blob))
    elif case == "empty_npz":
        source = tmp_path / "x.npz"
        np.savez(source)
    elif case == "empty_npy":
        source = tmp_path / "x.npy"
        np.save(source, images[:0])
    elif case == "empty_test_part":
        source = tmp_path / "x.npz"
        np.savez(source, x_train=images, x_test=images[:0])
    else:
        source = "cifar10"
        raw = _cifar_dir(tmp_path / "cifar")
        with open(raw / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
            pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, f)  # not 3×32×32 rows
    extra = {"raw_dir": tmp_path / "cifar"} if source == "cifar10" else {}
    with pytest.raises(DataError, match=message):
        prepare(str(source), val_size=2, root=tmp_path / "data", **extra, **QUIET)
    assert not any((tmp_path / "data").rglob("*.pt"))


def test_a_relative_path_is_held_absolute_so_two_directories_are_two_datasets(tmp_path, monkeypatch):
    for d in ("a", "b"):
        _png_folder(tmp_path / d / "imgs", n=10, size=(8, 8), seed=ord(d))
    configs = []
    for d in ("a", "b"):
        monkeypatch.chdir(tmp_path / d)
        configs.append(build_config({"data": {"dataset": "./imgs", "val_size": 2}}))
    assert [c.data.dataset for c in configs] == [str(tmp_path / "a" / "imgs"), str(tmp_path / "b" / "imgs")]
    assert configs[0].result_hash() != configs[1].result_hash()  # not one run directory for both
    monkeypatch.chdir(tmp_path / "a" / "imgs")
    here = build_config({"data": {"dataset": ".", "val_size": 2}})
    assert here.data.dataset == configs[0].data.dataset and here.result_hash() == configs[0].result_hash()
    prepare(here.data.dataset, val_size=2, root=tmp_path / "data", **QUIET)  # "." is a folder like any other
    assert prepared_dir(here.data, tmp_path / "data") == prepared_dir(configs[0].data, tmp_path / "data")
    with pytest.raises(ConfigError, match="data.dataset is empty"):
        build_config({"data": {"dataset": ""}})


def test_grey_images_among_colour_ones_are_converted_as_read_like_pil_would(tmp_path):
    folder = _png_folder(tmp_path / "mix", n=6, size=(30, 21), mode="RGB")
    grey = np.random.default_rng(5).integers(0, 256, (21, 30), dtype=np.uint8)
    Image.fromarray(grey).save(folder / "grey.png")
    prepare(str(folder), val_size=2, image_size=12, root=tmp_path, **QUIET)
    s = load_splits(str(folder), 2, root=tmp_path, image_size=12)
    # 30×21 → shorter side 21 to 12 (17×12), centre crop 12×12, with the grey image repeated in R, G and B.
    ref = Image.fromarray(grey).convert("RGB").resize((17, 12), Image.BILINEAR).crop((2, 0, 14, 12))
    expected = np.asarray(ref).transpose(2, 0, 1)
    assert s.train_x.shape[1:] == (3, 12, 12)
    assert any(np.array_equal(x.numpy(), expected) for x in torch.cat([s.train_x, s.val_x, s.test_x]))


def test_a_failing_read_closes_its_progress_bar_before_the_error_is_shown(tmp_path):
    import io
    from functools import partial

    from tqdm import tqdm

    folder = _png_folder(tmp_path / "bad", n=8, size=(8, 8))
    blob = (folder / "img004.png").read_bytes()
    (folder / "img004.png").write_bytes(blob[: len(blob) // 2])
    shown = io.StringIO()
    try:
        prepare(str(folder), val_size=2, root=tmp_path, progress=partial(tqdm, file=shown), **QUIET)
    except DataError as e:  # looked at while the error is alive, as the CLI prints it
        assert "img004.png cannot be read as an image" in str(e)
        assert shown.getvalue().endswith("\n")  # the bar's line is finished: the error starts on its own line
    else:
        pytest.fail("a truncated PNG was read")


def test_one_class_is_no_labelling(tmp_path):
    folder = _png_folder(tmp_path / "one", n=20, size=(8, 8), classes=["only"])
    messages: list[str] = []
    prepare(str(folder), val_size=4, root=tmp_path, log=messages.append)
    s = load_splits(str(folder), 4, root=tmp_path)
    assert not s.has_labels and s.n_classes == 0 and s.manifest["classes"] is None
    assert any("same label ('only')" in m and "treated as no labels" in m for m in messages)
    np.savez(tmp_path / "one.npz", images=np.zeros((20, 8, 8), np.uint8), labels=np.full(20, 7))
    prepare(str(tmp_path / "one.npz"), val_size=4, root=tmp_path, **QUIET)
    assert not load_splits(str(tmp_path / "one.npz"), 4, root=tmp_path).has_labels


def test_a_run_does_not_resume_on_changed_data(tmp_path, monkeypatch):
    from pipeline.stages import train_stage

    monkeypatch.setenv("VAE_PIPELINE_HOME", str(tmp_path))
    folder = _png_folder(tmp_path / "imgs", n=40, size=(8, 8))
    cfg = build_config({}, {"data.dataset": str(folder), "data.val_size": 4, "train.epochs": 2, "model.hidden_dim": 16,
                            "tracking.enabled": False, "eval.enabled": False, "train.grid_images": 2})

    def stop_after_the_first_epoch(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt  # as a Ctrl-C after the first checkpoint

    with pytest.raises(KeyboardInterrupt):
        train_stage(cfg, log=lambda *_: None, progress=False, on_epoch=stop_after_the_first_epoch)
    Image.fromarray(np.full((8, 8), 3, np.uint8)).save(folder / "img000.png")
    with pytest.raises(DataError, match="data changed since this run's checkpoint.*--restart"):
        train_stage(cfg, log=lambda *_: None, progress=False)
    assert train_stage(cfg, mode="restart", log=lambda *_: None, progress=False).status == "finished"
