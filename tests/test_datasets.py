"""Data: the embedded digits, the IDX and CIFAR-10 readers on files written here in the exact formats,
balanced subsets, and clear errors for bad input."""

import gzip
import os
import pickle
import struct

import numpy as np
import pytest

from ufm.datasets import DATASETS, Dataset, balanced_indices, load_dataset, read_cifar10_batch, read_idx

# IDX type codes (Y. LeCun's MNIST page), written independently of the reader's table.
IDX_CODES = {
    np.uint8: 0x08,
    np.int8: 0x09,
    np.int16: 0x0B,
    np.int32: 0x0C,
    np.float32: 0x0D,
    np.float64: 0x0E,
}


def write_idx(path, array, *, gz=False):
    """Write ``array`` in the IDX format: 0, 0, type code, ndim, big-endian uint32 sizes, big-endian data."""
    header = struct.pack(">BBBB", 0, 0, IDX_CODES[array.dtype.type], array.ndim)
    header += struct.pack(">" + "I" * array.ndim, *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def fake_mnist(directory, rng, *, per_class=(3, 2), gz=False, dotted=False):
    """Write train/t10k images and labels; returns the arrays written."""
    arrays = {}
    for stem, n in (("train", per_class[0]), ("t10k", per_class[1])):
        labels = np.repeat(np.arange(10, dtype=np.uint8), n)
        images = rng.integers(0, 256, size=(labels.size, 28, 28), dtype=np.uint8)
        sep = "." if dotted else "-"
        write_idx(directory / f"{stem}-images{sep}idx3-ubyte{'.gz' if gz else ''}", images, gz=gz)
        write_idx(directory / f"{stem}-labels{sep}idx1-ubyte{'.gz' if gz else ''}", labels, gz=gz)
        arrays[stem] = (images, labels)
    return arrays


def cifar_batch(rng, n):
    labels = [int(c) for c in rng.integers(0, 10, size=n)]
    # The first ten labels cover every class, so any subset of one per class exists.
    labels[:10] = range(10)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    return {b"batch_label": b"testing", b"labels": labels, b"data": data, b"filenames": [b"x.png"] * n}


def fake_cifar(directory, rng, n=12):
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = cifar_batch(rng, n)
        # Protocol 2 is what the original python-2 CIFAR files use.
        (directory / name).write_bytes(pickle.dumps(batches[name], protocol=2))
    return batches


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trips_every_type(tmp_path, rng, dtype, gz):
    array = (rng.normal(size=(4, 3, 2)) * 50).astype(dtype)
    out = read_idx(write_idx(tmp_path / "a.idx", array, gz=gz))
    assert out.dtype == np.dtype(dtype) and out.shape == array.shape
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dotted", [False, True])
def test_mnist_directory_keeps_images_and_split(tmp_path, rng, gz, dotted):
    written = fake_mnist(tmp_path, rng, gz=gz, dotted=dotted)
    data = load_dataset(f"mnist:{tmp_path}")
    assert data.C == 10 and data.N == 3 and data.input_shape == (1, 28, 28)
    assert data.x_test.shape == (20, 1, 28, 28)
    np.testing.assert_array_equal(data.y_train, np.repeat(np.arange(10), 3))
    # Undo the standardization with the training subset's own statistics: pixels must come back.
    images, labels = written["train"]
    raw = images.astype(np.float64) / 255
    for c in range(10):
        got = np.sort(data.x_train[data.y_train == c, 0].reshape(3, -1), axis=0)
        want = np.sort(raw[labels == c].reshape(3, -1), axis=0)
        z = (want - raw.mean()) / raw.std()
        np.testing.assert_allclose(got, z, rtol=1e-5, atol=1e-5)


def test_fashion_has_its_class_names(tmp_path, rng):
    fake_mnist(tmp_path, rng)
    data = load_dataset(f"fashion:{tmp_path}", per_class=2, test_per_class=1)
    assert data.classes[0] == "t-shirt/top" and data.N == 2 and data.y_test.shape == (10,)


def test_cifar_batch_layout_is_rgb_planes(tmp_path, rng):
    batch = cifar_batch(rng, 11)
    (tmp_path / "b").write_bytes(pickle.dumps(batch, protocol=2))
    images, labels = read_cifar10_batch(tmp_path / "b")
    assert images.shape == (11, 3, 32, 32) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, batch[b"labels"])
    # Row layout: 1024 red values, then green, then blue, each row-major 32 x 32.
    np.testing.assert_array_equal(images[4, 1, 2, 5], batch[b"data"][4, 1024 + 2 * 32 + 5])


@pytest.mark.parametrize("nested", [False, True])
def test_cifar_directory(tmp_path, rng, nested):
    root = tmp_path / "cifar-10-batches-py" if nested else tmp_path
    root.mkdir(exist_ok=True)
    fake_cifar(root, rng)
    data = load_dataset(f"cifar10:{tmp_path}", per_class=1)
    assert data.C == 10 and data.input_shape == (3, 32, 32) and data.x_test.shape[0] == 12
    np.testing.assert_allclose(data.x_train.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(data.x_train.std(axis=(0, 2, 3)), 1, rtol=1e-4)


def test_default_digits_are_balanced_and_split():
    data = load_dataset("default")
    assert data.C == 10 and data.N == 400 and data.x_test.shape == (1000, 1, 28, 28)
    np.testing.assert_array_equal(np.bincount(data.y_test), np.full(10, 100))
    np.testing.assert_array_equal(data.y_train, np.repeat(np.arange(10), 400))
    # No training image reappears in the test set.
    train = {row.tobytes() for row in data.x_train.reshape(4000, -1)}
    assert not any(row.tobytes() in train for row in data.x_test.reshape(1000, -1))


def test_balanced_subsets_are_nested():
    labels = np.repeat(np.arange(4), 10)
    small, large = balanced_indices(labels, 3, 4), balanced_indices(labels, 6, 4)
    np.testing.assert_array_equal(labels[small], np.repeat(np.arange(4), 3))
    for c in range(4):
        assert set(small[3 * c : 3 * c + 3]) <= set(large[6 * c : 6 * c + 6])


def test_counts_and_N_of_a_hand_built_unbalanced_dataset(tmp_path, rng):
    """The loaders give equal counts; a Dataset built by hand may not, and then has no N."""
    fake_mnist(tmp_path, rng)
    data = load_dataset(f"mnist:{tmp_path}")
    assert data.counts == (3,) * 10 and data.balanced and data.N == 3
    labels = np.array([0] * 8 + [1] * 4 + [2] * 2 + [3])
    unbalanced = Dataset(
        name="hand", x_train=np.zeros((15, 1, 2, 2), np.float32), y_train=labels,
        x_test=np.zeros((0, 1, 2, 2), np.float32), y_test=np.zeros(0, np.int64),
        classes=("a", "b", "c", "d"), source="test",
    )  # fmt: skip
    assert unbalanced.counts == (8, 4, 2, 1) and not unbalanced.balanced
    with pytest.raises(ValueError, match=r"only for balanced classes; got counts \(8, 4, 2, 1\)"):
        _ = unbalanced.N


def test_unknown_dataset_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown dataset 'svhn'.*'mnist'"):
        load_dataset("svhn:/tmp")
    assert set(DATASETS) == {"default", "mnist", "fashion", "cifar10"}


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(ValueError, match="needs a directory"):
        load_dataset("mnist")
    with pytest.raises(OSError, match="no such directory"):
        load_dataset(f"mnist:{tmp_path / 'nope'}")
    with pytest.raises(OSError, match="train-images-idx3-ubyte"):
        load_dataset(f"mnist:{tmp_path}")
    with pytest.raises(OSError, match="data_batch_1"):
        load_dataset(f"cifar10:{tmp_path}")


def test_too_many_per_class(tmp_path, rng):
    fake_mnist(tmp_path, rng)
    with pytest.raises(ValueError, match="per_class=4 but class"):
        load_dataset(f"mnist:{tmp_path}", per_class=4)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "not an IDX file"),
        (b"\x00\x00\x08\x03\x00\x00", "truncated IDX header"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x05abc", "says shape"),
        (b"\x00\x00\x01\x01\x00\x00\x00\x01a", "bad magic"),
        (b"\x1f\x8b\x08\x00garbage", "corrupt gzip"),
    ],
)
def test_corrupt_idx(tmp_path, content, message):
    (tmp_path / "x").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_idx(tmp_path / "x")


def test_corrupt_and_malicious_cifar(tmp_path, rng):
    (tmp_path / "junk").write_bytes(os.urandom(64))
    with pytest.raises(ValueError, match="corrupt CIFAR-10 batch"):
        read_cifar10_batch(tmp_path / "junk")
    # A pickle that would call os.system must be refused before anything runs.
    (tmp_path / "evil").write_bytes(pickle.dumps({b"data": os.system}))
    with pytest.raises(ValueError, match="not allowed"):
        read_cifar10_batch(tmp_path / "evil")
    bad = cifar_batch(rng, 4)
    bad[b"data"] = bad[b"data"][:, :100]
    (tmp_path / "short").write_bytes(pickle.dumps(bad))
    with pytest.raises(ValueError, match="expected \\(n, 3072\\)"):
        read_cifar10_batch(tmp_path / "short")
