"""Data for ``finetune``: the embedded 8x8 digits, or an image folder.

Both give a :class:`Splits`: a training and a validation ``Dataset`` of ``(image, label)`` with
images ``(3, S, S)`` float32, normalised with the ImageNet mean and std (what pretrained
backbones expect), and the class names.

- :func:`digits_splits`: the 1797 handwritten digits shipped in ``data/digits.npz`` (UCI
  "Optical Recognition of Handwritten Digits", CC BY 4.0; see ``data/README.md``), upsampled
  from 8x8 to ``S`` px, in a fixed stratified 80/20 split.
- :func:`image_folder_splits`: a folder of one subfolder per class (torchvision's
  ``ImageFolder``); with ``train/`` and ``val/`` subfolders those are the splits, otherwise a
  fixed stratified split of the whole folder.
"""

from __future__ import annotations

import importlib.resources
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from dropblock_inject.errors import DropBlockInjectError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DataError",
    "Splits",
    "digits_splits",
    "few_per_class",
    "image_folder_splits",
    "load_digits",
    "load_splits",
    "stratified_split",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLIT_SEED = 0  # the validation split never depends on the training seed
VAL_DIRS = ("val", "valid", "validation")


class DataError(DropBlockInjectError, ValueError):
    """The data set is missing or unusable (the message names the path and what is wrong)."""


@dataclass
class Splits:
    """A training and a validation set with their class names.

    Attributes:
        train: ``(image (3, S, S) float32, label int)`` items.
        val: The same, without augmentation.
        classes: Class names; label ``i`` is ``classes[i]``.
        source: Where the data came from, for printing.
    """

    train: Dataset
    val: Dataset
    classes: list[str]
    source: str


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The embedded digits: images ``(1797, 8, 8)`` uint8 in 0..16 and labels ``(1797,)`` uint8.

    Example:
        >>> images, labels = load_digits()
        >>> images.shape, int(images.max()), len(set(labels.tolist()))
        ((1797, 8, 8), 16, 10)
    """
    path = importlib.resources.files("dropblock_inject").joinpath("data", "digits.npz")
    with path.open("rb") as f, np.load(f) as arrays:
        return arrays["images"], arrays["labels"]


def stratified_split(
    labels: Sequence[int], val_fraction: float = 0.2, seed: int = SPLIT_SEED
) -> tuple[list[int], list[int]]:
    """Indices ``(train, val)``: ``val_fraction`` of each class (at least one when it has two), shuffled by ``seed``.

    Example:
        >>> train, val = stratified_split([0] * 10 + [1] * 5)
        >>> len(train), len(val), sorted(set(train) | set(val)) == list(range(15))
        (12, 3, True)
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    gen = torch.Generator().manual_seed(seed)
    labels_t = torch.as_tensor(list(labels))
    train: list[int] = []
    val: list[int] = []
    for cls in torch.unique(labels_t).tolist():
        idx = torch.nonzero(labels_t == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)].tolist()
        n_val = min(max(round(len(idx) * val_fraction), 1), len(idx) - 1) if len(idx) > 1 else 0
        val += idx[:n_val]
        train += idx[n_val:]
    return sorted(train), sorted(val)


class _TensorImages(Dataset):
    """Grey images ``(N, 1, S, S)`` in ``[0, 1]`` served as normalised ``(3, S, S)``, optionally shifted."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, max_shift: int = 0) -> None:
        self.images, self.labels, self.max_shift = images, labels, max_shift
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.images[i]
        if self.max_shift:
            image = _shift(image, *torch.randint(-self.max_shift, self.max_shift + 1, (2,)).tolist())
        return (image - self.mean) / self.std, int(self.labels[i])


def _shift(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``image`` ``(C, H, W)`` moved by ``(dy, dx)`` pixels, the uncovered border filled with 0."""
    h, w = image.shape[-2:]
    padded = F.pad(image, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)))
    top, left = max(-dy, 0), max(-dx, 0)
    return padded[..., top : top + h, left : left + w]


def digits_splits(size: int = 64, val_fraction: float = 0.2, *, augment: bool = True) -> Splits:
    """The embedded digits, upsampled to ``size`` px, in a fixed stratified split.

    Args:
        size: Side of the square images (bilinear upsampling of the 8x8 originals).
        val_fraction: Fraction of each class held out.
        augment: Shift each training image at random by up to one original pixel in each
            direction (the uncovered border is blank).

    Example:
        >>> s = digits_splits(32)
        >>> len(s.train), len(s.val), s.train[0][0].shape, s.classes[:3]
        (1438, 359, torch.Size([3, 32, 32]), ['0', '1', '2'])
    """
    if size < 8:
        raise DataError(f"input size must be at least 8 px for the 8x8 digits, got {size}")
    images, labels = load_digits()
    x = torch.from_numpy(images).float().div_(16.0).unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    y = torch.from_numpy(labels.astype(np.int64))
    train, val = stratified_split(y.tolist(), val_fraction)
    shift = size // 8 if augment else 0
    return Splits(
        train=_TensorImages(x[train], y[train], shift),
        val=_TensorImages(x[val], y[val]),
        classes=[str(c) for c in range(10)],
        source=f"embedded digits (UCI, CC BY 4.0): {len(train)} train / {len(val)} val images, 8x8 -> {size}x{size}",
    )


def image_folder_splits(root: str | os.PathLike, size: int = 224, val_fraction: float = 0.2) -> Splits:
    """An ``ImageFolder`` at ``root``: its ``train/`` and ``val/`` subfolders, else a stratified split.

    Training images get ``RandomResizedCrop(size)`` and a horizontal flip; validation images a
    resize to ``size / 0.875`` and a centre crop.

    Raises:
        DataError: ``root`` is not a folder, has no images, or fewer than two classes, or its
            train and val subfolders have different classes.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DataError(f"data folder {root!r} does not exist or is not a folder")
    train_tf, val_tf = _transforms(size)
    train_dir = os.path.join(root, "train")
    val_dir = next((os.path.join(root, d) for d in VAL_DIRS if os.path.isdir(os.path.join(root, d))), None)
    if os.path.isdir(train_dir) and val_dir is not None:
        train, val = _image_folder(train_dir, train_tf), _image_folder(val_dir, val_tf)
        if train.classes != val.classes:
            raise DataError(f"{train_dir!r} and {val_dir!r} have different classes: {train.classes} vs {val.classes}")
        where = f"{train_dir} ({len(train)}) / {val_dir} ({len(val)})"
        return Splits(train, val, list(train.classes), f"image folder {where}, {len(train.classes)} classes")
    base = train_dir if os.path.isdir(train_dir) else root
    full_train, full_val = _image_folder(base, train_tf), _image_folder(base, val_tf)
    train_idx, val_idx = stratified_split(full_train.targets, val_fraction)
    source = f"image folder {base}: {len(train_idx)} train / {len(val_idx)} val images (stratified split)"
    return Splits(Subset(full_train, train_idx), Subset(full_val, val_idx), list(full_train.classes), source)


def _image_folder(path: str, transform: object):  # -> torchvision.datasets.ImageFolder
    from torchvision.datasets import ImageFolder

    try:
        folder = ImageFolder(path, transform=transform)
    except FileNotFoundError as e:  # no class folder, or a class folder without images
        raise DataError(f"data folder {path!r}: {str(e).splitlines()[0]}") from e
    if len(folder.classes) < 2:
        raise DataError(
            f"data folder {path!r} has {len(folder.classes)} class folder(s) {folder.classes}; "
            "fine-tuning a classifier needs at least 2 (one subfolder of images per class)"
        )
    return folder


def _transforms(size: int) -> tuple[object, object]:
    from torchvision import transforms as T

    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    val = T.Compose([T.Resize(round(size / 0.875)), T.CenterCrop(size), T.ToTensor(), normalize])
    return train, val


def load_splits(path: str | os.PathLike | None, size: int, train_per_class: int | None = None) -> Splits:
    """The embedded digits when ``path`` is None, else the image folder at ``path``.

    Args:
        path: An image folder (see :func:`image_folder_splits`), or None for the digits.
        size: Side of the square images.
        train_per_class: Keep only this many training images of each class (a low-data setting;
            the same images whatever the training seed); the validation split stays whole.
    """
    splits = digits_splits(size) if path is None else image_folder_splits(path, size)
    return splits if train_per_class is None else few_per_class(splits, train_per_class)


def few_per_class(splits: Splits, k: int, seed: int = SPLIT_SEED) -> Splits:
    """``splits`` with ``k`` training images per class, drawn by ``seed`` (fixed: the same subset in every run).

    Raises:
        DataError: A class has fewer than ``k`` training images (the message names the smallest).

    Example:
        >>> s = few_per_class(digits_splits(16), 5)
        >>> labels = [y for _, y in s.train]
        >>> len(s.train), len(s.val), [labels.count(c) for c in range(10)] == [5] * 10
        (50, 359, True)
    """
    labels = torch.as_tensor(_labels_of(splits.train))
    gen = torch.Generator().manual_seed(seed)
    keep: list[int] = []
    for cls in range(len(splits.classes)):
        idx = torch.nonzero(labels == cls).flatten()
        if len(idx) < k:
            raise DataError(
                f"train_per_class={k}, but class {splits.classes[cls]!r} has {len(idx)} training images: "
                f"pick at most {min(torch.bincount(labels, minlength=len(splits.classes)).tolist())}"
            )
        keep += idx[torch.randperm(len(idx), generator=gen)[:k]].tolist()
    source = f"{splits.source}; {k} training images per class ({len(keep)} in all)"
    return Splits(Subset(splits.train, sorted(keep)), splits.val, splits.classes, source)


def _labels_of(dataset: Dataset) -> list[int]:
    """The label of every item, read without loading images."""
    if isinstance(dataset, Subset):
        inner = _labels_of(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    if isinstance(dataset, _TensorImages):
        return dataset.labels.tolist()
    return list(dataset.targets)  # torchvision's ImageFolder
