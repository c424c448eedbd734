"""Sampling without a fixed 16-image micro-batch: a short chunk is padded only as far as the network
was found to round every row as a full chunk does (runtime/batching.run_fixed_batch, exact_rows), and a
Linear's products at inference round a row alike wherever it sits (nets.layers.Linear)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from imagegen.runtime import batching as base
from imagegen.models.base import eval_mode
from imagegen.runtime.batching import SAMPLE_MICRO_BATCH, exact_rows, run_fixed_batch, wide_rows
from imagegen.nets import layers
from imagegen.nets.layers import ONEDNN_MIN_WEIGHTS, Linear


class Owner(nn.Module):
    pass


def test_a_short_chunk_is_padded_to_the_next_count_that_rounds_like_a_full_chunk():
    seen = []

    def odd_rounds_differently(x):     # a stand-in for a kernel whose rounding depends on the row count
        seen.append(x.shape[0])
        return x * 2 + (x.shape[0] % 2) * 1e-3

    owner, x = Owner(), torch.randn(20, 3)
    rows = exact_rows(odd_rounds_differently, [x[:1]], owner)
    assert rows == tuple(range(2, SAMPLE_MICRO_BATCH + 1, 2))
    seen.clear()
    full = run_fixed_batch(odd_rounds_differently, x, owner=owner)
    assert seen == [16, 4]                                   # checked once: no probe the second time
    assert torch.equal(full, x * 2)
    for n in (1, 3, 5):
        seen.clear()
        got = run_fixed_batch(odd_rounds_differently, x[:n], owner=owner)
        assert seen == [n + 1] and torch.equal(got, full[:n])


def test_an_exact_function_runs_one_image_as_one_row_and_a_mixing_one_pads_to_a_full_chunk():
    seen = []

    def exact(x):
        seen.append(x.shape[0])
        return x.square()

    def mixes_rows(x):                 # each row depends on the others: only a full chunk is right
        seen.append(x.shape[0])
        return x + x.mean(0, keepdim=True)

    x = torch.randn(1, 4)
    assert torch.equal(run_fixed_batch(exact, x, owner=Owner()), x.square())
    assert seen[-1] == 1
    owner = Owner()
    assert exact_rows(mixes_rows, [x], owner) == (SAMPLE_MICRO_BATCH,)
    seen.clear()
    run_fixed_batch(mixes_rows, x, owner=owner)
    assert seen == [SAMPLE_MICRO_BATCH]


def test_a_large_batch_runs_wide_chunks_only_where_they_round_like_16_row_chunks():
    seen = []

    def exact(x):
        seen.append(x.shape[0])
        return x.square()

    def wide_rounds_differently(x):    # a kernel that blocks more than 16 rows another way
        seen.append(x.shape[0])
        return x * 2 + (x.shape[0] > SAMPLE_MICRO_BATCH) * 1e-3

    x = torch.randn(150, 3)
    owner = Owner()
    assert wide_rows(exact, [x], owner) == max(base.WIDE_ROWS)
    run_fixed_batch(exact, x, owner=owner)                   # the short chunk's own check, once
    seen.clear()
    assert torch.equal(run_fixed_batch(exact, x, owner=owner), x.square())
    assert seen == [64, 64, 16, 6]                           # the short chunk: exact at 6 rows, no padding
    owner = Owner()
    assert wide_rows(wide_rounds_differently, [x], owner) == SAMPLE_MICRO_BATCH
    run_fixed_batch(wide_rounds_differently, x, owner=owner)
    seen.clear()
    assert torch.equal(run_fixed_batch(wide_rounds_differently, x, owner=owner), x * 2)
    assert seen == [16] * 9 + [6]
    owner = Owner()
    run_fixed_batch(exact, x[:31], owner=owner)
    seen.clear()
    assert torch.equal(run_fixed_batch(exact, x[:31], owner=owner), x[:31].square())
    assert seen == [16, 15]
    assert not any(key[0] == "wide" for key in owner._exact_rows)   # under 32 rows: no wide check at all
    big = torch.randn(40, base.WIDE_MAX_NUMEL // 32 + 1)     # 32 rows of it would pass the memory cap
    assert wide_rows(exact, [big], Owner()) == SAMPLE_MICRO_BATCH


def test_the_check_is_kept_per_function_input_shape_and_grad_mode():
    owner, calls = Owner(), []

    def fn(x):
        calls.append(x.shape)
        return x + 1

    exact_rows(fn, [torch.randn(1, 4)], owner)
    n = len(calls)
    exact_rows(fn, [torch.randn(3, 4)], owner)               # same shape per row: no new check
    assert len(calls) == n
    exact_rows(fn, [torch.randn(1, 5)], owner)               # another row shape: checked again
    with torch.no_grad():
        exact_rows(fn, [torch.randn(1, 4)], owner)           # another grad mode: checked again
    assert len(calls) == 3 * n


@pytest.mark.rounding
@pytest.mark.parametrize("onednn", [True, False])
def test_a_linear_row_at_inference_has_the_same_bits_wherever_it_sits_and_however_many_come_with_it(onednn, monkeypatch):
    """The sizes include those seen to fail as one MKL product under its AVX2 kernels on 2 threads (256
    inputs to 32 or 64 outputs: rows 4-7 of 16 rounded otherwise), so under ATEN_CPU_CAPABILITY=avx2
    MKL_ENABLE_INSTRUCTIONS=AVX2 this checks what Linear's products are there for; 2-D inputs take
    oneDNN's inner product, or (onednn=False, as without oneDNN) the batched product. Token inputs (3-D)
    from two samples on: one sample of many rows may be split across threads (batching.exact_rows then pads
    it)."""
    if not onednn:
        monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    try:
        for rows, d_in, d_out in [(1, 256, 32), (1, 256, 64), (1, 100, 4096), (1, 8, 5), (49, 256, 64), (49, 64, 256)]:
            layer = Linear(d_in, d_out).eval()
            x = torch.randn(16, d_in) if rows == 1 else torch.randn(16, rows, d_in)
            for t in sorted({1, min(2, threads)}):
                torch.set_num_threads(t)
                with torch.no_grad():
                    ref = layer(x)
                    assert torch.allclose(ref, F.linear(x, layer.weight, layer.bias), atol=1e-5)
                    for n in (1, 2, 3, 7, 16, 17, 64) if rows == 1 else (2, 3, 16, 17):
                        idx = (torch.arange(n) * 5 + 3) % 16        # the same rows in other places, repeated
                        assert torch.equal(layer(x[idx]), ref[idx]), (rows, d_in, d_out, t, n)
    finally:
        torch.set_num_threads(threads)


def test_a_linear_sees_its_weights_change_in_place_and_a_new_weight():
    """oneDNN's copy of a wide layer's weights is kept between calls: an update in place (training, EMA,
    load_state_dict) or another weight tensor must be seen."""
    torch.manual_seed(0)
    d_in, d_out = 256, ONEDNN_MIN_WEIGHTS // 256
    layer, x = Linear(d_in, d_out).eval(), torch.randn(4, d_in)
    with torch.no_grad():
        before = layer(x)
        if torch.backends.mkldnn.is_available():
            assert id(layer.weight) in layers._ONEDNN            # the wide layer took oneDNN's product
        layer.weight.mul_(2)
        assert torch.allclose(layer(x) - layer.bias, 2 * (before - layer.bias), atol=1e-4)
        layer.load_state_dict({"weight": torch.zeros(d_out, d_in), "bias": torch.ones(d_out)})
        assert torch.equal(layer(x), torch.ones(4, d_out))
        assert torch.equal(layer(x, weight=torch.eye(d_out, d_in)), x[:, :d_out] + 1)
        layer.bias = None
        assert torch.equal(layer(x), torch.zeros(4, d_out))


def _packed_layers():
    """A wide Linear and the two convolutions, each with an input, in the layouts sampling uses."""
    torch.manual_seed(0)
    cl = torch.channels_last
    return [(Linear(256, ONEDNN_MIN_WEIGHTS // 256).eval(), torch.randn(3, 256)),
            (layers.Conv2d(8, 16, 3, 1, 1).to(memory_format=cl).eval(), torch.randn(3, 8, 7, 7).contiguous(memory_format=cl)),
            (layers.ConvTranspose2d(8, 4, 4, 2, 1).to(memory_format=cl).eval(), torch.randn(3, 8, 7, 7).contiguous(memory_format=cl))]


def _plain(layer, x):
    if isinstance(layer, nn.Linear):
        return F.linear(x, layer.weight, layer.bias)
    if isinstance(layer, nn.ConvTranspose2d):
        return F.conv_transpose2d(x, layer.weight, layer.bias, layer.stride, layer.padding)
    return F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding)


@pytest.mark.parametrize("change", ["fused-adam-step", "foreach-adam-step", "in-place", "data-swap", "load_state_dict"])
def test_a_packed_weight_is_packed_again_after_any_change(change):
    """The packed copy must follow its weight, however it changes. A fused optimizer step changes the
    weight in place without bumping its version counter: a copy kept by version alone fed a GAN's
    discriminator step (fakes drawn under no_grad) the generator's first-step projection for the whole
    run; the optimizer-step count catches it."""
    for layer, x in _packed_layers():
        with torch.no_grad():
            before = layer(x)
        if change.endswith("adam-step"):
            opt = torch.optim.Adam(layer.parameters(), lr=0.1, fused=change == "fused-adam-step",
                                   foreach=change == "foreach-adam-step")
            layer(x).square().sum().backward()
            opt.step()
        elif change == "in-place":
            with torch.no_grad():
                layer.weight.mul_(-1)
        elif change == "data-swap":                     # what module.to() does to a parameter
            layer.weight.data = -layer.weight.detach().clone()
        else:
            layer.load_state_dict({k: -v for k, v in layer.state_dict().items()})
        with torch.no_grad():
            after, plain = layer(x), _plain(layer, x)
        assert not torch.allclose(after, before, atol=1e-3), (type(layer).__name__, change)
        assert torch.allclose(after, plain, atol=1e-5), (type(layer).__name__, change)


@pytest.mark.rounding
def test_a_convolution_at_inference_gives_an_image_the_same_bits_in_any_batch_and_keeps_the_layout():
    """Conv2d and ConvTranspose2d at inference run oneDNN on packed weights: numbers within rounding of
    the plain op, the layout the plain op gives back, and through run_fixed_batch each image's bits do
    not depend on its batch or place. (oneDNN may round one image otherwise than a batch, packed or not:
    a 32 -> 16 transposed convolution does on machine B; exact_rows then pads that image.)"""
    torch.manual_seed(0)
    cl = torch.channels_last
    for layer, shape in [(layers.Conv2d(32, 32, 3, 1, 1), (16, 32, 7, 7)), (layers.Conv2d(8, 16, 4, 2, 1), (16, 8, 14, 14)),
                         (layers.ConvTranspose2d(32, 16, 4, 2, 1), (16, 32, 7, 7)),
                         (layers.ConvTranspose2d(16, 1, 4, 2, 1), (16, 16, 14, 14)),
                         (layers.Conv2d(1, 8, 4, 2, 1), (16, 1, 28, 28))]:      # a one-channel input: both layouts at once
        for fmt in (cl, torch.contiguous_format):
            layer.to(memory_format=fmt).eval()
            x = torch.randn(shape).contiguous(memory_format=fmt)
            with torch.no_grad():
                ref = run_fixed_batch(layer, x, owner=layer)
                assert torch.allclose(ref, _plain(layer, x), atol=1e-5)
                got, plain = layer(x), _plain(layer, x)      # a one-channel map's size-1 stride may differ
                assert (got.is_contiguous(), got.is_contiguous(memory_format=cl)) == \
                    (plain.is_contiguous(), plain.is_contiguous(memory_format=cl))
                for n in (1, 2, 3, 7, 16, 17, 40):
                    idx = (torch.arange(n) * 5 + 3) % 16
                    got = run_fixed_batch(layer, x[idx].contiguous(memory_format=fmt), owner=layer)
                    assert torch.equal(got, ref[idx]), (layer, fmt, n)


def test_a_convolution_trains_with_the_plain_op():
    """Packed weights are for sampling only: a training step, or a no-grad step of training (a GAN's
    discriminator step draws its fakes so), runs the plain op and packs nothing."""
    for layer in (layers.Conv2d(4, 4, 3, 1, 1), layers.ConvTranspose2d(4, 4, 4, 2, 1)):
        x, packs = torch.randn(2, 4, 5, 5), len(layers._ONEDNN)
        assert layer(x).requires_grad
        with torch.no_grad():
            layer(x)
        assert len(layers._ONEDNN) == packs and id(layer.weight) not in layers._ONEDNN
        with torch.no_grad():
            layer.eval()(x)
        if torch.backends.mkldnn.is_available():
            assert id(layer.weight) in layers._ONEDNN
    assert set(layer.state_dict()) == set(nn.ConvTranspose2d(4, 4, 4, 2, 1).state_dict())


def test_a_linear_trains_and_exports_with_the_plain_product(monkeypatch):
    layer, x = Linear(8, 5), torch.randn(3, 8)
    rows = []
    real = F.linear
    monkeypatch.setattr(F, "linear", lambda a, w, b=None: rows.append(a.shape[0]) or real(a, w, b))
    with torch.no_grad():
        layer.eval()(x)
        assert rows == []                                    # inference: the batched product
        layer.train()(x)                                     # a no-grad step of training: the plain product
        assert rows == [3]
    y = layer(x)                                             # training: autograd sees the plain product
    assert rows == [3, 3] and y.requires_grad
    assert set(layer.state_dict()) == set(nn.Linear(8, 5).state_dict())


def test_eval_mode_switches_every_submodule_and_restores_the_mode_after():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Sequential(nn.Dropout()))
    for start in (True, False):
        net.train(start)
        with eval_mode(net):
            assert not any(m.training for m in net.modules())
        assert all(m.training == start for m in net.modules())
    net.eval()
    net[2][0].train()                  # one submodule left training: eval_mode still switches it
    with eval_mode(net):
        assert not any(m.training for m in net.modules())
    assert not any(m.training for m in net.modules())   # restored to the root's mode, as module.train() does
    net.eval()
    calls = []
    net.train = lambda mode=True: calls.append(mode)   # wholly in eval already: nothing is walked or set
    with eval_mode(net):
        pass
    assert calls == []
