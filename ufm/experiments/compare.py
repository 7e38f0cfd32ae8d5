"""Gradient flow from a random start against the closed-form minimizer: one comparison, one row.

``compare_flow`` integrates the flow of a UFM problem (``ufm.dynamics.gradient_flow``) from a seeded
random start, measures its end point and sets it beside the problem's closed form
(``problem.loss.closed_form(problem)``), or records why there is none. ``FlowComparison.row()`` is
the one flat row every caller reads: ``ufm flow --json`` and the tables of ``ufm sweep`` and
``ufm reproduce`` are built from it (their own column names are aliases of its keys).

The canonical row (``ROW_KEYS``; None marks a value that is undefined or absent, never NaN):

========================== ===================================================================
``t``, ``grad_norm``,      the flow: final time, ||grad L|| there, gradient evaluations,
``nfev``, ``success``,     ``FlowResult.success``, ``FlowResult.status`` (-1 failed, 0 t_max,
``flow_status``,           1 stationary, 2 target loss, 3 max_nfev, 4 max_seconds), its message
``message``, ``method``    and the integrator actually used
``loss``, ``eps``,         the end point (``ufm.dynamics.record_state``): loss, eps = 1 - mean
``cos_w``, ``cos_h``,      correct output, mean pairwise cosine of the rows of W and of the
``nc1``, ``nc2_*``,        centred class means, the NC measures, ||W||_F^2, ||H||_F^2 and
``nc3``, ``nc4``,          ||W||_F^2 / C (the mean ||W_c||^2)
``norm_w_sq``,
``norm_h_sq``,
``w_row_norm_sq``
``geometry``, ``rank``,    what the end point is (``FlowResult.critical``, docs/theory.md §13.7):
``hessian_min_eig``,       the frame of W ("simplex_etf", "orthogonal_frame", "other", "zero")
``hessian_max_abs_eig``,   and the rank of W, the smallest Hessian eigenvalue and the largest
``critical_point``         |eigenvalue| (Lanczos; None when skipped), and "minimum", "saddle",
                           "stationary" (Hessian skipped) or "not_stationary"; all None when the
                           flow ran with ``classify=False``
``cf_eps``, ``cf_loss``,   the closed form (``ufm.closed_form.UFMOptimum``): eps, minimal loss,
``cf_cos_w``,              the two cosines, ||W_c||^2, the geometry and delta = C sqrt(N lam_w
``cf_cos_h``,              lam_h); all None without a closed form
``cf_w_row_norm_sq``,
``cf_geometry``,
``cf_delta``
``eps_err``,               eps - cf_eps; (loss - cf_loss)/cf_loss (loss itself when cf_loss = 0);
``loss_rel_err``,          whether loss and eps agree with the closed form to AGREEMENT_RTOL
``reached``                (relative); None without a closed form
``closed_form_note``       why there is no closed form (the NoClosedForm message), else None
========================== ===================================================================

The row also holds every other scalar measure of ``record_state`` (e.g. ``nc2_equiangle_w``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._validation import check_memory
from ..dynamics import FlowResult, gradient_flow, record_state
from ..dynamics.moments import MomentState, moment_record, random_moments, use_moments
from ..geometry import mean_cosine
from ..losses import NoClosedForm
from ..model import UFMParams, UFMProblem, last_features

__all__ = ["AGREEMENT_RTOL", "FlowComparison", "ROW_KEYS", "centred_class_means", "compare_flow"]

# Relative agreement of the flow's end point with the closed form (loss and eps) that counts as
# reached: a flow stopped at ||grad L|| < 1e-8 lies ~1e-8/lam from the minimizer, so its loss agrees
# to ~1e-14 and eps to ~1e-8 at the sizes of ``ufm reproduce`` (measured 2026-11-30); 1e-6 leaves room.
AGREEMENT_RTOL = 1e-6
# Scale below which |reference| counts as zero in a relative comparison (eps = 0 or loss = 0).
_AGREEMENT_FLOOR = 1e-12

# The keys of the canonical row, in order; record_state's further measures follow ``nc4``.
FLOW_KEYS = ("t", "grad_norm", "nfev", "success", "flow_status", "message", "method")
END_KEYS = ("loss", "eps", "cos_w", "cos_h", "nc1", "nc3", "nc4", "norm_w_sq", "norm_h_sq", "w_row_norm_sq")
CLOSED_FORM_KEYS = (
    "cf_eps", "cf_loss", "cf_cos_w", "cf_cos_h", "cf_w_row_norm_sq", "cf_geometry", "cf_delta",
)  # fmt: skip
GAP_KEYS = ("eps_err", "loss_rel_err", "reached", "closed_form_note")
CRITICAL_KEYS = ("geometry", "rank", "hessian_min_eig", "hessian_max_abs_eig", "critical_point")
ROW_KEYS = FLOW_KEYS + END_KEYS + CRITICAL_KEYS + CLOSED_FORM_KEYS + GAP_KEYS

# UFMOptimum field behind each closed-form key.
_OPTIMUM_FIELDS = {
    "cf_eps": "eps", "cf_loss": "loss", "cf_cos_w": "cos_w", "cf_cos_h": "cos_h",
    "cf_w_row_norm_sq": "w_row_norm_sq", "cf_geometry": "geometry", "cf_delta": "delta",
}  # fmt: skip


def centred_class_means(problem: UFMProblem, params: UFMParams) -> np.ndarray:
    """M = [mu_c - mu_G] as rows, (C, p), of the features entering the classifier.

    mu_c is the mean of class c's features (``problem.labels``, so the counts may differ per class)
    and mu_G = 1/n sum_i h_i the mean over all examples, as in ``ufm.metrics.nc_metrics``.
    """
    Z = last_features(problem, params)  # (p, n)
    labels = np.asarray(problem.labels)  # (n,)
    counts = np.bincount(labels, minlength=problem.C)  # (C,)
    sums = np.zeros((problem.C, Z.shape[0]))
    np.add.at(sums, labels, Z.T)  # (C, p): sum of each class's features
    mu = sums / counts[:, None]  # (C, p)
    return mu - Z.mean(axis=1)


# Arrays the size of the flow's state that an integrator keeps at once, at most: DOP853's 13 stages,
# the state, its update and error estimate, and the driver's records (an upper estimate, not measured).
_STATE_COPIES = 20


def _flow_bytes(problem: UFMProblem, p: int, *, moments: bool = False) -> float:
    """Estimated float64 bytes of a flow: the targets (C, n) and their one-hot labels, twice, and
    _STATE_COPIES copies of the state: H (p, n), or for a moment flow the class means M (p, C) and the
    scatter S (p, p); W_1..W_{L-1} (p, p), W_L (C, p) and b (C,)."""
    C, n = problem.C, problem.n
    features = p * C + p * p if moments else p * n
    state = features + (problem.depth - 1) * p * p + C * p + C
    return 8.0 * ((0 if moments else 2 * C * n) + _STATE_COPIES * state)


def _centred_moment_means(state: MomentState, problem: UFMProblem) -> np.ndarray:
    """The same M (C, p) from a moment state (depth 1: the class means of H; deeper: of z_{L-1})."""
    means = state.M
    for Wk in state.Ws[:-1]:
        means = Wk @ means
    counts = np.asarray(problem.counts, dtype=float)
    return (means - (means @ counts / problem.n)[:, None]).T


def _finite(value: Any) -> Any:
    """A measure for the row: NumPy scalars as Python ones, NaN and inf as None (undefined)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _agrees(value: float | None, reference: float) -> bool:
    return value is not None and abs(value - reference) <= AGREEMENT_RTOL * max(
        abs(reference), _AGREEMENT_FLOOR
    )


@dataclass(frozen=True)
class FlowComparison:
    """Outcome of :func:`compare_flow`.

    Attributes
    ----------
    problem : the UFM problem.
    flow : the gradient flow (its trajectory in ``t``, ``loss``, ``metrics``; ``params`` its end point).
    optimum : the closed-form minimizer (``problem.loss.closed_form(problem)``), or None.
    closed_form_note : why there is no closed form (the NoClosedForm message), or None.
    end : scalar measures at the flow's end point: ``record_state`` plus ``cos_h`` and
        ``w_row_norm_sq``; None where undefined.
    """

    problem: UFMProblem
    flow: FlowResult
    optimum: Any  # UFMOptimum | None
    closed_form_note: str | None
    end: dict[str, Any] = field(repr=False)

    @property
    def reached(self) -> bool | None:
        """Whether loss and eps agree with the closed form to AGREEMENT_RTOL (None without one)."""
        if self.optimum is None:
            return None
        return _agrees(self.end["loss"], self.optimum.loss) and _agrees(self.end["eps"], self.optimum.eps)

    def row(self) -> dict[str, Any]:
        """The canonical flat row of the module docstring (scalars only; None, never NaN)."""
        r, opt = self.flow, self.optimum
        row: dict[str, Any] = {
            "t": r.t_final, "grad_norm": _finite(float(r.grad_norm)), "nfev": int(r.nfev),
            "success": bool(r.success), "flow_status": int(r.status), "message": r.message,
            "method": r.method,
        }  # fmt: skip
        row |= {k: self.end.get(k) for k in END_KEYS}
        cp = r.critical
        row |= {k: None if cp is None else _finite(getattr(cp, k)) for k in CRITICAL_KEYS}
        row |= {k: v for k, v in self.end.items() if k not in row}
        if opt is None:
            row |= dict.fromkeys(CLOSED_FORM_KEYS + GAP_KEYS)
        else:
            row |= {k: _finite(getattr(opt, name)) for k, name in _OPTIMUM_FIELDS.items()}
            loss = row["loss"]
            row["eps_err"] = None if row["eps"] is None else row["eps"] - opt.eps
            row["loss_rel_err"] = None if loss is None else (loss - opt.loss) / opt.loss if opt.loss else loss
            row["reached"] = self.reached
        row["closed_form_note"] = self.closed_form_note
        return row


def compare_flow(
    problem: UFMProblem, p: int, *, seed: int = 0, init_scale: float = 1.0, **flow_options: Any
) -> FlowComparison:
    """Gradient flow from a random start, measured at its end and set beside the closed form.

    Parameters
    ----------
    problem : UFMProblem
        Any UFM problem (balanced or not, any loss and depth).
    p : int
        Feature dimension of the start.
    seed, init_scale : the start ``UFMParams.random(problem, p, scale=init_scale, rng=seed)``, or for
        a moment flow its moments by their exact laws, ``random_moments`` (H is never formed; a
        different random stream, so not the same draw).
    **flow_options
        Passed to :func:`ufm.dynamics.gradient_flow` (``method``, ``t_max``, ``tol``, ``rtol``,
        ``atol``, ``max_nfev``, ``max_seconds``, ``metrics``, ``n_records``, ``progress``,
        ``moments``, ...); unset
        ones take the library's defaults (``DEFAULT_METHOD`` and its ``default_tolerances``).

    Returns
    -------
    FlowComparison
        ``.row()`` is the canonical row of the module docstring.
    """
    moments = use_moments(problem, p, flow_options.get("moments"))
    check_memory(
        f"a {'moment' if moments else 'gradient'} flow at C = {problem.C}, n = {problem.n}, p = {p}",
        _flow_bytes(problem, p, moments=moments),
        "choose a smaller problem (-C, -N, -p)" + ("" if moments else ", or a moment flow (--moments)"),
    )  # fmt: skip
    if moments:
        start: Any = random_moments(problem, p, scale=init_scale, rng=seed)
    else:
        start = UFMParams.random(problem, p, scale=init_scale, rng=seed)
    flow = gradient_flow(problem, start, **flow_options)
    try:
        optimum, note = problem.loss.closed_form(problem), None
    except NoClosedForm as err:
        optimum, note = None, str(err)
    if optimum is not None and p < optimum.min_dim:
        # The closed form is the minimizer over p >= its rank; below it the flow minimizes another problem.
        optimum, note = (
            None,
            (
                f"p = {p} is below the rank {optimum.min_dim} of the closed-form minimizer ({optimum.geometry}), "
                f"which holds for p >= {optimum.min_dim}"
            ),
        )
    if isinstance(flow.params, MomentState):
        end = {k: _finite(v) for k, v in moment_record(problem, flow.params).items()}
        end["cos_h"] = _finite(mean_cosine(_centred_moment_means(flow.params, problem)))
    else:
        end = {k: _finite(v) for k, v in record_state(problem, flow.params).items()}
        end["cos_h"] = _finite(mean_cosine(centred_class_means(problem, flow.params)))
    end["w_row_norm_sq"] = end["norm_w_sq"] / problem.C
    return FlowComparison(problem, flow, optimum, note, end)
