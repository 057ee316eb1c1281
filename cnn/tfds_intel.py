"""A tensorflow-datasets builder for the Intel scenes, read from its manual dir, used as numpy.

    splits = load_tfds("path/to/manual_dir")          # -> cnn.data.Splits of numpy arrays

The manual dir holds either one .npz in the homework's format or the original Kaggle folders
``seg_train/`` and ``seg_test/`` (read by :mod:`cnn.data`). The builder writes ``array_record``
files with plain uint8 tensor features, so neither preparing nor reading needs TensorFlow
(``tfds.features.Image`` would: it encodes PNGs with TensorFlow). Prepared data is cached under
``data_dir`` in a folder keyed by the manual dir's path and its files' sizes and times, so a
changed source is prepared again rather than read stale.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from cnn.data import CLASS_NAMES, IMAGE_SHAPE, DataError, Split, Splits, load_kaggle, load_npz

TFDS_SPLITS = {"train": "train", "val": "validation", "test": "test"}


def _source(manual_dir: Path) -> Path:
    """The manual dir itself where it holds Kaggle's ``seg_train/``, else its one .npz; a
    one-line :class:`DataError` otherwise (checked before TFDS starts preparing)."""
    if (manual_dir / "seg_train").is_dir():
        return manual_dir
    files = sorted(manual_dir.glob("*.npz"))
    if len(files) != 1:
        raise DataError(
            f"{manual_dir}: expected seg_train/ and seg_test/ folders or exactly one .npz, found {len(files)} .npz files"
        )
    return files[0]


def read_manual_dir(manual_dir: Path) -> Splits:
    """The Kaggle folders if ``seg_train/`` is there, else the single .npz in the folder."""
    source = _source(manual_dir)
    return load_kaggle(source) if source.is_dir() else load_npz(source)


class IntelScenes(tfds.core.GeneratorBasedBuilder):
    """Intel Image Classification scenes, 48x48x3 uint8, 6 classes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "48x48 scenes from the homework's .npz or the Kaggle JPEG folders."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put in the manual dir either the homework's intel_landscapes.npz (keys train_images, "
        "train_labels, val_*, test_*) or Kaggle's seg_train/ and seg_test/ folders."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Intel Image Classification scenes resized to 48x48 (IST DL 2024-25 Homework 2).",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8),
                "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
            }),
            supervised_keys=("image", "label"),
            homepage="https://www.kaggle.com/datasets/puneet6060/intel-image-classification",
            disable_shuffling=True,  # keep the source's order, so TFDS and direct reads agree
        )

    def _split_generators(self, dl_manager):
        splits = read_manual_dir(Path(dl_manager.manual_dir))
        return {
            TFDS_SPLITS[name]: self._generate_examples(split)
            for name, split in (("train", splits.train), ("val", splits.val), ("test", splits.test))
            if split is not None
        }

    def _generate_examples(self, split: Split):
        for i in range(len(split)):
            yield i, {"image": split.images[i], "label": int(split.labels[i])}


def _fingerprint(manual_dir: Path) -> str:
    digest = hashlib.sha1(str(manual_dir.resolve()).encode())
    for path in sorted(manual_dir.rglob("*")):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.relative_to(manual_dir)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:12]


def load_tfds(manual_dir: str | Path, data_dir: str | Path = Path.home() / "tensorflow_datasets") -> Splits:
    """Prepare (once per source) and read every split back as numpy arrays."""
    manual_dir = Path(manual_dir)
    if not manual_dir.is_dir():
        raise DataError(f"{manual_dir}: no such folder (the TFDS manual dir: one .npz or seg_train/ and seg_test/)")
    _source(manual_dir)
    builder = IntelScenes(data_dir=str(Path(data_dir) / f"intel_scenes_{_fingerprint(manual_dir)}"),
                          file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    sources = builder.as_data_source()
    out = {}
    for name, tfds_name in TFDS_SPLITS.items():
        if tfds_name not in sources:
            out[name] = None
            continue
        records = sources[tfds_name].__getitems__(range(len(sources[tfds_name])))
        images = np.stack([r["image"] for r in records]) if records else np.zeros((0, *IMAGE_SHAPE), np.uint8)
        out[name] = Split(images, np.asarray([r["label"] for r in records], np.int32))
    return Splits(**out)
