"""Data for the continual-learning recipes: Split Digits, Split MNIST and Split CIFAR-10.

Every data set is read into memory once as tensors (they are small), split into tasks of two
classes each, and served by ``RandomBatches``: a plain iterable of shuffled mini-batches that can
live on the GPU, so training pays no ``DataLoader`` worker overhead.

Sources, in order:

* local files under ``data_dir`` (MNIST's gzipped IDX files, CIFAR-10's JPEG tarball), read with
  plain readers (``gzip``/``numpy``, ``tarfile``/Pillow) so they work where ``datasets`` is absent;
  decoded CIFAR-10 is cached as ``.npz`` under ``cache_dir``;
* the official Hugging Face hub copies through ``datasets`` when the files are missing and the user
  has a network (``download=True``);
* scikit-learn's bundled ``load_digits`` (no download at all).
"""

from __future__ import annotations

import functools
import gzip
import io
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

DATASETS = ("digits", "mnist", "cifar10")
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CIFAR10_TARBALL = "cifar10/cifar10-jpg.tar.gz"
HUB_NAMES = {"mnist": ("ylecun/mnist", "image"), "cifar10": ("uoft-cs/cifar10", "img")}


class DataNotFoundError(FileNotFoundError):
    """Raised when a data set is neither in ``data_dir`` nor downloadable."""


@dataclass
class ArraySplit:
    """A labelled split as uint8/float images ``x`` (N, ...) and int64 labels ``y`` (N,)."""

    x: np.ndarray
    y: np.ndarray


@dataclass
class Task:
    """One task of a class-split benchmark: its classes and its train and test tensors."""

    classes: tuple[int, ...]
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def default_cache_dir() -> Path:
    """``$LIGHTNING_FISHER_CACHE`` or ``~/.cache/lightning_fisher``."""
    env = os.environ.get("LIGHTNING_FISHER_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "lightning_fisher"


# Readers ----------------------------------------------------------------------------------------
def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file, the format of the original MNIST distribution."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic number).")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: expected {shape}, found {arr.size} bytes.")
    return arr.reshape(shape).copy()  # writable, so torch.from_numpy does not warn


def _missing(name: str, where: Path, what: str) -> DataNotFoundError:
    return DataNotFoundError(
        f"{name} not found: expected {what} under {where}. Pass `--data-dir` pointing at the folder "
        "that holds it (in this project: `--data-dir ../shared/data`), or pass `--download` to "
        "fetch the official copy with the `datasets` library (needs a network)."
    )


def load_mnist_files(data_dir: Path) -> dict[str, ArraySplit]:
    """MNIST from ``data_dir/mnist`` (or ``data_dir``) in the original gzipped IDX format."""
    for root in (data_dir / "mnist", data_dir):
        if all((root / f).exists() for pair in MNIST_FILES.values() for f in pair):
            return {
                split: ArraySplit(read_idx(root / xs), read_idx(root / ys).astype(np.int64))
                for split, (xs, ys) in MNIST_FILES.items()
            }
    raise _missing(
        "MNIST", data_dir, "mnist/" + ", ".join(MNIST_FILES["train"] + MNIST_FILES["test"])
    )


def load_cifar10_tarball(tarball: Path, cache_dir: Path | None = None) -> dict[str, ArraySplit]:
    """CIFAR-10 from a tar of JPEGs ``*/{train,test}/<class>/NNNN.jpg``, decoded with Pillow.

    The decoded arrays are cached as ``.npz`` (keyed by the tarball's size and mtime) because
    decoding 60,000 JPEGs takes about a minute on two cores.
    """
    from PIL import Image

    stat = tarball.stat()
    cache = (cache_dir or default_cache_dir()) / f"cifar10-{stat.st_size}-{int(stat.st_mtime)}.npz"
    if cache.exists():
        with np.load(cache) as z:
            return {s: ArraySplit(z[f"{s}_x"], z[f"{s}_y"]) for s in ("train", "test")}
    index = {c: i for i, c in enumerate(CIFAR10_CLASSES)}
    items: dict[str, list[tuple[str, int, np.ndarray]]] = {"train": [], "test": []}
    with tarfile.open(tarball, "r:*") as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or not member.name.endswith(".jpg") or len(parts) < 3:
                continue
            split, cls = parts[-3], parts[-2]
            if split not in items or cls not in index:
                continue
            f = tar.extractfile(member)
            assert f is not None
            img = np.asarray(Image.open(io.BytesIO(f.read())).convert("RGB"), dtype=np.uint8)
            items[split].append((member.name, index[cls], img))
    if not items["train"] or not items["test"]:
        raise DataNotFoundError(
            f"{tarball} holds no `train/<class>/*.jpg` and `test/<class>/*.jpg` images of the "
            f"CIFAR-10 classes {CIFAR10_CLASSES}."
        )
    out = {}
    for split, rows in items.items():
        rows.sort(key=lambda r: r[0])  # tar order is not guaranteed; make the arrays reproducible
        out[split] = ArraySplit(np.stack([r[2] for r in rows]), np.array([r[1] for r in rows]))
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, **{f"{s}_{k}": getattr(a, k) for s, a in out.items() for k in ("x", "y")})
    tmp.replace(cache)  # atomic, so parallel workers never read a half-written cache
    return out


def load_from_hub(name: str) -> dict[str, ArraySplit]:
    """The official copy from the Hugging Face hub through ``datasets`` (needs a network)."""
    try:
        import datasets
    except ImportError as err:
        raise DataNotFoundError(
            f"Downloading {name} needs the `datasets` library: `pip install datasets`, or pass "
            "`--data-dir` with local files."
        ) from err
    repo, column = HUB_NAMES[name]
    ds = datasets.load_dataset(repo)
    return {
        split: ArraySplit(
            np.stack([np.asarray(im) for im in ds[split][column]]).astype(np.uint8),
            np.asarray(ds[split]["label"], dtype=np.int64),
        )
        for split in ("train", "test")
    }


@functools.lru_cache(maxsize=4)
def load_digits_arrays(seed: int = 0, test_fraction: float = 0.3) -> dict[str, ArraySplit]:
    """scikit-learn's 8x8 digits (bundled, no download), split per class into train and test.

    Cached: many short runs (tests, the demo) reuse it; callers must not modify the arrays."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise DataNotFoundError(
            "Split Digits needs scikit-learn (`pip install scikit-learn`, or the `recipes` extra)."
        ) from err
    bunch = load_digits()
    x = (bunch.data.reshape(-1, 8, 8) * (255.0 / 16.0)).round().astype(np.uint8)
    y = bunch.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test[idx[: round(len(idx) * test_fraction)]] = True
    return {"train": ArraySplit(x[~test], y[~test]), "test": ArraySplit(x[test], y[test])}


def load_arrays(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
) -> dict[str, ArraySplit]:
    """Train and test arrays of ``digits``, ``mnist`` or ``cifar10``."""
    if name not in DATASETS:
        raise ValueError(f"Unknown data set {name!r}; choose one of {', '.join(DATASETS)}.")
    if name == "digits":
        return load_digits_arrays()
    root = Path(data_dir) if data_dir is not None else None
    if root is not None and not root.is_dir() and not download:
        raise DataNotFoundError(
            f"--data-dir {root} is not a folder. Point it at the folder holding `mnist/` and "
            "`cifar10/` (in this project: `../shared/data`), or pass `--download`."
        )
    try:
        if root is None:
            raise _missing(name, Path("."), "local files (no --data-dir given)")
        if name == "mnist":
            return load_mnist_files(root)
        for tarball in (root / CIFAR10_TARBALL, root / Path(CIFAR10_TARBALL).name):
            if tarball.exists():
                return load_cifar10_tarball(tarball, Path(cache_dir) if cache_dir else None)
        raise _missing("CIFAR-10", root, CIFAR10_TARBALL)
    except DataNotFoundError:
        if download:
            return load_from_hub(name)
        raise


# Tensors and tasks ------------------------------------------------------------------------------
def to_tensor(
    x: np.ndarray, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> Tensor:
    """uint8 images (N, H, W) or (N, H, W, 3) -> float32 (N, C, H, W) in [0, 1], optionally
    normalised per channel."""
    t = torch.from_numpy(np.ascontiguousarray(x)).float().div_(255.0)
    t = t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2).contiguous()
    if mean is not None and std is not None:
        m = torch.tensor(mean).view(1, -1, 1, 1)
        s = torch.tensor(std).view(1, -1, 1, 1)
        t = (t - m) / s
    return t


def permuted_class_order(n_classes: int, seed: int) -> list[int]:
    """The classes in the order a per-seed random permutation assigns them to tasks.

    This is how van de Ven's code builds Split MNIST / Split CIFAR-10 for every seed but 0: it seeds
    NumPy's legacy generator with the run's seed, draws ``p = permutation(n_classes)``, relabels
    class ``c`` as ``p[c]`` and gives task ``t`` the new labels ``2t, 2t + 1``; so task ``t`` holds
    the original classes ``argsort(p)[2t : 2t + 2]``, which is what this returns (flattened).
    """
    p = np.random.RandomState(seed).permutation(n_classes)
    return [int(c) for c in np.argsort(p)]


def split_tasks(
    arrays: dict[str, ArraySplit],
    classes_per_task: int = 2,
    n_tasks: int | None = None,
    normalise: bool = False,
    max_train_per_task: int | None = None,
    device: str | torch.device = "cpu",
    class_order: Sequence[int] | None = None,
) -> list[Task]:
    """Split a data set into tasks of ``classes_per_task`` classes each.

    By default the classes go to tasks in their natural order (0-1, 2-3, ...); ``class_order``
    lists them in another order (task ``t`` gets ``class_order[t * k : (t + 1) * k]``). Labels are
    never renamed: a task's ``classes`` are the original class indices, which are also the output
    units it uses.

    Args:
        arrays: ``{"train": ..., "test": ...}`` as ``load_arrays`` returns them.
        classes_per_task: classes in each task.
        n_tasks: keep only the first ``n_tasks`` tasks (all if ``None``).
        normalise: subtract the training set's per-channel mean and divide by its std.
        max_train_per_task: keep the first ``n`` training inputs of each task (quick runs, tests).
        device: where the tensors live (preload to the GPU for fast training).
        class_order: a permutation of ``range(n_classes)`` (e.g. ``permuted_class_order``), or
            ``None`` for the natural order.
    """
    x_train = to_tensor(arrays["train"].x)
    mean = std = None
    if normalise:
        mean = x_train.mean(dim=(0, 2, 3)).tolist()
        std = x_train.std(dim=(0, 2, 3)).tolist()
    x_train = to_tensor(arrays["train"].x, mean, std)
    x_test = to_tensor(arrays["test"].x, mean, std)
    y_train = torch.from_numpy(arrays["train"].y)
    y_test = torch.from_numpy(arrays["test"].y)
    n_classes = int(y_train.max()) + 1
    order = list(range(n_classes)) if class_order is None else [int(c) for c in class_order]
    if sorted(order) != list(range(n_classes)):
        raise ValueError(
            f"class_order must list each of the {n_classes} classes once; got {list(order)}."
        )
    total = n_classes // classes_per_task
    tasks = []
    for t in range(total if n_tasks is None else min(n_tasks, total)):
        cls = tuple(order[t * classes_per_task : (t + 1) * classes_per_task])
        tr = torch.isin(y_train, torch.tensor(cls)).nonzero().squeeze(1)
        te = torch.isin(y_test, torch.tensor(cls)).nonzero().squeeze(1)
        if max_train_per_task is not None:
            tr = tr[:max_train_per_task]
        tasks.append(
            Task(
                cls,
                x_train[tr].to(device),
                y_train[tr].to(device),
                x_test[te].to(device),
                y_test[te].to(device),
            )
        )
    return tasks


class RandomBatches:
    """``n_batches`` shuffled full mini-batches of in-memory tensors, reshuffled every epoch.

    A plain iterable with ``len``, which Lightning accepts as a train dataloader; the tensors stay
    where they are (e.g. on the GPU), so there are no worker processes and no copies. Seeded, so a
    run is reproducible.
    """

    def __init__(
        self, x: Tensor, y: Tensor, batch_size: int, n_batches: int, seed: int = 0
    ) -> None:
        if len(x) == 0:
            raise ValueError("RandomBatches got an empty data set.")
        self.x, self.y = x, y
        self.batch_size = min(batch_size, len(x))
        self.n_batches = n_batches
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n, b = len(self.x), self.batch_size
        order = torch.empty(0, dtype=torch.long)
        pos = 0
        for _ in range(self.n_batches):
            if pos + b > len(order):  # the rest of this epoch cannot fill a batch: new epoch
                order, pos = torch.randperm(n, generator=self.generator).to(self.x.device), 0
            yield self.x[order[pos : pos + b]], self.y[order[pos : pos + b]]
            pos += b


class _BatchTensors(TensorDataset):
    """A ``TensorDataset`` that fetches a whole batch with one indexing op (``__getitems__``), not
    one item at a time: per-item fetches of GPU tensors would dominate a Fisher pass."""

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, ...]:
        idx = torch.as_tensor(indices, device=self.tensors[0].device)
        return tuple(t[idx] for t in self.tensors)


def _already_batched(batch: Any) -> Any:
    return batch


def task_loader(x: Tensor, y: Tensor, batch_size: int) -> DataLoader[tuple[Tensor, ...]]:
    """A sequential ``DataLoader`` over one task's tensors for Fisher passes (map-style, so
    EXACT(n) can draw a random subset of it)."""
    return DataLoader(
        _BatchTensors(x, y), batch_size=batch_size, shuffle=False, collate_fn=_already_batched
    )
