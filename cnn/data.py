"""Intel Image Classification scenes: the homework's .npz and the original Kaggle folders.

Both sources become a :class:`Splits` of uint8 NHWC ``(n, 48, 48, 3)`` images and int32 labels
0..5 (buildings, forest, glacier, mountain, sea, street). Anything malformed raises
:class:`DataError` with a one-line message naming the problem and the expected format.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnn.model import IMAGE_SHAPE, NUM_CLASSES
from common.npz import Npz, NpzError

CLASS_NAMES = ("buildings", "forest", "glacier", "mountain", "sea", "street")
SPLITS = ("train", "val", "test")
NPZ_FORMAT = (
    "an .npz with train_images/train_labels, val_images/val_labels, test_images/test_labels; "
    "uint8 images (n, 48, 48, 3), integer labels 0..5"
)
DEFAULT_NPZ = Path(__file__).resolve().parents[2] / "shared" / "data" / "intel" / "intel_landscapes_48.npz"


class DataError(ValueError):
    """The data on disk is missing or not in the expected format."""


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (n, 48, 48, 3) uint8
    labels: np.ndarray  # (n,) int32
    files: np.ndarray | None = None  # (n,) str: each image's source file, where the data names them

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Splits:
    train: Split | None
    val: Split | None
    test: Split | None


def _exact_uint8(path: Path, name: str, images: np.ndarray) -> np.ndarray:
    """Non-uint8 pixels converted to uint8 only where that loses nothing: integers (or integral
    floats) in 0..255. Anything else (e.g. floats in [0, 1], which a cast would flatten to 0 and
    1) is refused with a one-line :class:`DataError`."""
    if not (np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)):
        raise DataError(f"{path}: {name}_images has dtype {images.dtype}, expected uint8 pixels 0..255")
    if images.size and (not np.all(np.isfinite(images)) or images.min() < 0 or images.max() > 255
                        or not np.array_equal(images, np.round(images))):
        low, high = (images.min(), images.max()) if images.size else (0, 0)
        hint = "; floats in [0, 1]? multiply by 255 and round to uint8" if high <= 1 else ""
        raise DataError(f"{path}: {name}_images ({images.dtype}, {low}..{high}) are not whole pixel values "
                        f"0..255, expected uint8{hint}")
    return images.astype(np.uint8)


def _check_split(path: Path, name: str, images: np.ndarray, labels: np.ndarray, files=None) -> Split:
    if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"{path}: {name}_images has shape {images.shape}, expected (n, 48, 48, 3) NHWC")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{path}: {name}_labels has shape {labels.shape}, expected ({len(images)},)")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: {name}_labels has dtype {labels.dtype}, expected integers 0..5")
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataError(f"{path}: {name}_labels range over {labels.min()}..{labels.max()}, expected 0..5")
    if images.dtype != np.uint8:
        images = _exact_uint8(path, name, images)
    if files is not None and (files.ndim != 1 or len(files) != len(images)):
        files = None  # names that do not match the images one to one are ignored
    return Split(np.ascontiguousarray(images), labels.astype(np.int32), None if files is None else files.astype(str))


def load_npz(path: str | Path, required: tuple[str, ...] = SPLITS) -> Splits:
    """Read the homework's .npz. Splits in ``required`` must be present; others are loaded if there."""
    path = Path(path)
    try:
        data = Npz(path, NPZ_FORMAT)
    except NpzError as err:
        raise DataError(str(err)) from None
    keys = set(data.files)
    splits = {}
    with data:
        for name in SPLITS:
            wanted = {f"{name}_images", f"{name}_labels"}
            if wanted <= keys:
                try:  # each array is read (and checked) here, not lazily later
                    arrays = [data[f"{name}_{part}"] for part in ("images", "labels", "files") if f"{name}_{part}" in keys]
                except NpzError as err:
                    raise DataError(f"{path}: the {name} arrays cannot be read ({err.reason}); "
                                    f"expected {NPZ_FORMAT}") from None
                splits[name] = _check_split(path, name, *arrays)
            elif name in required:
                missing = ", ".join(sorted(wanted - keys))
                raise DataError(f"{path}: missing {missing} (found {', '.join(sorted(keys)) or 'nothing'}); expected {NPZ_FORMAT}")
            else:
                splits[name] = None
    return Splits(**splits)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")  # unsigned 16-bit grey: 0..65535


def rgb8(img, file):
    """A Pillow image of any mode -> an 8-bit RGB image of the same size (``file`` names it in errors).

    16-bit grey (``I;16*``, what Pillow opens a 16-bit greyscale PNG as) is scaled by
    255 / 65535 and rounded; Pillow's own conversion clips it at 255 instead, which turns a
    scene almost white. Alpha is dropped (the stored colours are kept). 32-bit integer (``I``)
    and float (``F``) pixels carry no known scale, and some modes have no conversion to RGB:
    those raise :class:`DataError` naming the file and its mode.
    """
    from PIL import Image

    if img.mode in SIXTEEN_BIT_MODES:
        grey = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.round(grey * (255 / 65535)).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("I", "F"):
        kind = "32-bit integer" if img.mode == "I" else "floating-point"
        raise DataError(f"{file}: {kind} pixels (Pillow mode {img.mode}) with no known scale; "
                        "expected 8-bit (or 16-bit) images: convert it to 8-bit RGB")
    try:
        return img.convert("RGB")
    except ValueError as err:  # e.g. La (premultiplied alpha), which Pillow cannot convert
        raise DataError(f"{file}: Pillow mode {img.mode} cannot be converted to RGB ({err})") from None


def _read_folder(root: Path, log=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A folder of class sub-folders of images -> 48x48 uint8 images (Lanczos), labels and file
    names (``<folder>/<class>/<file>``). Extensions match in any case (.jpg, .JPG, .Jpeg, ...);
    hidden files are skipped; ``log`` gets one line of what was read and skipped."""
    from PIL import Image

    # Kaggle's archive nests seg_train/seg_train/<class>; accept either depth.
    if not any((root / c).is_dir() for c in CLASS_NAMES) and (root / root.name).is_dir():
        root = root / root.name
    images, labels, files = [], [], []
    read, hidden, other = Counter(), 0, Counter()
    for label, name in enumerate(CLASS_NAMES):
        folder = root / name
        if not folder.is_dir():
            raise DataError(f"{root}: no {name}/ sub-folder; expected one folder of JPEGs per class {CLASS_NAMES}")
        for file in sorted(folder.iterdir()):
            if file.name.startswith("."):
                hidden += 1
                continue
            if not file.is_file() or file.suffix.lower() not in IMAGE_SUFFIXES:
                other[file.suffix or "(none)"] += 1
                continue
            try:
                with Image.open(file) as img:
                    img = rgb8(img, file).resize(IMAGE_SHAPE[:2], Image.Resampling.LANCZOS)
            except OSError as err:
                raise DataError(f"{file}: not a readable image ({err})") from None
            images.append(np.asarray(img, dtype=np.uint8))
            labels.append(label)
            files.append(f"{root.name}/{name}/{file.name}")
            read[file.suffix] += 1
    if not images:
        raise DataError(f"{root}: no images (.jpg, .jpeg, .png in any case) found under the class folders")
    if log is not None:
        kinds = ", ".join(f"{n} {suffix}" for suffix, n in sorted(read.items()))
        skipped = [f"{hidden} hidden"] if hidden else []
        skipped += [f"{n} {suffix}" for suffix, n in sorted(other.items())]
        log(f"{root}: read {len(images)} images ({kinds})" + (f"; skipped {', '.join(skipped)}" if skipped else ""))
    return np.stack(images), np.asarray(labels, dtype=np.int32), np.asarray(files)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held_out): ``fraction`` of every class held out, chosen by a seeded shuffle."""
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        held.append(idx[: int(round(fraction * len(idx)))])
    held_out = np.sort(np.concatenate(held))
    keep = np.setdiff1d(np.arange(len(labels)), held_out)
    return keep, held_out


def load_kaggle(root: str | Path, val_fraction: float = 0.1, seed: int = 0, log=None) -> Splits:
    """The original Kaggle layout: ``root/seg_train/<class>/*.jpg`` and ``root/seg_test/<class>/*.jpg``.

    Validation is a stratified, seeded ``val_fraction`` of seg_train.
    """
    root = Path(root)
    if not (root / "seg_train").is_dir():
        raise DataError(f"{root}: no seg_train/ folder (expected the Kaggle layout seg_train/<class>/*.jpg, seg_test/...)")
    images, labels, files = _read_folder(root / "seg_train", log)
    keep, held = stratified_split(labels, val_fraction, seed)
    test = Split(*_read_folder(root / "seg_test", log)) if (root / "seg_test").is_dir() else None
    return Splits(Split(images[keep], labels[keep], files[keep]), Split(images[held], labels[held], files[held]), test)


def load(path: str | Path, required: tuple[str, ...] = SPLITS, tfds_dir: str | Path | None = None, log=None) -> Splits:
    """An .npz file or a Kaggle folder, by what ``path`` is; ``tfds:DIR`` goes through the
    tensorflow-datasets builder with manual dir DIR (:mod:`cnn.tfds_intel`), cached in
    ``tfds_dir``. Raises :class:`DataError` when a split in ``required`` is missing."""
    if str(path).startswith("tfds:"):
        from cnn.tfds_intel import load_tfds

        splits = load_tfds(str(path)[len("tfds:") :], *(() if tfds_dir is None else (tfds_dir,)))
    elif Path(path).is_dir():
        splits = load_kaggle(path, log=log)
    else:
        return load_npz(path, required)
    missing = [name for name in required if getattr(splits, name) is None]
    if missing:
        raise DataError(f"{path}: no {', '.join(missing)} split (a Kaggle folder needs seg_test/ for the test split)")
    return splits


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [0, 1] (what the homework's loader fed the network)."""
    return images.astype(np.float32) / 255.0


@dataclass(frozen=True)
class Duplicates:
    """Groups of byte-identical images across a data set's splits (what :func:`find_duplicates` found)."""

    groups: int  # groups of two or more identical images
    images: int  # images in those groups
    across_splits: int  # groups with images in more than one split
    conflicting: int  # groups whose labels disagree
    examples: tuple[str, ...]  # a few groups, each "file (split, class) = file (split, class)"

    def summary(self) -> str | None:
        """One line for the log; None where there are no duplicates."""
        if not self.groups:
            return None
        return (f"note: {self.groups} groups of identical images ({self.images} images; {self.across_splits} "
                f"span more than one split, {self.conflicting} carry conflicting labels), kept as they are; e.g. "
                + "; ".join(self.examples))


def find_duplicates(splits: Splits, shown: int = 3) -> Duplicates:
    """Byte-identical images within and across the splits of ``splits``, without changing them.
    The examples prefer groups that span splits or disagree on the label; images are named by
    their source file where the split has ``files``, else by split and index."""
    parts = [(name, split) for name in SPLITS if (split := getattr(splits, name)) is not None and len(split)]
    if not parts:
        return Duplicates(0, 0, 0, 0, ())
    images = np.concatenate([split.images.reshape(len(split), -1) for _, split in parts])
    rows = np.ascontiguousarray(images).view(np.dtype((np.void, images.shape[1])))[:, 0]
    _, inverse, counts = np.unique(rows, return_inverse=True, return_counts=True)
    where = [(name, i) for name, split in parts for i in range(len(split))]
    labels = np.concatenate([split.labels for _, split in parts])
    members: dict[int, list[int]] = {}
    for k in np.flatnonzero(counts[inverse] > 1):
        members.setdefault(int(inverse[k]), []).append(int(k))
    groups = list(members.values())
    spans = [len({where[k][0] for k in g}) > 1 for g in groups]
    conflicts = [len({int(labels[k]) for k in g}) > 1 for g in groups]

    def name(k: int) -> str:
        split_name, i = where[k]
        files = getattr(splits, split_name).files
        place = files[i] if files is not None else f"{split_name}[{i}]"
        return f"{place} ({split_name}, {CLASS_NAMES[labels[k]]})"

    order = sorted(range(len(groups)), key=lambda j: (not (spans[j] and conflicts[j]), not conflicts[j], not spans[j]))
    examples = tuple(" = ".join(name(k) for k in groups[j]) for j in order[:shown])
    return Duplicates(len(groups), sum(map(len, groups)), sum(spans), sum(conflicts), examples)
