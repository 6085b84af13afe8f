"""Readers of a user's images and of torchvision's on-disk formats, into uint8 (N, C, H, W) arrays.

A source is read as it is on disk (``RawImages``); pipeline.data converts channels and size, splits
and caches it. Readers here never touch the network: torchvision downloads (``--download``) land
files in the layouts read below, and a user can point ``--raw-dir`` at the same files.

Layouts:
- an image folder (PNG, JPEG, BMP, WebP): images directly inside it (no labels), or one subfolder per
  class (torchvision's ImageFolder convention: labels are the sorted folder names, and a class's images
  may sit in folders below its own); either of those inside ``train/`` and ``test/`` subfolders gives
  the test split. Hidden files and folders (``.DS_Store``, macOS's ``._name.png``) are not read;
- a ``.npy`` file: uint8 images (N, H, W), (N, H, W, C) or (N, C, H, W) with C = 1 or 3, no labels;
- a ``.npz`` file: images under ``images``/``x``/``X``/``data`` (or the only array) and optional
  labels under ``labels``/``y``/``Y``/``targets``; or ``x_train``, ``x_test`` (+ ``y_train``,
  ``y_test``) for a source with its own test split;
- CIFAR-10 (``cifar-10-batches-py``), SVHN (``train_32x32.mat``, ``test_32x32.mat``) and CelebA
  (``celeba/img_align_celeba`` + ``celeba/list_eval_partition.txt``).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
IMAGE_KEYS = ("images", "x", "X", "data")
LABEL_KEYS = ("labels", "y", "Y", "targets")
# PIL modes that hold one grey value per pixel; anything else is read as RGB.
GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})


class SourceError(PipelineError, RuntimeError):
    """A source that cannot be read as images, with the file and what to do."""


@dataclass
class Part:
    """One split as read: images (a list: a folder's images may differ in size until resized) and
    labels (N,) int64, or None."""

    images: list[np.ndarray] | np.ndarray  # each (C, H, W) uint8, or one (N, C, H, W) array
    labels: np.ndarray | None


@dataclass
class RawImages:
    train: Part
    test: Part | None  # None: the source has no test split (one is drawn with data.test_fraction)
    files: list[Path]  # every file read, for the manifest's digests
    classes: list[str] | None = None  # label names in label order, where the source has them
    notes: list[str] = field(default_factory=list)


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def source_kind(path: Path) -> str:
    """'folder', 'npy' or 'npz' for a user's path; raises SourceError for anything else."""
    if path.is_dir():
        return "folder"
    if path.is_file() and path.suffix.lower() in (".npy", ".npz"):
        return path.suffix.lower()[1:]
    if not path.exists():
        raise SourceError(f"data.dataset={str(path)!r}: no such file or directory (relative paths are resolved "
                          f"against the directory you run from, here {Path.cwd()})")
    raise SourceError(f"data.dataset={str(path)!r} is neither a directory of images nor a .npy/.npz file")


# --- image folders -------------------------------------------------------------------------------
def _hidden(path: Path) -> bool:
    # Finder's .DS_Store and the ._name.png resource forks macOS leaves on other file systems: not images.
    return path.name.startswith(".")


def _images_in(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if not _hidden(p) and p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _subdirs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_dir() and not _hidden(p))


def _images_below(directory: Path) -> list[Path]:
    """A class folder's images, at any depth (as torchvision's ImageFolder reads them); a folder linked
    in twice (or into itself) is read once."""
    out, seen = [], set()

    def walk(d: Path) -> None:
        real = os.path.realpath(d)
        if real in seen:
            return
        seen.add(real)
        out.extend(_images_in(d))
        for sub in _subdirs(d):
            walk(sub)

    walk(directory)
    return sorted(out)


def _is_split_layout(root: Path) -> bool:
    """Whether a folder holds a train/ and a test/ part (and no images of its own)."""
    return (root / "train").is_dir() and (root / "test").is_dir() and not _images_in(root)


def _folder_listing(root: Path) -> tuple[list[Path], list[int] | None, list[str] | None]:
    """(files, labels or None, class names or None) of a folder: flat, or one subfolder per class."""
    flat, classes = _images_in(root), _subdirs(root)
    class_files = {c.name: _images_below(c) for c in classes}
    class_files = {name: files for name, files in class_files.items() if files}
    if "train" in class_files and not flat:
        # train/ next to val/ (and no test/) would otherwise become two classes named "train" and "val".
        raise SourceError(f"{root} has a train/ subfolder but no test/ one; a split layout needs train/ and test/ "
                          "(the validation images are drawn from train/ with data.val_size): rename the held-out "
                          "folder test/, or, if train is a class name, rename that folder")
    if flat and class_files:
        raise SourceError(f"{root} holds images both directly ({flat[0].name}, …) and in class subfolders "
                          f"({', '.join(list(class_files)[:3])}); keep one layout: all images in class subfolders "
                          "(labelled) or all directly in the folder (unlabelled)")
    if flat:
        return flat, None, None
    if not class_files:
        raise SourceError(f"{root} has no images ({', '.join(IMAGE_SUFFIXES)}) directly inside it or in subfolders")
    names = sorted(class_files)
    files = [f for name in names for f in class_files[name]]
    labels = [i for i, name in enumerate(names) for _ in class_files[name]]
    return files, labels, names


def read_image(path: Path) -> np.ndarray:
    """One image file → (C, H, W) uint8, C = 1 for grey modes, else 3 (alpha dropped)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            grey = img.mode in GREY_MODES
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                raise SourceError(f"{path}: {img.mode}-mode images (16-bit or float) are not supported; save 8-bit images")
            arr = np.asarray(img.convert("L" if grey else "RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise SourceError(f"{path} cannot be read as an image ({e}); remove or replace it") from None
    return arr[None] if grey else arr.transpose(2, 0, 1).copy()


def _read_files(files: list[Path], progress: Callable | None, size: int | None = None,
                channels: int | None = None) -> list[np.ndarray]:
    """The images, each converted as it is read (see convert): a folder of large photos is held at the
    size asked for, not at its own."""
    bar = progress(files, desc="reading images", unit="img") if progress else None
    try:
        return [convert(read_image(f), size, channels) for f in (bar if bar is not None else files)]
    finally:
        if bar is not None and hasattr(bar, "close"):
            bar.close()  # before an error is printed, not after it on the same line


def read_folder(root: Path, progress: Callable | None = None, size: int | None = None,
                channels: int | None = None) -> RawImages:
    if _is_split_layout(root):
        parts = {name: root / name for name in ("train", "test")}
        train_files, train_labels, train_classes = _folder_listing(parts["train"])
        test_files, test_labels, test_classes = _folder_listing(parts["test"])
        if train_classes != test_classes:
            raise SourceError(f"{parts['train']} and {parts['test']} must have the same class subfolders (or none): "
                              f"train has {train_classes or 'none'}, test has {test_classes or 'none'}")
        others = [d.name for d in _subdirs(root) if d.name not in parts and _images_below(d)]
        notes = [f"{root}: {', '.join(others)}/ not read (the test images are test/'s, and the validation images "
                 "are drawn from train/ with data.val_size)"] if others else []
        images = _read_files(train_files + test_files, progress, size, channels)
        n = len(train_files)
        return RawImages(Part(images[:n], _labels(train_labels)), Part(images[n:], _labels(test_labels)),
                         train_files + test_files, train_classes, notes)
    files, labels, classes = _folder_listing(root)
    return RawImages(Part(_read_files(files, progress, size, channels), _labels(labels)), None, files, classes)


def _labels(labels: list[int] | None) -> np.ndarray | None:
    return None if labels is None else np.asarray(labels, dtype=np.int64)


# --- arrays --------------------------------------------------------------------------------------
def to_nchw(array: np.ndarray, where: str) -> np.ndarray:
    """uint8 images (N, H, W), (N, H, W, C) or (N, C, H, W), C ∈ {1, 3} → (N, C, H, W)."""
    if array.dtype != np.uint8:
        raise SourceError(f"{where}: images must be uint8 (0–255), got {array.dtype}; convert them, e.g. "
                          "(x * 255).round().astype(np.uint8) for floats in [0, 1]")
    if array.ndim == 3:
        return array[:, None]
    if array.ndim == 4 and array.shape[-1] in (1, 3):
        return array.transpose(0, 3, 1, 2)
    if array.ndim == 4 and array.shape[1] in (1, 3):
        return array
    raise SourceError(f"{where}: images of shape {array.shape} are not (N, H, W), (N, H, W, C) or (N, C, H, W) "
                      "with C = 1 or 3")


def _label_array(labels, n: int, where: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or labels.shape[0] != n or not np.issubdtype(labels.dtype, np.integer):
        raise SourceError(f"{where}: labels must be {n} integers (one per image), got {labels.dtype} of shape "
                          f"{labels.shape}")
    return labels.astype(np.int64)


def _part(images: np.ndarray, labels, where: str) -> Part:
    x = to_nchw(images, where)
    return Part(x, None if labels is None else _label_array(labels, x.shape[0], where))


# What np.load raises for a damaged file: a short read, a bad zip directory or member, a bad header.
_NP_LOAD_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


def read_npy(path: Path) -> RawImages:
    try:
        array = np.load(path, allow_pickle=False)
    except _NP_LOAD_ERRORS as e:
        raise SourceError(f"{path} cannot be read as a .npy array ({e}); save it with np.save") from None
    if not isinstance(array, np.ndarray):  # np.load reads by content: this is a .npz archive
        array.close()
        raise SourceError(f"{path} is a .npz archive, not a .npy array; name it .npz")
    return RawImages(_part(array, None, str(path)), None, [path])


def read_npz(path: Path) -> RawImages:
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):  # np.load reads by content: this is a .npy array
            raise SourceError(f"{path} is a .npy array, not a .npz archive; name it .npy")
        with loaded as z:
            arrays = {k: z[k] for k in z.files}
    except _NP_LOAD_ERRORS as e:
        raise SourceError(f"{path} cannot be read as a .npz archive ({e}); save it with np.savez") from None
    if not arrays:
        raise SourceError(f"{path} holds no arrays; save the images in it (np.savez(path, images=..., labels=...))")
    if "x_train" in arrays and "x_test" in arrays:
        train = _part(arrays["x_train"], arrays.get("y_train"), f"{path}[x_train]")
        test = _part(arrays["x_test"], arrays.get("y_test"), f"{path}[x_test]")
        if (train.labels is None) != (test.labels is None):
            raise SourceError(f"{path}: give labels for both splits (y_train and y_test) or for neither")
        return RawImages(train, test, [path])
    key = next((k for k in IMAGE_KEYS if k in arrays), None)
    if key is None:
        if len(arrays) != 1:
            raise SourceError(f"{path} has arrays {', '.join(sorted(arrays))}; name the images one of "
                              f"{', '.join(IMAGE_KEYS)} (labels: {', '.join(LABEL_KEYS)}), or x_train/x_test")
        key = next(iter(arrays))
    label_key = next((k for k in LABEL_KEYS if k in arrays and k != key), None)
    return RawImages(_part(arrays[key], arrays.get(label_key) if label_key else None, f"{path}[{key}]"), None, [path])


def read_path(path: Path, progress: Callable | None = None, size: int | None = None,
              channels: int | None = None) -> RawImages:
    """A user's source as read; a folder's images already converted to `size` and `channels` (convert)."""
    kind = source_kind(path)
    if kind == "folder":
        return read_folder(path, progress, size, channels)
    return read_npy(path) if kind == "npy" else read_npz(path)


def source_files(path: Path) -> list[Path]:
    """The files a path source is read from, without reading them (for the cache's change check); raises
    SourceError where the folder cannot be read as a source."""
    if source_kind(path) != "folder":
        return [path]
    roots = [path / "train", path / "test"] if _is_split_layout(path) else [path]
    return sorted(f for root in roots for f in _folder_listing(root)[0])


# --- torchvision's layouts ------------------------------------------------------------------------
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise SourceError(f"{path} cannot be read as a CIFAR-10 batch ({e}); re-download it") from None


def read_cifar10(directory: Path) -> RawImages:
    """``cifar-10-batches-py``: pickled batches of (N, 3072) uint8 rows (R, G, B planes) and labels."""
    root = directory / "cifar-10-batches-py" if (directory / "cifar-10-batches-py").is_dir() else directory
    names = [f"data_batch_{i}" for i in range(1, 6)]
    files = [root / n for n in [*names, "test_batch"]]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{root}: missing {', '.join(missing)}")

    def part(batch_files: list[Path]) -> Part:
        xs, ys = [], []
        for f in batch_files:
            b = _unpickle(f)
            try:
                xs.append(np.asarray(b[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                ys.append(np.asarray(b[b"labels"], dtype=np.int64).reshape(-1))
            except (KeyError, TypeError, ValueError) as e:
                raise SourceError(f"{f} is not a CIFAR-10 batch ({type(e).__name__}: {e}); re-download it") from None
            if len(xs[-1]) != len(ys[-1]):
                raise SourceError(f"{f} holds {len(xs[-1])} images and {len(ys[-1])} labels; re-download it")
        return Part(np.concatenate(xs), np.concatenate(ys))

    return RawImages(part(files[:5]), part(files[5:]), files, CIFAR10_CLASSES)


def read_svhn(directory: Path) -> RawImages:
    """``train_32x32.mat`` / ``test_32x32.mat``: X (32, 32, 3, N) uint8, y (N, 1) with 10 for the digit 0."""
    from scipy.io import loadmat

    files = [directory / "train_32x32.mat", directory / "test_32x32.mat"]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{directory}: missing {', '.join(missing)}")

    def part(path: Path) -> Part:
        try:
            mat = loadmat(path)
            x = np.asarray(mat["X"], dtype=np.uint8).transpose(3, 2, 0, 1)
            y = np.asarray(mat["y"], dtype=np.int64).reshape(-1) % 10  # the digit 0 is stored as 10
        except (OSError, ValueError, TypeError, KeyError, EOFError) as e:
            raise SourceError(f"{path} cannot be read as an SVHN .mat file ({type(e).__name__}: {e}); "
                              "re-download it") from None
        if x.shape[1:] != (3, 32, 32) or len(x) != len(y):
            raise SourceError(f"{path}: X of shape {mat['X'].shape} and {len(y)} labels are not SVHN's "
                              "(32, 32, 3, N) images with N labels; re-download it")
        return Part(x, y)

    return RawImages(part(files[0]), part(files[1]), files, [str(d) for d in range(10)])


def read_celeba(directory: Path, progress: Callable | None = None, size: int | None = None,
                channels: int | None = None) -> RawImages:
    """``celeba/img_align_celeba/*.jpg`` with ``list_eval_partition.txt`` (0 train, 1 val, 2 test); no class
    labels (the 40 attributes are not classes). The official validation part joins the training pool."""
    root = directory / "celeba" if (directory / "celeba").is_dir() else directory
    images, partition = root / "img_align_celeba", root / "list_eval_partition.txt"
    if not images.is_dir() or not partition.is_file():
        raise FileNotFoundError(f"{root}: missing img_align_celeba/ or list_eval_partition.txt")
    train, test = [], []
    for line_no, line in enumerate(partition.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            name, part = line.split()
            (test if int(part) == 2 else train).append(images / name)
        except ValueError:
            raise SourceError(f"{partition}:{line_no}: expected 'FILE PARTITION', got {line!r}") from None
    # Converted as read: the 202,599 faces are 23 GB at 178×218, 2.5 GB at 64×64.
    read = _read_files(train + test, progress, size, channels)
    return RawImages(Part(read[: len(train)], None), Part(read[len(train):], None), [partition, *train, *test])


def stat_signature(path: Path) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def relative_name(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.as_posix()


# --- conversion ----------------------------------------------------------------------------------
def convert(image: np.ndarray, size: int | None, channels: int | None) -> np.ndarray:
    """(C, H, W) uint8 → `channels` (1: ITU-R 601 luma, as PIL's "L"; 3: grey repeated) and, with `size`,
    the shorter side resized to `size` (bilinear, antialiased) and the centre cropped to size × size."""
    from PIL import Image

    c = image.shape[0]
    if (channels in (None, c)) and (size is None or image.shape[1:] == (size, size)):
        return image
    img = Image.fromarray(image[0] if c == 1 else image.transpose(1, 2, 0))
    if channels and channels != c:
        img = img.convert("L" if channels == 1 else "RGB")
    if size is not None and img.size != (size, size):
        w, h = img.size
        scale = size / min(w, h)
        new = (max(size, round(w * scale)), max(size, round(h * scale)))
        img = img.resize(new, Image.BILINEAR)
        left, top = (new[0] - size) // 2, (new[1] - size) // 2
        img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _stack(images, size: int | None, channels: int, where: str, side_range: tuple[int, int]) -> np.ndarray:
    if isinstance(images, np.ndarray) and images.shape[1] == channels and (size is None or images.shape[2:] == (size, size)):
        out = images  # already as asked (IDX files, arrays): no per-image work
    else:
        out_list = [convert(im, size, channels) for im in images]
        shapes: dict[tuple, int] = {}
        for i, im in enumerate(out_list):
            shapes.setdefault(im.shape[1:], i)
        if len(shapes) > 1:
            (a, i), (b, j) = list(shapes.items())[:2]
            side = min(max(min(a + b), side_range[0]), side_range[1])
            raise SourceError(f"{where}: images differ in size (image {i} is {a[0]}×{a[1]}, image {j} is {b[0]}×{b[1]}); "
                              f"set data.image_size (e.g. {side}) to resize and centre-crop them all to one square size")
        out = np.stack(out_list)
    lo, hi = side_range
    h, w = out.shape[2:]
    if not (lo <= h <= hi and lo <= w <= hi):
        raise SourceError(f"{where}: images are {h}×{w}; the models take sides from {lo} to {hi} pixels. Set "
                          f"data.image_size (e.g. {min(max(min(h, w), lo), hi)}) to resize and centre-crop them")
    return out


def _has_colour(part: Part) -> bool:
    if isinstance(part.images, np.ndarray):
        return part.images.shape[1] == 3
    return any(im.shape[0] == 3 for im in part.images)


def conform(raw: RawImages, size: int | None, channels: int | None, side_range: tuple[int, int],
            where: str) -> tuple[Part, Part | None, list[str] | None]:
    """The source's images at one shape (N, C, H, W) and its labels as 0 … K − 1 (class names kept, or the
    original label values as names where they were not already 0 … K − 1)."""
    parts = [raw.train] + ([raw.test] if raw.test is not None else [])
    if channels is None:  # grey unless some image has colour
        channels = 3 if any(_has_colour(p) for p in parts) else 1
    for name, p in zip(("training", "test"), parts):
        if len(p.images) == 0:
            raise SourceError(f"{where}: the {name} part has no images" if len(parts) == 2 else f"{where} has no images")
    stacked = [_stack(p.images, size, channels, where, side_range) for p in parts]
    if len(stacked) == 2 and stacked[0].shape[1:] != stacked[1].shape[1:]:
        raise SourceError(f"{where}: training images are {stacked[0].shape[2]}×{stacked[0].shape[3]} and test images "
                          f"{stacked[1].shape[2]}×{stacked[1].shape[3]}; set data.image_size to give them one size")
    classes = raw.classes
    labelled = [p.labels is not None for p in parts]
    if any(labelled) and not all(labelled):
        raise SourceError(f"{where}: the training images have labels and the test images do not (or the reverse)")
    labels = [p.labels for p in parts]
    values = np.unique(np.concatenate(labels)) if all(labelled) else np.zeros(0)
    if all(labelled) and len(values) < 2:
        # One class is no labelling: a classifier's loss on it is 0 at any weights, so its features would be
        # an untrained network's. Treated as unlabelled (pipeline.evaluate reports class features unavailable).
        raw.notes.append(f"every image has the same label ({(classes or [str(values[0])])[0]!r}): one class is "
                         "treated as no labels")
        labels, labelled = [None] * len(parts), [False] * len(parts)
    if all(labelled):
        if classes is None or len(classes) < len(values):
            if not np.array_equal(values, np.arange(len(values))):
                labels = [np.searchsorted(values, y).astype(np.int64) for y in labels]
            classes = [str(v) for v in values] if classes is None else classes
    else:
        classes = None
    out = [Part(x, y) for x, y in zip(stacked, labels)]  # type: ignore[arg-type]
    return out[0], (out[1] if len(out) == 2 else None), classes
