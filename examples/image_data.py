"""Image data for the image-classification examples: every source (scikit-learn's digits, CIFAR-10
from the Hub or local parquet files in its schema, an image folder, plain files) becomes decoded
uint8 tensors kept in memory, augmented and normalised by whole batches.

Shared by ``image_classification.py`` and ``hessian_analysis.py`` (Python puts this folder on the
import path when either script runs).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

logger = logging.getLogger("image_classification")

IMAGE_COLUMNS = ("img", "image", "pixel_values")
PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------------------------------
# Data: every source becomes a datasets.DatasetDict with an image column and an integer label column,
# then goes through the same preprocessing.
# --------------------------------------------------------------------------------------------------


def load_digits_dataset():
    """scikit-learn's 8x8 digits as a ``DatasetDict`` (``img``: 8x8 grayscale PIL image scaled to 0..255,
    ``label``: ClassLabel 0-9), split 75/25 stratified with seed 0 (1347 train / 450 test)."""
    import datasets
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    idx_train, idx_test = train_test_split(np.arange(len(images)), test_size=0.25, random_state=0,
                                           stratify=digits.target)
    features = datasets.Features({"img": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[str(i) for i in range(10)])})

    def split(idx):
        return datasets.Dataset.from_dict(
            {"img": [Image.fromarray(images[i], mode="L") for i in idx], "label": [int(digits.target[i]) for i in idx]},
            features=features)

    return datasets.DatasetDict(train=split(idx_train), test=split(idx_test))


def _file_format(path: str) -> str:
    suffix = "".join(Path(path).suffixes[-2:]).lower()
    for ext, fmt in ((".parquet", "parquet"), (".arrow", "arrow"), (".jsonl", "json"), (".json", "json"),
                     (".csv", "csv")):
        if ext in suffix:
            return fmt
    raise ValueError(f"Cannot tell the format of {path!r}: use .parquet, .arrow, .json/.jsonl or .csv.")


def load_raw_datasets(args):
    """The train/test ``DatasetDict`` for ``args.dataset`` (before preprocessing)."""
    import datasets

    if args.dataset == "digits":
        return load_digits_dataset()
    if args.train_file:  # local copy in the hub's schema: only the loading differs from the hub path
        fmt = _file_format(args.train_file)
        if _file_format(args.test_file) != fmt:
            raise ValueError("--train_file and --test_file must have the same format.")
        return datasets.load_dataset(fmt, data_files={"train": args.train_file, "test": args.test_file})
    if args.dataset == "cifar10":
        return datasets.load_dataset(args.dataset_name)
    if args.dataset == "imagefolder":
        raw = datasets.load_dataset("imagefolder", data_dir=args.data_dir)
        if "test" not in raw:
            raw = raw["train"].train_test_split(test_size=0.2, seed=0, stratify_by_column=args.label_column)
        return raw
    raise ValueError(f"Unknown --dataset {args.dataset!r}.")


def image_column_of(dataset, requested: Optional[str]) -> str:
    if requested:
        if requested not in dataset.column_names:
            raise ValueError(f"--image_column {requested!r} not in the dataset's columns {dataset.column_names}.")
        return requested
    for name in IMAGE_COLUMNS:
        if name in dataset.column_names:
            return name
    raise ValueError(f"No image column among {dataset.column_names}; pass --image_column.")


def to_uint8(image, mode: str, size: Optional[int]) -> torch.Tensor:
    """PIL image -> uint8 tensor ``[C, H, W]`` (``mode`` 'L' or 'RGB', optional square resize)."""
    from PIL import Image

    if image.mode != mode:
        image = image.convert(mode)
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def decode_images(dataset, image_col: str, mode: str, size: Optional[int], desc: str) -> torch.Tensor:
    """Decode every image of a split once: uint8 ``[N, C, H, W]`` (kept in memory; CIFAR-10's
    60,000 images are 184 MB)."""
    from tqdm.auto import tqdm

    column = dataset.select_columns([image_col])
    images = [to_uint8(row[image_col], mode, size)
              for row in tqdm(column, desc=f"decoding {desc}", unit="img", mininterval=5, leave=False)]
    shapes = {tuple(x.shape) for x in images}
    if len(shapes) != 1:
        raise ValueError(f"Images of the {desc} split have different sizes {sorted(shapes)[:4]}...; "
                         "pass --image_size N to resize them to N x N.")
    return torch.stack(images)


def normalize(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, C, H, W]`` -> float ``(x / 255 - mean) / std`` per channel (memory format kept)."""
    return (pixels.float().div_(255.0) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def tensors_of(dataset: "ImageTensorDataset") -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split, normalised: ``pixel_values`` float ``[N, C, H, W]`` and ``labels`` ``[N]``."""
    return normalize(dataset.pixels, dataset.mean, dataset.std), dataset.labels


def crop_flip(pixels: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """The usual CIFAR augmentation on a batch ``[B, C, H, W]``: zero-pad ``pad`` px, crop a random
    ``H x W`` window per image and flip each image horizontally with probability 1/2 (torch's global
    RNG on the batch's device, so it follows ``--seed``). Returns a channels-last tensor."""
    b, _, h, w = pixels.shape
    device = pixels.device
    padded = torch.nn.functional.pad(pixels, (pad, pad, pad, pad)).permute(0, 2, 3, 1)  # [B, H+2p, W+2p, C]
    top = torch.randint(0, 2 * pad + 1, (b, 1), device=device)
    left = torch.randint(0, 2 * pad + 1, (b, 1), device=device)
    flip = torch.rand(b, 1, device=device) < 0.5
    rows = top + torch.arange(h, device=device)
    cols = left + torch.arange(w, device=device)
    cols = torch.where(flip, cols.flip(1), cols)
    out = padded[torch.arange(b, device=device)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)


class ImageTensorDataset(torch.utils.data.Dataset):
    """A decoded split: uint8 ``pixels`` ``[N, C, H, W]`` and ``labels`` ``[N]``, with the
    normalisation statistics. Items are ``{"pixel_values": uint8 [C, H, W], "labels": int64 []}``;
    with ``augment`` every fetched batch goes through :func:`crop_flip` (batched through
    ``__getitems__``, which ``DataLoader`` uses), so evaluation splits are never augmented.
    :class:`ImageCollator` stacks and normalises."""

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                 augment: bool = False):
        self.pixels, self.labels, self.mean, self.std, self.augment = pixels, labels, mean, std, augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices) -> list[dict]:
        index = torch.as_tensor(indices, dtype=torch.long, device=self.pixels.device)
        pixels = self.pixels[index]
        if self.augment:
            pixels = crop_flip(pixels)
        labels = self.labels[index]
        return [{"pixel_values": p, "labels": y} for p, y in zip(pixels, labels)]

    def to(self, device) -> "ImageTensorDataset":
        """The same split with its tensors on ``device`` (GPU preset: no host-to-device copies)."""
        return ImageTensorDataset(*(t.to(device) for t in (self.pixels, self.labels, self.mean, self.std)),
                                  augment=self.augment)


@dataclass
class ImageCollator:
    """Stacks items of an :class:`ImageTensorDataset` and applies :func:`normalize`:
    ``{"pixel_values": float [B, C, H, W], "labels": long [B]}``, channels-last when
    ``channels_last``."""

    mean: torch.Tensor
    std: torch.Tensor
    channels_last: bool = False

    def __call__(self, examples) -> dict:
        pixels = torch.stack([e["pixel_values"] for e in examples])
        labels = torch.stack([torch.as_tensor(e["labels"]) for e in examples]).long()
        pixels = normalize(pixels, self.mean.to(pixels.device), self.std.to(pixels.device))
        pixels = pixels.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        return {"pixel_values": pixels, "labels": labels}


@dataclass
class ImageData:
    """Decoded splits (:class:`ImageTensorDataset`) and what the model needs."""

    train: ImageTensorDataset
    test: ImageTensorDataset
    validation: Optional[ImageTensorDataset]
    num_labels: int
    num_channels: int
    image_size: tuple[int, int]
    id2label: dict[int, str]
    mean: list[float]
    std: list[float]
    augment: bool = False


def saved_normalization(path: Optional[PathLike]) -> Optional[tuple[list[float], list[float]]]:
    """``(image_mean, image_std)`` of the image processor saved in a local model directory, if any."""
    if not path:
        return None
    file = Path(path) / "preprocessor_config.json"
    if not file.is_file():
        return None
    config = json.loads(file.read_text(encoding="utf-8"))
    if "image_mean" in config and "image_std" in config:
        return list(config["image_mean"]), list(config["image_std"])
    return None


def prepare_data(args, normalization_from: Optional[PathLike] = None) -> ImageData:
    """Load ``args.dataset``, carve the validation split, decode every image once into uint8 tensors
    and record the normalisation: the training split's per-channel mean/std (of up to 5,000 images),
    or those of the image processor saved in the model directory ``normalization_from``, so a saved
    model is evaluated with the statistics it was trained with.

    ``args`` needs: ``dataset``, ``dataset_name``, ``train_file``/``test_file``, ``data_dir``,
    ``image_column``, ``label_column``, ``image_size``, ``grayscale``, ``augmentation``,
    ``validation_fraction``, ``max_train_samples``, ``max_eval_samples``, ``seed``."""
    import datasets

    raw = load_raw_datasets(args)
    if "train" not in raw or "test" not in raw:
        raise ValueError(f"The dataset needs 'train' and 'test' splits, got {list(raw)}.")
    train, test = raw["train"], raw["test"]
    image_col = image_column_of(train, args.image_column)
    label_col = args.label_column
    if label_col not in train.column_names:
        raise ValueError(f"--label_column {label_col!r} not in the dataset's columns {train.column_names}.")
    label_feature = train.features[label_col]
    if isinstance(label_feature, datasets.ClassLabel):
        names = label_feature.names
    else:
        names = [str(v) for v in sorted(set(train[label_col]))]
    id2label = dict(enumerate(names))
    if args.max_train_samples:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if args.max_eval_samples:
        test = test.select(range(min(args.max_eval_samples, len(test))))
    validation = None
    if args.validation_fraction > 0:
        stratify = label_col if isinstance(label_feature, datasets.ClassLabel) else None
        parts = train.train_test_split(test_size=args.validation_fraction, seed=args.seed, stratify_by_column=stratify)
        train, validation = parts["train"], parts["test"]

    first = train[0][image_col]
    mode = "L" if getattr(args, "grayscale", False) or first.mode in ("L", "1", "I", "I;16", "F") else "RGB"
    num_channels = 1 if mode == "L" else 3
    size = args.image_size

    def decoded(split, desc: str):
        return decode_images(split, image_col, mode, size, desc), torch.tensor(split[label_col], dtype=torch.long)

    train_pixels, train_labels = decoded(train, "train")
    image_size = tuple(train_pixels.shape[-2:])
    saved = saved_normalization(normalization_from)
    if saved is not None:
        mean, std = torch.tensor(saved[0]), torch.tensor(saved[1])
    else:
        stats = train_pixels[:5000].float().div_(255.0)
        mean = stats.mean(dim=(0, 2, 3))
        std = stats.std(dim=(0, 2, 3)).clamp_min(1e-3)
    augment = args.augmentation == "crop_flip" or (args.augmentation == "auto" and args.dataset == "cifar10")

    train_set = ImageTensorDataset(train_pixels, train_labels, mean, std, augment=augment)
    test_set = ImageTensorDataset(*decoded(test, "test"), mean, std)
    val_set = ImageTensorDataset(*decoded(validation, "validation"), mean, std) if validation is not None else None
    logger.info("data: %s, %d train / %s validation / %d test images, %d classes, %d channel(s) %s, augmentation=%s",
                args.dataset, len(train_set), len(val_set) if val_set is not None else 0, len(test_set),
                len(names), num_channels, image_size, augment)
    return ImageData(train=train_set, test=test_set, validation=val_set, num_labels=len(names),
                     num_channels=num_channels, image_size=image_size, id2label=id2label, mean=mean.tolist(),
                     std=std.tolist(), augment=augment)
