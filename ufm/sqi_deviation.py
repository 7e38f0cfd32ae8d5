"""The theorem away from its assumptions: exact error decompositions and bounds (docs/theory.md §12).

At ANY point of a network with a bias-free last layer ``f = W h`` trained with the square loss and
decay ``lam`` on ``W`` (balanced classes, targets ``T`` with label smoothing ``a``), the gradient
``G = dL/dW = (1/n) (F - T)^T H + lam W`` rearranges to the identity

    lam W = (1/n) (T - F)^T H + G.                                          (§12.1)

Split the residual at the measured eps (1 - the mean correct-class output) into its SQI part and
the rest,

    T - F = e P + E,   P = C/(C-1) (Y - 1 1^T / C),   e = eps - eps_a,   eps_a = a (C-1)/C,

and each prediction of the theorem (§4.1, §4.3) gets an exact error with two parts, one that
vanishes at a critical point (G = 0) and one that vanishes under SQI (E = 0), and a bound in the two
measured residuals

    stationarity_residual = ||G||_F / (lam ||W||_F),     sqi_residual = ||E||_F / ||T - F||_F:

* NC3 scale: ``W = s M + (E^T H / n + G) / lam`` with ``s = e / (lam (C-1))`` (§12.2);
* ``mean_c ||W_c||^2`` and the row cosines, from the Gram matrix ``lam W W^T = K_pred + dK``
  with ``K_pred`` proportional to ``I - J/C`` (§12.3, §12.4);
* the NC3 alignment ``|| W^T/||W|| - M/||M|| ||^2`` (§12.2).

Shapes follow ``ufm.metrics``: features ``H`` (n, p) rows, classifier ``W`` (C, p), outputs ``F =
H W^T`` (n, C), targets ``T`` (n, C). The proofs are ``ufm.proofs.sqi_deviation``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from . import closed_form
from ._validation import check_label_smoothing
from .geometry import mean_cosine


@dataclass(frozen=True)
class SQIBounds:
    """The theorem's predictions at a measured point, their exact errors, the parts of each error,
    and the bounds (docs/theory.md §12).

    Relative errors are against the predictions at the measured eps: ``w_scale_err = |w_scale -
    w_scale_pred| / |w_scale_pred|`` and so on. ``*_part_stationarity`` and ``*_part_sqi`` are the
    two signed parts of the relative error ``(measured - pred)/pred``, which they sum to exactly; for
    the cosines, whose error is not linear in the Gram matrix, ``gram_part_*`` are the sizes
    ``||dK_part||_2 / k`` of the two parts of the Gram perturbation relative to the predicted
    diagonal ``k``. A bound is ``inf`` where it is vacuous (the perturbation is as large as the
    predicted quantity); every field is NaN where the theorem does not apply (lam = 0, e <= 0 or a
    zero prediction). ``nc3_bound`` bounds the measured ``nc3`` itself, whose prediction is 0.

    Attributes
    ----------
    eps : 1 - mean correct-class output.
    stationarity_residual, sqi_residual : the two residuals above.
    output_sum_residual : RMS over examples of 1 - sum_c f_c(x): part of E, and nonzero at every
        critical point of a bias-free last layer (§12.5).
    w_scale, w_scale_pred, w_scale_err, w_scale_bound, w_scale_part_stationarity, w_scale_part_sqi
    w_row_norm_sq, w_row_norm_sq_pred, w_row_norm_sq_err, w_row_norm_sq_bound,
    w_row_norm_sq_part_stationarity, w_row_norm_sq_part_sqi
    w_cos, w_cos_pred, w_cos_err, w_cos_bound, gram_part_stationarity, gram_part_sqi
    nc3, nc3_bound
    """

    eps: float
    stationarity_residual: float
    sqi_residual: float
    output_sum_residual: float
    w_scale: float
    w_scale_pred: float
    w_scale_err: float
    w_scale_bound: float
    w_scale_part_stationarity: float
    w_scale_part_sqi: float
    w_row_norm_sq: float
    w_row_norm_sq_pred: float
    w_row_norm_sq_err: float
    w_row_norm_sq_bound: float
    w_row_norm_sq_part_stationarity: float
    w_row_norm_sq_part_sqi: float
    w_cos: float
    w_cos_pred: float
    w_cos_err: float
    w_cos_bound: float
    gram_part_stationarity: float
    gram_part_sqi: float
    nc3: float
    nc3_bound: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def sqi_direction(labels: np.ndarray, C: int) -> np.ndarray:
    """P = C/(C-1) (Y - 1 1^T/C), (n, C): the SQI residual per unit of e (§12.1).

    Row i is 1 at the correct class and -1/(C-1) elsewhere, so e P is exactly the residual T - F of
    outputs that quasi-interpolate with eps (and targets smoothed with eps_a = eps - e)."""
    P = np.full((len(labels), C), -1.0 / (C - 1))
    P[np.arange(len(labels)), labels] = 1.0
    return P


def _spectral_norms(*As):
    """||A||_2 of each (m, k) tensor from its smaller Gram matrix, one batched eigvalsh per Gram size
    (the small ones are C x C); a tensor of the norms, read back once with the other results."""
    import torch

    grams = [A.T @ A if A.shape[1] <= A.shape[0] else A @ A.T for A in As]
    top = {}
    for size in {g.shape[0] for g in grams}:
        group = [i for i, g in enumerate(grams) if g.shape[0] == size]
        top |= zip(group, torch.linalg.eigvalsh(torch.stack([grams[i] for i in group]))[:, -1])
    return torch.stack([top[i] for i in range(len(grams))]).clamp(min=0).sqrt()


def _float64_tensor(name: str, A, device=None):
    """A as a float64 torch tensor on ``device`` (default: its own; NumPy: the CPU, without a copy)."""
    import torch

    if not isinstance(A, torch.Tensor):
        A = torch.from_numpy(np.ascontiguousarray(A, dtype=np.float64))
    if not A.is_floating_point():
        raise ValueError(f"sqi_bounds: {name} must be a real matrix, got dtype {A.dtype}")
    return A.detach().to(device=device, dtype=torch.float64)


def _relative(measured: float, pred: float) -> float:
    return abs(measured - pred) / abs(pred)


def _ratio_or_inf(num: float, den: float) -> float:
    """num/den for a bound, inf where it is vacuous (den <= 0)."""
    return num / den if den > 0 else float("inf")


def sqi_bounds(
    W: np.ndarray, H: np.ndarray, labels: np.ndarray, lam: float, *, label_smoothing: float = 0.0
) -> SQIBounds:
    """Exact decompositions and bounds of the theorem's prediction errors (docs/theory.md §12).

    Parameters
    ----------
    W : (C, p) bias-free last layer; H : (n, p) its input features over the training set;
    labels : (n,) int, balanced classes (the theorem's setting; other counts raise ValueError);
    lam : the last layer's weight decay; label_smoothing : a of the targets (1 - a) y + a/C.
    W, H and labels may be NumPy arrays or torch tensors.

    Returns
    -------
    SQIBounds. The outputs are F = H W^T, so the identities hold to rounding (the tests check them
    to 1e-10 relative against an independently computed gradient).

    Notes
    -----
    Computed by torch in float64 on H's device (NumPy input: the CPU, without a copy), so a network's
    float32 features on a GPU are measured where they are, exactly as their float64 values would be:
    only the (n,) labels come to the host, and the scalars (read back three times) leave the device.
    Cost: three passes over H, O(n p C) and O(n p^2): the outputs H W^T, one product of H with an
    (n, 3C) matrix for every C x p quantity (the gradient, the SQI part, the class sums), and the Gram
    H^T H (for ||H||_2); the other spectral norms are of C x C Gram matrices, in one batched
    ``eigvalsh``.
    """
    import torch

    H = _float64_tensor("H", H)
    W = _float64_tensor("W", W, H.device)
    labels = (
        labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.ascontiguousarray(labels)
    )
    a = check_label_smoothing(label_smoothing)
    C, p = W.shape
    n = H.shape[0]
    if H.ndim != 2 or H.shape[1] != p or labels.shape != (n,):
        raise ValueError(
            f"sqi_bounds: W (C, p), H (n, p), labels (n,); got {tuple(W.shape)}, {tuple(H.shape)}, {labels.shape}"
        )
    counts = np.bincount(labels, minlength=C)
    if C < 2 or len(counts) != C or np.any(counts != counts[0]) or counts[0] == 0:
        raise ValueError(
            f"sqi_bounds needs C >= 2 balanced classes labelled 0..C-1 (the theorem's setting, docs/theory.md §4.1); "
            f"got class counts {counts.tolist()}"
        )
    # Everything below is float64 on H's device; only scalars (read back twice) leave it.
    y = torch.as_tensor(labels, device=H.device)[:, None]  # (n, 1)
    F = H @ W.T  # (n, C) bias-free outputs
    Y = torch.zeros_like(F).scatter_(1, y, 1.0)  # (n, C) one-hot
    T = (1.0 - a) * Y + a / C
    P = torch.full_like(F, -1.0 / (C - 1)).scatter_(1, y, 1.0)  # sqi_direction(labels, C)
    eps = 1.0 - float(F.gather(1, y).mean())
    e = eps - float(closed_form.ufm_smoothing_eps(C, a))
    R = T - F  # (n, C)
    E = R - e * P
    # Every (C, p) product with H in one pass over it: -R^T H for the gradient, E^T H for the SQI part
    # (§12.2) and Y^T H, the class sums.
    ZH = torch.cat([R, E, Y], dim=1).T @ H  # (3C, p)
    # G = dL/dW = (1/n)(H W^T - T)^T H + lam W for L = 1/(2n)||H W^T - T||^2 + lam/2 ||W||^2 (§18)
    G = -ZH[:C] / n + lam * W
    sums = ZH[2 * C :]  # (C, p)
    Mt = sums / int(counts[0]) - sums.sum(dim=0) / n  # (C, p) centred means, rows sum to zero

    norms = torch.stack([torch.linalg.norm(X) for X in (W, E, G, Mt, R)])
    on_device = [
        torch.sqrt(torch.mean((1.0 - F.sum(dim=1)) ** 2)),  # output_sum_residual
        torch.sum(W * Mt) / norms[3] ** 2,  # w_scale
        torch.sum((W / norms[0] - Mt / norms[3]) ** 2),  # nc3, §17.4 with M^T = Mt
    ]
    norm_W, norm_E, norm_G, norm_M, norm_R, out_sum, w_scale, nc3 = torch.cat(
        [norms, torch.stack(on_device)]
    ).tolist()
    measured = {
        "eps": eps,
        "stationarity_residual": norm_G / (lam * norm_W) if lam > 0 and norm_W > 0 else float("nan"),
        "sqi_residual": norm_E / norm_R,
        "output_sum_residual": out_sum,
        "w_scale": w_scale,
        "w_row_norm_sq": norm_W**2 / C,
        "w_cos": mean_cosine(W.cpu().numpy()),
        "nc3": nc3,
    }
    if not (lam > 0 and e > 0 and norm_W > 0 and norm_M > 0):
        return SQIBounds(**{**dict.fromkeys((f.name for f in fields(SQIBounds)), float("nan")), **measured})

    # §12.2: W - s M = (E^T H/n + G)/lam; the scale sees <., M>/||M||^2 of each part.
    s = float(closed_form.sqi_w_scale(C, eps, lam, a))
    delta_sqi = ZH[C : 2 * C] / (n * lam)  # (C, p): E^T H / (n lam)
    # §12.3: lam W W^T = K_pred + dK_sqi + dK_stat, K_pred = k C/(C-1) (I - J/C) with k = lam pred.
    dK_sqi = (E.T @ T - e * (E.T @ P + P.T @ E) - E.T @ E) / n  # (C, C)
    dK_stat = G @ W.T
    small = torch.cat(
        [
            torch.stack(
                [torch.sum(G * Mt), torch.sum(delta_sqi * Mt), torch.trace(dK_stat), torch.trace(dK_sqi)]
            ),
            torch.stack([torch.linalg.norm(T), torch.linalg.norm(P)]),
            _spectral_norms(H, T, P, W, dK_stat, dK_sqi),
        ]
    ).tolist()
    G_M, sqi_M, tr_stat, tr_sqi, norm_T, norm_P, sn_H, sn_T, sn_P, sn_W, sn_stat, sn_sqi = small
    scale_part_stat = G_M / (lam * norm_M**2 * s)
    scale_part_sqi = sqi_M / (norm_M**2 * s)
    delta_bound = (norm_G + norm_E * sn_H / n) / lam  # >= ||W - s M||_F
    scale_bound = delta_bound / (abs(s) * norm_M)

    k = lam * float(closed_form.sqi_w_row_norm_sq(C, eps, lam, a))
    row_part_stat = tr_stat / (C * k)
    row_part_sqi = tr_sqi / (C * k)
    trace_bound = (norm_E * (norm_T + 2 * e * norm_P) + norm_E**2) / n + norm_G * norm_W
    # §12.4: every entry of dK is at most ||dK||_2 <= beta; cosines move by r (1 + 1/(C-1))/(1 - r).
    beta = (norm_E * (sn_T + 2 * e * sn_P) + norm_E**2) / n + norm_G * sn_W
    r = beta / k if k > 0 else float("inf")
    cos_pred = float(closed_form.sqi_cosine(C))
    return SQIBounds(
        **measured,
        w_scale_pred=s,
        w_scale_err=_relative(measured["w_scale"], s),
        w_scale_bound=scale_bound,
        w_scale_part_stationarity=scale_part_stat,
        w_scale_part_sqi=scale_part_sqi,
        w_row_norm_sq_pred=k / lam,
        w_row_norm_sq_err=_relative(measured["w_row_norm_sq"], k / lam) if k != 0 else float("nan"),
        w_row_norm_sq_bound=_ratio_or_inf(trace_bound, C * k),
        w_row_norm_sq_part_stationarity=row_part_stat,
        w_row_norm_sq_part_sqi=row_part_sqi,
        w_cos_pred=cos_pred,
        w_cos_err=_relative(measured["w_cos"], cos_pred),
        w_cos_bound=C * r / (1 - r) if r < 1 else float("inf"),
        gram_part_stationarity=sn_stat / k if k > 0 else float("nan"),
        gram_part_sqi=sn_sqi / k if k > 0 else float("nan"),
        nc3_bound=(2 * delta_bound / norm_W) ** 2 if s > 0 else float("inf"),
    )
