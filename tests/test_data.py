"""Data prep: IDX parsing, checksums, missing-data errors, split determinism, the cache."""

from __future__ import annotations

import gzip
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import DATASETS, SPLIT_FILES, DataError, load_splits, parse_idx, prepare, processed_dir

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
QUIET = dict(log=lambda *_: None)


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _fake_raw_dir(path: Path, n_train: int = 300, n_test: int = 50, gz: bool = False) -> Path:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    path.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        blob = _idx(arr)
        if gz:
            with gzip.open(path / f"{name}.gz", "wb") as f:
                f.write(blob)
        else:
            (path / name).write_bytes(blob)
    return path


def test_parse_idx_round_trip_and_errors():
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(parse_idx(_idx(arr)), arr)
    with pytest.raises(DataError, match="magic"):
        parse_idx(b"\x00\x00\x0d\x01" + b"\x00" * 8)
    with pytest.raises(DataError, match="truncated"):
        parse_idx(_idx(arr)[:-3])


@pytest.mark.parametrize("gz", [False, True])
def test_prepare_splits_are_seeded_and_complete(tmp_path, gz):
    raw = _fake_raw_dir(tmp_path / "raw", gz=gz)
    root = tmp_path / "data"
    out = prepare("mnist", raw_dir=raw, root=root, val_size=50, split_seed=3, **QUIET)
    s = load_splits("mnist", 50, 3, root=root)
    assert s.train_x.shape == (250, 1, 28, 28) and s.val_x.shape == (50, 1, 28, 28) and s.test_x.shape == (50, 1, 28, 28)
    assert s.train_x.dtype == torch.uint8
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 250, "val": 50, "test": 50}
    assert manifest["split_seed"] == 3 and manifest["source"] == str(raw)
    # train ∪ val is exactly the official training set, with no overlap (the random images are unique).
    rows = {bytes(img.numpy().tobytes()) for img in torch.cat([s.train_x, s.val_x])}
    official = parse_idx((raw / ("train-images-idx3-ubyte" + (".gz" if gz else ""))).read_bytes()
                         if not gz else gzip.decompress((raw / "train-images-idx3-ubyte.gz").read_bytes()))
    assert len(rows) == 300 and rows == {bytes(img.tobytes()) for img in official}

    # Same seed → identical split (in a fresh directory); another seed → a different one.
    prepare("mnist", raw_dir=raw, root=tmp_path / "d2", val_size=50, split_seed=3, **QUIET)
    again = load_splits("mnist", 50, 3, root=tmp_path / "d2")
    assert torch.equal(again.val_x, s.val_x) and torch.equal(again.train_x, s.train_x)
    prepare("mnist", raw_dir=raw, root=root, val_size=50, split_seed=4, **QUIET)
    other = load_splits("mnist", 50, 4, root=root)
    assert not torch.equal(other.val_x, s.val_x)


def test_prepare_is_cached(tmp_path):
    raw = _fake_raw_dir(tmp_path / "raw")
    root = tmp_path / "data"
    out = prepare("mnist", raw_dir=raw, root=root, val_size=50, **QUIET)
    mtime = (out / "splits.pt").stat().st_mtime_ns
    shutil.rmtree(raw)  # the cache no longer needs the source
    messages = []
    prepare("mnist", raw_dir=None, root=root, val_size=50, log=messages.append)
    assert (out / "splits.pt").stat().st_mtime_ns == mtime
    assert "cached" in messages[0]


def test_checksum_mismatch_names_file_and_hashes_and_writes_nothing(tmp_path):
    raw = _fake_raw_dir(tmp_path / "raw")  # right names, wrong bytes for Fashion-MNIST
    root = tmp_path / "data"
    with pytest.raises(DataError) as e:
        prepare("fashion-mnist", raw_dir=raw, root=root, **QUIET)
    msg = str(e.value)
    expected = DATASETS["fashion-mnist"].sha256["train-images-idx3-ubyte"]
    assert "train-images-idx3-ubyte" in msg and expected in msg and "actual" in msg
    import hashlib

    actual = hashlib.sha256((raw / "train-images-idx3-ubyte").read_bytes()).hexdigest()
    assert actual in msg
    assert not processed_dir("fashion-mnist", 5000, 0, root).exists()


def test_missing_data_lists_every_way_to_get_it(tmp_path):
    with pytest.raises(DataError) as e:
        prepare("fashion-mnist", raw_dir=tmp_path, root=tmp_path / "data", **QUIET)
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "--raw-dir" in msg and "--download" in msg
    assert str(tmp_path) in msg  # says where it looked


def test_load_unprepared_says_how_to_prepare(tmp_path):
    with pytest.raises(DataError, match="make data"):
        load_splits("fashion-mnist", root=tmp_path)


def test_corrupt_cache_is_detected(tmp_path):
    raw = _fake_raw_dir(tmp_path / "raw")
    out = prepare("mnist", raw_dir=raw, root=tmp_path / "data", val_size=50, **QUIET)
    blob = bytearray((out / "splits.pt").read_bytes())
    blob[-100] ^= 0xFF
    (out / "splits.pt").write_bytes(bytes(blob))
    with pytest.raises(DataError, match="corrupt"):
        load_splits("mnist", 50, 0, root=tmp_path / "data")


@pytest.mark.skipif(not DEBIAN_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_the_debian_package(tmp_path):
    out = prepare("fashion-mnist", root=tmp_path, **QUIET)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["checksums_verified"] is True
    assert manifest["counts"] == {"train": 55000, "val": 5000, "test": 10000}
    assert set(manifest["raw_sha256"]) == set(SPLIT_FILES)
    s = load_splits("fashion-mnist", root=tmp_path)
    mean = float(torch.cat([s.train_x, s.val_x]).float().mean() / 255)
    assert mean == pytest.approx(0.2860, abs=5e-5)  # the published Fashion-MNIST train mean
    assert torch.bincount(s.test_y).tolist() == [1000] * 10
