"""The two data sources of ``train.py``: scikit-learn's digits (no download) and a folder of
images with one subfolder per class.

Both give ``(train, val, classes)``: map-style datasets of ``(Tensor[3, S, S] in [0, 1], label)``
(the models take ``/255`` inputs, no mean/std normalisation, as the released checkpoints do).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLIT_SEED = 0  # the held-out split is fixed: it does not move with --seed


class DataError(ValueError):
    """A data source that cannot be used; the message says what is wrong and where."""


class TensorImages(Dataset):
    """Small images kept as ``uint8`` or float ``Tensor[N, C, h, w]``, resized on access to
    ``Tensor[3, size, size]`` (bilinear; one channel is repeated to three)."""

    def __init__(self, images: Tensor, labels: Tensor, size: int) -> None:
        self.images, self.labels, self.size = images, labels, size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x = F.interpolate(self.images[i : i + 1].float(), size=(self.size, self.size),
                          mode="bilinear", align_corners=False)[0]
        return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x, int(self.labels[i])


def split(n: int, val_fraction: float) -> tuple[Tensor, Tensor]:
    """A fixed random split of ``range(n)`` into (train, val) indices."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_val = max(1, round(n * val_fraction))
    return order[n_val:], order[:n_val]


def digits(size: int, val_fraction: float = 0.2) -> tuple[Dataset, Dataset, list[str]]:
    """scikit-learn's ``load_digits``: 1,797 real 8×8 grey images of 10 digits (values 0..16),
    scaled to [0, 1], upsampled to ``size``×``size`` and made 3-channel; ``val_fraction`` of
    them held out (a fixed split)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digits data set needs scikit-learn: pip install scikit-learn "
                        "(or train on your own images with --data-dir)") from None
    d = load_digits()
    images = torch.from_numpy(d.images).float().div_(16.0).unsqueeze(1)  # [1797, 1, 8, 8]
    labels = torch.from_numpy(d.target).long()
    tr, va = split(len(labels), val_fraction)
    return (TensorImages(images[tr], labels[tr], size), TensorImages(images[va], labels[va], size),
            [str(c) for c in range(10)])


def _class_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        raise DataError(f"--data-dir {str(root)!r} is not a directory")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        loose = [p.name for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS]
        hint = (f" (it holds {len(loose)} image file(s) directly: move them into one subfolder "
                "per class)") if loose else ""
        raise DataError(f"--data-dir {str(root)!r} has no class subfolders{hint}; expected "
                        f"{root}/<class name>/<image files>")
    return classes


def _scan(root: Path, classes: list[str]) -> list[tuple[Path, int]]:
    samples, empty = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            empty.append(name)
        samples += [(p, label) for p in files]
    if empty:
        raise DataError(f"class folder(s) without images ({', '.join(IMAGE_EXTENSIONS)}) in "
                        f"{str(root)!r}: {', '.join(empty[:10])}")
    return samples


class ImageFolder(Dataset):
    """``root/<class>/<image>`` read with PIL, converted to RGB and resized to ``size``×``size``."""

    def __init__(self, samples: list[tuple[Path, int]], size: int) -> None:
        self.samples, self.size = samples, size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        from PIL import Image

        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB").resize((self.size, self.size), Image.Resampling.BILINEAR)
                data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        except OSError as e:
            raise DataError(f"cannot read image {str(path)!r}: {e}") from None
        return data.view(self.size, self.size, 3).permute(2, 0, 1).float().div_(255.0), label


def image_folder(root: str | os.PathLike, size: int, val_fraction: float = 0.2
                 ) -> tuple[Dataset, Dataset, list[str]]:
    """A folder of images, one subfolder per class. ``root/train`` and ``root/val`` (each with
    the same class subfolders) are used as they are; otherwise ``val_fraction`` of the images is
    held out (a fixed split)."""
    root = Path(root)
    train_dir, val_dir = root / "train", root / "val"
    if train_dir.is_dir() and val_dir.is_dir():
        classes = [p.name for p in _class_folders(train_dir)]
        val_classes = [p.name for p in _class_folders(val_dir)]
        if val_classes != classes:
            raise DataError(f"{str(val_dir)!r} and {str(train_dir)!r} have different class "
                            f"subfolders: {val_classes} vs {classes}")
        return (ImageFolder(_scan(train_dir, classes), size),
                ImageFolder(_scan(val_dir, classes), size), classes)
    classes = [p.name for p in _class_folders(root)]
    if len(classes) < 2:
        raise DataError(f"--data-dir {str(root)!r} has one class subfolder ({classes[0]}); a "
                        "classifier needs at least two")
    samples = _scan(root, classes)
    tr, va = split(len(samples), val_fraction)
    return (ImageFolder([samples[i] for i in tr], size),
            ImageFolder([samples[i] for i in va], size), classes)
