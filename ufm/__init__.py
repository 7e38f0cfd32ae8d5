"""ufm: a theory sandbox for neural collapse.

The unconstrained-features model (UFM) of docs/theory.md checked three ways: closed forms verified in
SymPy, gradient-flow dynamics, and measurements on trained networks.

The public names below are imported on first use (PEP 562), so ``import ufm`` and the ``ufm``
command start without loading torch, SymPy or SciPy until a function needs them.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0.dev0"

# Submodule -> the public names it defines.
_EXPORTS: dict[str, tuple[str, ...]] = {
    "closed_form": (
        "lemma1_alpha_star",
        "lemma1_loss",
        "sqi_cosine",
        "sqi_w_row_norm_sq",
        "sqi_w_scale",
        "ufm_optimum",
        "UFMOptimum",
    ),
    "closed_form_ce": ("ce_optimum", "CEOptimum"),
    "closed_form_deep": ("deep_optimum", "DeepOptimum"),
    "collect": ("collect_features", "CollectedFeatures", "model_nc_metrics"),
    "critical": ("classify_point", "CriticalPoint"),
    "datasets": ("Dataset", "DATASETS", "load_dataset"),
    "dynamics": (
        "DEFAULT_METHOD",
        "DescentResult",
        "FlowResult",
        "gradient_descent",
        "gradient_flow",
        "METHODS",
        "normalized_flow",
        "reduced_flow",
        "ReducedFlowResult",
        "sgd",
    ),
    "dynamics.moments": ("MomentState", "moments_from_params", "random_moments", "representative_params"),
    "experiments.compare": ("compare_flow", "FlowComparison"),
    "experiments.minimizer_phases": ("run_minimizer_phases",),
    "experiments.sweep": ("run_sweep", "RUNNERS", "SweepResult"),
    "experiments.weight_decay": ("weight_decay_experiment", "WeightDecayExperiment"),
    "geometry": ("frame_distance", "orthogonal_frame", "simplex_etf"),
    "metrics": ("load_features", "nc_metrics", "nc_metrics_stream", "NCAccumulator", "NCMetrics"),
    "losses": ("CrossEntropy", "get_loss", "Loss", "LOSSES", "NoClosedForm", "SquareLoss"),
    "model": (
        "loss",
        "loss_and_grad",
        "loss_and_grad_norm",
        "outputs",
        "torch_loss",
        "UFMParams",
        "UFMProblem",
    ),
    "networks": ("ARCHITECTURES", "build_network", "HomogeneousNet"),
    "optimize": ("check_optimum", "minimize_loss", "MinimizeResult", "OptimumCheck", "verify_optimum"),
    "proofs": ("Proof", "ProofResult", "run_proofs"),
    "sqi_deviation": ("sqi_bounds", "SQIBounds"),
    "tables": ("read_table",),
    "training": ("train", "TrainConfig", "TrainResult"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
# The modules of the exports, imported on first access as well (``ufm.dynamics.flow`` after ``import ufm``).
_MODULES = {module.split(".")[0] for module in _EXPORTS}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return importlib.import_module(f".{name}", __name__)  # the import binds it in globals()
    if name not in _WHERE:
        raise AttributeError(f"module 'ufm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
