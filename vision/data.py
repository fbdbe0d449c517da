"""Image data for the vision backend: image folders, latent folders and two embedded data sets.

Items are dicts ``{"x": Tensor[C, H, W], "image": Tensor[C', H', W'], "y": long, "id": str}``:

- ``x`` is what the diffusion model is trained on (pixels in [-1, 1], or a precomputed latent);
- ``image`` is what the frozen teacher sees (pixels in [-1, 1]); for pixel data sets it is ``x`` itself;
- ``id`` names the item *and its augmentation* (``"123"`` or ``"123:flip"``), so a teacher-feature cache keyed by
  id never returns the features of the unflipped image for a flipped one.

Data sets:

- :class:`ImageFolder`: ``root/<class>/<image>`` (or a flat folder, unconditional), ImageNet-sized: listed with
  ``os.scandir``, labels from the sorted class folders, PIL decoding when an item is read; corrupt files are reported
  by name when the data set is built (folders up to 20,000 images; larger ones when read) and stop the run or are
  skipped (``on_error``); empty class folders are refused; images are centre-cropped to ``resolution`` with ADM's
  ``center_crop_arr`` (box-filter halving, bicubic resize, centre crop), as REPA's preprocessing does.
- :class:`LatentFolder`: precomputed latents (``.npy``/``.npz``/``.safetensors``, one per image) with a
  ``dataset.json`` of labels ``{"labels": [[relative_path, label], ...]}`` as REPA's ``preprocessing/dataset_tools.py``
  writes, optionally paired with the image folder the teacher reads.
- :class:`DigitsDataset`: scikit-learn's digits (1,797 8×8 images, 10 classes), upsampled bilinearly.
- :class:`NaturalCrops`: fixed random crops of scikit-image's bundled natural images (unconditional).

Train/held-out splits are fixed by a seed (:func:`split_indices`).
"""

from __future__ import annotations

import abc
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "DigitsDataset",
    "NaturalCrops",
    "ImageFolder",
    "LatentFolder",
    "split_indices",
    "digits_data",
    "natural_crops_data",
    "image_folder_data",
    "latent_folder_data",
    "IMAGE_EXTENSIONS",
    "FLIP_TAG",
    "center_crop_arr",
    "read_image_array",
    "list_image_folder",
    "scan_images",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")
LATENT_EXTENSIONS = (".npy", ".npz", ".safetensors")
FLIP_TAG = ".flip"  # name tag of a mirrored copy's latent file: a/b.flip.npy is a/b mirrored


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed permutation of ``range(n)`` split into (train, held-out); same seed, same split."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


class _Flippable(Dataset, abc.ABC):
    """Index space doubled by horizontal flips when ``hflip``: item ``i + n`` is item ``i`` mirrored.

    Deterministic flips (instead of a coin per access) give every flipped view its own stable id, so teacher
    features can be cached per view; an epoch then sees both views, as random flips do on average.
    """

    hflip: bool = False

    @abc.abstractmethod
    def _len(self) -> int:
        """Number of items without the mirrored copies."""

    @abc.abstractmethod
    def _get(self, i: int) -> dict[str, Any]:
        """Item ``i`` (unflipped) as ``{"x", "image", "y", "id"}``."""

    def __len__(self) -> int:
        return self._len() * (2 if self.hflip else 1)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        n = self._len()
        if not -len(self) <= idx < len(self):
            raise IndexError(f"index {idx} out of range for a data set of {len(self)} items")
        idx %= len(self)
        item = self._get(idx % n)
        if idx >= n:
            item = dict(item)
            item["x"] = item["x"].flip(-1)
            if item.get("image") is not None and item["image"] is not item["x"]:
                item["image"] = item["image"].flip(-1)
            else:
                item["image"] = item["x"]
            item["id"] = f"{item['id']}:flip"
        return item


def _to_range(img: Tensor) -> Tensor:
    """[0, 1] -> [-1, 1]."""
    return img * 2.0 - 1.0


class DigitsDataset(_Flippable):
    """scikit-learn's 8×8 digits upsampled to ``resolution`` (bilinear), values in [-1, 1], 10 classes.

    Args:
        split: ``"train"``, ``"val"`` (the held-out split) or ``"all"``.
        resolution: output size (8, 16 or 32 are natural choices).
        channels: 1 (grey) or 3 (grey replicated).
        val_fraction, seed: the fixed held-out split.
        hflip: add mirrored copies (off by default: mirrored digits are other shapes).
    """

    num_classes = 10

    def __init__(
        self,
        split: str = "train",
        resolution: int = 16,
        channels: int = 1,
        val_fraction: float = 0.1,
        seed: int = 0,
        hflip: bool = False,
    ):
        from sklearn.datasets import load_digits

        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        digits = load_digits()
        images = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0  # (1797, 1, 8, 8) in [0, 1]
        if resolution != 8:
            images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
        images = _to_range(images.clamp(0, 1)).expand(-1, channels, -1, -1).contiguous()
        labels = torch.from_numpy(digits.target).long()
        train_idx, val_idx = split_indices(len(labels), val_fraction, seed)
        idx = {"train": train_idx, "val": val_idx, "all": np.arange(len(labels))}[split]
        self.index = torch.from_numpy(idx).long()
        self.images, self.labels = images[self.index], labels[self.index]
        self.hflip = hflip
        self.resolution, self.channels = resolution, channels

    def _len(self) -> int:
        return len(self.index)

    def _get(self, i: int) -> dict[str, Any]:
        x = self.images[i]
        return {"x": x, "image": x, "y": self.labels[i], "id": f"digits/{int(self.index[i])}"}


class NaturalCrops(_Flippable):
    """Fixed random crops of scikit-image's bundled natural images, resized to ``resolution`` (unconditional).

    Crops (position and size, 1/8 to 1/2 of the shorter side) are drawn once from ``seed``; the held-out split takes
    the last ``val_fraction`` of crops of every image.
    """

    num_classes = 0
    IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "camera", "moon")

    def __init__(
        self,
        split: str = "train",
        resolution: int = 32,
        num_crops: int = 2048,
        val_fraction: float = 0.1,
        seed: int = 0,
        hflip: bool = True,
        images: Sequence[str] | None = None,
    ):
        import skimage.data

        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
        names = list(images or self.IMAGES)
        sources = []
        for name in names:
            if not hasattr(skimage.data, name):
                raise ValueError(f"scikit-image has no bundled image {name!r}; choose from {list(self.IMAGES)}")
            arr = np.asarray(getattr(skimage.data, name)(), dtype=np.float32)
            arr = arr / (255.0 if arr.max() > 1.0 else 1.0)
            if arr.ndim == 2:
                arr = np.repeat(arr[..., None], 3, axis=2)
            sources.append(torch.from_numpy(arr[..., :3].copy()).permute(2, 0, 1))  # (3, H, W)
        rng = np.random.default_rng(seed)
        per_image = max(1, num_crops // len(sources))
        crops, ids = [], []
        n_val = int(round(per_image * val_fraction))
        for s, img in enumerate(sources):
            h, w = img.shape[1:]
            keep = {
                "train": range(0, per_image - n_val),
                "val": range(per_image - n_val, per_image),
                "all": range(per_image),
            }[split]
            for j in range(per_image):
                size = int(rng.integers(min(h, w) // 8, min(h, w) // 2 + 1))
                top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
                if j not in keep:
                    continue
                patch = img[:, top : top + size, left : left + size].unsqueeze(0)
                patch = F.interpolate(
                    patch, size=(resolution, resolution), mode="bicubic", align_corners=False, antialias=True
                )
                crops.append(_to_range(patch[0].clamp(0, 1)))
                ids.append(f"skimage/{names[s]}/{j}")
        self.images = torch.stack(crops)
        self.ids = ids
        self.hflip = hflip
        self.resolution = resolution

    def _len(self) -> int:
        return len(self.ids)

    def _get(self, i: int) -> dict[str, Any]:
        x = self.images[i]
        return {"x": x, "image": x, "y": torch.tensor(0), "id": self.ids[i]}


def center_crop_arr(pil_image: Any, image_size: int) -> np.ndarray:
    """ADM's centre crop (openai/guided-diffusion ``image_datasets.py``, as REPA's ``center-crop-dhariwal``):
    halve with a box filter while the shorter side is at least ``2 * image_size``, resize bicubically so the shorter
    side is ``image_size``, crop the centre square. Returns ``uint8 [image_size, image_size(, C)]``."""
    from PIL import Image

    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.asarray(pil_image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def read_image_array(path: str | Path, resolution: int, channels: int = 3) -> np.ndarray:
    """Decode with PIL and centre-crop (:func:`center_crop_arr`); ``uint8 [R, R, C]``. An unreadable file raises a
    ``ValueError`` that names it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            im = im.convert("RGB" if channels == 3 else "L")
    except Exception as err:  # noqa: BLE001 (PIL raises many kinds: UnidentifiedImageError, SyntaxError, OSError)
        raise ValueError(f"cannot read image {path}: {type(err).__name__}: {err}. Remove or replace the file.") from err
    arr = center_crop_arr(im, resolution)
    return arr[..., None] if arr.ndim == 2 else arr


def _load_image(path: Path, resolution: int, channels: int) -> Tensor:
    """:func:`read_image_array` as ``[C, R, R]`` in [-1, 1]."""
    arr = read_image_array(path, resolution, channels).astype(np.float32) / 255.0
    return _to_range(torch.from_numpy(arr).permute(2, 0, 1).contiguous())


def _list_files(root: Path, exts: Sequence[str]) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts)


def _scan_tree(folder: str, exts: Sequence[str]) -> list[str]:
    """Image files under ``folder`` (any depth, hidden entries skipped), relative, in sorted order; ``os.scandir``
    reads the file type from the directory entry, so listing a million files costs no ``stat`` per file."""
    out: list[str] = []
    with os.scandir(folder) as it:
        entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    for e in entries:
        if e.is_dir():
            out.extend(f"{e.name}/{sub}" for sub in _scan_tree(e.path, exts))
        elif e.is_file() and os.path.splitext(e.name)[1].lower() in exts:
            out.append(e.name)
    return out


def list_image_folder(root: str | Path) -> tuple[list[str], list[int], list[str]]:
    """``(relative files, labels, classes)`` of ``root/<class>/...`` (labels from the sorted top-level folder names,
    files sorted within each) or of a flat folder (no classes, labels 0). Refuses an empty folder, a mix of top-level
    images and class folders, and an empty class folder (it would shift the labels of every later class)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist: set data.root to a folder of images")
    with os.scandir(root) as it:
        entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    dirs = [e for e in entries if e.is_dir()]
    top = [e.name for e in entries if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS]
    per_class = {d.name: _scan_tree(d.path, IMAGE_EXTENSIONS) for d in dirs}
    if not top and not any(per_class.values()):
        raise ValueError(
            f"image folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)}): put images under "
            f"{root}/<class>/ or directly in it"
        )
    if top and any(per_class.values()):
        raise ValueError(f"{root} mixes images at the top level with class folders: use one layout")
    if top:
        return top, [0] * len(top), []
    empty = [c for c, files in per_class.items() if not files]
    if empty:
        raise ValueError(
            f"image folder {root}: class folder(s) {empty} hold no images ({', '.join(IMAGE_EXTENSIONS)}); labels come "
            "from the sorted folder names, so an empty one shifts the later classes. Add images or remove the folder(s)"
        )
    classes = sorted(per_class)
    files = [f"{c}/{f}" for c in classes for f in per_class[c]]
    labels = [i for i, c in enumerate(classes) for _ in per_class[c]]
    return files, labels, classes


def scan_images(files: Sequence[Path], on_error: str = "stop") -> list[tuple[Path, str]]:
    """Open every image's header and check its structure (PIL ``verify``: PNG chunk checksums, truncation), so a
    corrupt file stops the run when the data set is built, not when a batch reaches it mid-run.

    ``on_error="stop"`` raises naming the bad files; ``"skip"`` returns them as ``(path, reason)`` pairs instead."""
    from PIL import Image

    _check_on_error(on_error)
    bad = []
    for path in files:
        try:
            with Image.open(path) as im:
                im.verify()
        except Exception as err:  # noqa: BLE001 (PIL raises many kinds: UnidentifiedImageError, SyntaxError, OSError)
            bad.append((Path(path), f"{type(err).__name__}: {err}"))
    if bad and on_error == "stop":
        shown = "; ".join(f"{p} ({r})" for p, r in bad[:10]) + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise ValueError(
            f"{len(bad)} unreadable image(s): {shown}. Remove or replace the file(s), or skip them (on_error=skip)"
        )
    return bad


def _check_on_error(on_error: str) -> None:
    if on_error not in ("stop", "skip"):
        raise ValueError(f"on_error must be 'stop' or 'skip', got {on_error!r}")


SCAN_AUTO_LIMIT = 20_000  # scan="auto" verifies folders up to this size at build; larger ones are checked when read


class ImageFolder(_Flippable):
    """Images under ``root``: ``root/<class_name>/...`` (classes sorted by name; ImageNet's ``train/``) or flat
    (unconditional).

    Built for ImageNet-sized folders: the listing uses ``os.scandir`` (no ``stat`` or decode per file) and is kept as
    one byte array, not a million ``Path`` objects (which DataLoader workers would copy page by page); images are
    decoded only when an item is read.

    Args:
        root: the folder.
        resolution: images are centre-cropped to this size as ADM and REPA do (:func:`center_crop_arr`).
        channels: 3 (RGB) or 1 (grey).
        split, val_fraction, seed: a fixed held-out split over the sorted file list.
        hflip: add mirrored copies.
        scan: check every image of the split when the data set is built (:func:`scan_images`); ``"auto"`` does so
            for up to :data:`SCAN_AUTO_LIMIT` files. Empty class folders are refused in any case.
        on_error: a bad file found by the scan or when an item is read: ``"stop"`` raises naming it; ``"skip"``
            warns naming it and leaves it out (found by the scan) or returns the next readable item in its place
            (found when read). Skipped files are listed in :attr:`skipped`.
    """

    def __init__(
        self,
        root: str | Path,
        resolution: int = 32,
        channels: int = 3,
        split: str = "all",
        val_fraction: float = 0.0,
        seed: int = 0,
        hflip: bool = True,
        scan: bool | str = "auto",
        on_error: str = "stop",
    ):
        _check_on_error(on_error)
        if scan not in (True, False, "auto"):
            raise ValueError(f"scan must be true, false or 'auto', got {scan!r}")
        self.root = Path(root)
        files, labels, classes = list_image_folder(self.root)
        self.classes = classes
        self.num_classes = len(classes)
        if split != "all":
            tr, va = split_indices(len(files), val_fraction, seed)
            keep = tr if split == "train" else va
            files, labels = [files[i] for i in keep], [labels[i] for i in keep]
        self.skipped: list[tuple[Path, str]] = []
        if scan is True or (scan == "auto" and len(files) <= SCAN_AUTO_LIMIT):
            bad = scan_images([self.root / f for f in files], on_error)
            if bad:
                self._warn_skipped(bad)
                drop = {p.relative_to(self.root).as_posix() for p, _ in bad}
                kept = [(f, y) for f, y in zip(files, labels, strict=True) if f not in drop]
                files, labels = [f for f, _ in kept], [y for _, y in kept]
                if not files:
                    raise ValueError(f"image folder {self.root}: every image of the split is unreadable")
        self._rel = np.array([f.encode("utf-8") for f in files], dtype=np.bytes_)
        self._labels = np.asarray(labels, dtype=np.int64)
        self.resolution, self.channels, self.hflip, self.on_error = resolution, channels, hflip, on_error

    def _warn_skipped(self, bad: Sequence[tuple[Path, str]]) -> None:
        self.skipped.extend(bad)
        shown = "; ".join(f"{p} ({r})" for p, r in bad[:10]) + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "")
        warnings.warn(f"ImageFolder {self.root}: skipping {len(bad)} unreadable image(s): {shown}", stacklevel=3)

    @property
    def files(self) -> list[Path]:
        return [self.root / r.decode("utf-8") for r in self._rel]

    @property
    def labels(self) -> list[int]:
        return self._labels.tolist()

    def relative_path(self, i: int) -> str:
        return self._rel[i].decode("utf-8")

    def _len(self) -> int:
        return len(self._rel)

    def _get(self, i: int) -> dict[str, Any]:
        n = self._len()
        for k in range(min(n, 16)):  # on_error="skip": the next readable image stands in, up to 16 tries
            j = (i + k) % n
            rel = self.relative_path(j)
            try:
                x = _load_image(self.root / rel, self.resolution, self.channels)
            except ValueError as err:
                if self.on_error == "stop":
                    raise ValueError(f"{err} (or skip unreadable files: on_error=skip)") from err.__cause__
                self._warn_skipped([(self.root / rel, str(err.__cause__ or err))])
                continue
            return {"x": x, "image": x, "y": torch.tensor(int(self._labels[j])), "id": rel}
        raise ValueError(f"image folder {self.root}: 16 consecutive unreadable images from item {i}; check the folder")


def _load_latent(path: Path) -> Tensor:
    try:
        if path.suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                arr = z[z.files[0]]
        else:
            from safetensors.torch import load_file

            tensors = load_file(str(path))
            arr = next(iter(tensors.values())).numpy()
    except Exception as err:
        raise ValueError(f"cannot read latent {path}: {err}. Re-run the latent preparation for it.") from err
    t = torch.as_tensor(np.asarray(arr), dtype=torch.float32)
    return t[0] if t.dim() == 4 and t.shape[0] == 1 else t


class LatentFolder(Dataset):
    """Precomputed latents (REPA's data layout) plus, optionally, the images the teacher reads.

    ``root/dataset.json`` holds ``{"labels": [[relative_latent_path, label], ...]}`` (``null`` labels: unconditional).
    With ``image_root``, the image for latent ``a/b.npy`` is the file ``image_root/a/b.<ext>`` (any image extension),
    as REPA stores ``images/`` and ``vae-sd/`` side by side; a latent ``a/b.flip.npy`` with no image of its own
    (``scripts/encode_latents.py``'s mirrored copy) reads ``a/b.<ext>`` mirrored.
    """

    def __init__(
        self,
        root: str | Path,
        image_root: str | Path | None = None,
        image_resolution: int = 256,
        num_classes: int | None = None,
    ):
        self.root = Path(root)
        meta = self.root / "dataset.json"
        if not meta.exists():
            files = _list_files(self.root, LATENT_EXTENSIONS) if self.root.is_dir() else []
            if not files:
                raise FileNotFoundError(
                    f"latent folder {self.root} has no dataset.json and no latent files: prepare it with REPA's "
                    "preprocessing (dataset.json with {'labels': [[path, label], ...]})"
                )
            entries = [[f.relative_to(self.root).as_posix(), None] for f in files]
        else:
            entries = json.loads(meta.read_text()).get("labels")
            if not entries:
                raise ValueError(f"{meta} lists no latents under 'labels'")
        self.files = [self.root / e[0] for e in entries]
        self.labels = [0 if e[1] is None else int(e[1]) for e in entries]
        self.num_classes = (
            (max(self.labels) + 1 if any(e[1] is not None for e in entries) else 0)
            if num_classes is None
            else num_classes
        )
        pairs = zip(self.files, self.labels, strict=True)
        bad = [(f, y) for f, y in pairs if self.num_classes and not 0 <= y < self.num_classes]
        if bad:
            raise ValueError(f"label {bad[0][1]} of {bad[0][0]} is outside [0, {self.num_classes}): fix dataset.json")
        missing = [f for f in self.files if not f.exists()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} latent files listed in dataset.json are missing, e.g. {missing[0]}"
            )
        self.image_root = Path(image_root) if image_root is not None else None
        self.image_resolution = image_resolution

    def __len__(self) -> int:
        return len(self.files)

    def _image_path(self, latent: Path) -> tuple[Path, bool]:
        """The image of a latent and whether to mirror it (a ``.flip`` latent whose own image does not exist)."""
        assert self.image_root is not None
        rel = latent.relative_to(self.root)
        stem = self.image_root / rel.parent / rel.name[: -len(latent.suffix)]  # a/b.v2.npy -> a/b.v2 (keeps dots)
        candidates = [(stem, False)]
        if stem.name.endswith(FLIP_TAG):
            candidates.append((stem.parent / stem.name[: -len(FLIP_TAG)], True))
        for base, flip in candidates:
            for ext in IMAGE_EXTENSIONS:
                path = base.parent / (base.name + ext)
                if path.exists():
                    return path, flip
        raise FileNotFoundError(f"no image for latent {latent} under {self.image_root} (looked for {stem}.*)")

    def __getitem__(self, i: int) -> dict[str, Any]:
        x = _load_latent(self.files[i])
        item = {"x": x, "y": torch.tensor(self.labels[i]), "id": self.files[i].relative_to(self.root).as_posix()}
        if self.image_root is not None:
            path, flip = self._image_path(self.files[i])
            image = _load_image(path, self.image_resolution, 3)
            item["image"] = image.flip(-1) if flip else image
        return item


# -- DataModule builders (hydra ``data._target_``) -------------------------------------------------------------
def _datamodule(train: Dataset, val: Dataset | None, info: dict[str, Any]):
    from unirep.train import DataModule

    if len(train) == 0:
        raise ValueError("the training split is empty: check the data root and val_fraction")
    return DataModule(train=train, val=val, info=info)


def digits_data(resolution: int = 16, channels: int = 1, val_fraction: float = 0.1, seed: int = 0, hflip: bool = False):
    """Digits train/held-out DataModule; ``info`` carries num_classes, channels, resolution."""
    kw = dict(resolution=resolution, channels=channels, val_fraction=val_fraction, seed=seed)
    train = DigitsDataset("train", hflip=hflip, **kw)
    val = DigitsDataset("val", **kw)
    return _datamodule(train, val, dict(num_classes=10, channels=channels, resolution=resolution, name="digits"))


def natural_crops_data(
    resolution: int = 32, num_crops: int = 2048, val_fraction: float = 0.1, seed: int = 0, hflip: bool = True
):
    kw = dict(resolution=resolution, num_crops=num_crops, val_fraction=val_fraction, seed=seed)
    train = NaturalCrops("train", hflip=hflip, **kw)
    val = NaturalCrops("val", hflip=False, **kw)
    return _datamodule(train, val, dict(num_classes=0, channels=3, resolution=resolution, name="skimage"))


def image_folder_data(
    root: str,
    resolution: int = 32,
    channels: int = 3,
    val_fraction: float = 0.0,
    seed: int = 0,
    hflip: bool = True,
    scan: bool | str = "auto",
    on_error: str = "stop",
):
    """An :class:`ImageFolder` DataModule (``scan``/``on_error``: see there; ImageNet: ``scan=false``)."""
    split = "train" if val_fraction > 0 else "all"
    train = ImageFolder(root, resolution, channels, split, val_fraction, seed, hflip, scan, on_error)
    val = (
        ImageFolder(root, resolution, channels, "val", val_fraction, seed, False, scan, on_error)
        if val_fraction > 0
        else None
    )
    return _datamodule(
        train, val, dict(num_classes=train.num_classes, channels=channels, resolution=resolution, name=str(root))
    )


def latent_folder_data(
    root: str, image_root: str | None = None, image_resolution: int = 256, num_classes: int | None = None
):
    train = LatentFolder(root, image_root, image_resolution, num_classes)
    x = train[0]["x"]
    return _datamodule(
        train,
        None,
        dict(
            num_classes=train.num_classes,
            channels=int(x.shape[0]),
            resolution=int(x.shape[-1]),
            name=str(root),
            latent=True,
        ),
    )
