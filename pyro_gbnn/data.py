"""Image classification data sets as the paper trains on them, with reproducible loading.

Small images (MNIST, CIFAR) are decoded once into a uint8 tensor of shape [N, C, H, W]
and transformed per item; ImageNet-sized folders are decoded lazily from disk. Every
random choice a loader makes (shuffling and augmentation) is a pure function of
`(seed, epoch)` and, for augmentation, the item's position, so a run resumed at epoch
`e` sees bit-identical batches to one that was never interrupted:

* order: `make_loader(..., seed=s, epoch=e, shuffle=True)` permutes with a generator
  seeded from `(s, e)`;
* augmentation: item `i` of that loader is transformed under the CPU generator seeded
  with `augmentation_seed(s, e, i)`; the global RNG state is saved and restored around
  it, so loading data never perturbs the random stream of the model or the sampler,
  and the result does not depend on `num_workers`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, SequentialSampler
from torchvision.transforms import v2
from tqdm.auto import tqdm

try:
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as _tv_decode
    from torchvision.io import read_file as _tv_read
except ImportError:  # removed in a future torchvision; PIL decodes instead
    _tv_decode = _tv_read = None

from pyro_gbnn.errors import UsageError

__all__ = [
    "DATASETS",
    "DataSplits",
    "ImageFileDataset",
    "ImageTensorDataset",
    "augmentation_seed",
    "evaluation_seed",
    "posterior_draws_seed",
    "set_loader_epoch",
    "decode_cache_dir",
    "image_for_model",
    "load_dataset",
    "sample_examples",
    "make_loader",
]

DATASETS = ("mnist", "cifar10", "cifar100", "imagenet", "imagefolder")

_MNIST_MEAN, _MNIST_STD = (0.1307,), (0.3081,)
# Per-channel pixel statistics of the training sets (std over pixels, not over image means).
_CIFAR10_MEAN, _CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
_CIFAR100_MEAN, _CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2761)
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_CACHE_FOLDER = ".pyro_gbnn_cache"
_CACHE_VERSION = 1
_MASK64 = (1 << 64) - 1
_SHUFFLE_TAG, _AUGMENT_TAG, _WORKER_TAG, _EVALUATE_TAG, _DRAWS_TAG = 0x5348, 0x4155, 0x574B, 0x4556, 0x4452


@dataclass
class DataSplits:
    """What a training run needs to know about a data set: its splits and input shape.

    `val` is None unless `val_fraction > 0`; `classes[k]` names label `k`.
    """

    train: Dataset
    val: Dataset | None
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    classes: list[str]


# --------------------------------------------------------------------------- seeding


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _mix(*parts: int) -> int:
    """Hash integers to one 64-bit seed; a bijection in the last part, so indices never collide."""
    x = 0
    for part in parts:
        x = _splitmix64(x ^ (int(part) & _MASK64))
    return x


def augmentation_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of the CPU generator under which item `index` is augmented in `epoch`.

    Exposed so that a resumed run (or a test) can reproduce one item's augmentation alone.
    """
    return _mix(_AUGMENT_TAG, seed, epoch, index)


def evaluation_seed(seed: int, batch: int) -> int:
    """The seed of the weight draws for evaluation batch ``batch`` of a run seeded with ``seed``:
    a function of the batch alone, so the draws do not depend on which process scores it."""
    return _mix(_EVALUATE_TAG, seed, batch)


def posterior_draws_seed(seed: int, repeat: int = 0) -> int:
    """The seed of an evaluation's fixed posterior draws (``predict.batchnorm: per_draw``) and
    of the training batches their BatchNorm statistics are estimated on; ``repeat`` numbers
    the evaluation seeds a run reports its spread over."""
    return _mix(_DRAWS_TAG, seed, repeat)


# --------------------------------------------------------------------------- data sets


class _TransformedImages(Dataset, ABC):
    """Shared per-item logic: a uint8 image [C, H, W] and an int label, then `transform`.

    `dataset[i]` draws augmentation from the global RNG, as torchvision data sets do;
    `dataset.seeded_item(i, s)` draws it from a generator seeded with `s` instead and
    leaves the global RNG state as it was. Loaders from `make_loader` use the latter.
    """

    transform: Callable[[Tensor], Tensor]

    @abstractmethod
    def load(self, index: int) -> tuple[Tensor, int]:
        """The undecorated item: uint8 image [C, H, W] and its label."""

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = self.load(index)
        return self.transform(image), label

    def seeded_item(self, index: int, seed: int) -> tuple[Tensor, int]:
        """Item `index` augmented under a CPU generator seeded with `seed`: reproducible anywhere."""
        image, label = self.load(index)
        # transforms.v2 draws from the default CPU generator only; seed that one (not
        # torch.manual_seed, which would also reset the CUDA generators) and restore it.
        state = torch.get_rng_state()
        try:
            torch.default_generator.manual_seed(seed)
            return self.transform(image), label
        finally:
            torch.set_rng_state(state)


class ImageTensorDataset(_TransformedImages):
    """Decoded small images held in memory, so an epoch costs no decoding.

    images: uint8 [N, C, H, W]; labels: int64 [N]; `indices` selects a subset without
    copying the images (the train/validation split shares one tensor).
    Items are (float32 [C, H', W'] normalised, int label).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        transform: Callable[[Tensor], Tensor],
        indices: Tensor | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {list(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape [{images.shape[0]}], got {list(labels.shape)}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.transform = transform
        self.indices = None if indices is None else torch.as_tensor(indices, dtype=torch.int64)

    def __len__(self) -> int:
        return self.images.shape[0] if self.indices is None else self.indices.numel()

    def load(self, index: int) -> tuple[Tensor, int]:
        j = index if self.indices is None else int(self.indices[index])
        return self.images[j], int(self.labels[j])

    @property
    def targets(self) -> Tensor:
        """Labels of this (sub)set in item order, int64 [len(self)]."""
        return self.labels if self.indices is None else self.labels[self.indices]

    def subset(self, indices: Tensor, transform: Callable[[Tensor], Tensor]) -> ImageTensorDataset:
        base = torch.as_tensor(indices, dtype=torch.int64)
        if self.indices is not None:
            base = self.indices[base]
        return ImageTensorDataset(self.images, self.labels, transform, base)


class ImageFileDataset(_TransformedImages):
    """Images decoded from disk on every access: ImageNet-sized sets do not fit a cache.

    samples: (path, label) pairs. Items are (float32 [3, H', W'] normalised, int label).
    """

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable[[Tensor], Tensor]) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        return _decode_image(path), label

    @property
    def targets(self) -> Tensor:
        """Labels in item order, int64 [len(self)]."""
        return torch.tensor([label for _, label in self.samples], dtype=torch.int64)

    def subset(self, indices: Tensor, transform: Callable[[Tensor], Tensor]) -> ImageFileDataset:
        return ImageFileDataset([self.samples[int(i)] for i in indices], transform)


def _decode_image(path: str | Path) -> Tensor:
    """uint8 RGB [3, H, W]; PIL handles the formats torchvision's decoders do not.

    torchvision's decoders are about twice as fast as PIL on small JPEGs; torchvision
    0.29 deprecates them in favour of TorchCodec, so without them PIL does all the work.
    """
    if _tv_decode is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return _tv_decode(_tv_read(str(path)), mode=ImageReadMode.RGB)
        except (RuntimeError, ValueError):
            pass
    try:
        with Image.open(path) as image:
            array = np.array(image.convert("RGB"))
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot decode image {path} ({err}); remove or replace the file") from None
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


# --------------------------------------------------------------------------- transforms


def _normalise(mean: tuple[float, ...], std: tuple[float, ...]) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def _transforms(name: str, augment: bool) -> tuple[v2.Compose, v2.Compose]:
    """(train, eval) transforms of appendix I.2; `augment=False` makes train equal eval."""
    if name == "mnist":
        evaluate = v2.Compose(_normalise(_MNIST_MEAN, _MNIST_STD))
        return evaluate, evaluate
    if name == "cifar10":
        evaluate = v2.Compose(_normalise(_CIFAR10_MEAN, _CIFAR10_STD))
        train = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()]
        train += _normalise(_CIFAR10_MEAN, _CIFAR10_STD)
    elif name == "cifar100":
        evaluate = v2.Compose(_normalise(_CIFAR100_MEAN, _CIFAR100_STD))
        train = [v2.RandomCrop(32, padding=4, padding_mode="reflect"), v2.RandomHorizontalFlip()]
        train += _normalise(_CIFAR100_MEAN, _CIFAR100_STD)
    else:
        resize = [v2.Resize(256, antialias=True), v2.CenterCrop(224)]
        evaluate = v2.Compose(resize + _normalise(_IMAGENET_MEAN, _IMAGENET_STD))
        train = [
            v2.RandomResizedCrop(224, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.ColorJitter(0.4, 0.4, 0.4, 0.1),
            v2.Normalize(_IMAGENET_MEAN, _IMAGENET_STD),
        ]
    return (v2.Compose(train) if augment else evaluate), evaluate


def sample_examples(dataset: Dataset, count: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``count`` examples drawn without replacement (seeded) as ([count, ...], [count]):
    a subset that represents every class even where a split is stored sorted by class
    (the CIFAR JPEG copies are)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count]
    images, labels = zip(*(dataset[int(i)] for i in order))
    return torch.stack(images), torch.as_tensor(labels)


def image_for_model(path: str | Path, dataset: str, in_channels: int, image_size: int) -> Tensor:
    """An image file as a model trained on ``dataset`` sees a test image: [in_channels, H, W],
    grey or RGB, resized to ``image_size`` (ImageNet-style sets: their own resize and crop),
    normalised with the data set's statistics."""
    image = _decode_image(path)
    if in_channels == 1:
        image = v2.Grayscale(1)(image)
    elif in_channels != 3:
        raise UsageError(f"image files can feed models with 1 or 3 input channels, not {in_channels}")
    key = dataset.lower()
    if key in ("mnist", "cifar10", "cifar100") and tuple(image.shape[-2:]) != (image_size, image_size):
        image = v2.Resize((image_size, image_size), antialias=True)(image)
    return _transforms(key, augment=False)[1](image)


# --------------------------------------------------------------------------- MNIST


def _load_mnist(root: Path, download: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
    raw = root / "MNIST" / "raw"
    present = all((raw / f).is_file() for f in _MNIST_FILES)
    if not present and not download:
        raise UsageError(
            f"MNIST not found: looked for {raw}/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte; "
            "pass --data-dir with the folder that holds MNIST/raw, or --download"
        )
    splits = []
    for train in (True, False):
        try:
            ds = torchvision.datasets.MNIST(root=str(root), train=train, download=download and not present)
            images, labels = ds.data, ds.targets
        except Exception as err:  # torchvision reports bad files as asserts, RuntimeError, ValueError...
            what = f"{type(err).__name__}: {_one_line(err)}".rstrip(": ")
            if present:
                message = f"MNIST files in {raw} are malformed ({what}); replace them with the original IDX files"
            else:
                message = f"MNIST could not be downloaded into {raw} ({what}); put the four IDX files there by hand"
            raise UsageError(message) from None
        if images.dim() != 3 or labels.shape != (images.shape[0],):
            raise UsageError(
                f"MNIST files in {raw} are malformed: images of shape {list(images.shape)} "
                f"and {labels.numel()} labels; replace them with the original IDX files"
            )
        splits += [images.unsqueeze(1).contiguous(), labels.to(torch.int64)]
        classes = list(ds.classes)
    return splits[0], splits[1], splits[2], splits[3], classes


_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


# --------------------------------------------------------------------------- CIFAR


def _load_cifar(
    name: str, root: Path, download: bool, cache_dir: Path | None
) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
    """Pickled torchvision layout first, then the JPEG ImageFolder copy, then a download."""
    tv_class = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    pickled = root / tv_class.base_folder
    jpeg = root / f"{name}-jpeg"
    if pickled.is_dir() or (download and not jpeg.is_dir()):
        return _load_cifar_pickled(tv_class, name, root, download)
    if jpeg.is_dir():
        return _load_cifar_jpeg(name, jpeg, cache_dir or root / _CACHE_FOLDER)
    raise UsageError(
        f"{name} not found: looked for {pickled} (torchvision's pickled layout) and "
        f"{jpeg}/{{train,test}}/<class>/*.jpg; pass --data-dir with the folder that holds one of them, "
        "or --download"
    )


def _load_cifar_pickled(
    tv_class: type, name: str, root: Path, download: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
    folder = root / tv_class.base_folder
    out: list[Tensor] = []
    for train in (True, False):
        try:
            # torchvision checks each file against the published MD5 sums, so a truncated
            # extraction is caught here rather than as a mysterious accuracy drop later.
            ds = tv_class(root=str(root), train=train, download=download)
            images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
            labels = torch.as_tensor(ds.targets, dtype=torch.int64)
            classes = list(ds.classes)
        except RuntimeError as err:
            raise UsageError(
                f"{name} in {folder} is missing files or fails torchvision's MD5 check ({_one_line(err)}); "
                "extract the original archive there again, or pass --download"
            ) from None
        except OSError as err:
            raise UsageError(
                f"{name} could not be read from or downloaded into {folder} ({_one_line(err)}); check --data-dir"
            ) from None
        except Exception as err:  # unpickling garbage fails in many ways
            raise UsageError(
                f"{name} files in {folder} are malformed ({type(err).__name__}: {_one_line(err)}); replace them"
            ) from None
        if images.shape[1:] != (3, 32, 32) or labels.shape != (images.shape[0],):
            raise UsageError(
                f"{name} files in {folder} are malformed: images {list(images.shape)}, {labels.numel()} labels"
            )
        out += [images, labels]
    return out[0], out[1], out[2], out[3], classes


def _load_cifar_jpeg(name: str, folder: Path, cache_dir: Path) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
    expected = 10 if name == "cifar10" else 100
    train_folder, test_folder = folder / "train", folder / "test"
    for split in (train_folder, test_folder):
        if not split.is_dir():
            raise UsageError(
                f"{name} JPEG copy at {folder} has no {split.name}/ folder; "
                f"expected {folder}/{{train,test}}/<class>/*.jpg"
            )
    classes, train_samples = _scan_image_folder(train_folder)
    if len(classes) != expected:
        raise UsageError(
            f"{name} JPEG copy at {train_folder} has {len(classes)} class folders, expected {expected}; "
            "check --data-dir"
        )
    _, test_samples = _scan_image_folder(test_folder, classes)
    x_train, y_train = _cached_decode(train_folder, train_samples, cache_dir, (32, 32))
    x_test, y_test = _cached_decode(test_folder, test_samples, cache_dir, (32, 32))
    return x_train, y_train, x_test, y_test, classes


# --------------------------------------------------------------------------- image folders


def _scan_image_folder(folder: Path, classes: list[str] | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, sorted (path, label) samples) of an ImageFolder tree; labels follow `classes`.

    Given `classes` (those of the training folder), class folders must be a subset of them.
    """
    if not folder.is_dir():
        raise UsageError(f"image folder {folder} does not exist; expected {folder}/<class>/<image>")
    found = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if not found:
        raise UsageError(f"no class folders in {folder}; expected the ImageFolder layout {folder}/<class>/<image>")
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise UsageError(
            f"{folder} has class folders absent from the training set: {', '.join(unknown[:5])}; rename or remove them"
        )
    index = {c: i for i, c in enumerate(classes)}
    samples: list[tuple[str, int]] = []
    empty = []
    for c in found:
        files = []
        for parent, dirs, names in os.walk(folder / c, followlinks=True):
            dirs.sort()
            files += [os.path.join(parent, n) for n in sorted(names) if n.lower().endswith(_IMAGE_EXTENSIONS)]
        if not files:
            empty.append(c)
        samples += [(f, index[c]) for f in files]
    if empty:
        raise UsageError(
            f"{len(empty)} class folder(s) in {folder} hold no images ({', '.join(empty[:5])}); "
            f"add images ({' '.join(_IMAGE_EXTENSIONS)}) or remove the folders"
        )
    return classes, samples


def _load_image_folder(name: str, root: Path) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, int]]]:
    candidates = [root] + ([root / "imagenet"] if name == "imagenet" else [])
    for base in candidates:
        if (base / "train").is_dir():
            test = next((base / s for s in ("val", "test") if (base / s).is_dir()), None)
            if test is None:
                raise UsageError(
                    f"{name}: found {base / 'train'} but neither {base / 'val'} nor {base / 'test'}; add one of them"
                )
            classes, train_samples = _scan_image_folder(base / "train")
            _, test_samples = _scan_image_folder(test, classes)
            return classes, train_samples, test_samples
    looked = " and ".join(f"{b}/{{train,val}}" for b in candidates)
    raise UsageError(
        f"{name} not found: looked for {looked} in the ImageFolder layout <split>/<class>/<image>; pass --data-dir"
    )


def _check_image(path: str) -> None:
    """Decode ``path`` far enough to find a broken or truncated file: JPEGs at 1/8 scale (the
    whole compressed stream is read, the inverse DCT mostly skipped), other formats fully."""
    with Image.open(path) as image:
        image.draft("RGB", (1, 1))  # a no-op for formats without reduced decoding
        image.load()


def _check_images_once(root: Path, samples: list[tuple[str, int]], cache_dir: Path) -> None:
    """Every image file of an ImageFolder data set decodes, checked before any training; a
    listing that passed is remembered by its fingerprint, so later runs skip the scan."""
    marker = (
        f"checked-{hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]}-{_fingerprint(root, samples)[:32]}"
    )
    directories = [cache_dir, _user_cache_dir()]
    if any((d / marker).is_file() for d in directories):
        return
    bad = []
    for path, _ in tqdm(samples, desc="checking the image files once", disable=len(samples) < 20_000, leave=False):
        try:
            _check_image(path)
        except Exception as err:  # PIL reports broken files as OSError, SyntaxError, ValueError...
            bad.append(f"{path} ({type(err).__name__}: {_one_line(err)})")
    if bad:
        raise UsageError(
            f"{len(bad)} of {len(samples)} image files under {root} cannot be decoded, e.g. {bad[0]}; remove or "
            "replace them"
        )
    for directory in directories:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / marker).touch()
            return
        except OSError:
            continue


# --------------------------------------------------------------------------- decode cache


def _fingerprint(folder: Path, samples: list[tuple[str, int]]) -> str:
    """Changes when a file is added, removed, renamed, relabelled, resized or touched."""
    h = hashlib.sha256()
    for path, label in samples:
        st = os.stat(path)
        h.update(f"{os.path.relpath(path, folder)}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def decode_cache_dir(data_dir: Path, cache_dir: str | Path | None = None) -> Path:
    """Where decoded images are cached: ``cache_dir``, else ``$PYRO_GBNN_CACHE``, else
    ``data_dir/.pyro_gbnn_cache`` when the data folder is this user's own and writable, else
    the user cache (``~/.cache/pyro_gbnn``): a shared data folder is left as it is."""
    chosen = cache_dir or os.environ.get("PYRO_GBNN_CACHE")
    if chosen:
        return Path(chosen).expanduser()
    try:
        own = data_dir.stat().st_uid == os.getuid() and os.access(data_dir, os.W_OK)
    except OSError:
        own = False
    return data_dir / _CACHE_FOLDER if own else _user_cache_dir()


def _user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pyro_gbnn"


def _read_cache(path: Path, fingerprint: str, n: int) -> tuple[Tensor, Tensor] | None:
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        images, labels = blob["images"], blob["labels"]
        ok = (
            blob["version"] == _CACHE_VERSION
            and images.dtype == torch.uint8
            and images.dim() == 4
            and labels.dtype == torch.int64
            and labels.shape == (n,)
            and images.shape[0] == n
            and blob["fingerprint"] == fingerprint
        )
    except Exception as err:  # any unreadable cache is rebuilt, whatever the failure
        warnings.warn(f"ignoring unreadable decode cache {path} ({type(err).__name__}); rebuilding it", stacklevel=2)
        return None
    if not ok:
        return None
    return images, labels


def _write_cache(directories: list[Path], filename: str, blob: dict) -> Path | None:
    """Atomically (temp file + os.replace) into the first writable directory."""
    for directory in directories:
        tmp = None
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=filename + ".", suffix=".tmp", dir=directory)
            with os.fdopen(fd, "wb") as f:
                torch.save(blob, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes it private; others may share the data folder
            os.replace(tmp, directory / filename)
            return directory / filename
        except OSError:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
    where = ", ".join(map(str, directories))
    warnings.warn(f"could not write a decode cache to any of {where}; decoding every run", stacklevel=2)
    return None


def _cached_decode(
    folder: Path, samples: list[tuple[str, int]], cache_dir: Path, size: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """Decode every image of `folder` once; later runs reload the uint8 tensor from `cache_dir`.

    The cache file is named after the folder's absolute path and holds a fingerprint of
    the listing; a stale or unreadable file is rebuilt. If `cache_dir` is not writable
    the user cache (~/.cache/pyro_gbnn) is used.
    """
    resolved = folder.resolve()
    key = hashlib.sha256(str(resolved).encode()).hexdigest()[:16]
    filename = f"{resolved.parent.name}-{resolved.name}-{key}.pt"
    directories = [Path(cache_dir), _user_cache_dir()]
    fingerprint = _fingerprint(folder, samples)
    for directory in directories:
        hit = _read_cache(directory / filename, fingerprint, len(samples))
        if hit is not None:
            return hit
    images = []
    for path, _ in samples:
        image = _decode_image(path)
        if tuple(image.shape[1:]) != size:
            raise UsageError(
                f"image {path} is {image.shape[2]}x{image.shape[1]}, expected {size[1]}x{size[0]}; check --data-dir"
            )
        images.append(image)
    x = torch.stack(images)
    y = torch.tensor([label for _, label in samples], dtype=torch.int64)
    blob = {"version": _CACHE_VERSION, "fingerprint": fingerprint, "folder": str(resolved)}
    blob.update(images=x, labels=y)
    _write_cache(directories, filename, blob)
    return x, y


# --------------------------------------------------------------------------- public API


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _split_indices(n: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor | None]:
    if not 0.0 <= val_fraction < 1.0:
        raise UsageError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0.0:
        return torch.arange(n), None
    n_val = max(1, round(val_fraction * n))
    if n_val >= n:
        raise UsageError(f"val_fraction={val_fraction} leaves no training images out of {n}; use a smaller fraction")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def load_dataset(
    name: str,
    data_dir: str | Path,
    *,
    val_fraction: float = 0.0,
    seed: int = 0,
    augment: bool = True,
    download: bool = False,
    cache_dir: str | Path | None = None,
) -> DataSplits:
    """Load one of `DATASETS` from `data_dir` with the paper's transforms.

    `val_fraction` of the training set is held out (chosen by `torch.randperm` under
    `seed`; same seed, same split) and evaluated without augmentation. `download` lets
    torchvision fetch MNIST or CIFAR when absent; it is off so that nothing touches the
    network unasked. `cache_dir` holds decoded JPEG copies of CIFAR (see
    :func:`decode_cache_dir`). Missing or malformed data raises `UsageError`.
    """
    key = name.lower()
    if key not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    root = Path(data_dir).expanduser()
    train_tf, eval_tf = _transforms(key, augment)
    if key in ("mnist", "cifar10", "cifar100"):
        if key == "mnist":
            x_train, y_train, x_test, y_test, classes = _load_mnist(root, download)
        else:
            x_train, y_train, x_test, y_test, classes = _load_cifar(
                key, root, download, decode_cache_dir(root, cache_dir)
            )
        full: ImageTensorDataset | ImageFileDataset = ImageTensorDataset(x_train, y_train, eval_tf)
        test: Dataset = ImageTensorDataset(x_test, y_test, eval_tf)
        in_channels, image_size = x_train.shape[1], x_train.shape[-1]
    else:
        classes, train_samples, test_samples = _load_image_folder(key, root)
        _check_images_once(root, train_samples + test_samples, decode_cache_dir(root, cache_dir))
        full = ImageFileDataset(train_samples, eval_tf)
        test = ImageFileDataset(test_samples, eval_tf)
        in_channels, image_size = 3, 224
    train_idx, val_idx = _split_indices(len(full), val_fraction, seed)
    return DataSplits(
        train=full.subset(train_idx, train_tf),
        val=None if val_idx is None else full.subset(val_idx, eval_tf),
        test=test,
        num_classes=len(classes),
        in_channels=int(in_channels),
        image_size=int(image_size),
        classes=list(classes),
    )


class _EpochView(Dataset):
    """Item `i` of `dataset` augmented under `augmentation_seed(seed, epoch, i)`; an index
    `(epoch, i)` names its epoch itself (persistent workers keep one view for every epoch)."""

    def __init__(self, dataset: _TransformedImages, seed: int, epoch: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[Tensor, int]:
        epoch, index = index if isinstance(index, tuple) else (self.epoch, index)
        return self.dataset.seeded_item(index, augmentation_seed(self.seed, epoch, index))


class _EpochPermutation(Sampler[int]):
    """The same permutation every time it is iterated, determined by (seed, epoch) alone;
    ``tag_epoch`` yields (epoch, index) pairs for an :class:`_EpochView` in persistent workers."""

    def __init__(self, n: int, seed: int, epoch: int, tag_epoch: bool = False) -> None:
        self.n, self.seed, self.epoch, self.tag_epoch = n, seed, epoch, tag_epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(_mix(_SHUFFLE_TAG, self.seed, self.epoch))
        return _tagged(torch.randperm(self.n, generator=generator).tolist(), self.epoch, self.tag_epoch)


def _tagged(order: list[int], epoch: int, tag_epoch: bool) -> Iterator:
    return iter([(epoch, i) for i in order] if tag_epoch else order)


class _ShardedEpochPermutation(DistributedSampler):
    """Rank ``rank``'s share of the (seed, epoch) permutation, split as ``DistributedSampler``
    splits its own (padded to a multiple of the ranks, then every ``num_replicas``-th item),
    so local batch b of all ranks together holds the items of one-process batch b."""

    def __init__(
        self, dataset: Dataset, seed: int, epoch: int, num_replicas: int, rank: int, tag_epoch: bool = False
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.set_epoch(epoch)
        self.tag_epoch = tag_epoch

    def __iter__(self) -> Iterator[int]:
        order = list(_EpochPermutation(len(self.dataset), self.seed, self.epoch))
        while len(order) < self.total_size:
            order += order[: self.total_size - len(order)]
        return _tagged(order[self.rank : self.total_size : self.num_replicas], self.epoch, self.tag_epoch)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
    num_replicas: int = 1,
    rank: int = 0,
    persistent_workers: bool = False,
) -> DataLoader:
    """A loader for one epoch whose batches depend only on (seed, epoch), augmentation included.

    Make a new loader per epoch; resuming at epoch `e` with `make_loader(..., epoch=e)`
    repeats exactly what an uninterrupted run saw, for any `num_workers`. Iterating the
    same loader twice gives the same batches. Data sets other than this module's are
    loaded as they are (their own randomness is not seeded here).

    ``persistent_workers`` (with ``num_workers`` > 0): the workers outlive the epoch, and
    :func:`set_loader_epoch` moves the same loader to the next epoch with the batches a new
    loader for that epoch would give (the sampler hands each worker (epoch, index) pairs).

    With ``num_replicas`` > 1 (data-parallel training, ``shuffle=True``), this is rank
    ``rank``'s shard of the epoch's permutation in batches of ``batch_size`` (the local
    batch; the global one is ``num_replicas`` times it).
    """
    if batch_size < 1:
        raise UsageError(f"batch_size must be a positive integer, got {batch_size}")
    if num_workers < 0:
        raise UsageError(f"num_workers must be >= 0, got {num_workers}")
    view = _EpochView(dataset, seed, epoch) if isinstance(dataset, _TransformedImages) else dataset
    persistent_workers = persistent_workers and num_workers > 0
    tag_epoch = persistent_workers and isinstance(view, _EpochView)
    if num_replicas > 1 and not shuffle:
        raise ValueError("a sharded loader shuffles; evaluation shards whole batches instead (see FitRun.evaluate)")
    if num_replicas > 1:
        sampler = _ShardedEpochPermutation(dataset, seed, epoch, num_replicas, rank, tag_epoch)
    else:
        sampler = _EpochPermutation(len(dataset), seed, epoch, tag_epoch) if shuffle else SequentialSampler(view)
    # DataLoader draws its workers' base seed from this generator; without one it would
    # consume the global RNG and shift the model's random stream.
    generator = torch.Generator().manual_seed(_mix(_WORKER_TAG, seed, epoch))
    return DataLoader(
        view,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        generator=generator,
        persistent_workers=persistent_workers,
    )


def set_loader_epoch(loader: DataLoader, epoch: int) -> DataLoader:
    """``loader`` (from :func:`make_loader`) moved to ``epoch``: its permutation and
    augmentation are then those of ``make_loader(..., epoch=epoch)``."""
    for part in (loader.sampler, loader.dataset):
        if isinstance(part, (_EpochPermutation, _ShardedEpochPermutation, _EpochView)):
            part.epoch = epoch
    return loader
