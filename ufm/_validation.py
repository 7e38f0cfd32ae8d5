"""Input checks shared by every public entry point.

Each check raises a ValueError whose message names the argument and the problem, so that a bad
call fails at the boundary rather than as a silent NaN deep inside a solver.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np


class EqualClassMeans(ValueError):
    """All class means coincide (to rounding): the between-class covariance is zero and the
    neural-collapse measures are undefined (e.g. a network whose last ReLUs are all inactive)."""


def check_choice(name: str, value: str, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``; otherwise raise a ValueError listing them."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid choices: {', '.join(map(repr, choices))}")
    return value


def check_classes(C: Any) -> int:
    """Number of classes: an integer C >= 2."""
    if isinstance(C, bool) or int(C) != C or C < 2:
        raise ValueError(f"the number of classes C must be an integer >= 2, got {C!r}")
    return int(C)


def check_positive_int(name: str, value: Any) -> int:
    """An integer >= 1."""
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_nonneg(name: str, value: Any) -> float:
    """A finite real number >= 0 (weight decays, times, tolerances)."""
    v = float(value)
    if not np.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def check_positive(name: str, value: Any) -> float:
    """A finite real number > 0 (learning rates, time budgets)."""
    v = float(value)
    if not np.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def check_torch_device(device: str) -> None:
    """A device string that torch reads and this machine has, checked before any work goes there."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a torch device ({err}); use 'cpu' or 'cuda'") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {device!r} is not one ufm computes on; use 'cpu', 'cuda' or 'mps'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but torch sees no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r} requested but torch sees {torch.cuda.device_count()} CUDA devices"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} requested but torch sees no MPS device")


def check_label_smoothing(a: Any) -> float:
    """Label smoothing a in [0, 1): a = 1 would make every target 1/C and erase the labels."""
    v = float(a)
    if not (0.0 <= v < 1.0):
        raise ValueError(f"label_smoothing must be in [0, 1), got {a!r}")
    return v


def check_finite(name: str, array: Any) -> np.ndarray:
    """A float array with no NaN or infinity; reports how many entries are bad."""
    a = np.asarray(array, dtype=float)
    bad = ~np.isfinite(a)
    if bad.any():
        raise ValueError(f"{name} has {int(bad.sum())} non-finite entries (NaN or inf) out of {a.size}")
    return a


def check_reiterable(name: str, batches: Any) -> None:
    """Refuse a one-shot iterator (a generator, ``iter(loader)``) as the batches of two passes: the
    second pass would see none, and the error would come only after the first."""
    if isinstance(batches, Iterator):
        raise ValueError(
            f"{name} is a one-shot iterator ({type(batches).__name__}), but the measurement reads the "
            "batches twice: pass a list, a DataLoader without shuffling, or a zero-argument callable that "
            "returns a fresh iterable"
        )


def check_shape(name: str, array: np.ndarray, shape: tuple[int | None, ...]) -> np.ndarray:
    """Check ``array.shape`` against ``shape``; ``None`` entries match any size."""
    ok = array.ndim == len(shape) and all(s is None or s == a for s, a in zip(shape, array.shape))
    if not ok:
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} must have shape {want}, got {tuple(array.shape)}")
    return array


def check_labels(labels: Any, n: int, C: int | None = None) -> tuple[np.ndarray, int]:
    """Integer class labels of length ``n`` in 0..C-1; returns (labels, C).

    With ``C`` None the number of classes is max(label) + 1. Every class must have at least one
    example, since class means are undefined otherwise.
    """
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"labels must be a 1-D array of length {n} (one per example), got shape {y.shape}")
    if n == 0:
        raise ValueError("no examples: labels is empty")
    if y.dtype == bool or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise ValueError(
            f"labels must be integers 0..C-1, got dtype {y.dtype} (e.g. {y[0].tolist()!r}); map class names to "
            "integers first, e.g. np.unique(labels, return_inverse=True)[1]"
        )
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
            raise ValueError("labels must be integers 0..C-1")
        y = y.astype(np.int64)
    if y.min() < 0 or (C is not None and y.max() >= C):
        hi = "C-1" if C is None else str(C - 1)
        raise ValueError(f"labels out of range: found {y.min()}..{y.max()}, expected 0..{hi}")
    source = f"the largest label is {int(y.max())}" if C is None else "as given"
    C = int(y.max()) + 1 if C is None else int(C)
    # Every class needs an example, so C <= n: checked before any per-class array (of C entries) is
    # allocated, since a single stray label of 10^9 would otherwise ask for gigabytes.
    if C > n:
        raise ValueError(
            f"C = {C} classes ({source}) but there are only {n} examples, "
            f"so at least {C - n} classes have none; check the labels (a stray or unmapped value?)"
        )
    counts = np.bincount(y, minlength=C)
    if (counts == 0).any():
        missing = np.flatnonzero(counts == 0).tolist()
        raise ValueError(f"classes with no examples: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if C < 2:
        raise ValueError("a single class: neural-collapse measures need at least C = 2 classes")
    return y.astype(np.int64, copy=False), C


def available_memory() -> int | None:
    """Bytes this process may still allocate: the system's available memory (``MemAvailable`` of
    /proc/meminfo, else free physical pages), capped by an address-space limit; None if unknown."""
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            pass
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            avail = soft if avail is None else min(avail, soft)
    except (ImportError, OSError, ValueError):
        pass
    return avail


def check_memory(what: str, nbytes: float, hint: str) -> None:
    """Refuse, before allocating, work whose estimated ``nbytes`` exceed the available memory."""
    avail = available_memory()
    if avail is not None and nbytes > avail:
        raise ValueError(
            f"{what} needs about {nbytes / 2**30:.3g} GiB, more than the {avail / 2**30:.3g} GiB of memory "
            f"available; {hint}"
        )


def output_directory(path: str | os.PathLike[str], *, create: bool = True) -> Path:
    """``path`` as the output directory of ``--out``, created with its parents unless ``create`` is
    False. Checked before the work that fills it, so a bad path fails at once, not after the work: a
    ValueError when it is a file, or cannot be created (the reason in the message)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(
            f"--out {out} is a file, not a directory: name a directory (it is created if missing)"
        )
    if create:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"cannot create the --out directory {out}: {err.strerror or err}") from None
    return out


def claim_outputs(path: str | os.PathLike[str], names: Iterable[str], *, overwrite: bool) -> Path:
    """The output directory ``path`` (:func:`output_directory`) for the files ``names``: refused when it
    already holds one of them, the result of an earlier run, unless ``overwrite`` (they are replaced)."""
    out = output_directory(path, create=False)
    found = [name for name in names if (out / name).exists()]
    if found and not overwrite:
        raise ValueError(
            f"{out} already holds {', '.join(found)} of an earlier run: replace them with --overwrite, "
            "or choose another --out"
        )
    return output_directory(out)
