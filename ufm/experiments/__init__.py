"""Experiments: runs of the library that set theory beside measurement, and their figures.

=================  ===========================================================================
``compare``        one gradient flow from a random start against the closed form, as one row
``sweep``          grids of flow or training runs into one results table (local pool or Dask)
``reproduce``      the main job, ``ufm reproduce``: proofs, flows, phase diagram, network, report
``weight_decay``   the poster's experiment: a network trained with and without weight decay
``low_rank``       the journal paper's low-rank bias: every layer's singular values over the epochs
``normalization``  the journal paper's rho under weight normalization, a dense MLP against a CNN
``sgd_noise``      SGD's fluctuation at quasi-interpolation: fixed batch order against sampling
``plots``          the figures; each function states the claim it supports and saves one file
=================  ===========================================================================

The submodules are imported on use (``from ufm.experiments.sweep import run_sweep``), so importing
this package loads nothing heavy.
"""
