"""Training deep homogeneous networks on a regularized loss (the poster's square loss by default),
measuring collapse.

Objective (poster; docs/theory.md §18), over the n training examples x_i with labels y_i, one-hot targets
e_{y_i} smoothed by a = ``label_smoothing`` to t_i = (1 - a) e_{y_i} + a/C:

    L(W) = 1/n sum_i l(f(x_i), t_i) + lambda/2 sum_k ||W_k||_F^2,

with l(f, t) = 1/2 ||t - f||^2 for the square loss (``loss="mse"``, the default; at a = 0 and balanced
classes this is the poster's 1/(2NC) sum_{n,c,i} (y_{n(c)}^(i) - f^(i)(x_{n(c)}))^2) or the softmax
cross-entropy (``loss="ce"``); the loss objects live in :mod:`ufm.losses`. On a mini-batch B the data
term is estimated by ``loss.torch_value`` on B (the mean over its examples). Weight decay is added to
the gradient explicitly, grad += lambda W_k for every layer k (or lambda rho_k under weight
normalization, where ||W_k||^2 = rho_k^2), before the step of plain SGD with momentum; this is the same
update as ``torch.optim.SGD(weight_decay=lambda)``, written out so that the Lagrange-multiplier
projection of :mod:`ufm.networks` sees the full gradient.

Every ``measure_every`` epochs (and at epoch 0 and the last epoch) :func:`measure_network` records:
train/test loss and accuracy; NC1-NC4 from :func:`ufm.metrics.nc_metrics` on the penultimate features
(collected by the forward hook of :func:`ufm.collect.capture_activations`); the Frobenius norm of every
layer and their product rho; the numerical and stable rank of every weight matrix; the symmetric
quasi-interpolation (SQI) residuals; and the poster's theorem evaluated at the measured eps and lambda
beside the measured values:

* ||W_L^c||^2 = (eps - C eps^2/(C-1)) / (C lambda)                 (NC2 equinorm)
* W_L^c = eps/(lambda (C-1)) (mu_c - mu_G)                          (NC3; scale fitted by least squares)
* cos(W_L^c, W_L^c') = -1/(C-1)                                      (NC2 equiangularity)

With torch on one thread and a second CPU core free (``torch.set_num_threads(1)`` or
``OMP_NUM_THREADS=1``), each measurement is taken on a copy of the network on a second thread while
the next epoch trains; rows, files and checkpoints are those of measuring between the epochs
(docs/theory.md §18, "Measuring beside the training").

During the last epoch the weights and the outputs on a fixed probe set are tracked step by step: their
fluctuation across those late steps is the SGD noise of the journal paper (:class:`_SGDNoise`).

Checkpoints (model, optimizer, scheduler, the state of the generator that orders mini-batches, history)
are written every ``checkpoint_every`` epochs (:class:`_Checkpoint`); ``resume=True`` continues from the
last one and, on the CPU, reaches bit-identical weights and history. A run whose mini-batch loss
becomes non-finite or explodes stops at the end of that epoch (the losses are read back once an
epoch) with a message naming the step, leaving the last good checkpoint untouched.

The poster's experiment built on :func:`train` (the same run with and without weight decay) is
:func:`ufm.experiments.weight_decay.weight_decay_experiment`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

try:
    import fcntl
except ImportError:  # Windows: runs are not locked (train's _locked)
    fcntl = None

from . import closed_form
from ._threads import one_torch_thread, usable_cores
from ._validation import (
    EqualClassMeans,
    check_choice,
    check_label_smoothing,
    check_nonneg,
    check_positive,
    check_positive_int,
    check_torch_device,
    output_directory,
)
from .collect import capture_activations
from .datasets import Dataset, load_dataset
from .geometry import mean_cosine
from .losses import Loss, get_loss
from .metrics import nc_metrics
from .networks import FEATURE_LAYER, HomogeneousNet, build_network
from .sqi_deviation import SQIBounds, sqi_bounds
from .tables import GrowingCsv, GrowingJson, atomic_write, cell_text, write_json

__all__ = [
    "BATCH_ORDERS",
    "SCHEDULES",
    "TrainConfig",
    "TrainResult",
    "measure_network",
    "network_for",
    "resolve_device",
    "train",
]

# A loss above this multiple of the loss at initialization (or a non-finite loss) means divergence:
# the loss of a fitting run only decreases from its start, so a 1e3-fold increase is no fluctuation
# but the blow-up of a too-large step.
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
# Long format (epoch, refined, layer, index, value): every layer's singular values at every epoch
# with singular-value measures (svd_every), s_1 >= s_2 >= ... (docs/theory.md §16.1).
SINGULAR_VALUES = "singular_values.csv"
SINGULAR_VALUE_COLUMNS = ("epoch", "refined", "layer", "index", "value")
# What a run leaves in its directory: a new run there is refused unless told to overwrite.
RUN_FILES = (CHECKPOINT, HISTORY, CONFIG, FINAL, SINGULAR_VALUES)
CHECKPOINT_KEYS = frozenset(
    ("identity", "epoch", "nsteps", "history", "noise", "model", "optimizer", "scheduler", "shuffle")
)


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

# Orders of the mini-batches (docs/theory.md §16.3): "shuffle" draws a fresh permutation of the
# training set every epoch; "fixed" repeats one permutation (the first epoch's of "shuffle"), so that
# SGD is a deterministic map with period one epoch and its fluctuation owes nothing to sampling.
BATCH_ORDERS = ("shuffle", "fixed")


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
    loss : str
        Name of the data term's loss in :data:`ufm.losses.LOSSES` (``"mse"``: the poster's square loss).
    label_smoothing : float
        a in [0, 1): the targets are (1 - a) e_y + a/C.
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
    batch_order : str
        ``"shuffle"`` (a fresh permutation of the training set every epoch) or ``"fixed"`` (the first
        epoch's permutation every epoch), :data:`BATCH_ORDERS`; docs/theory.md §16.3.
    momentum : float
        SGD momentum in [0, 1).
    schedule : str
        Learning-rate schedule in :data:`SCHEDULES`.
    measure_every, checkpoint_every : int
        Epochs between measurements and between checkpoints. Unmeasured epochs have no history row.
    svd_every : int
        The singular-value measures (``rank_W{k}``, ``srank_W{k}``, ``wl_sv_ratio``) are taken at the
        measured epochs that are multiples of it (and at epoch 0 and the last epoch); on the other
        measured epochs those columns are blank (NaN). Default 1: every measured epoch.
    svd_layers : str
        The layers whose singular values are taken (``rank_W{k}``, ``srank_W{k}``, their rows of
        ``singular_values.csv``; ``wl_sv_ratio`` needs W_L): ``"all"`` (default), ``"last"`` (W_L) or
        1-based layer numbers such as ``"1,3"``; the other layers' columns are blank (NaN).
    device : str
        ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``. Not part of the run's identity
        (a run may be resumed on another device), but bit-identical resumption is promised on the CPU only.
    refine_to : float or None
        After the SGD epochs, move the last layer to the limit of full-batch gradient descent in
        W_L (:func:`refine`, docs/theory.md §12.6) and require its ``stationarity_residual``
        ||dL/dW_L||/(lambda ||W_L||) to be below this; the refined state is one more history row
        (``refined`` = 1). Square loss and wd > 0 only. Not part of the run's identity: a finished
        run can be resumed with ``refine_to`` to refine it.
    """

    dataset: str = "default"
    arch: str = "mlp"
    depth: int = 3
    width: int = 128
    wd: float = 5e-3
    loss: str = "mse"
    label_smoothing: float = 0.0
    lr: float = 0.02
    epochs: int = 300
    batch_size: int = 50
    per_class: int | None = 100
    test_per_class: int | None = None
    weight_norm: bool = False
    seed: int = 0
    batch_order: str = "shuffle"
    momentum: float = 0.9
    schedule: str = "step"
    measure_every: int = 1
    checkpoint_every: int = 10
    svd_every: int = 1
    svd_layers: str = "all"
    device: str = "auto"
    refine_to: float | None = None

    def __post_init__(self):
        check_choice("arch", self.arch, ("mlp", "cnn"))
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("batch_order", self.batch_order, BATCH_ORDERS)
        check_choice("device", self.device, ("auto", "cpu", "cuda"))
        for name in (
            "depth",
            "width",
            "epochs",
            "batch_size",
            "measure_every",
            "checkpoint_every",
            "svd_every",
        ):
            check_positive_int(name, getattr(self, name))
        for name in ("per_class", "test_per_class"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        check_nonneg("wd", self.wd)
        refinable = self.wd > 0 and get_loss(self.loss, self.label_smoothing).linear_residual
        if self.refine_to is not None and not (check_nonneg("refine_to", self.refine_to) > 0 and refinable):
            raise ValueError(
                f"refine_to must be > 0 and needs weight decay wd > 0 and the square loss (the residual "
                f"divides by lambda; the refinement solves the square loss in W_L); got "
                f"refine_to={self.refine_to!r}, wd={self.wd!r}, loss={self.loss!r}"
            )
        check_positive("lr", self.lr)
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if isinstance(self.seed, bool) or int(self.seed) != self.seed:
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.loss, str):
            raise ValueError(f"loss must be a name (a key of ufm.losses.LOSSES), got {self.loss!r}")
        check_label_smoothing(self.label_smoothing)  # a in [0, 1)
        _svd_layer_numbers(self.svd_layers, self.depth)  # a spec that does not parse: ValueError
        get_loss(self.loss, self.label_smoothing)  # an unknown name: ValueError listing the valid ones

    @property
    def svd_layer_numbers(self) -> tuple[int, ...]:
        """The layers k (1-based, ascending) of ``svd_layers``."""
        return _svd_layer_numbers(self.svd_layers, self.depth)

    @property
    def data_loss(self) -> Loss:
        """The loss object of the data term: ``ufm.losses.get_loss(loss, label_smoothing)``."""
        return get_loss(self.loss, self.label_smoothing)

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


def _svd_layer_numbers(spec: str, depth: int) -> tuple[int, ...]:
    """``TrainConfig.svd_layers`` as layer numbers 1..depth, ascending; a ValueError naming the
    accepted forms when it is none of them."""
    if spec == "all":
        return tuple(range(1, depth + 1))
    if spec == "last":
        return (depth,)
    try:
        layers = sorted({int(k) for k in spec.split(",")})
    except (AttributeError, ValueError):
        layers = None
    if not layers or not 1 <= layers[0] <= layers[-1] <= depth:
        raise ValueError(
            f"svd_layers must be 'all', 'last' or layer numbers 1..depth={depth} separated by commas "
            f"(e.g. '1,{depth}'), got {spec!r}"
        )
    return tuple(layers)


def network_for(config: TrainConfig, data: Dataset) -> HomogeneousNet:
    """The network ``config`` describes, for ``data``'s input shape and classes, at its seeded start."""
    return build_network(
        config.arch, data.input_shape, data.C, depth=config.depth, width=config.width,
        weight_norm=config.weight_norm, seed=config.seed,
    )  # fmt: skip


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` without a GPU is an error."""
    check_choice("device", device, ("auto", "cpu", "cuda"))
    if device == "cuda":
        check_torch_device(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def _matrix(W: torch.Tensor) -> np.ndarray:
    """A weight as a float64 matrix (out, fan_in); convolutions are flattened over (in, k, k)."""
    return W.detach().reshape(W.shape[0], -1).double().cpu().numpy()


@torch.no_grad()
def _forward_with_features(
    model: HomogeneousNet, x: torch.Tensor, *, features: bool = True
) -> tuple[np.ndarray, torch.Tensor | None]:
    """Outputs f (n, C) as float64 NumPy, and penultimate features h (n, p) as the network's tensor on
    its device (hooked at FEATURE_LAYER's output; None without ``features``): only the small outputs
    travel to the host."""
    chunks = range(0, x.shape[0], MEASURE_CHUNK)
    if not features:
        return torch.cat([model(x[i : i + MEASURE_CHUNK]) for i in chunks]).double().cpu().numpy(), None
    with capture_activations(model, FEATURE_LAYER, capture="output") as captured:
        outputs = [model(x[i : i + MEASURE_CHUNK]) for i in chunks]
    return torch.cat(outputs).double().cpu().numpy(), torch.cat(captured)


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


# docs/theory.md §12: the residuals, the errors of the theorem's predictions, their stationarity and
# SQI parts and their bounds, from ufm.sqi_deviation (its other fields are already columns here).
_SQI_KEYS = tuple(
    f.name
    for f in fields(SQIBounds)
    if f.name not in ("eps", "nc3", "w_scale", "w_row_norm_sq", "w_cos") and not f.name.endswith("_pred")
)


def _sqi_columns(W_L: np.ndarray, H: torch.Tensor, labels: np.ndarray, wd: float, loss: Loss) -> dict:
    """The ``_SQI_KEYS`` of one measurement, from the features H (n, p) on their device (float64
    there); NaN where the theorem does not apply (no weight decay, a loss whose residual is not
    linear, imbalanced classes)."""
    counts = np.bincount(labels)
    if not (wd > 0 and loss.linear_residual and np.all(counts == counts[0])):
        return dict.fromkeys(_SQI_KEYS, np.nan)
    bounds = sqi_bounds(W_L, H, labels, wd, label_smoothing=loss.label_smoothing)
    return {key: getattr(bounds, key) for key in _SQI_KEYS}


def _none_if_nan(x: float) -> float | None:
    return None if not np.isfinite(x) else float(x)


def measure_network(
    model: HomogeneousNet,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    wd: float,
    *,
    loss: str | Loss = "mse",
    singular_values: bool = True,
    spectra: list[np.ndarray] | None = None,
) -> dict[str, float]:
    """All per-epoch measurements of one network.

    The features stay on the network's device in its dtype: ``nc_metrics`` measures them there (float32
    products, float64 sums; docs/theory.md §17.9) and :func:`ufm.sqi_deviation.sqi_bounds` in float64
    there; the outputs, weights and class means are float64. One forward over the training set gives
    the outputs and the features; the test set's forward gives outputs only. Cost and what each
    quantity takes: docs/theory.md §18.

    Parameters
    ----------
    model : HomogeneousNet
    x_train : Tensor, shape (n, ...); y_train : Tensor, shape (n,), int64
        Training set, the NC statistics are taken over it. Any class counts n_c, every class present:
        mu_G is the mean over all n examples, as in :func:`ufm.metrics.nc_metrics`.
    x_test : Tensor, shape (n_test, ...); y_test : Tensor, shape (n_test,)
    wd : float
        lambda, for the regularization term and the theorem's predictions.
    singular_values : bool
        Whether to take the singular-value measures (``rank_W{k}``, ``srank_W{k}``, ``wl_sv_ratio``);
        NaN when not.
    spectra : list of (ndarray or None), optional
        The singular values of W_1, ..., W_L (descending), when the caller has them already
        (``train`` keeps them for ``singular_values.csv``), None for a layer not measured (its
        singular-value columns NaN); computed here for every layer when None.
    loss : str or Loss
        The data term (:func:`ufm.losses.get_loss`), with its label smoothing: ``train_loss`` is
        ``loss.value(f.T, loss.targets(y_train, C))`` = 1/n sum_i l(f_i, t_i), the same for the test set.

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
      (eps - eps_a)/(lambda(C-1)), eps_a = a (C-1)/C with label smoothing a (NaN for a loss whose
      residual is not linear, e.g. cross-entropy); ``w_cos_mean`` (mean pairwise cosine of W_L's rows) and ``w_cos_pred`` =
      -1/(C-1); ``mu_cos_mean`` the same for the centred class means;
    * away from the theorem's assumptions (docs/theory.md §12, :func:`ufm.sqi_deviation.sqi_bounds`):
      ``stationarity_residual`` = ||dL/dW_L||/(lambda ||W_L||), ``sqi_residual`` = ||E||/||T - F||,
      ``output_sum_residual``; for each prediction its relative error and a bound on it
      (``w_scale_err``/``w_scale_bound``, ``w_row_norm_sq_err``/``w_row_norm_sq_bound``,
      ``w_cos_err``/``w_cos_bound``, and ``nc3_bound``), and the exact stationarity and SQI parts of the
      error (``*_part_stationarity``, ``*_part_sqi``; ``gram_part_*`` for the cosines); a vacuous
      bound is inf;
    * ``norm_W{k}`` (Frobenius, k = 1..L), ``rho`` (their product), ``rank_W{k}`` (singular values
      above RANK_RTOL times the largest), ``srank_W{k}`` (stable rank ||W||_F^2/||W||_2^2) and
      ``wl_sv_ratio`` = s_C/s_1 of W_L (zero when W_L has the NC rank C-1).
    * ``norm_W_sq_pred`` = -<dL_data/dF, F>/lambda: the squared norm ||W_k||^2 that every layer has
      at a critical point of the objective (docs/theory.md §16.2; NaN at lambda = 0).
    """
    loss = get_loss(loss)
    model.eval()
    y_tr, y_te = y_train.cpu().numpy(), y_test.cpu().numpy()
    f_tr, H = _forward_with_features(model, x_train)  # (n, C) host, (n, p) device
    f_te, _ = _forward_with_features(model, x_test, features=False)
    C = f_tr.shape[1]
    W_L = _matrix(model.classifier_weight())  # (C, p)
    # Norms in float64 on the device, one reduction each without a float64 copy of the weight (only L
    # numbers travel); W_L is the one weight needed on the host, for the C x p measures.
    norms = torch.stack([torch.linalg.vector_norm(W.detach(), dtype=torch.float64) for W in model.weights()])
    sq_norms = np.array(norms.tolist()) ** 2
    T_tr = loss.targets(y_tr, C)  # (C, n)
    row = {
        "train_loss": loss.value(f_tr.T, T_tr),  # outputs and targets (C, n)
        "test_loss": loss.value(f_te.T, loss.targets(y_te, C)),
        "train_acc": np.mean(f_tr.argmax(1) == y_tr),
        "test_acc": np.mean(f_te.argmax(1) == y_te),
    }
    row["train_err"] = 1.0 - row["train_acc"]
    row["objective"] = row["train_loss"] + 0.5 * wd * sq_norms.sum()
    # docs/theory.md §16.2: <W_k, dL/dW_k> = <dL_data/dF, F> + lambda ||W_k||^2 for each layer of a
    # positively homogeneous network, so at a critical point every ||W_k||^2 equals this.
    grad_f = loss.value_and_grad(f_tr.T, T_tr)[1]  # (C, n)
    row["norm_W_sq_pred"] = -np.sum(grad_f * f_tr.T) / wd if wd > 0 else np.nan

    nc = nc_metrics(H, y_train, W=W_L, outputs=f_tr)
    for key in _NC_KEYS:
        row[key] = float(getattr(nc, key))
    eps = nc.eps

    # Theorem at the measured eps and lambda: undefined without weight decay, and for a loss whose
    # residual is not (f - T)/n (docs/theory.md §4.3; label smoothing a shifts eps by a (C-1)/C).
    Mt = _centred_means(H, y_train, C)  # (C, p): rows mu_c - mu_G
    predicts = wd > 0 and loss.linear_residual
    a = loss.label_smoothing
    row["w_row_norm_sq"] = np.mean(np.sum(W_L**2, axis=1))
    row["w_row_norm_sq_pred"] = closed_form.sqi_w_row_norm_sq(C, eps, wd, a) if predicts else np.nan
    row["w_scale"] = np.sum(W_L * Mt) / np.sum(Mt**2)
    row["w_scale_pred"] = closed_form.sqi_w_scale(C, eps, wd, a) if predicts else np.nan
    row["w_cos_mean"] = mean_cosine(W_L)
    row["mu_cos_mean"] = mean_cosine(Mt)
    row["w_cos_pred"] = closed_form.sqi_cosine(C)
    row |= _sqi_columns(W_L, H, y_tr, wd, loss)

    if not singular_values:
        spectra = [None] * len(sq_norms)
    elif spectra is None:
        spectra = [_singular_values(W, exact=False) for W in model.weights()]
    for k, s in enumerate(spectra, start=1):
        row[f"norm_W{k}"] = np.sqrt(sq_norms[k - 1])
        row[f"rank_W{k}"] = np.nan if s is None else int(np.sum(s > RANK_RTOL * s[0]))
        row[f"srank_W{k}"] = np.nan if s is None else sq_norms[k - 1] / s[0] ** 2
    row["rho"] = math.prod(row[f"norm_W{k}"] for k in range(1, len(sq_norms) + 1))
    s = spectra[-1]  # of W_L, the last layer
    row["wl_sv_ratio"] = np.nan if s is None else s[C - 1] / s[0] if len(s) >= C else 0.0
    return {k: float(v) for k, v in row.items()}


def _centred_means(H: torch.Tensor, y: torch.Tensor, C: int) -> np.ndarray:
    """Rows mu_c - mu_G (C, p), float64, summed on H's device (only the C x p result is copied)."""
    y = y.to(H.device)
    sums = torch.zeros(C, H.shape[1], dtype=torch.float64, device=H.device).index_add_(0, y, H.double())
    counts = torch.bincount(y, minlength=C).double()
    return (sums / counts[:, None] - sums.sum(0) / counts.sum()).cpu().numpy()


def _singular_values(W: torch.Tensor, *, exact: bool = True) -> np.ndarray:
    """Singular values of a weight as a matrix (out, fan_in), float64, descending. Computed by torch on
    the weight's device.

    ``exact``: those of the triangular factor R of a QR factorization of the matrix or its transpose
    (min x min), the same singular values (Householder QR is backward stable, so they are as accurate
    as an SVD of the matrix): at (128, 784) 2.4-3.6 against 10.2-11.0 ms for ``svdvals`` of the matrix
    (best of 20, one torch thread, 2026-12-03). ``exact=False`` takes square roots of the eigenvalues
    of the smaller Gram matrix (3-4x faster again; values below ~1e-8 of the largest are lost to
    rounding, far below RANK_RTOL), used for the per-epoch ranks.
    """
    A = W.detach().reshape(W.shape[0], -1).double()
    with one_torch_thread():
        if not exact:
            G = A @ A.T if A.shape[0] <= A.shape[1] else A.T @ A
            return torch.linalg.eigvalsh(G).clamp(min=0).sqrt().flip(0).cpu().numpy()
        long = A if A.shape[0] >= A.shape[1] else A.T
        R = torch.linalg.qr(long, mode="r").R if long.shape[0] > long.shape[1] else long
        return torch.linalg.svdvals(R).cpu().numpy()


# ----------------------------------------------------------------------------------------------------
# The pieces of a run: data on the device, its state, checkpoints, SGD noise, one step, the record.
# ----------------------------------------------------------------------------------------------------


def _check_dataset_matches(data: Dataset, config: TrainConfig) -> None:
    """A dataset passed to ``train`` must be the one ``config`` names: config.json and resume trust it."""
    if data.name != config.dataset:
        raise ValueError(
            f"the dataset given was loaded from {data.name!r} but config.dataset = {config.dataset!r}"
        )
    if config.per_class is not None and data.counts != (config.per_class,) * data.C:
        have = f"N = {data.N}" if data.balanced else f"counts {data.counts}"
        raise ValueError(f"the dataset given has {have} per class but config.per_class = {config.per_class}")
    n_test = len(data.y_test)
    if config.test_per_class is not None and n_test != data.C * config.test_per_class:
        raise ValueError(
            f"the dataset given has {n_test} test examples, not C * config.test_per_class = "
            f"{data.C} * {config.test_per_class}"
        )


class _Tensors(NamedTuple):
    """The data on the training device: inputs (n, ...), int64 labels (n,), and the noise probe."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_probe: torch.Tensor  # (n_probe, ...): up to NOISE_PROBE_PER_CLASS training inputs of each class
    C: int


def _tensors(config: TrainConfig, dataset: Dataset | None, device: torch.device) -> tuple[Dataset, _Tensors]:
    """Load (or check) the data set of ``config`` and move it to ``device``."""
    if dataset is None:
        dataset = load_dataset(
            config.dataset, per_class=config.per_class, test_per_class=config.test_per_class
        )
    else:
        _check_dataset_matches(dataset, config)
    n = dataset.y_train.shape[0]
    if config.batch_size > n:
        raise ValueError(f"batch_size={config.batch_size} exceeds the {n} training examples")
    probe = np.concatenate(
        [np.flatnonzero(dataset.y_train == c)[:NOISE_PROBE_PER_CLASS] for c in range(dataset.C)]
    )
    x_train = torch.from_numpy(dataset.x_train).to(device)
    tensors = _Tensors(
        x_train=x_train,
        y_train=torch.from_numpy(dataset.y_train).to(device),
        x_test=torch.from_numpy(dataset.x_test).to(device),
        y_test=torch.from_numpy(dataset.y_test).to(device),
        x_probe=x_train[torch.from_numpy(probe).to(device)],
        C=dataset.C,
    )
    return dataset, tensors


@dataclass
class _TrainState:
    """What changes as a run goes on, and what a checkpoint holds; ``epoch``: the last epoch done."""

    model: HomogeneousNet
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    shuffle: torch.Generator
    epoch: int = 0
    nsteps: int = 0
    history: list[dict] = field(default_factory=list)
    noise: dict = field(default_factory=dict)
    # One entry per record with singular values: {"epoch", "refined", "values": [s of W_1, ..., W_L]}.
    spectra: list[dict] = field(default_factory=list)
    history_csv: GrowingCsv = field(default_factory=GrowingCsv)  # writes out/history.csv
    # The history and the spectra as a checkpoint holds them, each row encoded once.
    history_json: GrowingJson = field(default_factory=GrowingJson)
    spectra_json: GrowingJson = field(default_factory=GrowingJson)

    @classmethod
    def start(cls, config: TrainConfig, data: Dataset, device: torch.device) -> _TrainState:
        model = network_for(config, data).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
        scheduler = SCHEDULES[config.schedule](optimizer, config.epochs)
        # The order of mini-batches is the only randomness after initialization; it has its own
        # generator (saved in checkpoints), so measurements or other torch code never perturb it.
        shuffle = torch.Generator().manual_seed(config.seed)
        return cls(model, optimizer, scheduler, shuffle)

    @property
    def lr(self) -> float:
        """The learning rate of the next step."""
        return self.optimizer.param_groups[0]["lr"]


_NOT_IDENTITY = ("device", "refine_to")


def _identity(config: TrainConfig) -> dict:
    """The fields that must match for a checkpoint to be resumed (all but the device and the
    refinement, which runs after the epochs and is not checkpointed)."""
    return {k: v for k, v in config.as_dict().items() if k not in _NOT_IDENTITY}


def _identity_differences(stored: dict, config: TrainConfig) -> list[str]:
    """Fields in which a checkpoint's stored identity differs from ``config``'s.

    A field missing from ``stored`` counts as its default: checkpoints written before the field
    existed (``loss``, ``label_smoothing``) were written by runs that used the default.
    """
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    current = _identity(config)
    return sorted(
        k for k in current.keys() | stored.keys() if stored.get(k, defaults.get(k)) != current.get(k)
    )


class _Checkpoint:
    """``out/checkpoint.pt``: written atomically, resumed only by a run of the same identity."""

    def __init__(self, out: Path | None):
        self.path = None if out is None else out / CHECKPOINT
        self.saved_epoch: int | None = None  # epoch of the checkpoint on disk (None: none written)

    def exists(self) -> bool:
        return self.path is not None and self.path.is_file()

    def restore(self, state: _TrainState, config: TrainConfig, device: torch.device) -> None:
        """Load the checkpoint into ``state``; a ValueError naming the fields if it is another run's."""
        damaged = (
            f"cannot resume from {self.path}: {{}}; it is damaged or not a ufm checkpoint. Start the run "
            "again with --overwrite (or move the directory away), or restore the file from a backup"
        )
        try:
            # weights_only: a checkpoint holds tensors and plain Python values only, so no code can run.
            saved = torch.load(self.path, map_location=device, weights_only=True)
        except Exception as err:  # zero-filled, random, empty, truncated: zipfile, pickle, OS errors
            reason = (
                "the file is empty" if self.path.stat().st_size == 0 else f"unreadable ({type(err).__name__})"
            )
            raise ValueError(damaged.format(reason)) from None
        missing = sorted(CHECKPOINT_KEYS - set(saved)) if isinstance(saved, dict) else None
        if missing is None or missing:
            held = type(saved).__name__ if missing is None else f"a dict without {', '.join(missing)}"
            raise ValueError(damaged.format(f"it holds {held}"))
        diff = _identity_differences(saved["identity"], config)
        if diff:
            raise ValueError(f"cannot resume {self.path}: its configuration differs in {', '.join(diff)}")
        try:
            state.model.load_state_dict(saved["model"])
            state.optimizer.load_state_dict(saved["optimizer"])
            state.scheduler.load_state_dict(saved["scheduler"])
            state.shuffle.set_state(saved["shuffle"].cpu())  # a CPU generator, whatever map_location did
        except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(damaged.format(f"its state does not fit this network ({err})")) from None
        try:
            state.history, state.history_json = _saved_list(saved["history"])
            # Checkpoints before singular_values.csv have no spectra.
            state.spectra, state.spectra_json = _saved_list(saved.get("spectra", []))
        except (TypeError, ValueError) as err:  # not a list, or JSON that does not parse
            raise ValueError(damaged.format(f"its history is unreadable ({err})")) from None
        state.epoch, state.nsteps = saved["epoch"], saved["nsteps"]
        state.noise = saved["noise"]
        self.saved_epoch = saved["epoch"]

    def writer(self, state: _TrainState, config: TrainConfig) -> Callable[[], None]:
        """A function that writes the checkpoint of ``state`` as it is now, with the history and the
        spectra as they are when it is called: a copy of the training state, so that it can be
        written after the next epoch has changed it (:meth:`_Recorder.after`)."""
        saved = copy.deepcopy(
            {  # the keys of CHECKPOINT_KEYS but the history and the spectra
                "identity": _identity(config),
                "epoch": state.epoch,
                "nsteps": state.nsteps,
                "noise": state.noise,
                "model": state.model.state_dict(),
                "optimizer": state.optimizer.state_dict(),
                "scheduler": state.scheduler.state_dict(),
                "shuffle": state.shuffle.get_state(),
            }
        )

        def write() -> None:
            lists = {
                "history": state.history_json.parts(state.history),
                "spectra": state.spectra_json.parts(state.spectra),
            }
            # atomic: a crash never leaves half a file, a full disk no temporary file
            atomic_write(self.path, lambda tmp: torch.save(saved | lists, tmp))
            self.saved_epoch = saved["epoch"]

        return write

    def kept(self) -> str:
        """What divergence leaves on disk, for the message."""
        if self.saved_epoch is None:
            return "this run had written no checkpoint"
        return f"the last good checkpoint ({self.path}, epoch {self.saved_epoch}) is kept"


def _saved_list(saved: list) -> tuple[list, GrowingJson]:
    """A checkpoint's list (history or spectra) and its JSON cache: JSON parts (GrowingJson), or the
    list itself as checkpoints before version 0.2 pickled it."""
    if all(isinstance(part, str) for part in saved):
        return GrowingJson.read(saved)
    return list(saved), GrowingJson()


class _Welford:
    """Running mean and summed squared deviation of a stream of tensors (Welford's algorithm)."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, None, None

    def add(self, x: torch.Tensor) -> None:
        """x in any float dtype; the moments are float64 (x - mean promotes x exactly, no copy of x)."""
        x = x.detach()
        self.count += 1
        if self.mean is None:
            self.mean = x.to(torch.float64, copy=True)
            self.m2 = torch.zeros_like(self.mean)
            return
        # m2 += delta (x - mean_new) = delta^2 (count - 1)/count: one temporary, not two.
        delta = x - self.mean
        self.mean.add_(delta, alpha=1.0 / self.count)
        self.m2.addcmul_(delta, delta, value=(self.count - 1) / self.count)

    def relative_std(self) -> float:
        """sqrt(sum of variances) / ||mean||: the typical fluctuation relative to the average."""
        return math.sqrt(float(self.m2.sum()) / self.count) / float(self.mean.norm())


class _SGDNoise:
    """SGD noise (journal paper): the fluctuation of W_1, ..., W_L and of the outputs on a fixed probe
    set over the steps of one epoch, each as sqrt(sum of variances) / ||mean||. ``tracker`` makes the
    running moments of one quantity (:class:`_Welford` or an extension of it, e.g. the within-epoch
    moments of :mod:`ufm.experiments.sgd_noise`)."""

    def __init__(self, n_layers: int, tracker=_Welford):
        self.layers = [tracker() for _ in range(n_layers)]
        self.outputs = tracker()

    @torch.no_grad()
    def add(self, model: HomogeneousNet, x_probe: torch.Tensor) -> None:
        for tracker, W in zip(self.layers, model.weights()):
            tracker.add(W)
        self.outputs.add(model(x_probe))

    def result(self) -> dict:
        """``noise_W{k}``, ``noise_out`` and ``noise_steps`` (the steps tracked)."""
        noise = {f"noise_W{k}": t.relative_std() for k, t in enumerate(self.layers, start=1)}
        return noise | {"noise_out": self.outputs.relative_std(), "noise_steps": self.outputs.count}


def _epoch_order(state: _TrainState, config: TrainConfig, n: int) -> torch.Tensor:
    """The permutation (n,) of the training examples for the next epoch, by ``config.batch_order``:
    "fixed" redraws the first epoch's permutation from the seed, so it needs no state to resume."""
    if config.batch_order == "fixed":
        return torch.randperm(n, generator=torch.Generator().manual_seed(config.seed))
    return torch.randperm(n, generator=state.shuffle)


@dataclass(frozen=True)
class _Divergence:
    """The first mini-batch of an epoch whose loss diverged: the run's step number, and the loss."""

    step: int
    loss: float


def _run_epoch(
    state: _TrainState,
    data: _Tensors,
    config: TrainConfig,
    order: torch.Tensor,
    reference_loss: Callable[[], float],
    noise: _SGDNoise | None = None,
) -> _Divergence | None:
    """SGD steps over the mini-batches of ``order`` (n,), on its device, each step added to ``noise``
    when given; returns the first mini-batch whose loss diverged (against ``reference_loss()``, asked
    for at the end of the epoch: the first epoch runs while epoch 0 is measured), or None.

    The mini-batch losses stay on the device and are read back once, at the end of the epoch: a GPU
    never waits for the host inside the epoch. Steps after a diverged one are still taken, on weights
    that no longer matter: the run stops there and keeps its last good checkpoint."""
    loss, model, B = config.data_loss, state.model, config.batch_size
    step = _SGDStep(model, state.optimizer, config.wd)
    losses, first_step = [], state.nsteps + 1
    for i in range(0, order.shape[0] - B + 1, B):
        idx = order[i : i + B]
        data_term = loss.torch_value(model(data.x_train[idx]), data.y_train[idx], data.C)
        losses.append(data_term.detach())
        step(data_term)
        state.nsteps += 1
        if noise is not None:
            noise.add(model, data.x_probe)
    reference = reference_loss()
    for j, value in enumerate(torch.stack(losses).tolist()):  # batch_size <= n: one step at least
        if _diverged(value, reference):
            return _Divergence(first_step + j, value)
    return None


class _SGDStep:
    """One optimizer step on data_term + lambda/2 sum_k ||W_k||^2, weight decay added to the gradient
    by hand, for a model whose parameters do not change identity (``load_state_dict`` copies in place).

    The decayed parameters and whether the model is weight-normalized are read from its modules once:
    reading them at every step (``decay_parameters``, ``project_gradients_``, ``renormalize_``) cost
    24-34 us, 2-3% of a 1.1 ms step of the default run (best of 20 x 1,000 calls, 2026-12-02)."""

    def __init__(self, model: HomogeneousNet, optimizer: torch.optim.Optimizer, wd: float):
        self.model, self.optimizer, self.wd = model, optimizer, wd
        self.decayed = model.decay_parameters()
        self.weight_norm = model.weight_norm

    def __call__(self, data_term: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        data_term.backward()
        with torch.no_grad():
            for p in self.decayed:
                p.grad.add_(p, alpha=self.wd)  # d/dW of lambda/2 ||W||^2
        if self.weight_norm:
            self.model.project_gradients_()
        self.optimizer.step()
        if self.weight_norm:
            self.model.renormalize_()


def _diverged(value: float, reference_loss: float) -> bool:
    """Non-finite, or above DIVERGENCE_FACTOR times the start (at least 1)."""
    return not math.isfinite(value) or value > DIVERGENCE_FACTOR * max(reference_loss, 1.0)


def _divergence_message(epoch: int, step: int, value: float, config: TrainConfig, kept: str) -> str:
    why = "not finite" if not math.isfinite(value) else f"above {DIVERGENCE_FACTOR:g} x its start"
    return (
        f"training diverged in epoch {epoch} (step {step}): mini-batch loss {value:.4g} is "
        f"{why}; lower --lr (now {config.lr:g}) or --wd (now {config.wd:g}); {kept}"
    )


def _measure(model: HomogeneousNet, data: _Tensors, config: TrainConfig, epoch: int, svd: bool):
    """The measures of one record (``measure_network``) and, with ``svd``, the singular values of the
    layers in ``config.svd_layers`` (None for the others); (row, spectra or None)."""
    spectra = None
    if svd:
        weights = enumerate(model.weights(), start=1)
        spectra = [
            _singular_values(W, exact=False) if k in config.svd_layer_numbers else None for k, W in weights
        ]
    try:
        row = measure_network(
            model, data.x_train, data.y_train, data.x_test, data.y_test, config.wd,
            loss=config.data_loss, singular_values=svd, spectra=spectra,
        )  # fmt: skip
    except EqualClassMeans as err:
        # Every class maps to the same features, as when every ReLU feeding the classifier is
        # inactive on every example (dead), e.g. after too large a step.
        raise ValueError(
            f"cannot measure the network after epoch {epoch}: {err}; the ReLUs feeding the classifier "
            f"are likely dead (inactive on every example): lower --lr (now {config.lr:g}) or --wd (now "
            f"{config.wd:g}), or try another --seed"
        ) from None
    except ValueError as err:
        raise ValueError(f"cannot measure the network after epoch {epoch}: {err}") from None
    return row, spectra


def _overlap_possible() -> bool:
    """Whether measurements can run beside the training: torch on one thread, so that a measurement
    on a second thread, on one torch thread too, computes what it would in line (``nc_metrics``
    cuts its work into one part per torch thread, §17.10), and a second CPU core to run it on."""
    return torch.get_num_threads() == 1 and usable_cores() >= 2


class _Recorder:
    """The run's measurements, appended to its history (and written to ``out``) in epoch order.

    Each is taken on a copy of the network made right after its epoch, so its row is the same
    wherever it runs. With ``overlap`` it runs on a second thread while the next epoch trains
    (docs/theory.md §18): one measurement at most is pending; it is collected by the next one and
    by ``wait``, as the run does before a refinement and at the end, and a checkpoint of its epoch
    is written after it (``after``), so what is on disk is what a run measuring in line would have
    written. Its errors are raised when it is collected, before anything after it is written."""

    def __init__(
        self, state: _TrainState, data: _Tensors, config: TrainConfig, out: Path | None, overlap: bool
    ):
        self._state, self._data, self._config, self._out = state, data, config, out
        # A new thread takes torch's thread count of the moment; it is fixed here, whatever happens
        # to the caller's count later.
        self._pool = (
            ThreadPoolExecutor(1, "ufm-measure", initializer=torch.set_num_threads, initargs=(1,))
            if overlap
            else None
        )
        self._copy: HomogeneousNet | None = None
        self._pending: tuple[Future, dict] | None = None
        self._then: list[Callable[[], None]] = []  # to run once the pending measurement is appended

    def submit(self, lr: float, refined: bool = False) -> None:
        """Measure the network after ``state.epoch``, which trained at learning rate ``lr``
        (``refined``: then had its last layer refined, :func:`refine`)."""
        self._collect()
        state, config = self._state, self._config
        header = {"epoch": state.epoch, "step": state.nsteps, "lr": lr, "refined": int(refined)}
        svd = state.epoch % config.svd_every == 0 or state.epoch == config.epochs
        if self._pool is None:
            self._append(header, *_measure(state.model, self._data, config, state.epoch, svd))
            return
        if self._copy is None:
            self._copy = copy.deepcopy(state.model)
        else:
            self._copy.load_state_dict(state.model.state_dict())
        future = self._pool.submit(_measure, self._copy, self._data, config, state.epoch, svd)
        self._pending = (future, header)

    def record(self, lr: float, refined: bool = False) -> dict:
        """``submit`` and ``wait``: the row of this measurement."""
        self.submit(lr, refined)
        return self.wait()

    def first(self) -> dict:
        """The history's first row (the measurement of epoch 0), collected if it is pending."""
        if len(self._state.history) == 0:
            self._collect()
        return self._state.history[0]

    def wait(self) -> dict:
        """Append (and write) the pending measurement, if any; the history's last row."""
        self._collect()
        return self._state.history[-1]

    def after(self, then: Callable[[], None]) -> None:
        """Run ``then`` (on this thread) once the pending measurement is appended, now if none is;
        not at all if it fails."""
        if self._pending is None:
            then()
        else:
            self._then.append(then)

    def _collect(self) -> None:
        if self._pending is not None:
            future, header = self._pending
            self._pending, then = None, self._then
            self._then = []
            self._append(header, *future.result())
            for fn in then:
                fn()

    def close(self) -> None:
        """Collect the pending measurement, as a run ending on an error or an interruption keeps every
        measurement taken (if it fails, the error that ended the run is the one reported); stop the
        thread."""
        if self._pending is not None:
            with contextlib.suppress(Exception):
                self._collect()
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _append(self, header: dict, row: dict, spectra: list | None) -> None:
        state, out = self._state, self._out
        state.history.append(header | row)
        if spectra is not None:
            values = [[] if s is None else s.tolist() for s in spectra]
            state.spectra.append({"epoch": header["epoch"], "refined": header["refined"], "values": values})
        if out is not None:
            state.history_csv.write(out / HISTORY, state.history)
            if spectra is not None:
                _append_spectra(out / SINGULAR_VALUES, state.spectra[-1:])


def _spectra_lines(spectra: list[dict]) -> str:
    """Rows of singular_values.csv (``SINGULAR_VALUE_COLUMNS``) for these records, as CSV text."""
    return "".join(
        f"{rec['epoch']},{rec['refined']},{k},{i},{cell_text(v)}\n"
        for rec in spectra
        for k, values in enumerate(rec["values"], start=1)
        for i, v in enumerate(values, start=1)
    )


def _write_spectra(path: Path, spectra: list[dict]) -> None:
    """singular_values.csv holding exactly these records, written atomically (a run's start, a resume)."""
    text = ",".join(SINGULAR_VALUE_COLUMNS) + "\n" + _spectra_lines(spectra)
    atomic_write(path, lambda tmp: tmp.write_text(text))


def _append_spectra(path: Path, spectra: list[dict]) -> None:
    """Append one record's rows in one write: the file grows by whole records, and a resume rewrites
    it from the checkpoint (:func:`_write_spectra`), so it never holds epochs the history lacks."""
    with path.open("a") as fh:
        fh.write(_spectra_lines(spectra))


def _jsonable(row: dict) -> dict:
    return {k: _none_if_nan(v) if isinstance(v, float) else v for k, v in row.items()}


def _result(
    config: TrainConfig,
    state: _TrainState,
    status: int,
    message: str,
    success: bool,
    out: Path | None,
    t0: float,
) -> TrainResult:
    """The TrainResult of a run that ended; writes ``final.json`` unless it diverged."""
    final = _jsonable(state.history[-1] | state.noise)
    # A diverged model holds non-finite weights: its singular values are not reported.
    svals = () if status else tuple(_singular_values(W) for W in state.model.weights())
    if out is not None and status == 0:
        write_json(
            out / FINAL,
            final | {"singular_values": [s.tolist() for s in svals], "status": status, "message": message},
        )
    history = state.history
    columns = {
        k: np.array([np.nan if r[k] is None else r[k] for r in history], dtype=float) for k in history[0]
    }
    return TrainResult(
        config=config,
        history=columns,
        final=final,
        singular_values=svals,
        success=success,
        status=status,
        message=message,
        nsteps=state.nsteps,
        wall_s=time.perf_counter() - t0,
        out=out,
    )


@contextlib.contextmanager
def _locked(out: Path | None):
    """Hold an exclusive ``flock`` on the directory ``out`` (made if missing; no lock file is left)
    while a run writes there, so that a second run into it, started meanwhile, is refused rather than
    interleaving its files with this one's. Where ``fcntl`` is missing (Windows) nothing is locked."""
    if out is None or fcntl is None:
        yield
        return
    fd = os.open(output_directory(out), os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(
                f"another run is writing to {out} now (it holds the directory's lock): wait for it to end, "
                "or choose another --out"
            ) from None
        yield
    finally:
        os.close(fd)  # releases the lock


def _claim_directory(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Make ``out`` ready for a run: refuse one that holds a run (unless resuming or overwriting)."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the run, or replace it")
    output_directory(out, create=False)
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not resume:
        if not overwrite:
            raise ValueError(
                f"{out} already holds a run ({_describe_run(out)}; {', '.join(found)}); continue it with "
                "--resume, replace it with --overwrite, or choose another --out"
            )
        for name in found:
            (out / name).unlink()
    output_directory(out)


def _describe_run(out: Path) -> str:
    """A few settings of the run in ``out``, from its config.json, to name it in a message."""
    try:
        config = json.loads((out / CONFIG).read_text())
        return ", ".join(
            f"{k}={config[k]}" for k in ("dataset", "arch", "wd", "epochs", "seed") if k in config
        )
    except (OSError, ValueError, TypeError):
        return "no readable config.json"


def _solve_last_layer(model: HomogeneousNet, x: torch.Tensor, T: torch.Tensor, wd: float) -> None:
    """Set W_L to the exact minimizer of the objective in W_L at the current features, the ridge
    solution T^T H (H^T H + n lambda I)^{-1} (docs/theory.md §12.6), computed in float64."""
    with torch.no_grad():
        H = model.penultimate(model.features(x)).double()  # (n, p)
        n, p = H.shape
        A = H.T @ H + n * wd * torch.eye(p, dtype=H.dtype, device=H.device)
        W = torch.linalg.solve(A, H.T @ T.double()).T.to(x.dtype)  # (C, p)
        layer = model.layers[-1]
        if model.weight_norm:
            layer.rho.copy_(W.norm())
            layer.V.copy_(W / W.norm())
        else:
            layer.W.copy_(W)


def _hidden_residual(model: HomogeneousNet, data: _Tensors, config: TrainConfig) -> float:
    """||grad of the objective in the hidden layers|| / (lambda ||(W_1..W_L)||), full batch."""
    hidden = [q for layer in model.layers[:-1] for q in layer.parameters()]
    data_term = config.data_loss.torch_value(model(data.x_train), data.y_train, data.C)
    objective = data_term + 0.5 * config.wd * model.weight_norm_sq()
    grads = torch.autograd.grad(objective, hidden)
    if model.weight_norm:  # the radial part of dL/dV_k is not a direction the constraint allows
        grads = [g - (g * q).sum() * q if q.dim() > 0 else g for g, q in zip(grads, hidden)]
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    return float(norm / (config.wd * torch.sqrt(model.weight_norm_sq().detach().double())))


def refine(model: HomogeneousNet, data: _Tensors, config: TrainConfig) -> float:
    """Make the last layer stationary after SGD (docs/theory.md §12.6); returns the hidden layers'
    relative gradient, which it does not reduce.

    The objective is a strongly convex quadratic in W_L at fixed features, so full-batch gradient
    descent in W_L converges to its exact minimizer, the ridge solution, which is computed directly
    (in float64, then stored in the network's dtype). The hidden layers are not moved. Square loss only.
    """
    model.eval()
    T = config.data_loss.torch_targets(data.y_train, data.C, data.x_train.dtype)
    _solve_last_layer(model, data.x_train, T, config.wd)
    return _hidden_residual(model, data, config)


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------


def _epochs(
    state: _TrainState,
    data: _Tensors,
    config: TrainConfig,
    recorder: _Recorder,
    checkpoint: _Checkpoint,
    stop_after_epoch: int | None,
    progress: bool,
) -> tuple[int, str, int]:
    """The SGD epochs of :func:`train` after ``state.epoch``, measured and checkpointed as ``config``
    says; (status, message, the last epoch asked for). Every measurement is collected on return."""
    from ._progress import progress_bar

    if state.epoch == 0 and not state.history:
        recorder.submit(lr=state.lr)
    model, n = state.model, data.y_train.shape[0]

    def reference_loss() -> float:
        return recorder.first()["train_loss"]

    last_epoch = config.epochs if stop_after_epoch is None else min(config.epochs, stop_after_epoch)
    status, message = 0, f"finished {config.epochs} epochs"
    bar = progress_bar(range(state.epoch + 1, last_epoch + 1), enabled=progress, desc="train", unit="epoch")
    for epoch in bar:
        model.train()
        noise = _SGDNoise(len(model.layers)) if epoch == config.epochs else None  # the last epoch's
        order = _epoch_order(state, config, n).to(data.y_train.device)
        diverged = _run_epoch(state, data, config, order, reference_loss, noise)
        if diverged is not None:
            status = 1
            recorder.wait()  # and the checkpoint after it, which the message names
            message = _divergence_message(epoch, diverged.step, diverged.loss, config, checkpoint.kept())
            break
        lr_used = state.lr
        state.scheduler.step()  # before the checkpoint, so a resumed run starts at the next epoch's rate
        state.epoch = epoch
        if noise is not None:
            state.noise = noise.result()
        if epoch % config.measure_every == 0 or epoch == config.epochs:
            recorder.submit(lr=lr_used)
            row = state.history[-1]  # the last one collected
            bar.set_postfix(
                loss=f"{row['train_loss']:.3g}", acc=f"{row['train_acc']:.3f}", nc1=f"{row['nc1']:.3g}"
            )
        if checkpoint.path is not None and (epoch % config.checkpoint_every == 0 or epoch == last_epoch):
            recorder.after(checkpoint.writer(state, config))  # it holds the history up to its epoch
    bar.close()
    recorder.wait()
    return status, message, last_epoch


def train(
    config: TrainConfig,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    stop_after_epoch: int | None = None,
    dataset: Dataset | None = None,
) -> TrainResult:
    """Train a deep homogeneous network with SGD on the regularized loss, measuring collapse.

    Parameters
    ----------
    config : TrainConfig
    out : str or Path, optional
        Directory for ``checkpoint.pt``, ``history.csv``, ``config.json`` and ``final.json``. Without it
        nothing is written and ``resume`` is not possible.
    resume : bool
        Continue from ``out/checkpoint.pt`` (its configuration must equal ``config`` apart from the
        device). Without a checkpoint the run starts from scratch.
    overwrite : bool
        Replace the run already in ``out`` (its RUN_FILES are deleted first). Without it (and without
        ``resume``) a directory holding a run is refused with a ValueError, and nothing in it changes.
        A directory that another run is writing now (it holds its ``flock``) is refused either way.
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
    t0 = time.perf_counter()
    device = resolve_device(config.device)
    if out is None and resume:
        raise ValueError("resume needs an output directory holding a checkpoint (--out DIR)")
    if stop_after_epoch is not None:
        check_positive_int("stop_after_epoch", stop_after_epoch)
    out = None if out is None else Path(out)
    with _locked(out):
        if out is not None:
            _claim_directory(out, resume=resume, overwrite=overwrite)
        return _train(config, device, out, resume, progress, stop_after_epoch, dataset, t0)


def _train(
    config: TrainConfig, device: torch.device, out: Path | None, resume: bool, progress: bool,
    stop_after_epoch: int | None, dataset: Dataset | None, t0: float,
) -> TrainResult:  # fmt: skip
    """:func:`train` once its directory is claimed and locked."""
    dataset, data = _tensors(config, dataset, device)
    state = _TrainState.start(config, dataset, device)
    checkpoint, note = _Checkpoint(out), ""
    if resume and checkpoint.exists():
        checkpoint.restore(state, config, device)
    elif resume:
        note = " (no checkpoint to resume from: started from scratch)"
    if out is not None:
        write_json(out / CONFIG, config.as_dict())
        _write_spectra(out / SINGULAR_VALUES, state.spectra)  # a resume drops epochs after the checkpoint

    recorder = _Recorder(state, data, config, out, overlap=_overlap_possible())
    try:
        status, message, last_epoch = _epochs(
            state, data, config, recorder, checkpoint, stop_after_epoch, progress
        )
        success = status == 0 and last_epoch == config.epochs
        message = message + note if status == 0 else message
        if status == 0 and last_epoch < config.epochs:
            message = f"stopped after epoch {last_epoch} of {config.epochs}; continue with resume"
        elif success and config.refine_to is not None:
            hidden_residual = refine(state.model, data, config)
            residual = recorder.record(lr=0.0, refined=True)["stationarity_residual"]
            success = residual < config.refine_to
            message += (
                f"; last layer refined to stationarity_residual {residual:.1e} (hidden layers' relative "
                f"gradient {hidden_residual:.1e}, not refined)"
            )
            if not success:
                message += f"; above --refine-to {config.refine_to:g}: the float32 weights limit it"
    finally:
        recorder.close()
    return _result(config, state, status, message, success, out, t0)
