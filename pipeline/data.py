"""Data preparation: verified raw IDX files → seeded train/val/test uint8 tensors + manifest.

Sources, in order: the prepared cache; raw IDX files (plain or gzipped) in ``raw_dir`` (default:
where Debian's ``dataset-fashion-mnist`` installs them) or in a previous download under
``data/raw``; a torchvision download, only when asked (``--download``). Fashion-MNIST files are
checked against pinned SHA-256 digests of the decompressed IDX bytes before anything is written.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import paths
from pipeline.errors import PipelineError
from pipeline.fileio import atomic_write_bytes

SPLIT_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    torchvision_class: str
    default_raw_dir: str | None
    # SHA-256 of each decompressed IDX file; None where we have no pinned digest to check.
    sha256: dict[str, str] | None
    image_shape: tuple[int, int, int] = (1, 28, 28)  # C, H, W


DATASETS: dict[str, DatasetSpec] = {
    "fashion-mnist": DatasetSpec(
        "fashion-mnist",
        "FashionMNIST",
        "/usr/share/datasets/fashion-mnist",
        {
            "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
    ),
    # No Debian package ships MNIST; torchvision checks the MD5 of its downloads.
    "mnist": DatasetSpec("mnist", "MNIST", None, None),
}


class DataError(PipelineError, RuntimeError):
    """Missing or corrupt data, with what to do about it."""


@dataclass(frozen=True)
class Splits:
    train_x: torch.Tensor  # (N, 1, 28, 28) uint8
    train_y: torch.Tensor  # (N,) int64
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    manifest: dict
    manifest_sha256: str


def _spec(dataset: str) -> DatasetSpec:
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; allowed: {', '.join(DATASETS)}")
    return DATASETS[dataset]


def processed_dir(dataset: str, val_size: int, split_seed: int, root: Path | None = None) -> Path:
    return (root or paths.data_dir()) / "processed" / dataset / f"val{val_size}-seed{split_seed}"


def download_root(root: Path | None = None) -> Path:
    return (root or paths.data_dir()) / "raw"


# --- IDX parsing ---------------------------------------------------------------------------------
def parse_idx(blob: bytes) -> np.ndarray:
    """IDX format (LeCun): 2 zero bytes, dtype code, ndim, big-endian int32 dims, then the data."""
    if len(blob) < 4 or blob[0] != 0 or blob[1] != 0 or blob[2] != 0x08:
        raise DataError("not an unsigned-byte IDX file (bad magic number)")
    ndim = blob[3]
    dims = struct.unpack(f">{ndim}I", blob[4 : 4 + 4 * ndim])
    data = np.frombuffer(blob, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"IDX file truncated: header says {dims}, found {data.size} bytes of data")
    return data.reshape(dims)


def _read_raw(directory: Path, name: str) -> bytes | None:
    plain, gz = directory / name, directory / f"{name}.gz"
    if plain.is_file():
        return plain.read_bytes()
    if gz.is_file():
        try:
            with gzip.open(gz, "rb") as f:
                return f.read()
        except (OSError, EOFError) as e:
            raise DataError(f"{gz} is not a readable gzip file ({e}); replace it or re-download") from None
    return None


def _raw_candidates(spec: DatasetSpec, raw_dir: Path | None, root: Path | None) -> list[Path]:
    dirs = [raw_dir] if raw_dir else ([Path(spec.default_raw_dir)] if spec.default_raw_dir else [])
    dirs.append(download_root(root) / spec.torchvision_class / "raw")
    return dirs


def _load_raw_files(spec: DatasetSpec, dirs: list[Path]) -> tuple[Path, dict[str, bytes]] | None:
    for d in dirs:
        blobs = {name: _read_raw(d, name) for name in SPLIT_FILES}
        if all(b is not None for b in blobs.values()):
            return d, blobs  # type: ignore[return-value]
    return None


def _download(spec: DatasetSpec, root: Path) -> Path:
    import torchvision.datasets as tvd  # the only torchvision importer, and only when asked

    target = download_root(root)
    target.mkdir(parents=True, exist_ok=True)
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    try:
        getattr(tvd, spec.torchvision_class)(root=str(target), train=True, download=True)
        getattr(tvd, spec.torchvision_class)(root=str(target), train=False, download=True)
    except Exception as e:  # torchvision raises RuntimeError/URLError/OSError depending on where
        raise DataError(f"downloading {spec.name} failed ({type(e).__name__}: {e}).\n{_how_to_get(spec)}") from None
    finally:
        socket.setdefaulttimeout(old_timeout)
    return target / spec.torchvision_class / "raw"


def _how_to_get(spec: DatasetSpec, tried: list[Path] | None = None) -> str:
    lines = []
    if tried:
        lines.append("looked for the four IDX files (plain or .gz) in: " + ", ".join(str(t) for t in tried))
    lines.append(f"ways to get {spec.name}:")
    if spec.name == "fashion-mnist":
        lines.append("  - Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist  (installs to /usr/share/datasets/fashion-mnist)")
    lines.append("  - point at a directory holding the IDX files: python -m pipeline prepare --raw-dir DIR")
    lines.append(f"  - download with torchvision (needs internet): python -m pipeline prepare --dataset {spec.name} --download")
    return "\n".join(lines)


def _sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _verify(spec: DatasetSpec, source: Path, blobs: dict[str, bytes]) -> dict[str, str]:
    actual = {name: _sha256(b) for name, b in blobs.items()}
    if spec.sha256 is None:
        return actual
    for name in SPLIT_FILES:
        if actual[name] != spec.sha256[name]:
            raise DataError(
                f"checksum mismatch for {source / name} (or its .gz):\n"
                f"  expected sha256 {spec.sha256[name]}\n  actual   sha256 {actual[name]}\n"
                "the file is corrupt or not the original; nothing was written. Replace it and rerun."
            )
    return actual


def _tensor_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(tensors, buf)
    return buf.getvalue()


def prepare(
    dataset: str = "fashion-mnist",
    *,
    val_size: int = 5000,
    split_seed: int = 0,
    raw_dir: str | Path | None = None,
    download: bool = False,
    root: Path | None = None,
    force: bool = False,
    log=print,
) -> Path:
    """Prepare a dataset's splits; returns the directory holding ``splits.pt`` and ``manifest.json``.

    Cached: when a valid manifest for the same dataset and split exists, nothing is redone.
    """
    spec = _spec(dataset)
    out = processed_dir(dataset, val_size, split_seed, root)
    if not force and _cache_valid(out):
        log(f"[prepare] {dataset}: cached at {out}")
        return out

    dirs = _raw_candidates(spec, Path(raw_dir) if raw_dir else None, root)
    if raw_dir and not Path(raw_dir).is_dir():
        raise DataError(f"--raw-dir {raw_dir} is not a directory.\n{_how_to_get(spec)}")
    found = _load_raw_files(spec, dirs)
    if found is None:
        if not download:
            raise DataError(f"{dataset} not found.\n{_how_to_get(spec, dirs)}")
        log(f"[prepare] downloading {dataset} with torchvision into {download_root(root)}")
        found = _load_raw_files(spec, [_download(spec, root or paths.data_dir())])
        if found is None:
            raise DataError(f"download of {dataset} finished but the IDX files are missing.\n{_how_to_get(spec)}")
    source, blobs = found
    checksums = _verify(spec, source, blobs)

    parsed = {}
    for name, blob in blobs.items():
        try:
            parsed[name] = parse_idx(blob)
        except DataError as e:
            raise DataError(f"{source / name}: {e}; replace the file or re-download") from None
    train_images, train_labels = parsed["train-images-idx3-ubyte"], parsed["train-labels-idx1-ubyte"]
    test_images, test_labels = parsed["t10k-images-idx3-ubyte"], parsed["t10k-labels-idx1-ubyte"]
    n_train = train_images.shape[0]
    if not 0 < val_size < n_train:
        raise DataError(f"val_size={val_size} must be between 1 and {n_train - 1}")

    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(split_seed))
    val_idx, train_idx = perm[:val_size], perm[val_size:]
    images = torch.from_numpy(train_images.copy()).unsqueeze(1)  # (N, 1, 28, 28) uint8
    labels = torch.from_numpy(train_labels.astype(np.int64))
    tensors = {
        "train_x": images[train_idx].contiguous(),
        "train_y": labels[train_idx].contiguous(),
        "val_x": images[val_idx].contiguous(),
        "val_y": labels[val_idx].contiguous(),
        "test_x": torch.from_numpy(test_images.copy()).unsqueeze(1).contiguous(),
        "test_y": torch.from_numpy(test_labels.astype(np.int64)),
    }
    blob = _tensor_bytes(tensors)
    manifest = {
        "dataset": dataset,
        "source": str(source),
        "raw_sha256": checksums,
        "checksums_verified": spec.sha256 is not None,
        "split_seed": split_seed,
        "val_size": val_size,
        "counts": {"train": len(train_idx), "val": len(val_idx), "test": int(test_images.shape[0])},
        "train_mean_intensity": round(float(tensors["train_x"].float().mean() / 255), 6),
        "splits_sha256": _sha256(blob),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out.mkdir(parents=True, exist_ok=True)
    # The manifest is written last: its presence (with a matching digest) marks a complete cache.
    (out / "manifest.json").unlink(missing_ok=True)
    atomic_write_bytes(out / "splits.pt", blob)
    atomic_write_bytes(out / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())
    c = manifest["counts"]
    log(f"[prepare] {dataset}: {c['train']} train / {c['val']} val / {c['test']} test from {source} → {out}")
    return out


def _cache_valid(out: Path) -> bool:
    try:
        manifest = json.loads((out / "manifest.json").read_text())
        return (out / "splits.pt").stat().st_size > 0 and "splits_sha256" in manifest
    except (OSError, ValueError):
        return False


def load_splits(
    dataset: str = "fashion-mnist", val_size: int = 5000, split_seed: int = 0, root: Path | None = None
) -> Splits:
    """Load prepared splits, checking the tensors against the manifest's digest."""
    spec = _spec(dataset)
    out = processed_dir(dataset, val_size, split_seed, root)
    if not _cache_valid(out):
        raise DataError(
            f"{dataset} is not prepared (no {out / 'manifest.json'}). Run `make data` or "
            f"`python -m pipeline prepare --dataset {dataset} --val-size {val_size} --split-seed {split_seed}`.\n"
            + _how_to_get(spec)
        )
    manifest_bytes = (out / "manifest.json").read_bytes()
    manifest = json.loads(manifest_bytes)
    blob = (out / "splits.pt").read_bytes()
    if _sha256(blob) != manifest["splits_sha256"]:
        raise DataError(f"{out / 'splits.pt'} does not match its manifest (corrupt cache); rerun prepare with --force")
    import io

    t = torch.load(io.BytesIO(blob), weights_only=True)
    return Splits(**t, manifest=manifest, manifest_sha256=_sha256(manifest_bytes))


def ensure_splits(data_cfg, log=print) -> Splits:
    """Prepare from local sources if needed (never downloads), then load."""
    prepare(data_cfg.dataset, val_size=data_cfg.val_size, split_seed=data_cfg.split_seed, log=log)
    return load_splits(data_cfg.dataset, data_cfg.val_size, data_cfg.split_seed)


def binarize_static(images_u8: torch.Tensor, seed: int) -> torch.Tensor:
    """One fixed Bernoulli draw per pixel (Salakhutdinov & Murray 2008 style), on the CPU, seeded: 0 or 255."""
    probs = images_u8.float() / 255
    return (torch.bernoulli(probs, generator=torch.Generator().manual_seed(seed)) * 255).to(torch.uint8)


class DeviceData:
    """A split held on the device as uint8; batches are gathered by index, no DataLoader."""

    def __init__(self, images_u8: torch.Tensor, device: torch.device, binarize: str = "none", static_seed: int = 0,
                 augment=None):
        self.binarize = binarize
        # (x in [0, 1], generator) → x: the training augmentation (pipeline.augment), applied before dynamic
        # binarization; None for validation and test data.
        self.augment = augment
        if binarize == "static":
            images_u8 = binarize_static(images_u8, static_seed)
        self.images = images_u8.to(device)
        self.n = self.images.shape[0]

    def batch(self, idx: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = self.images[idx].float().div_(255)  # (B, C, H, W) in [0, 1]
        if self.augment is not None:
            x = self.augment(x, generator)
        if self.binarize == "dynamic":
            x = torch.bernoulli(x, generator=generator)
        return x
