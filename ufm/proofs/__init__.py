"""ufm.proofs: every formula ``ufm`` claims, verified symbolically in SymPy for general C.

Each statement is a ``Proof`` (name, source, assumptions, check) in the registry ``PROOFS``; its check
evaluates ``ufm.closed_form``'s own functions on SymPy symbols, so changing a closed form makes a
proof fail. ``run_proofs()`` decides every claim symbolically and spot-checks it at random points.

Modules, in the order of docs/theory.md: ``etf`` (§1), ``lemma1`` (poster, Lemma 1),
``lemma2`` (poster, Lemma 2), ``theorem`` (poster, main theorem, NC1-NC4), ``ufm_minimizer``
(§5, the global minimizer of the regularized UFM, derived here), ``label_smoothing`` (the
same minimizer with smoothed targets (1 - a) y + a/C, derived here), ``bias_decay`` (§6, a
regularized bias), ``deep`` (§7-§8, deep linear layers and class counts), ``cross_entropy`` (§9),
``moment_closure`` (§11, the moment flow's equations as matrix identities for symbolic sizes),
``sqi_deviation`` (§12, the theorem's errors away from SQI and stationarity, derived here).

The public API is also the plugin API: a user's file builds ``Proof(key, name, source, assumptions,
check)`` objects from the same ``Claim`` makers (``zero``, ``positive``, ``numeric``), symbols and I/J
algebra (``IJ``) as the library's proofs, passes each to ``register``, and runs with
``ufm prove --module FILE`` or ``run_proofs(module=FILE)`` (docs/proofs_and_testing.md).
"""

# Each module registers its proofs on import, in this order (the order ``ufm prove`` lists them):
# label_smoothing after ufm_minimizer, whose statement it extends.
# isort: off
from . import etf, lemma1, lemma2, theorem, ufm_minimizer  # noqa: F401
from . import label_smoothing  # noqa: F401
from . import bias_decay, deep, cross_entropy  # noqa: F401
from . import moment_closure  # noqa: F401
from . import sqi_deviation  # noqa: F401

# isort: on
from ._core import (
    PROOFS,
    STATUSES,
    Claim,
    ClaimResult,
    Proof,
    ProofResult,
    load_module,
    numeric,
    positive,
    register,
    run_proofs,
    verify,
    zero,
)
from .algebra import IJ
from .symbols import C_GE2, C, N, alpha, eps, k, lam, lam_h, lam_w, u

__all__ = [
    "PROOFS", "STATUSES", "Claim", "ClaimResult", "Proof", "ProofResult", "load_module", "numeric",
    "positive", "register", "run_proofs", "verify", "zero",
    "IJ", "C", "C_GE2", "N", "alpha", "eps", "k", "lam", "lam_h", "lam_w", "u",
]  # fmt: skip
