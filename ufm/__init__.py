"""ufm: a theory sandbox for neural collapse.

The unconstrained-features model (UFM) of THEORY.md checked three ways: closed forms verified in
SymPy, gradient-flow dynamics, and measurements on trained networks.
"""

from .closed_form import (
    UFMOptimum,
    lemma1_alpha_star,
    lemma1_loss,
    sqi_cosine,
    sqi_w_row_norm_sq,
    sqi_w_scale,
    ufm_optimum,
)
from .geometry import frame_distance, orthogonal_frame, simplex_etf
from .model import LOSSES, UFMParams, UFMProblem, loss, loss_and_grad, outputs, torch_loss
from .optimize import MinimizeResult, minimize_loss

__version__ = "0.1.0"

__all__ = [
    "LOSSES",
    "MinimizeResult",
    "UFMOptimum",
    "UFMParams",
    "UFMProblem",
    "frame_distance",
    "lemma1_alpha_star",
    "lemma1_loss",
    "loss",
    "loss_and_grad",
    "minimize_loss",
    "orthogonal_frame",
    "outputs",
    "simplex_etf",
    "sqi_cosine",
    "sqi_w_row_norm_sq",
    "sqi_w_scale",
    "torch_loss",
    "ufm_optimum",
]
