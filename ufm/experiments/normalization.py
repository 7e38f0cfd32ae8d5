"""Normalization in the journal paper [XRLGP23] measured: rho = prod_k rho_k over the epochs of networks
trained with W_k = rho_k V_k, ||V_k|| = 1, a dense MLP against a CNN with local kernels, with and
without weight decay (docs/theory.md §16.2); a part of ``ufm reproduce``.

Claim [XRLGP23]: rho, the product of the layers' Frobenius norms, controls norm-based generalization
bounds, and for convolutional layers with local kernels the bound (which uses the norm of the kernel,
not of the layer as a dense matrix) is much smaller than for dense layers.

Measured, per architecture and lambda in ``NORM_WDS``, with ``TrainConfig(weight_norm=True)``:

* ``rho`` and ``rho_1 .. rho_L`` (rho_k = ||W_k||_F; for a convolution the norm of its kernel
  (out, in, 3, 3)) at every epoch;
* ``rho_pred`` = (norm_W_sq_pred)^(L/2): at a critical point of the objective every layer of a
  positively homogeneous network has lambda ||W_k||^2 = -<dL_data/dF, F> (§16.2), so rho there is
  set by the fit alone, whatever the architecture;
* ``rho_dense``, at the last epoch: the product of the Frobenius norms of the layers written as dense
  matrices (a convolution as its (out h' w', in h w) matrix, :func:`conv_dense_norm`); for the MLP
  it is rho. rho_dense / rho is what the kernel norm saves over the dense-matrix norm for the same
  CNN, an identity of the geometry (about sqrt of the number of output positions per layer).

Sizes (``SIZES``): L = 4 weight layers each (the same degree of homogeneity; the CNN has three 3 x 3
convolutions, as with two it reached only 85% (lambda = 5e-3) and 90% (lambda = 0) training accuracy
in 100 epochs, against 99% with three in 200), 20 digits a class (10 in quick mode). The learning
rates are the largest that fit (measured on the embedded digits, lambda = 5e-3): under weight
normalization a step moves V_k by rho_k^2 times what the same step moves W_k / ||W_k|| in plain
training, and He initialization gives rho_k = 16 for the MLP's 784-input and 128-wide layers, so
the MLP needs lr = 3e-3 (at L = 3: 1e-2 stopped at 20% training accuracy, 5e-2 diverged in its
second step); the CNN, rho_k = 8 at width 32, takes 1e-2 (3e-2 fell to 34% training accuracy). He
initialization also sets rho at epoch 0 (||W_k||^2 ~ 2 width per hidden layer, rho_L ~ 1): the
report gives it beside the end value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..tables import read_csv, write_csv

__all__ = [
    "NORMALIZATION_CSV",
    "NORM_WDS",
    "SIZES",
    "NormalizationResult",
    "conv_dense_norm",
    "normalization_section",
    "plot_normalization",
    "run_normalization",
]

NORMALIZATION_CSV = "normalization.csv"
NORMALIZATION_PNG = "normalization.png"
# Without weight decay, and with the default lambda (TrainConfig.wd) of the weight-decay experiment.
NORM_WDS = (0.0, 5e-3)
# Per architecture, the TrainConfig fields of each mode (module docstring: why these).
SIZES = {
    "quick": {
        "mlp": dict(width=128, lr=3e-3, per_class=10, epochs=60, batch_size=20),
        "cnn": dict(width=16, lr=1e-2, per_class=10, epochs=60, batch_size=20),
    },
    "full": {
        "mlp": dict(width=128, lr=3e-3, per_class=20, epochs=200, batch_size=20),
        "cnn": dict(width=32, lr=1e-2, per_class=20, epochs=200, batch_size=20),
    },
}
DEPTH = 4
# Test examples per class: the bound is about generalization, but 20 a class keep measuring cheap.
TEST_PER_CLASS = 20
# Measure every MEASURE_EVERY-th epoch; singular values (not used here) only at the first and last.
MEASURE_EVERY = 5


def _output_size(n: int, kernel: int, stride: int, padding: int) -> int:
    return (n + 2 * padding - kernel) // stride + 1


def _hits(n_in: int, kernel: int, stride: int, padding: int) -> np.ndarray:
    """For each kernel offset a (kernel,): the output positions whose input s r + a - padding is inside."""
    rows = stride * np.arange(_output_size(n_in, kernel, stride, padding))
    return np.array([np.sum((rows + a - padding >= 0) & (rows + a - padding < n_in)) for a in range(kernel)])


def conv_dense_norm(kernel: np.ndarray, input_hw: tuple[int, int], *, stride: int, padding: int) -> float:
    """Frobenius norm of a 2-d convolution (zero padding) written as a dense matrix.

    Each kernel entry K[o, i, a, b] appears once in the matrix for every output position whose
    input pixel under offset (a, b) lies inside the image, so with n_a (n_b) such positions along
    the height (width), ||T||_F^2 = sum_{a,b} n_a n_b ||K[:, :, a, b]||_F^2 (docs/theory.md §16.2).

    Parameters
    ----------
    kernel : ndarray, shape (out, in, k_h, k_w)
    input_hw : (height, width) of the input
    stride, padding : int, as in ``torch.nn.functional.conv2d``
    """
    kernel = np.asarray(kernel, dtype=float)
    if kernel.ndim != 4:
        raise ValueError(f"kernel must have shape (out, in, k_h, k_w), got {kernel.shape}")
    n_h = _hits(input_hw[0], kernel.shape[2], stride, padding)
    n_w = _hits(input_hw[1], kernel.shape[3], stride, padding)
    per_offset = np.sum(kernel**2, axis=(0, 1))  # (k_h, k_w)
    return float(np.sqrt(np.sum(np.outer(n_h, n_w) * per_offset)))


def _dense_norms(model, input_shape: tuple[int, ...]) -> list[float]:
    """||W_k|| of every layer as a dense matrix: convolutions by :func:`conv_dense_norm`, dense layers as they are."""
    hw = tuple(input_shape[1:])
    norms = []
    for layer in model.layers:
        W = layer.weight().detach().double().cpu().numpy()
        if W.ndim == 4:
            stride, padding = layer.stride, W.shape[-1] // 2
            norms.append(conv_dense_norm(W, hw, stride=stride, padding=padding))
            hw = tuple(_output_size(n, W.shape[-1], stride, padding) for n in hw)
        else:
            norms.append(float(np.linalg.norm(W)))
    return norms


@dataclass(frozen=True)
class NormalizationResult:
    """Outcome of :func:`run_normalization`.

    Attributes
    ----------
    table : Path
        ``normalization.csv``: one row per (arch, wd, measured epoch).
    figure : Path
        ``normalization.png`` (:func:`plot_normalization`).
    final : tuple of dict
        The last epoch's row of each run.
    """

    table: Path
    figure: Path
    final: tuple[dict, ...]


def _final_model(result, dataset):
    """The trained network, rebuilt from the run's last checkpoint (``train`` returns no model)."""
    import torch

    from ..training import CHECKPOINT, network_for

    model = network_for(result.config, dataset)
    model.load_state_dict(torch.load(result.out / CHECKPOINT, weights_only=True)["model"])
    return model


def run_normalization(out: Path, *, quick: bool, seed: int = 0, progress: bool = True) -> NormalizationResult:
    """Train the MLP and the CNN of ``SIZES`` with weight normalization for each lambda in ``NORM_WDS``;
    write ``normalization.csv``, ``normalization.png`` and the runs (``normalization/<arch>_wd_<lambda>``)."""
    from .._threads import one_torch_thread

    rows, final = [], []
    with one_torch_thread():  # small batches: two threads lose to spinning on a shared CPU (training.py)
        for arch, size in SIZES["quick" if quick else "full"].items():
            arch_rows, arch_final = _train_arch(arch, size, Path(out), seed, progress)
            rows, final = rows + arch_rows, final + arch_final
    table = write_csv(Path(out) / NORMALIZATION_CSV, rows)
    figure = plot_normalization(read_csv(table), Path(out) / NORMALIZATION_PNG)
    return NormalizationResult(table=table, figure=figure, final=tuple(final))


def _train_arch(arch: str, size: dict, out: Path, seed: int, progress: bool) -> tuple[list[dict], list[dict]]:
    """The runs of one architecture, one per lambda in NORM_WDS: (rows of normalization.csv, each
    run's last row)."""
    from ..datasets import load_dataset
    from ..training import TrainConfig, train

    data = load_dataset("default", per_class=size["per_class"], test_per_class=TEST_PER_CLASS)
    rows, final = [], []
    for wd in NORM_WDS:
        config = TrainConfig(
            arch=arch, depth=DEPTH, wd=wd, weight_norm=True, seed=seed, test_per_class=TEST_PER_CLASS,
            measure_every=MEASURE_EVERY, svd_every=size["epochs"], checkpoint_every=size["epochs"], **size,
        )  # fmt: skip
        result = train(
            config, out=out / "normalization" / f"{arch}_wd_{wd:g}", progress=progress, dataset=data
        )
        if not result.success:
            raise ValueError(f"normalization run {arch}, lambda = {wd:g} failed: {result.message}")
        h = result.history
        dense = _dense_norms(_final_model(result, data), data.input_shape)
        for i in range(len(h["epoch"])):
            row = {"arch": arch, "wd": wd, "epoch": int(h["epoch"][i]), "rho": float(h["rho"][i])}
            row |= {f"rho_{k}": float(h[f"norm_W{k}"][i]) for k in range(1, DEPTH + 1)}
            pred = h["norm_W_sq_pred"][i]
            row["rho_pred"] = float(pred ** (DEPTH / 2)) if np.isfinite(pred) and pred > 0 else None
            row |= {k: float(h[k][i]) for k in ("train_loss", "train_acc", "test_acc", "eps")}
            last = i == len(h["epoch"]) - 1
            row["rho_dense"] = math.prod(dense) if last else None
            rows.append(row)
        final.append(rows[-1])
    return rows, final


def plot_normalization(rows: list[dict], path: str | Path) -> Path:
    """Claim [XRLGP23]: rho = prod_k ||W_k|| is much smaller for a CNN with local kernels than for a
    dense network. One panel per lambda: rho against epoch for each architecture (solid), the
    critical-point value rho_pred (dotted, lambda > 0), and the CNN's rho as dense matrices at the end
    (marker).

    Parameters
    ----------
    rows : rows of ``normalization.csv``.
    path : output file.
    """
    from .plots import _figure, _save

    wds = list(dict.fromkeys(r["wd"] for r in rows))
    fig, axes = _figure(1, len(wds), (5 * len(wds), 4))
    axes = np.atleast_1d(axes)
    for ax, wd in zip(axes, wds):
        for j, arch in enumerate(dict.fromkeys(r["arch"] for r in rows)):
            sub = [r for r in rows if r["wd"] == wd and r["arch"] == arch]
            x = [r["epoch"] for r in sub]
            ax.plot(x, [r["rho"] for r in sub], "-", color=f"C{j}", label=f"{arch}: rho")
            if any(r["rho_pred"] is not None for r in sub):
                pred = [np.nan if r["rho_pred"] is None else r["rho_pred"] for r in sub]
                ax.plot(x, pred, ":", color=f"C{j}", label=f"{arch}: rho at a critical point")
            if arch == "cnn":
                ax.plot(
                    [x[-1]], [sub[-1]["rho_dense"]], "s", color=f"C{j}", label="cnn: rho as dense matrices"
                )
        ax.set(yscale="log", xlabel="epoch", ylabel="rho", title=f"weight normalization, lambda = {wd:g}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def normalization_section(out: Path, number: int) -> str:
    """The report's section ``number``, from ``normalization.csv`` alone."""
    rows = read_csv(Path(out) / NORMALIZATION_CSV)
    runs = list(dict.fromkeys((r["arch"], r["wd"]) for r in rows))
    first = {run: next(r for r in rows if (r["arch"], r["wd"]) == run) for run in runs}
    last = {run: [r for r in rows if (r["arch"], r["wd"]) == run][-1] for run in runs}

    def f(v) -> str:
        return "-" if v is None else f"{v:.3g}"

    layers = [c for c in rows[0] if c.startswith("rho_") and c[4:].isdigit()]
    cols = ("arch", "wd", "epoch", "train_acc", "test_acc", "eps", "rho", *layers, "rho_pred", "rho_dense")
    table = "\n".join(
        [
            "| rho at epoch 0 | " + " | ".join(cols) + " |",
            "|" + "|".join("---" for _ in range(len(cols) + 1)) + "|",
        ]
        + [
            "| "
            + " | ".join([f(first[run]["rho"])] + [r[c] if isinstance(r[c], str) else f(r[c]) for c in cols])
            + " |"
            for run, r in last.items()
        ]
    )
    findings = []
    for wd in dict.fromkeys(w for _, w in runs):
        if ("mlp", wd) in last and ("cnn", wd) in last:
            m, c = last[("mlp", wd)], last[("cnn", wd)]
            m0, c0 = first[("mlp", wd)], first[("cnn", wd)]
            findings.append(
                f"- lambda = {wd:g}: rho_CNN / rho_MLP = {c['rho'] / m['rho']:.3g} at the last epoch "
                f"({c['rho']:.3g} against {m['rho']:.3g}; at epoch 0 {c0['rho'] / m0['rho']:.3g}); training "
                f"accuracy {c['train_acc']:.3g} (CNN) and {m['train_acc']:.3g} (MLP). The CNN written as dense "
                f"matrices has rho = {c['rho_dense']:.3g}, {c['rho_dense'] / c['rho']:.3g} times its kernel rho and "
                f"{c['rho_dense'] / m['rho']:.3g} times the MLP's rho."
            )
    for (arch, wd), r in last.items():
        line = f"- {arch}, lambda = {wd:g}: rho moved by a factor {r['rho'] / first[(arch, wd)]['rho']:.3g} from epoch 0"
        if r["rho_pred"] is not None:
            line += (
                f"; rho / rho_pred = {r['rho'] / r['rho_pred']:.3g} at the last epoch (1 at a critical point)"
            )
        findings.append(line + ".")
    return f"""## {number}. Normalization (`{NORMALIZATION_CSV}`, figure `{NORMALIZATION_PNG}`)

The journal paper [XRLGP23] trains with W_k = rho_k V_k, ||V_k|| = 1 (Lagrange multipliers; here
`TrainConfig(weight_norm=True)`, docs/theory.md §16, §18) and bounds the generalization error through
rho = prod_k rho_k, claiming the bound much smaller for convolutional layers with local kernels than
for dense ones. Measured: a bias-free ReLU MLP and a CNN (3 x 3 kernels, global average pooling),
both with L = {DEPTH} weight layers, on the embedded digits (`ufm.experiments.normalization`, sizes
in its `SIZES`). rho_k of a convolution is the norm of its kernel; `rho_dense` (last epoch) is the
product of the layers' norms as dense matrices; `rho_pred` = (-<dL_data/dF, F>/lambda)^(L/2) is rho
at a critical point of the objective, where every layer has the same norm (§16.2): it depends on the
fit, not on the architecture.

{table}

{chr(10).join(findings)}

How to read these numbers. He initialization gives each hidden layer E||W_k||^2 = 2 x (its output
width) and W_L about 1, so rho at epoch 0 is about (2 width)^((L-1)/2) for both architectures: the
CNN starts with the smaller rho only because it is narrower, not because its kernels are local.
Where rho / rho_pred is far from 1 the run is far from a critical point, and its rho still carries
its initialization; at a critical point rho = rho_pred, which depends on the fit alone (a smaller
rho there is a smaller eps, §16.2). What locality itself changes is `rho_dense / rho`: the same CNN
measured as a dense network has a rho larger by about the square root of the product of the output
positions of its convolutions. The claim is held to that: the kernel rho that the paper's bound uses
is smaller than the dense-matrix rho by that factor, a count of positions; how the kernel rho of the
trained CNN compares with the MLP's depends on their widths and initialization as long as the runs
are far from a critical point (rho / rho_pred >> 1).

![normalization]({NORMALIZATION_PNG})
"""
