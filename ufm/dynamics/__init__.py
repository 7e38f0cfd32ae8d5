"""Dynamics of the UFM: gradient flow as an ODE (and its moment closure), discrete GD/SGD, the
normalized flow, and the scalar flow on the collapsed manifold (docs/theory.md §11, §13-§16)."""

from .discrete import DescentResult, gradient_descent, normalized_flow, sgd
from .flow import (
    DEFAULT_MAX_NFEV,
    DEFAULT_MAX_SECONDS,
    STATUS_MESSAGES,
    FlowResult,
    gradient_flow,
    linear_part,
    record_state,
)
from .integrators import (
    DEFAULT_METHOD,
    ETD2,
    METHODS,
    FlowDiverged,
    Integrator,
    ScipyIntegrator,
    default_method,
)
from .moments import MomentState, moments_from_params, random_moments, representative_params
from .reduced import ReducedFlowResult, reduced_flow

__all__ = [
    "DEFAULT_MAX_NFEV", "DEFAULT_MAX_SECONDS", "DEFAULT_METHOD", "ETD2", "METHODS", "STATUS_MESSAGES",
    "DescentResult", "FlowDiverged", "FlowResult", "Integrator", "MomentState", "ReducedFlowResult",
    "ScipyIntegrator", "default_method", "moments_from_params", "random_moments", "representative_params",
    "gradient_descent", "gradient_flow", "linear_part", "normalized_flow", "record_state", "reduced_flow", "sgd",
]  # fmt: skip
