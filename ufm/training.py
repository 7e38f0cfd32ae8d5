"""Training deep homogeneous networks with the poster's regularized square loss, measuring collapse.

Objective (poster; THEORY.md), over the N*C training examples with one-hot targets y:

    L(W) = 1/(2NC) sum_{n,c,i} (y_{n(c)}^(i) - f^(i)(x_{n(c)}))^2 + lambda/2 sum_k ||W_k||_F^2.

On a mini-batch B the data term is estimated by 1/(2|B|) sum_{x in B} ||y - f(x)||^2 (the sum runs over
all C outputs, the mean over examples). Weight decay is added to the gradient explicitly,
grad += lambda W_k for every layer k (or lambda rho_k under weight normalization, where ||W_k||^2 =
rho_k^2), before the step of plain SGD with momentum; this is the same update as
``torch.optim.SGD(weight_decay=lambda)``, written out so that the Lagrange-multiplier projection of
:mod:`ufm.networks` sees the full gradient.

Every ``measure_every`` epochs (and at epoch 0 and the last epoch) :func:`measure_network` records:
train/test loss and accuracy; NC1-NC4 from :func:`ufm.metrics.nc_metrics` on the penultimate features
(collected by a forward hook); the Frobenius norm of every layer and their product rho; the numerical
and stable rank of every weight matrix; the symmetric quasi-interpolation (SQI) residuals; and the
poster's theorem evaluated at the measured eps and lambda beside the measured values:

* ||W_L^c||^2 = (eps - C eps^2/(C-1)) / (C lambda)                 (NC2 equinorm)
* W_L^c = eps/(lambda (C-1)) (mu_c - mu_G)                          (NC3; scale fitted by least squares)
* cos(W_L^c, W_L^c') = -1/(C-1)                                      (NC2 equiangularity)

During the last epoch the weights and the outputs on a fixed probe set are tracked step by step: their
fluctuation across those late steps is the SGD noise of the journal paper.

Checkpoints (model, optimizer, scheduler, the state of the generator that orders mini-batches, history) are written every
``checkpoint_every`` epochs; ``resume=True`` continues from the last one and, on the CPU, reaches
bit-identical weights and history. A run whose loss becomes non-finite or explodes stops with a clear
message, leaving the last good checkpoint untouched.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import closed_form
from ._validation import check_choice, check_nonneg, check_positive_int
from .datasets import Dataset, load_dataset
from .geometry import mean_cosine
from .networks import FEATURE_LAYER, HomogeneousNet, build_network
from .tables import write_csv, write_json

__all__ = [
    "SCHEDULES",
    "TrainConfig",
    "TrainResult",
    "WeightDecayExperiment",
    "format_theory_table",
    "measure_network",
    "train",
    "weight_decay_experiment",
]

# A loss above this multiple of the loss at initialization (or a non-finite loss) means divergence:
# the square loss of a fitting run only decreases from its start, so a 1e3-fold increase is no
# fluctuation but the blow-up of a too-large step.
DIVERGENCE_FACTOR = 1e3

# Singular values below this fraction of the largest one count as zero in the numerical rank
# (1e-2: float32 training leaves directions of size ~1e-3 that weight decay is still shrinking).
RANK_RTOL = 1e-2

# Examples per class of the probe set on which the late-step output fluctuation is measured.
NOISE_PROBE_PER_CLASS = 10

# Examples per forward pass when measuring (bounds memory for CIFAR-sized inputs).
MEASURE_CHUNK = 2048

CHECKPOINT = "checkpoint.pt"
HISTORY = "history.csv"
CONFIG = "config.json"
FINAL = "final.json"


def _step_schedule(optimizer, epochs: int):
    # Divide the learning rate by 10 at 50% and 75% of training (Papyan, Han and Donoho 2020).
    milestones = sorted({max(1, epochs // 2), max(1, (3 * epochs) // 4)})
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)


def _cosine_schedule(optimizer, epochs: int):
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)


def _constant_schedule(optimizer, epochs: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


# Learning-rate schedules by name: factory(optimizer, epochs) -> scheduler stepped once per epoch.
SCHEDULES = {"step": _step_schedule, "cosine": _cosine_schedule, "constant": _constant_schedule}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (the defaults are the poster's experiment).

    The defaults were chosen by a measured sweep on the embedded MNIST digits (issue 9): weight decay
    acts through lr * wd * steps, and 6,000 steps at lr 0.02 (momentum 0.9) with lambda = 5e-3 fit the
    training set exactly and, at the last epoch, gave NC3 9.1x, NC1 23x and NC2-equiangle 2.6x lower
    than the same run without weight decay (3,000 steps: NC3 only 3.3x; lambda = 2e-3: 2.5x). A run
    took 60 s with one torch thread and 3.5 min with two on a shared, busy 2-core machine.

    Attributes
    ----------
    dataset : str
        Spec for :func:`ufm.datasets.load_dataset` (``default``, ``mnist:DIR``, ...).
    arch : str
        ``"mlp"`` or ``"cnn"`` (:data:`ufm.networks.ARCHITECTURES`).
    depth, width : int
        L weight layers; hidden units (MLP) or channels (CNN), p = width.
    wd : float
        lambda, weight decay on every layer.
    lr : float
        Initial learning rate eta.
    epochs, batch_size : int
    per_class : int or None
        N training examples per class (None: all that the data set has, balanced).
    test_per_class : int or None
        Test examples per class (None: the whole test set).
    weight_norm : bool
        W_k = rho_k V_k with ||V_k|| = 1 kept by Lagrange multipliers (:mod:`ufm.networks`).
    seed : int
        Seeds the initial weights and the order of the mini-batches.
    momentum : float
        SGD momentum in [0, 1).
    schedule : str
        Learning-rate schedule in :data:`SCHEDULES`.
    measure_every, checkpoint_every : int
        Epochs between measurements and between checkpoints.
    device : str
        ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``. Not part of the run's identity
        (a run may be resumed on another device), but bit-identical resumption is promised on the CPU only.
    """

    dataset: str = "default"
    arch: str = "mlp"
    depth: int = 3
    width: int = 128
    wd: float = 5e-3
    lr: float = 0.02
    epochs: int = 300
    batch_size: int = 50
    per_class: int | None = 100
    test_per_class: int | None = None
    weight_norm: bool = False
    seed: int = 0
    momentum: float = 0.9
    schedule: str = "step"
    measure_every: int = 1
    checkpoint_every: int = 10
    device: str = "auto"

    def __post_init__(self):
        check_choice("arch", self.arch, ("mlp", "cnn"))
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("device", self.device, ("auto", "cpu", "cuda"))
        for name in ("depth", "width", "epochs", "batch_size", "measure_every", "checkpoint_every"):
            check_positive_int(name, getattr(self, name))
        for name in ("per_class", "test_per_class"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        check_nonneg("wd", self.wd)
        if check_nonneg("lr", self.lr) == 0:
            raise ValueError("lr must be > 0")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if isinstance(self.seed, bool) or int(self.seed) != self.seed:
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TrainResult:
    """Outcome of :func:`train`.

    Attributes
    ----------
    config : TrainConfig
    history : dict of str -> ndarray, each of shape (n_measured,)
        One column per measured quantity (see :func:`measure_network`), one entry per measured
        epoch (column ``epoch``). Predictions undefined at lambda = 0 are NaN here.
    final : dict
        The last measured row (None where undefined) plus the SGD-noise measures ``noise_*``.
    singular_values : tuple of ndarray
        Singular values of W_1, ..., W_L at the end (convolutions reshaped to (out, in*k*k)).
    success : bool
        True when all epochs ran.
    status : int
        0 finished, 1 diverged (stopped early; see ``message``).
    message : str
    nsteps : int
        SGD steps taken in total (lr * wd * nsteps is what weight decay acts through).
    wall_s : float
        Seconds spent in this call.
    out : Path or None
        Directory holding checkpoint, history CSV, config and final JSON.
    """

    config: TrainConfig
    history: dict[str, np.ndarray]
    final: dict
    singular_values: tuple[np.ndarray, ...]
    success: bool
    status: int
    message: str
    nsteps: int
    wall_s: float
    out: Path | None = field(default=None)


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` without a GPU is an error."""
    check_choice("device", device, ("auto", "cpu", "cuda"))
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch sees no CUDA device")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def _square_loss(f: torch.Tensor, y: torch.Tensor, C: int) -> torch.Tensor:
    """1/(2n) sum_{n,i} (y_n^(i) - f^(i)(x_n))^2 with one-hot y: the poster's 1/(2NC) sum over n, c, i."""
    onehot = torch.nn.functional.one_hot(y, C).to(f.dtype)  # (n, C)
    return 0.5 * ((f - onehot) ** 2).sum(dim=1).mean()


def _matrix(W: torch.Tensor) -> np.ndarray:
    """A weight as a float64 matrix (out, fan_in); convolutions are flattened over (in, k, k)."""
    return W.detach().reshape(W.shape[0], -1).double().cpu().numpy()


@torch.no_grad()
def _forward_with_features(model: HomogeneousNet, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Outputs f (n, C) and penultimate features h (n, p), float64, via a forward hook on FEATURE_LAYER."""
    captured: list[torch.Tensor] = []
    hook = model.get_submodule(FEATURE_LAYER).register_forward_hook(
        lambda module, inputs, output: captured.append(output.detach())
    )
    try:
        outputs = [model(x[i : i + MEASURE_CHUNK]) for i in range(0, x.shape[0], MEASURE_CHUNK)]
    finally:
        hook.remove()
    f = torch.cat(outputs).double().cpu().numpy()
    h = torch.cat(captured).double().cpu().numpy()
    return f, h


# Scalar measures taken from ufm.metrics.NCMetrics into every history row.
_NC_KEYS = (
    "nc1",
    "nc2_equinorm",
    "nc2_equiangle",
    "nc2_maxangle",
    "nc2_equinorm_w",
    "nc2_equiangle_w",
    "nc2_maxangle_w",
    "nc3",
    "nc4",
    "eps",
    "sqi_spread",
    "sqi_correct_std",
)


def _none_if_nan(x: float) -> float | None:
    return None if not np.isfinite(x) else float(x)


def measure_network(
    model: HomogeneousNet,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    wd: float,
) -> dict[str, float]:
    """All per-epoch measurements of one network, in float64.

    Parameters
    ----------
    model : HomogeneousNet
    x_train : Tensor, shape (N*C, ...); y_train : Tensor, shape (N*C,), int64
        Balanced training set (the NC statistics are taken over it).
    x_test : Tensor, shape (n_test, ...); y_test : Tensor, shape (n_test,)
    wd : float
        lambda, for the regularization term and the theorem's predictions.

    Returns
    -------
    dict of str -> float, NaN where a quantity is undefined (the predictions at lambda = 0):

    * ``train_loss``, ``test_loss`` (data term), ``objective`` (data term + lambda/2 sum ||W_k||^2),
      ``train_acc``, ``test_acc``, ``train_err``;
    * ``nc1``, ``nc2_equinorm``, ``nc2_equiangle``, ``nc2_maxangle``, the same with ``_w`` (classifier
      rows), ``nc3``, ``nc4`` from :func:`ufm.metrics.nc_metrics` on the hooked features (n, p);
    * SQI residuals, also from ``nc_metrics`` (on the outputs f): ``eps`` = 1 - mean correct-class
      output, ``sqi_spread`` = RMS deviation of the wrong-class outputs from eps/(C-1) and
      ``sqi_correct_std`` (both zero under SQI);
    * theory vs measurement: ``w_row_norm_sq`` (mean_c ||W_L^c||^2) and ``w_row_norm_sq_pred``;
      ``w_scale`` (least-squares a in W_L^c ~ a (mu_c - mu_G)) and ``w_scale_pred`` =
      eps/(lambda(C-1)); ``w_cos_mean`` (mean pairwise cosine of W_L's rows) and ``w_cos_pred`` =
      -1/(C-1); ``mu_cos_mean`` the same for the centred class means;
    * ``norm_W{k}`` (Frobenius, k = 1..L), ``rho`` (their product), ``rank_W{k}`` (singular values
      above RANK_RTOL times the largest), ``srank_W{k}`` (stable rank ||W||_F^2/||W||_2^2) and
      ``wl_sv_ratio`` = s_C/s_1 of W_L (zero when W_L has the NC rank C-1).
      ``rho`` also comes from ``nc_metrics``.
    """
    from .metrics import nc_metrics  # written alongside; imported late to keep import order loose

    model.eval()
    y_tr = y_train.cpu().numpy()
    f_tr, H = _forward_with_features(model, x_train)  # (n, C), (n, p)
    f_te, _ = _forward_with_features(model, x_test)
    n, C = f_tr.shape
    onehot = np.eye(C)[y_tr]  # (n, C)
    Ws = [_matrix(W) for W in model.weights()]
    W_L = Ws[-1]  # (C, p)
    sq_norms = np.array([np.sum(W**2) for W in Ws])
    row = {
        "train_loss": 0.5 * np.sum((f_tr - onehot) ** 2) / n,
        "test_loss": 0.5 * np.sum((f_te - np.eye(C)[y_test.cpu().numpy()]) ** 2) / f_te.shape[0],
        "train_acc": np.mean(f_tr.argmax(1) == y_tr),
        "test_acc": np.mean(f_te.argmax(1) == y_test.cpu().numpy()),
    }
    row["train_err"] = 1.0 - row["train_acc"]
    row["objective"] = row["train_loss"] + 0.5 * wd * sq_norms.sum()

    nc = nc_metrics(H, y_tr, W=W_L, outputs=f_tr, layers=Ws)
    for key in _NC_KEYS:
        row[key] = float(getattr(nc, key))
    eps = nc.eps

    # Theorem at the measured eps and lambda (undefined without weight decay).
    mu = np.stack([H[y_tr == c].mean(axis=0) for c in range(C)])  # (C, p) class means
    Mt = mu - H.mean(axis=0)  # (C, p): rows mu_c - mu_G
    has_wd = wd > 0
    row["w_row_norm_sq"] = np.mean(np.sum(W_L**2, axis=1))
    row["w_row_norm_sq_pred"] = closed_form.sqi_w_row_norm_sq(C, eps, wd) if has_wd else np.nan
    row["w_scale"] = np.sum(W_L * Mt) / np.sum(Mt**2)
    row["w_scale_pred"] = closed_form.sqi_w_scale(C, eps, wd) if has_wd else np.nan
    row["w_cos_mean"] = mean_cosine(W_L)
    row["mu_cos_mean"] = mean_cosine(Mt)
    row["w_cos_pred"] = closed_form.sqi_cosine(C)

    for k, W in enumerate(model.weights(), start=1):
        s = _singular_values(W, exact=False)
        row[f"norm_W{k}"] = np.sqrt(sq_norms[k - 1])
        row[f"rank_W{k}"] = int(np.sum(s > RANK_RTOL * s[0]))
        row[f"srank_W{k}"] = sq_norms[k - 1] / s[0] ** 2
    row["rho"] = nc.rho
    row["wl_sv_ratio"] = s[C - 1] / s[0] if len(s) >= C else 0.0  # s: singular values of W_L
    return {k: float(v) for k, v in row.items()}


def _check_dataset_matches(data: Dataset, config: TrainConfig) -> None:
    """A dataset passed to ``train`` must be the one ``config`` names: config.json and resume trust it."""
    if data.name != config.dataset:
        raise ValueError(
            f"the dataset given was loaded from {data.name!r} but config.dataset = {config.dataset!r}"
        )
    if config.per_class is not None and data.N != config.per_class:
        raise ValueError(
            f"the dataset given has N = {data.N} per class but config.per_class = {config.per_class}"
        )
    n_test = len(data.y_test)
    if config.test_per_class is not None and n_test != data.C * config.test_per_class:
        raise ValueError(
            f"the dataset given has {n_test} test examples, not C * config.test_per_class = "
            f"{data.C} * {config.test_per_class}"
        )


@contextlib.contextmanager
def _one_cpu_thread():
    """Run LAPACK calls on one CPU thread: on a shared, busy CPU a multithreaded SVD of a 256 x 784
    matrix was measured 40x slower than a single-threaded one (threads spinning on taken cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _singular_values(W: torch.Tensor, *, exact: bool = True) -> np.ndarray:
    """Singular values of a weight as a matrix (out, fan_in), float64, descending.

    ``exact=False`` takes square roots of the eigenvalues of the smaller Gram matrix (3-4x faster than
    an SVD; values below ~1e-8 of the largest are lost to rounding, far below RANK_RTOL), used for the
    per-epoch ranks. Computed by torch on the weight's device.
    """
    A = W.detach().reshape(W.shape[0], -1).double()
    with _one_cpu_thread():
        if exact:
            return torch.linalg.svdvals(A).cpu().numpy()
        G = A @ A.T if A.shape[0] <= A.shape[1] else A.T @ A
        return torch.linalg.eigvalsh(G).clamp(min=0).sqrt().flip(0).cpu().numpy()


class _Welford:
    """Running mean and summed squared deviation of a stream of tensors (Welford's algorithm)."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, None, None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().double()
        self.count += 1
        if self.mean is None:
            self.mean, self.m2 = x.clone(), torch.zeros_like(x)
            return
        delta = x - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (x - self.mean)

    def relative_std(self) -> float:
        """sqrt(sum of variances) / ||mean||: the typical fluctuation relative to the average."""
        return math.sqrt(float(self.m2.sum()) / self.count) / float(self.mean.norm())


def _jsonable(row: dict) -> dict:
    return {k: _none_if_nan(v) if isinstance(v, float) else v for k, v in row.items()}


def _identity(config: TrainConfig) -> dict:
    """The fields that must match for a checkpoint to be resumed (all but the device)."""
    return {k: v for k, v in config.as_dict().items() if k != "device"}


def train(
    config: TrainConfig,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_after_epoch: int | None = None,
    dataset: Dataset | None = None,
) -> TrainResult:
    """Train a deep homogeneous network with SGD on the regularized square loss, measuring collapse.

    Parameters
    ----------
    config : TrainConfig
    out : str or Path, optional
        Directory for ``checkpoint.pt``, ``history.csv``, ``config.json`` and ``final.json``. Without it
        nothing is written and ``resume`` is not possible.
    resume : bool
        Continue from ``out/checkpoint.pt`` (its configuration must equal ``config`` apart from the
        device). Without a checkpoint the run starts from scratch.
    progress : bool
        Show a tqdm bar on stderr (only when stderr is a terminal).
    stop_after_epoch : int, optional
        Stop after this epoch, as an interruption would (the run can later be resumed).
    dataset : Dataset, optional
        Already loaded data (otherwise loaded from ``config.dataset``).

    Returns
    -------
    TrainResult
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    device = resolve_device(config.device)
    if out is None and resume:
        raise ValueError("resume needs an output directory holding a checkpoint (--out DIR)")
    out = None if out is None else Path(out)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    if stop_after_epoch is not None:
        check_positive_int("stop_after_epoch", stop_after_epoch)
    data = dataset or load_dataset(
        config.dataset, per_class=config.per_class, test_per_class=config.test_per_class
    )
    if dataset is not None:
        _check_dataset_matches(dataset, config)
    C = data.C
    x_train, y_train = torch.from_numpy(data.x_train).to(device), torch.from_numpy(data.y_train).to(device)
    x_test, y_test = torch.from_numpy(data.x_test).to(device), torch.from_numpy(data.y_test).to(device)
    n = x_train.shape[0]
    if config.batch_size > n:
        raise ValueError(f"batch_size={config.batch_size} exceeds the {n} training examples")
    probe = torch.from_numpy(
        np.concatenate([np.flatnonzero(data.y_train == c)[:NOISE_PROBE_PER_CLASS] for c in range(C)])
    ).to(device)

    model = build_network(
        config.arch,
        data.input_shape,
        C,
        depth=config.depth,
        width=config.width,
        weight_norm=config.weight_norm,
        seed=config.seed,
    ).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    scheduler = SCHEDULES[config.schedule](optimizer, config.epochs)
    # The order of mini-batches is the only randomness after initialization; it has its own generator
    # (saved in checkpoints), so measurements or other torch code never perturb it.
    shuffle = torch.Generator().manual_seed(config.seed)
    history: list[dict] = []
    start_epoch, nsteps, noise, note = 0, 0, {}, ""
    saved_epoch = None  # epoch of the checkpoint on disk (None: none written)
    ckpt_path = None if out is None else out / CHECKPOINT
    if resume and ckpt_path.is_file():
        # weights_only: a checkpoint holds tensors and plain Python values only, so no code can run.
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        if state["identity"] != _identity(config):
            diff = sorted(k for k, v in _identity(config).items() if state["identity"].get(k) != v)
            raise ValueError(f"cannot resume {ckpt_path}: its configuration differs in {', '.join(diff)}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        shuffle.set_state(state["shuffle"].cpu())  # a CPU generator, whatever map_location did
        start_epoch, nsteps = state["epoch"], state["nsteps"]
        history, noise, saved_epoch = state["history"], state["noise"], state["epoch"]
    elif resume:
        note = " (no checkpoint to resume from: started from scratch)"
    if out is not None:
        write_json(out / CONFIG, config.as_dict())

    def save_checkpoint(epoch: int) -> None:
        nonlocal saved_epoch
        state = {
            "identity": _identity(config),
            "epoch": epoch,
            "nsteps": nsteps,
            "history": history,
            "noise": noise,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "shuffle": shuffle.get_state(),
        }
        torch.save(state, ckpt_path.with_suffix(".tmp"))
        os.replace(ckpt_path.with_suffix(".tmp"), ckpt_path)  # atomic: a crash never leaves half a file
        saved_epoch = epoch

    def record(epoch: int, lr: float) -> dict:
        """Measure after ``epoch``, which trained at learning rate ``lr``."""
        row = {"epoch": epoch, "step": nsteps, "lr": lr}
        row |= measure_network(model, x_train, y_train, x_test, y_test, config.wd)
        history.append(row)
        if out is not None:
            write_csv(out / HISTORY, history)
        return row

    if start_epoch == 0 and not history:
        record(0, optimizer.param_groups[0]["lr"])
    reference_loss = history[0]["train_loss"]
    last_epoch = config.epochs if stop_after_epoch is None else min(config.epochs, stop_after_epoch)
    status, message = 0, f"finished {config.epochs} epochs{note}"
    bar = tqdm(
        range(start_epoch + 1, last_epoch + 1),
        desc="train",
        unit="epoch",
        file=sys.stderr,
        disable=not progress or not sys.stderr.isatty(),
    )
    for epoch in bar:
        model.train()
        late = epoch == config.epochs
        if late:
            trackers = [_Welford() for _ in model.layers] + [_Welford()]
        order = torch.randperm(n, generator=shuffle).to(device)
        diverged = None
        for i in range(0, n - config.batch_size + 1, config.batch_size):
            idx = order[i : i + config.batch_size]
            loss = _square_loss(model(x_train[idx]), y_train[idx], C)
            value = float(loss.detach())
            if not math.isfinite(value) or value > DIVERGENCE_FACTOR * max(reference_loss, 1.0):
                diverged = value
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():
                for p in model.decay_parameters():
                    p.grad.add_(p, alpha=config.wd)  # d/dW of lambda/2 ||W||^2
            model.project_gradients_()
            optimizer.step()
            model.renormalize_()
            nsteps += 1
            if late:
                with torch.no_grad():
                    for tracker, W in zip(trackers, model.weights()):
                        tracker.add(W)
                    trackers[-1].add(model(x_train[probe]))
        if diverged is not None:
            status = 1
            kept = (
                "this run had written no checkpoint"
                if saved_epoch is None
                else f"the last good checkpoint ({ckpt_path}, epoch {saved_epoch}) is kept"
            )
            why = "not finite" if not math.isfinite(diverged) else f"above {DIVERGENCE_FACTOR:g} x its start"
            message = (
                f"training diverged in epoch {epoch} (step {nsteps + 1}): mini-batch loss {diverged:.4g} is "
                f"{why}; lower --lr (now {config.lr:g}) or --wd (now {config.wd:g}); {kept}"
            )
            break
        lr_used = optimizer.param_groups[0]["lr"]
        scheduler.step()  # before the checkpoint, so a resumed run starts at the next epoch's rate
        if late:
            noise = {f"noise_W{k}": t.relative_std() for k, t in enumerate(trackers[:-1], start=1)}
            noise |= {"noise_out": trackers[-1].relative_std(), "noise_steps": trackers[-1].count}
        if epoch % config.measure_every == 0 or epoch == config.epochs:
            row = record(epoch, lr_used)
            bar.set_postfix(
                loss=f"{row['train_loss']:.3g}", acc=f"{row['train_acc']:.3f}", nc1=f"{row['nc1']:.3g}"
            )
        if ckpt_path is not None and (epoch % config.checkpoint_every == 0 or epoch == last_epoch):
            save_checkpoint(epoch)
    bar.close()
    if status == 0 and last_epoch < config.epochs:
        message = f"stopped after epoch {last_epoch} of {config.epochs}; continue with resume"

    final = _jsonable(history[-1] | noise)
    # A diverged model holds non-finite weights: its singular values are not reported.
    svals = () if status else tuple(_singular_values(W) for W in model.weights())
    if out is not None and status == 0:
        write_json(
            out / FINAL,
            final | {"singular_values": [s.tolist() for s in svals], "status": status, "message": message},
        )
    columns = {
        k: np.array([np.nan if r[k] is None else r[k] for r in history], dtype=float) for k in history[0]
    }
    return TrainResult(
        config=config,
        history=columns,
        final=final,
        singular_values=svals,
        success=status == 0 and last_epoch == config.epochs,
        status=status,
        message=message,
        nsteps=nsteps,
        wall_s=time.perf_counter() - t0,
        out=out,
    )


# ----------------------------------------------------------------------------------------------------
# The poster's experiment: the same run without weight decay and with two weight decays.
# ----------------------------------------------------------------------------------------------------

# Weight decays compared: none, the default, and twice the default.
EXPERIMENT_WDS = (0.0, TrainConfig.wd, 2 * TrainConfig.wd)

# Quick mode (smoke tests, ``ufm reproduce --quick``): 50 digits per class, 1,200 steps, about 10 s a
# run. The larger learning rate keeps lr * wd * steps high enough that the effect still shows (measured:
# NC3 4.0x and NC1 4.7x lower with the default lambda than without; zero training error in both).
QUICK_OVERRIDES = {"per_class": 50, "batch_size": 25, "epochs": 60, "lr": 0.05}

# Columns of the theory-vs-measurement table, (key, heading).
_TABLE_COLUMNS = (
    ("wd", "lambda"),
    ("train_acc", "train acc"),
    ("test_acc", "test acc"),
    ("nc1", "NC1"),
    ("nc2_equinorm", "NC2 norm"),
    ("nc2_equiangle", "NC2 angle"),
    ("nc3", "NC3"),
    ("nc4", "NC4"),
    ("eps", "eps"),
    ("sqi_spread", "SQI spread"),
    ("w_row_norm_sq", "|W_c|^2"),
    ("w_row_norm_sq_pred", "|W_c|^2 thm"),
    ("w_scale", "NC3 scale"),
    ("w_scale_pred", "scale thm"),
    ("w_cos_mean", "cos W"),
    ("w_cos_pred", "cos thm"),
    ("wl_sv_ratio", "s_C/s_1 W_L"),
    ("rho", "rho"),
    ("noise_out", "SGD noise f"),
)


@dataclass(frozen=True)
class WeightDecayExperiment:
    """Outcome of :func:`weight_decay_experiment`.

    Attributes
    ----------
    results : tuple of TrainResult
        One run per weight decay, same seed, data and schedule.
    table : tuple of dict
        One row per run: the last epoch's measures beside the theorem's predictions (``*_pred``,
        None without weight decay); keys as in ``_TABLE_COLUMNS``.
    figure : Path or None
        NC1-NC4 and training error against epoch (:func:`ufm.plots.plot_nc_training`).
    """

    results: tuple[TrainResult, ...]
    table: tuple[dict, ...]
    figure: Path | None

    @property
    def histories(self) -> dict[str, dict[str, np.ndarray]]:
        """Label ``"lambda = <wd>"`` -> history, one per run."""
        return _labelled_histories(self.results)


def _labelled_histories(results: Sequence[TrainResult]) -> dict[str, dict[str, np.ndarray]]:
    return {f"lambda = {r.config.wd:g}": r.history for r in results}


def weight_decay_experiment(
    *,
    wds: Sequence[float] = EXPERIMENT_WDS,
    quick: bool = False,
    out: str | Path | None = None,
    progress: bool = False,
    **overrides,
) -> WeightDecayExperiment:
    """The poster's experiment (Figs. 1-2): collapse with weight decay and not without it.

    Trains the default network (:class:`TrainConfig`) once per weight decay in ``wds``, with the same
    seed, data and learning-rate schedule, then tabulates the last epoch's NC1-NC4 and the theorem's
    predictions at the measured eps (THEORY.md statement 4) and draws NC1-NC4 against epoch.

    Parameters
    ----------
    wds : sequence of float
        Weight decays lambda (default: 0, the default lambda and twice it).
    quick : bool
        Use ``QUICK_OVERRIDES`` (about 10 s a run on a CPU) instead of the full defaults (minutes).
    out : str or Path, optional
        Directory for one sub-directory per run (``wd_<lambda>``), the figure ``nc_weight_decay.png``
        and the table ``theory_vs_measurement.csv``. Without it nothing is written and no figure made.
    progress : bool
        Progress bars on stderr.
    **overrides
        Any other :class:`TrainConfig` field (``seed``, ``device``, ``epochs``, ...).

    Returns
    -------
    WeightDecayExperiment
    """
    if len(wds) == 0:
        raise ValueError("wds is empty: give at least one weight decay")
    settings = (QUICK_OVERRIDES if quick else {}) | overrides
    configs = [TrainConfig(**(settings | {"wd": check_nonneg("wd", wd)})) for wd in wds]
    data = load_dataset(
        configs[0].dataset, per_class=configs[0].per_class, test_per_class=configs[0].test_per_class
    )
    out = None if out is None else Path(out)
    results = tuple(
        train(c, out=None if out is None else out / f"wd_{c.wd:g}", progress=progress, dataset=data)
        for c in configs
    )
    table = tuple(
        {key: r.config.wd if key == "wd" else r.final.get(key) for key, _ in _TABLE_COLUMNS} for r in results
    )
    figure = None
    if out is not None:
        from .plots import plot_nc_training

        figure = plot_nc_training(_labelled_histories(results), out / "nc_weight_decay.png")
        write_csv(out / "theory_vs_measurement.csv", list(table))
    return WeightDecayExperiment(results=results, table=table, figure=figure)


def format_theory_table(table: Sequence[dict]) -> str:
    """The theory-vs-measurement table as aligned text (4 significant digits; '-' where undefined)."""
    lines = ["  ".join(f"{head:>11}" for _, head in _TABLE_COLUMNS)]
    for row in table:
        cells = ["-" if row.get(key) is None else f"{row[key]:.4g}" for key, _ in _TABLE_COLUMNS]
        lines.append("  ".join(f"{c:>11}" for c in cells))
    return "\n".join(lines)
