"""The embedded digits and the image-folder loader of ``finetune``."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from dropblock_inject.errors import DropBlockInjectError
from dropblock_inject.train.data import (
    DataError,
    digits_splits,
    image_folder_splits,
    load_digits,
    load_splits,
    stratified_split,
)


def make_image_folder(root: Path, classes: dict[str, int], size: int = 12) -> Path:
    """``root/<class>/<i>.png``: ``classes[name]`` small RGB images per class."""
    for c, (name, n) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (size, size), (20 * c, 10 * i, 100)).save(root / name / f"{i}.png")
    return root


class TestDigits:
    def test_arrays(self) -> None:
        images, labels = load_digits()
        assert images.shape == (1797, 8, 8) and str(images.dtype) == "uint8"
        assert labels.shape == (1797,) and int(images.min()) == 0 and int(images.max()) == 16
        assert sorted(Counter(labels.tolist())) == list(range(10))
        assert min(Counter(labels.tolist()).values()) >= 170

    def test_split_shapes_and_classes(self) -> None:
        s = digits_splits(32)
        assert (len(s.train), len(s.val)) == (1438, 359)
        assert s.classes == [str(i) for i in range(10)]
        image, label = s.val[0]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and isinstance(label, int)
        val_counts = Counter(s.val[i][1] for i in range(len(s.val)))
        assert set(val_counts) == set(range(10)) and all(34 <= n <= 37 for n in val_counts.values())
        assert "CC BY 4.0" in s.source

    def test_split_is_deterministic_and_disjoint(self) -> None:
        a, b = digits_splits(16, augment=False), digits_splits(16, augment=False)
        assert torch.equal(a.val.images, b.val.images) and torch.equal(a.train.labels, b.train.labels)
        labels = load_digits()[1].tolist()
        train, val = stratified_split(labels)
        assert not set(train) & set(val) and len(train) + len(val) == len(labels)
        assert (train, val) == stratified_split(labels)

    def test_normalised_like_imagenet(self) -> None:
        image = digits_splits(16).val[0][0]
        background = image[:, 0, 0]  # an empty corner: 0 before normalisation
        expected = -torch.tensor([0.485, 0.456, 0.406]) / torch.tensor([0.229, 0.224, 0.225])
        assert torch.allclose(background, expected, atol=1e-5)

    def test_augmentation_shifts_training_images_only(self) -> None:
        s = digits_splits(16)
        torch.manual_seed(0)
        views = [s.train[0][0] for _ in range(8)]
        assert any(not torch.equal(views[0], v) for v in views[1:])
        assert torch.equal(s.val[0][0], s.val[0][0])

    def test_too_small(self) -> None:
        with pytest.raises(DataError, match="at least 8"):
            digits_splits(4)


class TestStratifiedSplit:
    def test_each_class_keeps_one_of_each(self) -> None:
        train, val = stratified_split([0, 0, 1, 1, 1, 2])
        assert sorted(train + val) == list(range(6))
        assert 5 in train  # a class of one image stays in training
        assert {0, 1} & set(val) and {2, 3, 4} & set(val)

    def test_bad_fraction(self) -> None:
        with pytest.raises(DataError, match="val_fraction"):
            stratified_split([0, 1], val_fraction=1.0)


class TestImageFolder:
    def test_split_of_one_folder(self, tmp_path: Path) -> None:
        root = make_image_folder(tmp_path / "imgs", {"cat": 5, "dog": 5, "fox": 4})
        s = image_folder_splits(root, size=8)
        assert s.classes == ["cat", "dog", "fox"]
        assert (len(s.train), len(s.val)) == (11, 3)
        image, label = s.train[0]
        assert image.shape == (3, 8, 8) and label in (0, 1, 2)
        assert load_splits(root, 8).classes == s.classes

    def test_train_and_val_subfolders(self, tmp_path: Path) -> None:
        make_image_folder(tmp_path / "train", {"a": 3, "b": 3})
        make_image_folder(tmp_path / "val", {"a": 1, "b": 2})
        s = image_folder_splits(tmp_path, size=8)
        assert (len(s.train), len(s.val), s.classes) == (6, 3, ["a", "b"])
        assert s.val[2][0].shape == (3, 8, 8)

    @pytest.mark.parametrize(
        ("layout", "message"),
        [
            ({}, "does not exist"),
            ({"only": 3}, "at least 2"),
            ({"empty": 0}, "data folder"),
        ],
    )
    def test_unusable_folders(self, tmp_path: Path, layout: dict, message: str) -> None:
        root = tmp_path / "data"
        if layout:
            root.mkdir()
            for name, n in layout.items():
                make_image_folder(root, {name: n}) if n else (root / name).mkdir()
        with pytest.raises(DataError, match=message) as exc:
            image_folder_splits(root, size=8)
        assert isinstance(exc.value, DropBlockInjectError) and isinstance(exc.value, ValueError)
        assert "\n" not in str(exc.value)

    def test_train_and_val_with_other_classes(self, tmp_path: Path) -> None:
        make_image_folder(tmp_path / "train", {"a": 2, "b": 2})
        make_image_folder(tmp_path / "val", {"a": 1, "c": 1})
        with pytest.raises(DataError, match="different classes"):
            image_folder_splits(tmp_path, size=8)
