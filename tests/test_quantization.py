"""Post-training quantization (Subedar et al., 2021): round trips, storage, the quantized guide."""

import math

import pyro
import pytest
import torch
from pyro import poutine
from torch import nn

from pyro_gbnn.bayesian import BayesianNetwork
from pyro_gbnn.guides import MeanFieldGuide
from pyro_gbnn.likelihoods import Categorical
from pyro_gbnn.predict import predict, predict_batch
from pyro_gbnn.priors import IIDNormalPrior
from pyro_gbnn.quantization import (
    QuantizedMeanFieldGuide,
    quantize_affine,
    quantize_mean_field,
    quantize_symmetric,
)


def adversarial_tensors():
    torch.manual_seed(0)
    outlier = torch.randn(6, 5) * 0.01
    outlier[2, 3] = 1e4
    return {
        "random": torch.randn(6, 5),
        "constant": torch.full((6, 5), 0.37),
        "zeros": torch.zeros(6, 5),
        "outlier": outlier,
        "one_zero_channel": torch.cat([torch.zeros(1, 5), torch.randn(5, 5)]),
        "conv": torch.randn(4, 3, 3, 3),
        "bias": torch.randn(7),
    }


def step_of(q):
    """The quantization step of every element, broadcast to the tensor's shape."""
    if not q.per_channel:
        return q.scale.expand(q.shape)
    return q.scale.view([-1] + [1] * (len(q.shape) - 1)).expand(q.shape)


def assert_half_step(x, q):
    err = (q.dequantize() - x).abs()
    bound = step_of(q) / 2 + 1e-6 * x.abs().clamp_min(1.0)  # fp32 rounding of codes * scale
    assert (err <= bound).all(), f"max excess {(err - bound).max().item()}"


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("case", list(adversarial_tensors()))
def test_symmetric_round_trip_within_half_a_step(case, bits, per_channel):
    x = adversarial_tensors()[case]
    q = quantize_symmetric(x, bits, per_channel)
    assert_half_step(x, q)
    qmax = 2 ** (bits - 1) - 1
    assert q.codes.dtype == torch.int8 and q.codes.shape == x.shape
    assert q.codes.min() >= -qmax and q.codes.max() <= qmax
    assert q.zero_point is None
    assert q.per_channel == (per_channel and x.dim() >= 2)
    assert torch.isfinite(q.scale).all() and torch.isfinite(q.dequantize()).all()


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", [8, 4, 2, 1])
@pytest.mark.parametrize("case", list(adversarial_tensors()))
def test_affine_round_trip_within_half_a_step(case, bits, per_channel):
    x = adversarial_tensors()[case]
    q = quantize_affine(x, bits, per_channel)
    assert_half_step(x, q)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == x.shape
    assert q.codes.max() <= 2**bits - 1
    values = q.dequantize()
    assert values.unique().numel() <= 2**bits * (x.shape[0] if q.per_channel else 1)
    assert torch.isfinite(values).all()


def test_constant_and_zero_tensors_are_exact():
    for x in (torch.zeros(3, 4), torch.full((3, 4), -2.5), torch.full((5,), 1e-3)):
        for per_channel in (False, True):
            assert torch.equal(quantize_symmetric(x, 4, per_channel).dequantize(), x)
            assert torch.equal(quantize_affine(x, 1, per_channel).dequantize(), x)


def test_symmetric_keeps_zero_and_sign():
    x = torch.tensor([[0.0, 1.0, -1.0, 0.2], [0.0, -3.0, 0.001, 0.0]])
    for bits in (2, 4, 8):
        for per_channel in (False, True):
            q = quantize_symmetric(x, bits, per_channel)
            assert (q.codes[x == 0] == 0).all() and (q.dequantize()[x == 0] == 0).all()
            assert (q.dequantize() * x >= 0).all(), "no value changes sign"
    q = quantize_symmetric(torch.tensor([-2.0, 1.0, 2.0]), 8, False)
    assert q.scale.item() == pytest.approx(2.0 / 127)
    assert q.codes.tolist() == [-127, 64, 127]


def test_one_bit_affine_has_two_levels_min_and_max():
    x = torch.tensor([0.01, 0.02, 0.05, 0.2, 0.3])
    q = quantize_affine(x, 1, False)
    assert q.dequantize().tolist() == pytest.approx([0.01, 0.01, 0.01, 0.3, 0.3])
    assert q.zero_point.item() == pytest.approx(0.01) and q.scale.item() == pytest.approx(0.29)


def test_affine_keeps_positive_values_positive():
    x = torch.rand(8, 16) * 0.1 + 1e-7  # stds: tiny to moderate, all > 0
    for bits in (1, 2, 4, 8):
        for per_channel in (False, True):
            assert (quantize_affine(x, bits, per_channel).dequantize() >= x.min()).all()


def test_num_bytes_packs_codes_and_counts_fp32_scales():
    x = torch.randn(1000)
    assert quantize_symmetric(x, 4, False).num_bytes() == 500 + 4
    assert quantize_affine(x, 4, False).num_bytes() == 500 + 4 + 4
    assert quantize_affine(x, 1, False).num_bytes() == 125 + 8
    assert quantize_affine(torch.randn(3), 1, False).num_bytes() == 1 + 8, "3 bits round up to a byte"
    w = torch.randn(10, 3, 3, 3)  # 270 values, 10 output channels
    assert quantize_symmetric(w, 8, True).num_bytes() == 270 + 10 * 4
    assert quantize_affine(w, 2, True).num_bytes() == math.ceil(270 * 2 / 8) + 10 * 8
    assert quantize_symmetric(torch.randn(7), 8, True).num_bytes() == 7 + 4, "biases are per tensor"


def test_per_channel_beats_per_tensor_on_channel_wise_ranges():
    torch.manual_seed(1)
    x = torch.randn(8, 32) * torch.logspace(-3, 1, 8).unsqueeze(1)
    for quantize in (quantize_symmetric, quantize_affine):
        for bits in (2, 4, 8):
            per_channel, per_tensor = quantize(x, bits, True), quantize(x, bits, False)
            err_c = (per_channel.dequantize() - x).abs()
            err_t = (per_tensor.dequantize() - x).abs()
            assert err_c.mean() < err_t.mean()
            assert (per_channel.scale <= per_tensor.scale + 1e-12).all()
            assert (err_c.amax(1) <= per_tensor.scale / 2 + 1e-6).all()


def test_channel_dim_selects_the_channel_axis():
    x = torch.randn(3, 5) * torch.tensor([1e-3, 1e-2, 1e-1, 1.0, 10.0])
    q = quantize_symmetric(x, 4, True, channel_dim=1)
    assert q.scale.shape == (5,)
    assert ((q.dequantize() - x).abs() <= q.scale / 2 + 1e-6).all()


@pytest.mark.parametrize("bits", [0, 9, 4.0, True])
def test_bits_outside_range_raise_naming_the_range(bits):
    with pytest.raises(ValueError, match=r"1\.\.8"):
        quantize_affine(torch.randn(4), bits, False)
    with pytest.raises(ValueError, match=r"2\.\.8"):
        quantize_symmetric(torch.randn(4), bits, False)


def test_one_bit_symmetric_is_refused():
    with pytest.raises(ValueError, match=r"2\.\.8, got 1"):
        quantize_symmetric(torch.randn(4), 1, False)
    with pytest.raises(ValueError, match=r"2\.\.8"):
        quantize_mean_field(tiny_guide()[1], loc_bits=1)


def tiny_net():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def tiny_guide():
    bnn = BayesianNetwork(tiny_net(), IIDNormalPrior(0.0, 1.0), Categorical(20))
    guide = MeanFieldGuide(bnn, init_scale=0.05)
    with torch.no_grad():  # stds that vary per weight, as after training
        for rho in guide.scale_parameters():
            rho.add_(torch.randn_like(rho))
    return bnn, guide


def test_quantized_guide_has_the_mean_field_interface():
    bnn, guide = tiny_guide()
    qguide = quantize_mean_field(guide, 8, 4)
    assert isinstance(qguide, QuantizedMeanFieldGuide)
    assert list(qguide.site_shapes) == list(guide.site_shapes)
    draws = qguide.sample_weights(5)
    for name, shape in guide.site_shapes.items():
        assert draws[name].shape == (5, *shape)
        assert qguide.distribution(name).event_shape == shape
    assert not list(qguide.parameters())
    trace = poutine.trace(qguide).get_trace()
    assert [n for n, s in trace.nodes.items() if s["type"] == "sample"] == list(guide.site_shapes)
    x, y = torch.randn(2, 1, 6, 6), torch.tensor([0, 2])
    model_trace = poutine.trace(poutine.replay(bnn.model, trace=trace)).get_trace(x, y)
    assert torch.isfinite(model_trace.log_prob_sum())


def test_quantized_guide_predicts_like_the_original_at_8_bits():
    bnn, guide = tiny_guide()
    qguide = quantize_mean_field(guide, loc_bits=8, scale_bits=8)
    torch.manual_seed(3)
    batches = [(torch.randn(16, 1, 6, 6), torch.randint(0, 3, (16,))) for _ in range(2)]
    pyro.set_rng_seed(7)
    full = predict(bnn, guide, batches, num_samples=20)
    pyro.set_rng_seed(7)
    quant = predict(bnn, qguide, batches, num_samples=20)
    assert torch.equal(full.labels, quant.labels)
    assert (full.probs - quant.probs).abs().max() < 0.005
    pyro.set_rng_seed(7)
    coarse = predict(bnn, quantize_mean_field(guide, loc_bits=2, scale_bits=1), batches, num_samples=20)
    assert (full.probs - coarse.probs).abs().max() > 0.005, "the tolerance can tell 8 bits from 2"
    pyro.set_rng_seed(7)
    per_draw = predict_batch(bnn, qguide, batches[0][0], num_samples=4)
    assert per_draw.shape == (4, 16, 3) and torch.allclose(per_draw.sum(-1), torch.ones(4, 16))


@pytest.mark.parametrize("scale_bits", [8, 4, 2, 1])
@pytest.mark.parametrize("per_channel", [False, True])
def test_quantized_stds_are_strictly_positive(scale_bits, per_channel):
    _, guide = tiny_guide()
    with torch.no_grad():
        guide.rho["4/weight"][0, 0] = -200.0  # softplus underflows to exactly 0 in fp32
    qguide = quantize_mean_field(guide, 8, scale_bits, per_channel)
    for name in qguide.site_shapes:
        assert (qguide.scale(name) > 0).all()
        qguide.distribution(name)  # validates scale > 0


def test_size_bytes_matches_the_hand_count():
    _, guide = tiny_guide()
    qguide = quantize_mean_field(guide, loc_bits=8, scale_bits=4, per_channel=True)
    # sites: 0.weight [4,1,3,3] (36), 0.bias [4], 4.weight [3,64] (192), 4.bias [3]
    means = (36 + 4 * 4) + (4 + 4) + (192 + 3 * 4) + (3 + 4)
    stds = (18 + 4 * 8) + (2 + 8) + (96 + 3 * 8) + (2 + 8)
    assert qguide.size_bytes() == means + stds == 461
    assert qguide.site_bytes["0.weight"] == (52, 50)
    per_tensor = quantize_mean_field(guide, loc_bits=8, scale_bits=4, per_channel=False)
    assert per_tensor.size_bytes() == (36 + 4 + 192 + 3) + 4 * 4 + (18 + 2 + 96 + 2) + 4 * 8
