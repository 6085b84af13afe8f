"""Data preparation: a verified source → seeded train/val/test uint8 tensors + a manifest, cached.

A dataset is a name or a path (``data.dataset``):
- ``fashion-mnist`` and ``mnist``: raw IDX files (plain or gzipped) in ``raw_dir`` (default: where
  Debian's ``dataset-fashion-mnist`` installs them) or in a previous download under ``data/raw``;
  Fashion-MNIST files are checked against pinned SHA-256 digests before anything is written;
- ``cifar10``, ``svhn`` and ``celeba``: torchvision's files, in ``raw_dir`` or downloaded into
  ``data/raw`` when asked (``--download``; nothing touches the network otherwise);
- a path: a folder of images or a ``.npy``/``.npz`` file (layouts in pipeline.datasources).
``data.channels`` (1 or 3) and ``data.image_size`` (shorter side resized, then centre-cropped square)
convert the images; a source without a test split gives ``data.test_fraction`` of its images to one.
The manifest records a SHA-256 of every source file; a source file that changes (or appears, or goes)
invalidates the cache, and the next ``prepare`` says which and prepares the dataset again.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import datasources as src
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
    image_shape: tuple[int, int, int] = (1, 28, 28)  # C, H, W (after default_image_size)
    reader: str = "idx"  # idx | cifar10 | svhn | celeba: the on-disk layout (pipeline.datasources)
    # The side images are resized to when data.image_size is not given (CelebA's 178×218 faces).
    default_image_size: int | None = None


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
    # torchvision checks the MD5 of each download; the manifest records every file's SHA-256.
    "cifar10": DatasetSpec("cifar10", "CIFAR10", None, None, (3, 32, 32), "cifar10"),
    "svhn": DatasetSpec("svhn", "SVHN", None, None, (3, 32, 32), "svhn"),
    "celeba": DatasetSpec("celeba", "CelebA", None, None, (3, 64, 64), "celeba", default_image_size=64),
}
SIDE_RANGE = (8, 64)  # the image sides every model family takes (pipeline.vae)


class DataError(PipelineError, RuntimeError):
    """Missing or corrupt data, with what to do about it."""


@dataclass(frozen=True)
class Splits:
    train_x: torch.Tensor  # (N, C, H, W) uint8
    train_y: torch.Tensor | None  # (N,) int64 in 0 … n_classes − 1; None when the dataset has no labels
    val_x: torch.Tensor
    val_y: torch.Tensor | None
    test_x: torch.Tensor
    test_y: torch.Tensor | None
    manifest: dict
    manifest_sha256: str

    @property
    def has_labels(self) -> bool:
        return self.train_y is not None

    @property
    def n_classes(self) -> int:
        """Classes of the labels (0 without labels); manifests written before this key are the 10 of MNIST."""
        return int(self.manifest.get("n_classes", 10)) if self.has_labels else 0


@dataclass(frozen=True)
class DataOptions:
    """What turns a source into prepared splits: the part of a data config prepare reads."""

    dataset: str = "fashion-mnist"
    val_size: int = 5000
    split_seed: int = 0
    image_size: int | None = None
    channels: int | None = None
    test_fraction: float = 0.1

    @classmethod
    def of(cls, data_cfg) -> DataOptions:
        return cls(data_cfg.dataset, data_cfg.val_size, data_cfg.split_seed, data_cfg.image_size, data_cfg.channels,
                   data_cfg.test_fraction)

    @property
    def conversions(self) -> dict:
        """The keyword options of prepare and load_splits beyond the dataset and its split."""
        return dict(image_size=self.image_size, channels=self.channels, test_fraction=self.test_fraction)

    @property
    def named(self) -> bool:
        return self.dataset in DATASETS

    def conversion(self) -> tuple[int | None, int | None]:
        """(image_size, channels) to convert to, None where the source is kept as it is: a named
        dataset's own size and channels are no conversion (CelebA's default size is)."""
        size, channels = self.image_size, self.channels
        if self.named:
            spec = DATASETS[self.dataset]
            size = size or spec.default_image_size
            if spec.default_image_size is None and size == spec.image_shape[1] == spec.image_shape[2]:
                size = None
            if channels == spec.image_shape[0]:
                channels = None
        return size, channels


def processed_dir(dataset: str, val_size: int, split_seed: int, root: Path | None = None) -> Path:
    """Where a named dataset's splits are cached, without conversions (see prepared_dir)."""
    return prepared_dir(DataOptions(dataset, val_size, split_seed), root)


def source_path(dataset: str) -> Path:
    """A path dataset's source, absolute (relative paths are resolved against the working directory)."""
    return Path(dataset).expanduser().resolve()


def dataset_key(o: DataOptions) -> str:
    """The cache directory's name for a dataset and its conversions: a named dataset as it ships keeps
    its name; a path gets its last component and a digest of the absolute path and options."""
    size, channels = o.conversion()
    if o.named:
        return o.dataset + (f"-s{size}" if size else "") + (f"-c{channels}" if channels else "")
    path = source_path(o.dataset)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", path.name)[:40] or "data"
    digest = hashlib.sha256(json.dumps([str(path), size, channels, o.test_fraction]).encode()).hexdigest()[:10]
    return f"{slug}-{digest}"


def prepared_dir(data_cfg, root: Path | None = None) -> Path:
    """The directory of a data config's prepared splits (``splits.pt``, ``manifest.json``, the classifier)."""
    o = data_cfg if isinstance(data_cfg, DataOptions) else DataOptions.of(data_cfg)
    return (root or paths.data_dir()) / "processed" / dataset_key(o) / f"val{o.val_size}-seed{o.split_seed}"


def image_shape(data_cfg, root: Path | None = None) -> tuple[int, int, int]:
    """(C, H, W) of a data config's images: from the named dataset and the conversions, else from the
    prepared manifest (a path's images are known once prepared)."""
    o = data_cfg if isinstance(data_cfg, DataOptions) else DataOptions.of(data_cfg)
    size, channels = o.conversion()
    if o.named:
        c, h, w = DATASETS[o.dataset].image_shape
        return (channels or c, size or h, size or w)
    if size and channels:
        return (channels, size, size)
    try:
        shape = json.loads((prepared_dir(o, root) / "manifest.json").read_text())["image_shape"]
    except (OSError, ValueError, KeyError):
        raise DataError(f"the image shape of {o.dataset} is known once it is prepared: run `python -m pipeline "
                        f"prepare --dataset {o.dataset}` (with the same data options) first") from None
    return tuple(shape)


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
    downloaded = download_root(root) / spec.torchvision_class
    dirs.append(downloaded / "raw" if spec.reader == "idx" else downloaded)
    return dirs


def _load_raw_files(spec: DatasetSpec, dirs: list[Path]) -> tuple[Path, dict[str, bytes]] | None:
    for d in dirs:
        blobs = {name: _read_raw(d, name) for name in SPLIT_FILES}
        if all(b is not None for b in blobs.values()):
            return d, blobs  # type: ignore[return-value]
    return None


def _download(spec: DatasetSpec, root: Path) -> Path:
    import torchvision.datasets as tvd  # the only torchvision importer, and only when asked

    target = download_root(root) / spec.torchvision_class
    target.mkdir(parents=True, exist_ok=True)
    cls = getattr(tvd, spec.torchvision_class)
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    try:
        if spec.reader == "idx":
            cls(root=str(target.parent), train=True, download=True)
            cls(root=str(target.parent), train=False, download=True)
            return target / "raw"
        if spec.reader == "cifar10":
            cls(root=str(target), train=True, download=True)
        elif spec.reader == "svhn":
            cls(root=str(target), split="train", download=True)
            cls(root=str(target), split="test", download=True)
        else:
            cls(root=str(target), split="all", download=True)
    except Exception as e:  # torchvision raises RuntimeError/URLError/OSError depending on where
        raise DataError(f"downloading {spec.name} failed ({type(e).__name__}: {e}).\n{_how_to_get(spec)}") from None
    finally:
        socket.setdefaulttimeout(old_timeout)
    return target


def _how_to_get(spec: DatasetSpec, tried: list[Path] | None = None) -> str:
    lines = []
    if tried:
        what = "the four IDX files (plain or .gz)" if spec.reader == "idx" else f"{spec.name}'s torchvision files"
        lines.append(f"looked for {what} in: " + ", ".join(str(t) for t in tried))
    lines.append(f"ways to get {spec.name}:")
    if spec.name == "fashion-mnist":
        lines.append("  - Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist  (installs to /usr/share/datasets/fashion-mnist)")
    what = "the IDX files" if spec.reader == "idx" else "torchvision's files for it"
    lines.append(f"  - point at a directory holding {what}: python -m pipeline prepare --dataset {spec.name} --raw-dir DIR")
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


def _tensor_bytes(tensors: dict[str, torch.Tensor | None]) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(tensors, buf)
    return buf.getvalue()


def _read_idx(spec: DatasetSpec, o: DataOptions, raw_dir, download, root, log):
    dirs = _raw_candidates(spec, Path(raw_dir) if raw_dir else None, root)
    found = _load_raw_files(spec, dirs)
    if found is None:
        if not download:
            raise DataError(f"{spec.name} not found.\n{_how_to_get(spec, dirs)}")
        log(f"[prepare] downloading {spec.name} with torchvision into {download_root(root)}")
        found = _load_raw_files(spec, [_download(spec, root or paths.data_dir())])
        if found is None:
            raise DataError(f"download of {spec.name} finished but the IDX files are missing.\n{_how_to_get(spec)}")
    source, blobs = found
    checksums = _verify(spec, source, blobs)
    parsed = {}
    for name, blob in blobs.items():
        try:
            parsed[name] = parse_idx(blob)
        except DataError as e:
            raise DataError(f"{source / name}: {e}; replace the file or re-download") from None
    raw = src.RawImages(
        src.Part(parsed["train-images-idx3-ubyte"][:, None], parsed["train-labels-idx1-ubyte"].astype(np.int64)),
        src.Part(parsed["t10k-images-idx3-ubyte"][:, None], parsed["t10k-labels-idx1-ubyte"].astype(np.int64)), [])
    return source, raw, {"raw_sha256": checksums, "checksums_verified": spec.sha256 is not None}


def _read_torchvision(spec: DatasetSpec, raw_dir, download, root, progress, log, size, channels):
    readers = {"cifar10": src.read_cifar10, "svhn": src.read_svhn,
               "celeba": lambda d: src.read_celeba(d, progress, size, channels)}
    dirs = _raw_candidates(spec, Path(raw_dir) if raw_dir else None, root)
    for d in dirs:
        try:
            return d, readers[spec.reader](d)
        except FileNotFoundError:
            continue
    if not download:
        raise DataError(f"{spec.name} not found.\n{_how_to_get(spec, dirs)}")
    log(f"[prepare] downloading {spec.name} with torchvision into {download_root(root)}")
    target = _download(spec, root or paths.data_dir())
    try:
        return target, readers[spec.reader](target)
    except FileNotFoundError as e:
        raise DataError(f"download of {spec.name} finished but its files are missing ({e}).\n{_how_to_get(spec)}") from None


def _file_records(files: list[Path], base: Path, progress) -> dict[str, dict]:
    it = progress(files, desc="hashing source files", unit="file") if progress and len(files) > 1000 else files
    return {src.relative_name(f, base): {"sha256": src.file_sha256(f), "size_mtime": src.stat_signature(f)} for f in it}


def _split(train: src.Part, test: src.Part | None, o: DataOptions) -> dict[str, np.ndarray | None]:
    """Seeded splits of the converted images: val_size images of the training part for validation and,
    for a source with no test split, round(test_fraction · N) of all its images for the test set."""
    x, y = train.images, train.labels
    if test is None:
        n = x.shape[0]
        n_test = round(o.test_fraction * n)
        if not 1 <= n_test < n:
            raise DataError(f"data.test_fraction={o.test_fraction:g} of {n} images is {n_test} test images; "
                            "the source needs more images or another fraction")
        # Its own generator (seed split_seed + 1): the validation draw below stays that of a named dataset.
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(o.split_seed + 1)).numpy()
        test = src.Part(x[perm[:n_test]], None if y is None else y[perm[:n_test]])
        x, y = x[perm[n_test:]], None if y is None else y[perm[n_test:]]
    n_train = x.shape[0]
    if not 0 < o.val_size < n_train:
        hint = f" (10% would be data.val_size={max(1, n_train // 10)})" if n_train > 1 else ""
        raise DataError(f"data.val_size={o.val_size} must be between 1 and {n_train - 1}: the training part of "
                        f"{o.dataset} has {n_train} images{hint}")
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(o.split_seed)).numpy()
    val_idx, train_idx = perm[: o.val_size], perm[o.val_size:]
    return {"train_x": x[train_idx], "train_y": None if y is None else y[train_idx],
            "val_x": x[val_idx], "val_y": None if y is None else y[val_idx],
            "test_x": test.images, "test_y": test.labels}


def prepare(
    dataset: str = "fashion-mnist",
    *,
    val_size: int = 5000,
    split_seed: int = 0,
    image_size: int | None = None,
    channels: int | None = None,
    test_fraction: float = 0.1,
    raw_dir: str | Path | None = None,
    download: bool = False,
    root: Path | None = None,
    force: bool = False,
    log=print,
    progress: Callable | None = None,
) -> Path:
    """Prepare a dataset's splits; returns the directory holding ``splits.pt`` and ``manifest.json``.

    Cached: when a valid manifest for the same dataset, options and split exists (and, for a path, its
    files are unchanged), nothing is redone. `progress`: a tqdm-like wrapper for long reads, or None.
    """
    o = DataOptions(dataset, val_size, split_seed, image_size, channels, test_fraction)
    if not dataset:
        raise DataError("data.dataset is empty; give a dataset name or a path")
    out = prepared_dir(o, root)
    if not force and _cache_valid(out):
        changed = None if o.named else _source_changes(out, source_path(dataset), progress)
        if not changed:
            log(f"[prepare] {dataset}: cached at {out}")
            return out
        log(f"[prepare] {dataset} changed since it was prepared ({changed}): preparing it again. Runs already "
            "trained keep their results; their runs record the earlier manifest's digest")

    size, want_channels = o.conversion()
    extra: dict = {}
    if raw_dir and not Path(raw_dir).is_dir():
        spec = DATASETS.get(dataset)
        raise DataError(f"--raw-dir {raw_dir} is not a directory." + (f"\n{_how_to_get(spec)}" if spec else ""))
    if not o.named and (raw_dir or download):
        raise DataError(f"--raw-dir and --download are for named datasets ({', '.join(DATASETS)}); "
                        f"{dataset} is a path and is read from there")
    try:
        if o.named and DATASETS[dataset].reader == "idx":
            source, raw, extra = _read_idx(DATASETS[dataset], o, raw_dir, download, root, log)
        elif o.named:
            source, raw = _read_torchvision(DATASETS[dataset], raw_dir, download, root, progress, log, size,
                                            want_channels)
        else:
            source = source_path(dataset)
            raw = src.read_path(source, progress, size, want_channels)
    except src.SourceError as e:
        raise DataError(str(e)) from None
    if raw.files:
        base = source if source.is_dir() else source.parent
        extra["source_files"] = _file_records(raw.files, base, progress)
    try:
        train, test, classes = src.conform(raw, size, want_channels, SIDE_RANGE, dataset)
    except src.SourceError as e:
        raise DataError(str(e)) from None
    for note in raw.notes:
        log(f"[prepare] note: {note}")
    parts = _split(train, test, o)
    # Standard strides (numpy gives size-1 dims others): the same tensors always serialize to the same bytes.
    tensors = {k: None if v is None else torch.from_numpy(np.array(v)).clone(memory_format=torch.contiguous_format)
               for k, v in parts.items()}
    blob = _tensor_bytes(tensors)
    train_x = tensors["train_x"]
    manifest = {
        "dataset": dataset,
        "source": str(source),
        **{k: v for k, v in extra.items() if k != "source_files"},
        "split_seed": split_seed,
        "val_size": val_size,
        "counts": {"train": int(train_x.shape[0]), "val": int(tensors["val_x"].shape[0]),
                   "test": int(tensors["test_x"].shape[0])},
        "train_mean_intensity": round(float(train_x.float().mean() / 255), 6),
        "splits_sha256": _sha256(blob),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "image_shape": list(train_x.shape[1:]),
        "has_labels": tensors["train_y"] is not None,
        "n_classes": len(classes) if classes else 0,
        "classes": classes,
        "options": {"image_size": size, "channels": want_channels,
                    "test_fraction": test_fraction if raw.test is None else None},
        "test_split": "source" if raw.test is not None else f"{test_fraction:g} of the source's images",
        **({"source_files": extra["source_files"]} if "source_files" in extra else {}),
    }
    out.mkdir(parents=True, exist_ok=True)
    # The manifest is written last: its presence (with a matching digest) marks a complete cache.
    (out / "manifest.json").unlink(missing_ok=True)
    atomic_write_bytes(out / "splits.pt", blob)
    atomic_write_bytes(out / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())
    c = manifest["counts"]
    shape = "×".join(map(str, manifest["image_shape"]))
    labels = f"{len(classes)} classes" if classes else "no labels"
    log(f"[prepare] {dataset}: {c['train']} train / {c['val']} val / {c['test']} test, {shape}, {labels}, from "
        f"{source} → {out}")
    return out


def _source_changes(out: Path, source: Path, progress=None) -> str | None:
    """What changed in a path source since its manifest was written ('2 changed: a.png, b.png; …'), or None."""
    try:
        recorded = json.loads((out / "manifest.json").read_text()).get("source_files") or {}
        current = src.source_files(source)
    except (OSError, ValueError, src.SourceError):
        return "its files cannot be listed"
    base = source if source.is_dir() else source.parent
    now = {src.relative_name(f, base): f for f in current}
    added = sorted(set(now) - set(recorded))
    removed = sorted(set(recorded) - set(now))
    changed = []
    for name in sorted(set(now) & set(recorded)):
        rec = recorded[name]
        if src.stat_signature(now[name]) != rec.get("size_mtime") and src.file_sha256(now[name]) != rec.get("sha256"):
            changed.append(name)

    def some(names: list[str]) -> str:
        return ", ".join(names[:3]) + (", …" if len(names) > 3 else "")

    parts = [f"{len(v)} {k}: {some(v)}" for k, v in (("changed", changed), ("added", added), ("removed", removed)) if v]
    return "; ".join(parts) or None


def _cache_valid(out: Path) -> bool:
    try:
        manifest = json.loads((out / "manifest.json").read_text())
        return (out / "splits.pt").stat().st_size > 0 and "splits_sha256" in manifest
    except (OSError, ValueError):
        return False


def load_splits(
    dataset: str = "fashion-mnist", val_size: int = 5000, split_seed: int = 0, root: Path | None = None, *,
    image_size: int | None = None, channels: int | None = None, test_fraction: float = 0.1,
) -> Splits:
    """Load prepared splits, checking the tensors against the manifest's digest."""
    o = DataOptions(dataset, val_size, split_seed, image_size, channels, test_fraction)
    out = prepared_dir(o, root)
    if not _cache_valid(out):
        how = _how_to_get(DATASETS[dataset]) if o.named else f"(the images are read from {source_path(dataset)})"
        options = "".join(f" --{k.replace('_', '-')} {v}" for k, v in
                          (("image_size", image_size), ("channels", channels)) if v is not None)
        if test_fraction != 0.1:
            options += f" --test-fraction {test_fraction:g}"
        raise DataError(
            f"{dataset} is not prepared (no {out / 'manifest.json'}). Run `make data` or "
            f"`python -m pipeline prepare --dataset {dataset} --val-size {val_size} --split-seed {split_seed}{options}`.\n"
            + how
        )
    manifest_bytes = (out / "manifest.json").read_bytes()
    manifest = json.loads(manifest_bytes)
    blob = (out / "splits.pt").read_bytes()
    if _sha256(blob) != manifest["splits_sha256"]:
        raise DataError(f"{out / 'splits.pt'} does not match its manifest (corrupt cache); rerun prepare with --force")
    import io

    t = torch.load(io.BytesIO(blob), weights_only=True)
    return Splits(**t, manifest=manifest, manifest_sha256=_sha256(manifest_bytes))


def ensure_splits(data_cfg, log=print, progress: Callable | None = None) -> Splits:
    """Prepare from local sources if needed (never downloads), then load. Reading a folder of images shows
    a progress bar on a terminal."""
    if progress is None:
        from functools import partial

        from tqdm.auto import tqdm

        progress = partial(tqdm, disable=None, leave=False)  # disable=None: off when not a TTY
    o = DataOptions.of(data_cfg)
    prepare(o.dataset, val_size=o.val_size, split_seed=o.split_seed, log=log, progress=progress, **o.conversions)
    return load_splits(o.dataset, o.val_size, o.split_seed, **o.conversions)


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
