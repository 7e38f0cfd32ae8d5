"""Discrete dynamics of the UFM (GD, SGD, momentum) and the journal paper's normalized flow.

GD and SGD
----------
theta_{k+1} = theta_k - lr v_k with v_k = mu v_{k-1} + g_k (heavy ball, PyTorch's convention;
mu = 0 is plain GD). GD uses g_k = grad L, so GD with small lr is the Euler method for the flow
(first order in lr; ``tests/test_discrete.py`` measures it). Time is t = k lr.

SGD samples class-balanced mini-batches of examples (columns of H): every step takes B/C examples of
each class (a fresh permutation of each class every epoch), matching the balanced setting of the theory.
Its g_k is the data gradient of the batch, (1/B) sum_{i in B} grad l_i, **plus the exact gradient of
the weight decay of every parameter**. Choice and reason: the penalty is not a sum over examples, so
it is not sampled; each feature column h_i gets a data gradient only from its own term l_i, i.e. only
when i is in the batch, with weight 1/B, and since P(i in B) = B/n that is (1/n) grad l_i in
expectation. So E[g_k] = grad L exactly (an unbiased SGD for the same L), and SGD with B = n is GD.

Normalized dynamics (Xu, Rangamani, Galanti, Liao, Poggio, Research 2023)
--------------------------------------------------------------------------
Each layer W_k = rho_k V_k with ||V_k||_F = 1, the constraint kept by a Lagrange multiplier nu_k.
Chain rule with G_k = dL/dW_k (the full regularized gradient): dL/drho_k = <V_k, G_k> and
dL/dV_k = rho_k G_k. Gradient flow in (rho_k, V_k) under the constraint::

    V_k'   = -rho_k G_k - nu_k V_k,   nu_k from d||V_k||^2/dt = 2 <V_k, V_k'> = 0:  nu_k = -rho_k <V_k, G_k>
           = -rho_k (G_k - <V_k, G_k> V_k)            (tangential projection of the gradient)
    rho_k' = -<V_k, G_k>                               (weight decay enters as lam_k rho_k through G_k)

H and b follow plain gradient flow. The induced W_k' = -[rho_k^2 G_k + (1 - rho_k^2) <V_k, G_k> V_k]
is a preconditioned gradient flow: dL/dt = -sum_k (<V_k, G_k>^2 + rho_k^2 ||G_k - <V_k, G_k> V_k||^2) -
||G_H||^2 - ||G_b||^2 <= 0, and its fixed points with rho_k != 0 are exactly those of the gradient
flow (G_k = 0), so it converges to the same closed form. ||V_k|| = 1 is invariant exactly; numerically
it drifts by the integrator's error, recorded as ``v_norm_err``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .._progress import progress_bar
from .._validation import check_nonneg, check_positive_int
from ..model import GradientWork, UFMParams, UFMProblem, check_params, loss_and_grad
from .flow import FlowResult, _stack_records, _System, decay_parts, end_point, integrate, record_state
from .integrators import Diagonal


@dataclass(frozen=True)
class DescentResult(FlowResult):
    """A run of GD or SGD: a FlowResult whose ``t`` = steps * lr is the flow time the steps approximate.

    Attributes (besides FlowResult's)
    ---------------------------------
    steps : (k,) recorded step numbers.

    ``nfev`` counts full gradients for GD and mini-batch gradients for SGD; ``method`` is "GD" or
    "SGD"; status 0 means n_steps were run.
    """

    steps: np.ndarray | None = None


def _batch_gradient(problem: UFMProblem, params: UFMParams, idx: np.ndarray, per_class: int) -> UFMParams:
    """(1/B) sum_{i in idx} grad l_i plus the full weight-decay gradient (module docstring).

    ``idx`` lists the batch class-major (per_class examples of each class), so the batch is itself a
    balanced UFMProblem with N = per_class; its decays are zeroed and the exact decays added after.
    """
    sub = replace(problem, N=per_class, lam_w=(0.0,) * problem.depth, lam_h=0.0, lam_b=0.0)
    _, g = loss_and_grad(sub, UFMParams(params.H[:, idx], params.Ws, params.b))
    dH = problem.lam_h * params.H
    dH[:, idx] += g.H
    dWs = tuple(gw + lam * Wk for gw, lam, Wk in zip(g.Ws, problem.lam_layers, params.Ws))
    db = None if params.b is None else g.b + problem.lam_b * params.b
    return UFMParams(dH, dWs, db)


def _descend(
    problem, start, lr, n_steps, momentum, tol, target_loss, record_every, metrics, progress, sampler,
    check_every=1, classify=True,
):  # fmt: skip
    """Shared loop of GD and SGD: ``sampler(k, params) -> gradient`` (or None for the full gradient).

    The full loss and gradient (stopping rules, records) are evaluated at steps that are multiples of
    ``check_every`` or of ``record_every``, and at n_steps; GD needs them every step anyway.
    """
    check_params(problem, start)
    lr = check_nonneg("lr", lr)
    n_steps = check_positive_int("n_steps", n_steps)
    record_every = check_positive_int("record_every", record_every)
    momentum = check_nonneg("momentum", momentum)
    if momentum >= 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    theta = start.ravel().copy()
    # The full gradient is written into one buffer with reused scratch, and the steps alternate between
    # two state buffers: fresh state-sized arrays on every step would cost their page faults.
    work, full_flat, spare = GradientWork(problem, start), np.empty_like(theta), np.empty_like(theta)
    vel = np.zeros_like(theta)
    steps, records = [], []
    status, msg, nfev, k = 0, "", 0, 0
    gnorm = float("nan")
    last_good = (0, theta)
    bar = progress_bar(
        total=n_steps, enabled=progress, terminal_only=False, desc="descent", unit="step", leave=False
    )
    try:
        while True:
            params = UFMParams.unravel(start, theta)
            checked = sampler is _full or k % check_every == 0 or k % record_every == 0 or k >= n_steps
            try:
                with np.errstate(over="raise", invalid="raise", divide="raise"):
                    if checked:
                        value, _ = loss_and_grad(problem, params, out=full_flat, work=work)
                        gnorm = float(np.linalg.norm(full_flat))
                        if not (np.isfinite(value) and np.isfinite(gnorm)):
                            raise FloatingPointError(f"non-finite loss {value} or gradient norm {gnorm}")
                    stop = checked and (
                        gnorm < tol or (target_loss is not None and value <= target_loss) or k >= n_steps
                    )
                    g = None if stop else sampler(k, params)
                    if g is not None:
                        g = g.ravel()
                        if not np.all(np.isfinite(g)):
                            raise FloatingPointError("non-finite mini-batch gradient")
            except FloatingPointError as err:
                s_good = last_good[0]
                status = -1
                msg = f"diverged at step {k}: {err}; last good step {s_good} (t = {s_good * lr:.6g})"
                theta = last_good[1]
                break
            last_good = (k, theta)  # the next step writes into the other buffer, so no copy is needed
            if checked and (k % record_every == 0 or stop):
                steps.append(k)
                rec = record_state(problem, params) if metrics else {"loss": value}
                rec["grad_norm"] = gnorm
                records.append(rec)
            if stop:
                status = 1 if gnorm < tol else 2 if (target_loss is not None and value <= target_loss) else 0
                msg = {0: "ran n_steps", 1: "stationary: ||grad L|| < tol", 2: "reached the target loss"}[
                    status
                ]
                msg += f" at step {k} (t = {k * lr:.6g})"
                break
            if g is None:
                g = full_flat  # GD: the gradient computed above
            else:
                nfev += 1
            with np.errstate(over="ignore", invalid="ignore"):  # checked at the next step
                if momentum:
                    vel *= momentum
                    vel += g
                else:
                    vel = g
                np.multiply(vel, -lr, out=spare)
                spare += theta  # theta - lr vel
                theta, spare = spare, theta
            k += 1
            bar.update(1)
    finally:
        bar.close()
    if sampler is _full:
        nfev = last_good[0] + 1  # one full gradient per step taken, and one at the end
    stacked = _stack_records(records) if records else {"loss": np.array([])}
    loss_t = stacked.pop("loss")
    final = UFMParams.unravel(start, theta)
    gfinal = gnorm if status >= 0 else float("nan")  # a run ends at a checked step, where gnorm is fresh
    steps_a = np.array(steps, dtype=int)
    return DescentResult(
        steps=steps_a, t=steps_a * lr, loss=loss_t, metrics=stacked, params=final, grad_norm=gfinal,
        nfev=int(nfev), success=status >= 0, status=status, message=msg,
        method="GD" if sampler is _full else "SGD", critical=end_point(problem, final, tol, classify, status == -1),
    )  # fmt: skip


def _full(k: int, params: UFMParams) -> None:
    return None


def gradient_descent(
    problem: UFMProblem,
    start: UFMParams,
    *,
    lr: float,
    n_steps: int,
    momentum: float = 0.0,
    tol: float = 0.0,
    target_loss: float | None = None,
    record_every: int = 100,
    metrics: bool = True,
    progress: bool = False,
    classify: bool = True,
) -> DescentResult:
    """Full-batch gradient descent (heavy-ball momentum optional; module docstring).

    Parameters
    ----------
    problem, start : model and theta_0; lr : step size (flow time per step); n_steps : maximum steps;
    momentum : mu in [0, 1); tol : stop when ||grad L|| < tol; target_loss : stop when the loss is
    <= this; record_every : record loss and measures every so many steps (and at the end);
    metrics : record NC measures; progress : tqdm bar on stderr; classify : classify the end point
    (``critical``, as for ``gradient_flow``; docs/theory.md §13.7).
    """
    return _descend(
        problem, start, lr, n_steps, momentum, tol, target_loss, record_every, metrics, progress, _full,
        classify=classify,
    )  # fmt: skip


def sgd(
    problem: UFMProblem,
    start: UFMParams,
    *,
    lr: float,
    n_steps: int,
    batch_size: int,
    momentum: float = 0.0,
    seed: int | None = 0,
    tol: float = 0.0,
    target_loss: float | None = None,
    record_every: int = 100,
    metrics: bool = True,
    progress: bool = False,
    check_every: int | None = None,
    classify: bool = True,
) -> DescentResult:
    """SGD over class-balanced mini-batches of examples (module docstring for the gradient estimate).

    ``batch_size`` must be a multiple of C and at most n. The stopping rules (``tol``,
    ``target_loss``) look at the full loss and gradient, evaluated every ``check_every`` steps
    (default: once an epoch, n/batch_size steps), at every record and at n_steps; so a run stops at
    such a step. ``nfev`` counts mini-batch gradients only, not these full ones. ``classify`` as for
    ``gradient_descent``.
    """
    C, N = problem.C, problem.N
    batch_size = check_positive_int("batch_size", batch_size)
    if batch_size % C or batch_size > problem.n:
        raise ValueError(
            f"batch_size must be a multiple of C = {C} and at most n = {problem.n}, got {batch_size}"
        )
    per_class = batch_size // C
    per_epoch = N // per_class
    rng = np.random.default_rng(seed)
    offsets = np.arange(C)[:, None] * N  # (C, 1) first column of each class
    order = np.empty((C, N), dtype=int)

    def sampler(k: int, params: UFMParams) -> UFMParams:
        j = k % per_epoch
        if j == 0:
            order[:] = rng.permuted(np.tile(np.arange(N), (C, 1)), axis=1)
        idx = (offsets + order[:, j * per_class : (j + 1) * per_class]).ravel()  # class-major
        return _batch_gradient(problem, params, idx, per_class)

    check_every = per_epoch if check_every is None else check_positive_int("check_every", check_every)
    return _descend(
        problem, start, lr, n_steps, momentum, tol, target_loss, record_every, metrics, progress, sampler,
        check_every, classify,
    )  # fmt: skip


def _normalized_system(problem: UFMProblem, start: UFMParams) -> _System:
    """State y = (H, rho_1..rho_L, V_1..V_L, b) flat; field of the module docstring."""
    norms = [float(np.linalg.norm(Wk)) for Wk in start.Ws]
    if min(norms) == 0:
        raise ValueError("the normalized flow needs every ||W_k||_F > 0 at the start (V_k = W_k/rho_k)")
    L = len(start.Ws)
    Vs0 = [Wk / r for Wk, r in zip(start.Ws, norms)]
    like = UFMParams(start.H, tuple(Vs0), start.b)  # layout of (H, V_k, b)
    nH = start.H.size

    def split(y: np.ndarray) -> tuple[np.ndarray, UFMParams]:
        rho = y[nH : nH + L]
        rest = np.concatenate([y[:nH], y[nH + L :]])
        return rho, UFMParams.unravel(like, rest)

    def to_params(y: np.ndarray) -> UFMParams:
        rho, pv = split(np.asarray(y, dtype=float))
        return UFMParams(pv.H, tuple(r * V for r, V in zip(rho, pv.Ws)), pv.b)

    def field(y: np.ndarray) -> tuple[float, np.ndarray, float]:
        rho, pv = split(y)
        with np.errstate(over="raise", invalid="raise", divide="raise"):
            value, g = loss_and_grad(problem, to_params(y))
            drho = np.array([-float(np.vdot(V, G)) for V, G in zip(pv.Ws, g.Ws)])
            # V' = -rho (G - <V, G> V): the Lagrange multiplier removes the radial part.
            dVs = [-r * (G + d * V) for r, V, G, d in zip(rho, pv.Ws, g.Ws, drho)]
            parts = [-g.H.ravel(), drho, *[dV.ravel() for dV in dVs]]
            if g.b is not None:
                parts.append(-g.b)
            dy = np.concatenate(parts)
        return value, dy, float(np.linalg.norm(dy))

    def extra(y: np.ndarray) -> dict[str, float]:
        rho, pv = split(y)
        out = {f"rho_{k + 1}": float(r) for k, r in enumerate(rho)}
        out["rho"] = float(np.prod(rho))
        out["v_norm_err"] = max(abs(float(np.linalg.norm(V)) - 1) for V in pv.Ws)
        return out

    # Weight decay acts on rho_k alone (rho' = -<V, G_data> - lam_k rho); it cancels out of V'.
    decays = decay_parts(problem, nH, start.Ws, start.b)
    lin = Diagonal.of(
        [decays[0], *((1, -lam) for lam in problem.lam_layers), (sum(W.size for W in start.Ws), 0.0)]
        + decays[1 + L :]
    )
    y0 = np.concatenate(
        [start.H.ravel(), norms, *[V.ravel() for V in Vs0]] + ([start.b] if start.b is not None else [])
    )
    return _System(
        problem=problem, y0=y0, field=field, to_params=to_params, linear=lin, extra=extra,
        stationarity_is_grad_norm=False,
    )  # fmt: skip


def normalized_flow(
    problem: UFMProblem,
    start: UFMParams,
    *,
    method: str | None = None,
    t_max: float = 1e6,
    tol: float = 1e-8,
    rtol: float | None = None,
    atol: float | None = None,
    t_eval: np.ndarray | None = None,
    n_records: int = 60,
    metrics: bool = True,
    progress: bool = False,
    max_nfev: int | None = None,
    max_seconds: float | None = None,
    classify: bool = True,
) -> FlowResult:
    """The normalized dynamics (module docstring), integrated by the driver of ``ufm.dynamics.gradient_flow`` (same methods, defaults and budget).

    The stationarity event compares ||(H', rho', V', b')|| with ``tol``; ``metrics`` gain ``rho_k``,
    ``rho`` = prod_k rho_k and ``v_norm_err`` = max_k | ||V_k|| - 1 |. ``params`` is W_k = rho_k V_k.
    The ``ETD2`` method runs on the host only (the field is NumPy). ``classify`` as for
    ``gradient_flow`` (the end point is classified by ||grad L||, not by the stationarity above).
    """
    check_params(problem, start)
    return integrate(
        _normalized_system(problem, start), method=method, t_max=t_max, tol=tol, rtol=rtol, atol=atol,
        t_eval=t_eval, n_records=n_records, metrics=metrics, target_loss=None, dense_output=False,
        progress=progress, device="cpu", max_nfev=max_nfev, max_seconds=max_seconds, classify=classify,
    )  # fmt: skip
