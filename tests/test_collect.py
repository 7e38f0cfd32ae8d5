"""Feature collection from torch models (ufm.collect) against features computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ufm import collect_features, model_nc_metrics, nc_metrics, nc_metrics_stream
from ufm.collect import capture_activations
from ufm.metrics import NCAccumulator

RTOL_STREAM = 1e-10


@pytest.fixture
def setup():
    torch.manual_seed(0)
    C, d, p, n = 4, 6, 5, 90
    model = nn.Sequential(
        nn.Linear(d, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, p), nn.Tanh(), nn.Linear(p, C)
    ).double()
    x = torch.randn(n, d, dtype=torch.float64)
    y = torch.arange(n) % C
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)
    return model, loader, x, y, C


def test_collect_matches_manual_features(setup):
    """The default hook (input of the last Linear) gives tanh(W_2 relu(W_1 x)) in eval mode, and the
    classifier's weight and bias; the model is left as it was (training mode, no hooks, same weights)."""
    model, loader, x, y, C = setup
    model.train()
    before = [t.clone() for t in model.parameters()]
    got = collect_features(model, loader)
    with torch.no_grad():
        h = model[4](model[3](model[1](model[0](x))))  # dropout skipped: eval mode
    torch.testing.assert_close(got.features, h, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.labels, y)
    torch.testing.assert_close(got.outputs, h @ model[5].weight.T + model[5].bias, rtol=1e-12, atol=1e-12)
    assert torch.equal(got.weight, model[5].weight) and torch.equal(got.bias, model[5].bias)
    assert got.layer == "5" and got.classifier == "5"
    assert model.training and all(m.training for m in model.modules())
    assert not any(m._forward_hooks for m in model.modules())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_collect_named_layer_output(setup):
    """Hooking a named layer's output (the Tanh) gives the same features; the classifier defaults to
    the last Linear."""
    model, loader, x, y, C = setup
    by_output = collect_features(model, loader, layer="4", capture="output")
    by_input = collect_features(model, loader)
    torch.testing.assert_close(by_output.features, by_input.features, rtol=0, atol=0)
    assert by_output.classifier == "5"


@pytest.mark.parametrize("eval_mode", [False, True])
def test_capture_activations_hooks_one_layer_and_cleans_up(setup, eval_mode):
    """The one forward hook: each forward call appends the layer's input or output, (batch, p), equal
    to the hand computation; on exit, also after an error, no hook is left and the modes are restored."""
    model, loader, x, y, C = setup
    model.train()
    with capture_activations(model, "4", capture="output", eval_mode=eval_mode) as out:
        with capture_activations(model, "5") as inp:  # "input" by default
            assert model[2].training != eval_mode
            model(x[:7])
            model(x[7:9])
    with torch.no_grad():
        z = model[3](model[1](model[0](x[:9])))  # dropout off: compared in eval mode only
    assert [t.shape for t in out] == [(7, 5), (2, 5)] and [t.shape for t in inp] == [(7, 5), (2, 5)]
    if eval_mode:
        torch.testing.assert_close(torch.cat(out), torch.tanh(z), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat(inp), torch.cat(out), rtol=0, atol=0)  # Tanh output = Linear input
    assert not any(m._forward_hooks for m in model.modules()) and all(m.training for m in model.modules())
    with pytest.raises(RuntimeError):
        with capture_activations(model, "5", eval_mode=True):
            model(torch.zeros(2, 3, dtype=torch.float64))  # wrong input width
    assert not any(m._forward_hooks for m in model.modules()) and all(m.training for m in model.modules())
    with pytest.raises(ValueError, match="unknown capture"):
        with capture_activations(model, "5", capture="grad"):
            pass


def test_model_nc_metrics_streams_like_one_shot(setup):
    """Two streaming passes through the model equal nc_metrics on the collected features."""
    model, loader, x, y, C = setup
    got = collect_features(model, loader)
    expected = nc_metrics(got.features, got.labels, got.weight, got.bias, outputs=got.outputs, layers=None)
    streamed = model_nc_metrics(model, loader)
    for key, value in expected.as_dict().items():
        other = streamed.as_dict()[key]
        if isinstance(value, float):
            assert other == pytest.approx(value, rel=RTOL_STREAM, abs=1e-14), key
        else:
            assert (
                np.allclose(other, value, rtol=RTOL_STREAM, atol=1e-14)
                if value is not None
                else other is None
            )


def test_a_one_shot_loader_is_refused_and_a_callable_is_read_twice(setup):
    """Two passes need the batches twice. Before: a generator ran the whole first pass and then said
    "the second pass saw different data (0 vs 90 examples)"; now it is refused before any batch, and a
    callable returning a fresh iterable is read like the DataLoader."""
    model, loader, x, y, C = setup
    seen = []

    def batches():
        for xb, yb in loader:
            seen.append(len(yb))
            yield xb, yb

    with pytest.raises(
        ValueError, match=r"^loader is a one-shot iterator \(generator\).*zero-argument callable"
    ):
        model_nc_metrics(model, batches())
    assert seen == []
    assert model_nc_metrics(model, batches) == model_nc_metrics(model, loader)
    assert sum(seen) == 2 * len(y)
    with pytest.raises(ValueError, match=r"^batches is a one-shot iterator"):
        nc_metrics_stream(iter([(x, y)]), C)


W_MEASURES = (
    "nc2_equinorm_w",
    "nc2_equiangle_w",
    "nc2_maxangle_w",
    "etf_distance_w",
    "nc3",
    "sv_w",
    "rank_w",
)


def test_any_layer_of_another_width(setup):
    """The first hidden layer (width 8, the classifier's is p = 5): its measures equal nc_metrics of
    relu(W_1 x) computed by hand; the W-dependent ones are absent, NC4 and eps come from the outputs."""
    model, loader, x, y, C = setup
    streamed = model_nc_metrics(model, loader, layer="1", capture="output")
    model.eval()  # as model_nc_metrics measures: dropout off
    with torch.no_grad():
        h = model[1](model[0](x))  # (n, 8)
        out = model(x)
    expected = nc_metrics(h, y, outputs=out)
    assert streamed.p == 8 and streamed.C == C
    assert streamed.nc1 == pytest.approx(expected.nc1, rel=RTOL_STREAM)
    assert streamed.nc4 == pytest.approx(expected.nc4) and streamed.eps == pytest.approx(
        expected.eps, rel=1e-12
    )
    for key in W_MEASURES:
        assert getattr(streamed, key) is None, key
    got = collect_features(model, loader, layer="1", capture="output")
    assert got.weight is None and got.bias is None and got.classifier is None
    torch.testing.assert_close(got.features, h, rtol=1e-12, atol=1e-12)


def test_without_a_classifier(setup):
    """classifier=False: the penultimate features alone; without outputs C must be given."""
    model, loader, x, y, C = setup
    alone = model_nc_metrics(model, loader, classifier=False, use_outputs=False, C=C)
    full = model_nc_metrics(model, loader)
    assert alone.nc1 == pytest.approx(full.nc1, rel=RTOL_STREAM)
    assert alone.nc4 is None and alone.eps is None
    for key in W_MEASURES:
        assert getattr(alone, key) is None, key
    headless = nn.Sequential(*list(model)[:5])  # ends at the Tanh: outputs (batch, p), no Linear classifier
    with pytest.raises(ValueError, match="give C"):
        model_nc_metrics(headless, loader, layer="4", capture="output", classifier=False, use_outputs=False)


def test_rho_all_layers(setup):
    model, loader, *_ = setup
    norms = [torch.linalg.norm(m.weight).item() for m in model if isinstance(m, nn.Linear)]
    assert model_nc_metrics(model, loader, layers="all").rho == pytest.approx(np.prod(norms), rel=1e-12)


def test_collect_errors(setup):
    model, loader, *_ = setup
    with pytest.raises(ValueError, match="no submodule 'head'"):
        collect_features(model, loader, layer="head")
    with pytest.raises(ValueError, match="unknown capture"):
        collect_features(model, loader, layer="4", capture="grad")
    with pytest.raises(ValueError, match="no nn.Linear"):
        collect_features(nn.Sequential(nn.Tanh()), loader)
    with pytest.raises(ValueError, match="no batches"):
        collect_features(model, [])
    for call in (collect_features, model_nc_metrics):  # the default hook is the classifier's input
        with pytest.raises(ValueError, match="needs layer="):
            call(model, loader, capture="output")
    with pytest.raises(ValueError, match=r"\(inputs, labels"):
        collect_features(model, [torch.zeros(2, 6, dtype=torch.float64)])
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_accumulator_on_cuda_equals_cpu():
    """Batches on a GPU are processed there (float64) and give the CPU numbers."""
    rng = np.random.default_rng(0)
    C, p, n = 5, 16, 500
    y = np.arange(n) % C
    H = rng.standard_normal((n, p)) + 2 * rng.standard_normal((C, p))[y]
    W, b = rng.standard_normal((C, p)), rng.standard_normal(C)
    acc = NCAccumulator(W=torch.tensor(W, device="cuda"), b=b)
    Hc, yc = torch.tensor(H, device="cuda", dtype=torch.float32), torch.tensor(y, device="cuda")
    for _ in range(2):
        for i in range(0, n, 128):
            acc.update(Hc[i : i + 128], yc[i : i + 128])
        if acc.pass_number == 1:
            acc.end_first_pass()
    got, expected = acc.result(), nc_metrics(Hc.cpu().double().numpy(), y, W, b)
    for key in ("nc1", "nc2_equinorm", "nc3", "nc4", "eps", "sqi_spread"):
        assert getattr(got, key) == pytest.approx(getattr(expected, key), rel=1e-9), key
