"""The integrator registry: every method against an independent reference, measured orders, budgets.

The reference for paths is DOP853 at rtol 1e-13 (an eighth-order method at a tolerance far below what
is compared); the reference for end points is the closed form of the global minimizer.
"""

import numpy as np
import pytest

from ufm.closed_form import ufm_optimum
from ufm.dynamics import METHODS, gradient_flow, linear_part
from ufm.dynamics.flow import _gradient_system, _System, integrate
from ufm.dynamics.integrators import ACCURATE_METHOD, DEFAULT_METHOD, ETD2, Diagonal, Evaluator, _phi12
from ufm.model import UFMParams, UFMProblem, loss_and_grad

T = 2.0  # horizon of the order tests: the flow still moves fast there (||grad L|| ~ 0.3)


@pytest.fixture(scope="module")
def system():
    problem = UFMProblem(3, 2, 0.05, 0.05)
    return _gradient_system(problem, UFMParams.random(problem, 4, rng=0))


def _step_to(system, name, *, h=None, rtol=1e-13, atol=1e-15):
    """Integrate to T with the integrator object itself; (state at T, number of steps)."""
    cls = METHODS[name]
    fun = Evaluator(system.field, by_value=cls.cache_by_value)
    fixed = {} if h is None else {"first_step": h, "max_step": h}
    solver = cls(fun, system.y0, T, rtol=rtol, atol=atol, linear=system.linear, **fixed)
    steps = 0
    while solver.t < T:
        assert solver.step() is None
        steps += 1
    return solver.host(solver.y), steps


# Fixed-step settings per method: steps of T/k with a tolerance loose enough that no step is rejected
# (explicit methods, ETD2) or tight enough that Radau's Newton iterations, which use the diagonal
# approximate Jacobian, converge below the discretization error; the steps large enough that the error
# stays far above rounding (DOP853 reaches 1e-12 at k = 8).
ORDER_CASES = {
    "ETD2": ((8, 16, 32, 64), 1e3, 1e3),
    "RK23": ((16, 32, 64), 1e3, 1e3),
    "RK45": ((16, 32, 64), 1e3, 1e3),
    "DOP853": ((2, 4, 8), 1e3, 1e3),
    "Radau": ((32, 64), 1e-6, 1e-8),
}


@pytest.mark.parametrize("name", sorted(ORDER_CASES))
def test_measured_order_matches_the_stated_order(system, name):
    """Global error at T with fixed steps h falls like h^order: the last halving within 0.2 of the
    stated order (diffrax's order test)."""
    ref, _ = _step_to(system, "DOP853")
    ks, rtol, atol = ORDER_CASES[name]
    errors = []
    for k in ks:
        y, steps = _step_to(system, name, h=T / k, rtol=rtol, atol=atol)
        assert steps == k  # the steps really were fixed
        errors.append(np.linalg.norm(y - ref))
    measured = np.log2(errors[-2] / errors[-1])
    assert abs(measured - METHODS[name].order) <= 0.2


def test_every_registered_method_states_its_order():
    """Fixed-order methods are measured above; the variable-order ones state a (lowest, highest) pair."""
    for name, cls in METHODS.items():
        if name in ORDER_CASES:
            assert isinstance(cls.order, int)
        else:
            low, high = cls.order
            assert 1 <= low < high


@pytest.mark.parametrize("name", sorted(METHODS))
def test_error_falls_with_the_tolerance(system, name):
    """Adaptive runs: the error at T against the reference falls by at least 10x when rtol falls by
    1000x (the variable-order methods included)."""
    ref, _ = _step_to(system, "DOP853")
    loose, _ = _step_to(system, name, rtol=1e-4, atol=1e-6)
    tight, _ = _step_to(system, name, rtol=1e-7, atol=1e-9)
    assert np.linalg.norm(tight - ref) < 0.1 * np.linalg.norm(loose - ref)


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("bias", [True, False])
def test_every_method_reaches_the_closed_form(name, bias):
    """From a random start, each method with its own default tolerances ends at the closed-form loss
    (typed reference: ufm_optimum is checked against typed numbers in test_catalogue.py)."""
    problem = UFMProblem(3, 3, 0.03, 0.03, bias=bias)
    r = gradient_flow(problem, UFMParams.random(problem, 4, rng=1), method=name, tol=1e-6, metrics=False)
    assert r.status == 1 and r.success
    # ||grad L|| < 1e-6 puts the loss within ~||grad||^2/lam ~ 3e-11 of the minimum.
    assert r.loss[-1] == pytest.approx(ufm_optimum(3, 3, 0.03, 0.03, bias=bias).loss, rel=1e-9)
    assert np.linalg.norm(loss_and_grad(problem, r.params)[1].ravel()) < 1e-6


@pytest.mark.parametrize("name", sorted(METHODS))
def test_dense_output_follows_the_reference_path(name):
    """sol(t) between steps agrees with a DOP853 path at rtol 1e-12 to the method's path accuracy."""
    problem = UFMProblem(3, 2, 0.05, 0.05)
    start = UFMParams.random(problem, 4, rng=2)
    ts = np.array([0.37, 1.1, 2.9])
    ref = gradient_flow(problem, start, method="DOP853", t_max=3.0, tol=0.0, rtol=1e-12, atol=1e-14,
                        t_eval=ts, metrics=False)  # fmt: skip
    r = gradient_flow(problem, start, method=name, t_max=3.0, tol=0.0, rtol=1e-6, atol=1e-8,
                      dense_output=True, metrics=False)  # fmt: skip
    for t, loss_ref in zip(ts, ref.loss[:3]):
        params = UFMParams.unravel(start, r.sol(t))
        assert loss_and_grad(problem, params)[0] == pytest.approx(loss_ref, rel=1e-4)
    # Several times at once: one column a time, as each is alone.
    np.testing.assert_allclose(r.sol(ts), np.stack([r.sol(t) for t in ts], axis=1), rtol=1e-14, atol=1e-14)


def test_default_method_is_the_library_policy():
    """No method named: ETD2 by default, DOP853 when a path below rtol 1e-7 is asked for."""
    problem = UFMProblem(3, 2, 0.05, 0.05)
    start = UFMParams.random(problem, 4, rng=0)
    assert gradient_flow(problem, start, t_max=1.0, metrics=False).method == DEFAULT_METHOD == "ETD2"
    assert gradient_flow(problem, start, t_max=1.0, rtol=1e-10, metrics=False).method == ACCURATE_METHOD


@pytest.mark.parametrize("name", ["ETD2", "DOP853", "BDF"])
def test_budget_of_gradient_evaluations_stops_the_run(name):
    """max_nfev stops the run with status 3, a message naming the budget, and the state so far."""
    problem = UFMProblem(3, 3, 0.03, 0.03)
    r = gradient_flow(problem, UFMParams.random(problem, 4, rng=1), method=name, max_nfev=20, metrics=False)
    assert r.status == 3 and not r.success
    assert "max_nfev" in r.message
    assert 20 <= r.nfev < 20 + 40  # stopped at the first accepted step past the budget
    assert r.t_final > 0


def test_time_budget_stops_the_run():
    """max_seconds stops a run that would otherwise go on (status 4)."""
    problem = UFMProblem(3, 3, 0.03, 0.03)
    r = gradient_flow(problem, UFMParams.random(problem, 4, rng=1), method="RK23", rtol=1e-12,
                      max_seconds=0.05, metrics=False)  # fmt: skip
    assert r.status == 4 and not r.success
    assert "max_seconds" in r.message


def test_a_device_this_machine_lacks_is_refused_before_the_flow():
    """Before: device="cuda" without CUDA was torch's AssertionError, "gpu9" a RuntimeError."""
    import torch

    problem = UFMProblem(3, 2, 0.03, 0.03)
    start = UFMParams.random(problem, 4, rng=1)
    cases = {"gpu9": "is not a torch device", "meta": "is not one ufm computes on"}
    if not torch.cuda.is_available():
        cases["cuda:0"] = "requested but torch sees no CUDA device"
    for device, message in cases.items():
        for method in ("ETD2", "BDF"):
            with pytest.raises(ValueError, match=rf"^device '{device}' {message}"):
                gradient_flow(problem, start, device=device, method=method)


def test_bad_budgets_are_refused():
    problem = UFMProblem(3, 3, 0.03, 0.03)
    start = UFMParams.random(problem, 4, rng=1)
    with pytest.raises(ValueError, match="max_nfev"):
        gradient_flow(problem, start, max_nfev=0)
    for seconds in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match=r"^max_seconds must be a finite number > 0, got"):
            gradient_flow(problem, start, max_seconds=seconds)


@pytest.mark.parametrize("name", ["ETD2", "DOP853", "BDF"])
def test_a_blow_up_stops_with_the_last_good_state(name):
    """y' = y^2 from y = 1 blows up at t = 1 (exact solution 1/(1 - t)): the run stops near t = 1,
    failed (status -1: step size underflow) or out of its budget (status 3), says so, and returns the
    last state that passed the check, finite, never NaN."""
    problem = UFMProblem(2, 1, 0.0, 0.0, bias=False)
    like = UFMParams.random(problem, 1, rng=0)  # 4 numbers: H (1, 2) and W (2, 1)

    def field(y):
        with np.errstate(over="raise", invalid="raise"):
            dy = y * y
            return float(y @ y), dy, float(np.linalg.norm(dy))

    system = _System(
        problem, np.ones(4), field, lambda y: UFMParams.unravel(like, np.asarray(y)), np.zeros(4)
    )
    r = integrate(system, method=name, t_max=2.0, tol=0.0, rtol=1e-6, atol=1e-9, t_eval=None, n_records=5,
                  metrics=False, target_loss=None, dense_output=False, progress=False, device="cpu",
                  max_nfev=5000)  # fmt: skip
    assert r.status in (-1, 3) and not r.success
    assert 0.5 < r.t_final < 1.01
    assert "t = " in r.message
    final = r.params.ravel()
    assert np.all(np.isfinite(final)) and final.min() > 2  # on the way up: 1/(1 - 0.5) = 2


def test_etd2_holds_two_states_beyond_the_field():
    """Lean ETD2 (docs/theory.md §13.4): stepping as the driver does holds, beyond one field evaluation
    with its input, only the field at the state and the trial stage u (tracemalloc peaks; measured
    2.17 states)."""
    import tracemalloc

    from ufm.dynamics.integrators import ETD2

    problem = UFMProblem(10, 160, 5e-4, 5e-4)
    system = _gradient_system(problem, UFMParams.random(problem, 64, rng=0))

    def peak(fn):
        tracemalloc.start()
        fn()
        top = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return top / system.y0.nbytes

    def stepping():
        fun = Evaluator(system.field)
        solver = ETD2(fun, system.y0.copy(), 1e6, rtol=1e-5, atol=1e-7, linear=system.linear)
        for _ in range(10):
            fun(solver.y)
            assert solver.step() is None

    field = peak(lambda: system.field(system.y0.copy()))  # its input and its own temporaries
    assert peak(stepping) - field <= 2.3


def test_etd2_through_the_driver_holds_under_five_states_when_c_n_exceeds_the_state():
    """Lean ETD2 with the field writing into arrays it hands back (Evaluator ``into``/``recycle``, as
    the driver runs it), at C = 80 > p = 16, where the outputs C x n alone are 4.96 states: the gradient
    runs over column blocks, so stepping peaks at the four arrays y, F(y), u, F(u) plus scratch
    (tracemalloc, measured 4.62 states; docs/theory.md §13.3)."""
    import tracemalloc

    from ufm.dynamics.integrators import ETD2

    problem = UFMProblem(80, 125, 5e-4, 5e-4)
    system = _gradient_system(problem, UFMParams.random(problem, 16, rng=0))
    assert problem.T.size > 4.9 * system.y0.size
    tracemalloc.start()
    fun = Evaluator(system.field, into=system.field_into)
    solver = ETD2(fun, system.y0.copy(), 1e6, rtol=1e-5, atol=1e-7, linear=system.linear)
    for _ in range(10):
        fun(solver.y)
        assert solver.step() is None
    peak = tracemalloc.get_traced_memory()[1] / system.y0.nbytes
    tracemalloc.stop()
    assert peak < 5


def test_a_flows_memory_does_not_grow_with_its_records():
    """Records are measured as the run passes their times, not kept as states (docs/theory.md §13.3),
    and a whole call stays under 6 states (tracemalloc, in states of the flat parameters; 2026-12-06):

    * 60 requested records (30 reached in 150 evaluations, most of them interpolated) peak as 2 do,
      at 5.48: ETD2's four arrays, the start state among them, and for a record the interpolated
      state, whose loss and ||grad L|| take no state-sized array (``loss_and_grad_norm``);
    * without an interpolated record the call peaks at 4.39.

    Before, at (4, 500, 32): 7.4 and 8.3 while Lambda was a vector, y0 was kept and a record's field
    made its dy/dt; when every record's state was kept, 37 records at (10, 1600, 64) took 43.2 states
    against 9.3 for 2."""
    import tracemalloc

    problem = UFMProblem(4, 2000, 5e-4, 5e-4)
    start = UFMParams.random(problem, 32, rng=0)

    def peak(**kw):
        tracemalloc.start()
        r = gradient_flow(problem, start, method="ETD2", tol=0.0, max_nfev=150, metrics=False, classify=False,
                          **kw)  # fmt: skip
        top = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return top / start.ravel().nbytes, r.t.size

    (few, n_few), (many, n_many) = peak(n_records=2), peak(n_records=60)
    assert n_few <= 3 and n_many >= 20
    assert many - few < 0.5 and many < 6
    assert peak(t_eval=[0.0])[0] < 5


def test_diagonal_keeps_lambda_as_its_runs():
    """Lambda as runs (``Diagonal``): the vector of ``linear_part`` equals the decays typed out block by
    block, equal neighbours share a run and empty blocks vanish, and a vector given instead (the
    contract allows it) comes back entry for entry."""
    problem = UFMProblem(3, 4, 0.02, 0.05, lam_b=0.3)
    x = UFMParams.random(problem, 5, rng=0)
    typed = np.concatenate([np.full(5 * 12, -0.05), np.full(3 * 5, -0.02), np.full(3, -(0.3 + 1.0))])
    lam = linear_part(problem, x)
    np.testing.assert_array_equal(np.asarray(lam), typed)
    assert lam.size == typed.size and len(lam.runs) == 3
    with pytest.raises(ValueError, match="holds runs"):
        np.asarray(lam, copy=False)
    merged = Diagonal.of([(2, -1.0), (0, 5.0), (3, -1.0), (1, 0.0)])
    assert merged.runs == (slice(0, 5), slice(5, 6))
    np.testing.assert_array_equal(merged.levels, [-1.0, 0.0])
    vector = np.repeat([0.5, -2.0, 0.5, 0.0], [3, 1, 2, 4])
    back = Diagonal.coerce(vector)
    np.testing.assert_array_equal(np.asarray(back), vector)
    assert len(back.runs) == 4


def test_etd2_reusing_y0_takes_the_same_steps():
    """``overwrite_y0`` (what the driver passes for its own start state) reuses y0's memory as a later
    trial stage, and changes nothing else: the same states bit for bit after 12 steps; without it y0
    is never written."""
    problem = UFMProblem(4, 30, 5e-3, 5e-3)
    system = _gradient_system(problem, UFMParams.random(problem, 8, rng=1))

    def run(y0, overwrite):
        fun = Evaluator(system.field, into=system.field_into)
        solver = ETD2(fun, y0, 1e6, rtol=1e-5, atol=1e-7, linear=system.linear, overwrite_y0=overwrite)
        for _ in range(12):
            fun(solver.y)
            assert solver.step() is None
        return solver.y

    kept, given = system.y0.copy(), system.y0.copy()
    a, b = run(kept, False), run(given, True)
    np.testing.assert_array_equal(kept, system.y0)
    assert not np.array_equal(given, system.y0)  # its memory was reused
    np.testing.assert_array_equal(a, b)


def test_records_are_the_same_with_and_without_dense_output():
    """A record interpolated without dense output (``dense(keep=False)``: ETD2 goes on reusing the
    step's arrays) equals the same run's record with them kept for the dense output, bit for bit, and
    the dense output at the record times gives the recorded losses and ||grad L|| (to 1e-12 and 1e-10
    relative; the reference gradient is ``loss_and_grad``'s whole array) and the recorded measures
    (measured on views of the state, ``params_view``) as ``record_state`` gives them on parameters of
    their own (to 1e-10)."""
    from ufm.dynamics import record_state

    problem = UFMProblem(3, 20, 0.01, 0.01)
    start = UFMParams.random(problem, 6, rng=2)
    kw = dict(method="ETD2", t_max=50.0, tol=0.0, n_records=25, metrics=True, classify=False)
    plain, dense = gradient_flow(problem, start, **kw), gradient_flow(problem, start, dense_output=True, **kw)
    assert plain.t.size == 25  # 0, 23 log-spaced times, t_max
    np.testing.assert_array_equal(plain.t, dense.t)
    np.testing.assert_array_equal(plain.loss, dense.loss)
    from ufm.model import loss

    at = [UFMParams.unravel(start, dense.sol(t)) for t in plain.t[1:-1]]
    np.testing.assert_allclose([loss(problem, x) for x in at], plain.loss[1:-1], rtol=1e-12)
    norms = [np.linalg.norm(loss_and_grad(problem, x)[1].ravel()) for x in at]
    np.testing.assert_allclose(norms, plain.metrics["grad_norm"][1:-1], rtol=1e-10)
    own = [
        record_state(problem, UFMParams(x.H.copy(), tuple(W.copy() for W in x.Ws), x.b.copy())) for x in at
    ]
    for key in ("nc1", "nc2_equinorm", "nc3", "eps", "norm_h_sq"):
        np.testing.assert_allclose([r[key] for r in own], plain.metrics[key][1:-1], rtol=1e-10, err_msg=key)


def test_phi_functions_match_high_precision():
    """ETD2's phi_1(z) = (e^z - 1)/z and phi_2(z) = (e^z - 1 - z)/z^2 against mpmath at 60 digits, on
    both sides of the series cutoff (|z| = 0.02), at 0 and far out: within 2e-14 relative (phi_2's
    closed form just above the cutoff loses 2 eps/|z| = 1.1e-14 to cancellation)."""
    import mpmath

    mpmath.mp.dps = 60  # (e^z - 1 - z) at z = 1e-30 needs 31 digits beyond z
    z = np.array([0.0, 1e-30, -1e-12, 1e-8, -0.0199, 0.0199, -0.02, 0.0201, -0.5, 0.7, -3.0, -50.0, 10.0])
    phi1, phi2 = _phi12(z)
    for x, p1, p2 in zip(z, phi1, phi2):
        m = mpmath.mpf(float(x))
        ref1 = mpmath.mpf(1) if m == 0 else mpmath.expm1(m) / m
        ref2 = mpmath.mpf(1) / 2 if m == 0 else (mpmath.expm1(m) - m) / m**2
        assert abs(p1 - ref1) <= 2e-14 * abs(ref1), (x, p1, ref1)
        assert abs(p2 - ref2) <= 2e-14 * abs(ref2), (x, p2, ref2)
