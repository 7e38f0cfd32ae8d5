"""Penultimate features, labels and the classifier of any torch model, for the NC measurements.

A forward hook on a named submodule (:func:`capture_activations`, the package's only one) captures
its input (default: the features entering the classifier) or its output, batch by batch, on the
model's own device. The model is not changed: no
parameter is touched, the hook is removed and every submodule's train/eval mode is restored afterwards,
even on error.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._validation import check_choice, check_reiterable
from .metrics import NCAccumulator, NCMetrics

__all__ = ["CAPTURE", "CollectedFeatures", "capture_activations", "collect_features", "model_nc_metrics"]

# Which side of the hooked layer is captured.
CAPTURE = ("input", "output")


@dataclass(frozen=True)
class CollectedFeatures:
    """What :func:`collect_features` captured.

    Attributes
    ----------
    features : (n, p) tensor, one example per row (the hooked layer's input or output, flattened).
    labels : (n,) int64 tensor.
    outputs : (n, C) tensor of model outputs, or None when the model's output is not a (batch, C) matrix.
    weight : (C, p) classifier weight (a detached copy), or None when there is no linear classifier.
    bias : (C,) classifier bias, or None.
    layer : name of the hooked submodule; classifier : name of the classifier submodule or None.
    """

    features: torch.Tensor
    labels: torch.Tensor
    outputs: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    layer: str
    classifier: str | None


def _last_linear(model: nn.Module) -> str | None:
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[-1] if names else None


def _module(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        raise ValueError(
            f"model has no submodule {name!r}; submodules: {', '.join(map(repr, list(modules)[1:]))}"
        )
    return modules[name]


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@contextmanager
def capture_activations(
    model: nn.Module, layer: str, *, capture: str = "input", eval_mode: bool = False
) -> Iterator[list[torch.Tensor]]:
    """Hook ``layer`` of ``model``; yield a list that receives its (batch, p) activations.

    The one forward hook of the package: :func:`collect_features`, :func:`model_nc_metrics` and the
    training measurements (:func:`ufm.training.measure_network`) all capture features through it.

    Parameters
    ----------
    model : nn.Module
    layer : str
        Name of the submodule to hook, as in ``model.named_modules()``.
    capture : "input" or "output"
        Which side of ``layer`` is captured; each forward call appends one detached tensor, flattened
        to (batch, p).
    eval_mode : bool
        Put the model in eval mode while hooked.

    Notes
    -----
    On exit (also on error) the hook is removed and every submodule's train/eval mode is restored.
    """
    check_choice("capture", capture, CAPTURE)
    captured: list[torch.Tensor] = []

    def hook(module, inputs, output):
        x = inputs[0] if capture == "input" else output
        captured.append(x.detach().flatten(start_dim=1))

    modes = {m: m.training for m in model.modules()}
    handle = _module(model, layer).register_forward_hook(hook)
    try:
        if eval_mode:
            model.eval()
        yield captured
    finally:
        handle.remove()
        for m, training in modes.items():
            m.training = training


def _batches(model: nn.Module, loader: Iterable, captured: list[torch.Tensor], device: torch.device):
    """Run the model on each (x, y, ...) batch; yield (features, labels, outputs or None) on ``device``."""
    with torch.no_grad():
        for k, batch in enumerate(loader() if callable(loader) else loader):
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise ValueError(f"loader batch {k} must be a (inputs, labels, ...) pair")
            x, y = batch[0], batch[1]
            captured.clear()
            out = model(x.to(device))
            if len(captured) != 1:
                raise ValueError(
                    f"the hooked layer ran {len(captured)} times in one forward pass; expected once"
                )
            h = captured[0]
            y = torch.as_tensor(y).to(device)
            if y.ndim != 1 or y.shape[0] != h.shape[0]:
                raise ValueError(
                    f"loader batch {k}: labels shape {tuple(y.shape)} does not match {h.shape[0]} inputs"
                )
            is_matrix = isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[0] == h.shape[0]
            yield h, y, out.detach() if is_matrix else None


def _classifier(model: nn.Module, layer: str, capture: str, classifier: str | bool | None) -> str | None:
    if classifier is False:  # measure the layer alone
        return None
    if classifier is not None:
        _module(model, classifier)
        return classifier
    if capture == "input" and isinstance(_module(model, layer), nn.Linear):
        return layer
    return _last_linear(model)


def _resolve(
    model: nn.Module, layer: str | None, capture: str, classifier: str | bool | None
) -> tuple[str, str | None]:
    check_choice("capture", capture, CAPTURE)
    if layer is None:
        if capture != "input":
            raise ValueError(
                f"capture={capture!r} needs layer=: by default the input of the last nn.Linear is hooked"
            )
        layer = _last_linear(model)
        if layer is None:
            raise ValueError("model has no nn.Linear classifier; name the layer to hook with layer=")
    return layer, _classifier(model, layer, capture, classifier)


def _acting_on(W: torch.Tensor | None, width: int) -> bool:
    """Whether a (C, q) classifier acts on features of this width (q = width); one that does not,
    e.g. the last layer when an earlier, wider layer is measured, gives no W-dependent measures."""
    return W is not None and W.shape[1] == width


def _weights(model: nn.Module, classifier: str | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if classifier is None:
        return None, None
    m = _module(model, classifier)
    W = getattr(m, "weight", None)
    b = getattr(m, "bias", None)
    if not isinstance(W, torch.Tensor) or W.ndim != 2:
        raise ValueError(f"classifier {classifier!r} has no (C, p) weight matrix")
    return W.detach().clone(), None if b is None else b.detach().clone()


def collect_features(
    model: nn.Module,
    loader: Iterable,
    *,
    layer: str | None = None,
    capture: str = "input",
    classifier: str | bool | None = None,
    eval_mode: bool = True,
    store_device: str | torch.device | None = "cpu",
) -> CollectedFeatures:
    """Collect (n, p) features, labels, outputs and the classifier of ``model`` over ``loader``.

    Parameters
    ----------
    model : any ``nn.Module``; run on the device of its parameters, under ``torch.no_grad``.
    loader : iterable of ``(inputs, labels, ...)`` batches (a DataLoader); inputs are moved to the
        model's device.
    layer : name (as in ``model.named_modules()``) of the submodule to hook. Default: the last
        ``nn.Linear``, whose input is captured: the penultimate features h with f = W h + b.
    capture : "input" or "output" of ``layer``; flattened to (batch, p).
    classifier : name of the linear classifier giving W (C, p) and b; default ``layer`` when it is an
        ``nn.Linear`` hooked at its input, else the last ``nn.Linear`` (None if there is none).
        ``False``: no classifier. A classifier whose width differs from the layer's (it does not act
        on these features) is dropped: ``weight``, ``bias`` and ``classifier`` are then None.
    eval_mode : run in eval mode (dropout off, batch-norm running statistics); the previous modes are
        restored afterwards.
    store_device : where the collected tensors are kept (default CPU, to spare accelerator memory;
        None keeps them on the model's device).

    Notes
    -----
    Holds all n x p features; :func:`model_nc_metrics` measures without storing them.
    """
    layer, classifier = _resolve(model, layer, capture, classifier)
    device = _model_device(model)
    feats, labels, outs = [], [], []
    with capture_activations(model, layer, capture=capture, eval_mode=eval_mode) as captured:
        for h, y, out in _batches(model, loader, captured, device):
            feats.append(h.to(store_device))
            labels.append(y.to(store_device))
            outs.append(None if out is None else out.to(store_device))
    if not feats:
        raise ValueError("loader yielded no batches")
    W, b = _weights(model, classifier)
    features = torch.cat(feats)
    if not _acting_on(W, features.shape[1]):
        W = b = classifier = None
    return CollectedFeatures(
        features=features,
        labels=torch.cat(labels).long(),
        outputs=None if any(o is None for o in outs) else torch.cat(outs),
        weight=W,
        bias=b,
        layer=layer,
        classifier=classifier,
    )


def model_nc_metrics(
    model: nn.Module,
    loader: Iterable,
    C: int | None = None,
    *,
    layer: str | None = None,
    capture: str = "input",
    classifier: str | bool | None = None,
    eval_mode: bool = True,
    use_outputs: bool = True,
    layers: Any = None,
) -> NCMetrics:
    """NC measurements of ``model`` over ``loader`` by two streaming passes; memory independent of n.

    Same hooking rules as :func:`collect_features`: any named ``layer``, its ``capture="input"`` or
    ``"output"``. The classifier W, b feeds the W-dependent measures (NC2 of W, NC3, NC4 by W) only
    when it acts on that layer, i.e. its width equals the layer's; for any other layer, or with
    ``classifier=False`` (no classifier at all), those measures are None, not an error. C is then
    ``C``, else the classifier's row count, else the width of the model's (batch, C) outputs.

    The loader must yield the same examples in both passes (no shuffling, or at least the same set):
    a re-iterable (a list, a DataLoader) or a zero-argument callable returning a fresh iterable; a
    one-shot iterator (a generator) is refused.
    The model's outputs feed eps and the SQI spread (and NC4 without a classifier) when
    ``use_outputs`` and they are (batch, C). ``layers="all"`` sets rho over every parameter of
    ndim >= 2 (the weight matrices and kernels); a sequence of tensors is used as given.
    """
    check_reiterable("loader", loader)
    layer, classifier = _resolve(model, layer, capture, classifier)
    W, b = _weights(model, classifier)
    if layers == "all":
        layers = [t.detach() for t in model.parameters() if t.ndim >= 2]
    acc = None
    device = _model_device(model)
    with capture_activations(model, layer, capture=capture, eval_mode=eval_mode) as captured:
        for _ in range(2):
            for h, y, out in _batches(model, loader, captured, device):
                if acc is None:
                    acc = _accumulator(C, W, b, h.shape[1], out if use_outputs else None, layers, layer)
                keep = use_outputs and out is not None and out.shape[1] == acc.C
                acc.update(h, y, out if keep else None)
            if acc is None:
                raise ValueError("loader yielded no batches")
            if acc.pass_number == 1:
                acc.end_first_pass()
    return acc.result()


def _accumulator(C, W, b, width: int, out, layers, layer: str) -> NCAccumulator:
    """The accumulator for features of ``width``: with W only when W acts on them (:func:`_acting_on`)."""
    if C is None:
        C = W.shape[0] if W is not None else None if out is None else out.shape[1]
    if C is None:
        raise ValueError(
            f"layer {layer!r} has no classifier and the model's outputs are not (batch, C): give C, "
            "the number of classes"
        )
    if not _acting_on(W, width):
        W = b = None
    return NCAccumulator(C, W=W, b=b, layers=layers)
