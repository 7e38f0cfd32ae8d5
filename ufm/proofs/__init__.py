"""ufm.proofs: every formula ``ufm`` claims, verified symbolically in SymPy for general C.

Each statement is a ``Proof`` (name, source, assumptions, check) in the registry ``PROOFS``; its check
evaluates ``ufm.closed_form``'s own functions on SymPy symbols, so changing a closed form makes a
proof fail. ``run_proofs()`` decides every claim symbolically and spot-checks it at random points.

Modules, in the order of docs/theory.md: ``etf`` (§1), ``lemma1`` (poster, Lemma 1),
``lemma2`` (poster, Lemma 2), ``theorem`` (poster, main theorem, NC1-NC4), ``ufm_minimizer``
(§5, the global minimizer of the regularized UFM, derived here), ``label_smoothing`` (the
same minimizer with smoothed targets (1 - a) y + a/C, derived here), ``sqi_deviation`` (§12, the
theorem's errors away from SQI and stationarity, derived here).
"""

# Each module registers its proofs on import, in this order (the order ``ufm prove`` lists them):
# label_smoothing after ufm_minimizer, whose statement it extends.
# isort: off
from . import etf, lemma1, lemma2, theorem, ufm_minimizer  # noqa: F401
from . import label_smoothing  # noqa: F401
from . import sqi_deviation  # noqa: F401

# isort: on
from ._core import PROOFS, Claim, Proof, ProofResult, run_proofs, verify

__all__ = ["PROOFS", "Claim", "Proof", "ProofResult", "run_proofs", "verify"]
