"""Candidate operations, drop path, channel shuffle and the partial-channel MixedOp."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hvd_pcdarts.models import MixedOp
from hvd_pcdarts.space.genotypes import PRIMITIVES
from hvd_pcdarts.space.ops import (
    OPS,
    DilConv,
    FactorizedReduce,
    Identity,
    ReLUConvBN,
    SepConv,
    Zero,
    channel_shuffle,
    drop_path,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# --- the op table --------------------------------------------------------------------------------------------
def test_ops_table_is_the_search_space():
    assert sorted(OPS) == sorted(PRIMITIVES)
    assert PRIMITIVES == ["none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3",
                          "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"]


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("stride,hw_out", [(1, 16), (2, 8)])
@pytest.mark.parametrize("name", PRIMITIVES)
def test_op_output_shape(name, stride, hw_out, affine):
    torch.manual_seed(0)
    op = OPS[name](8, stride, affine)
    x = torch.randn(2, 8, 16, 16)
    y = op(x)
    assert tuple(y.shape) == (2, 8, hw_out, hw_out)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", PRIMITIVES)
def test_op_stride2_odd_size_rounds_up(name):
    # every stride-2 op must agree on ceil(7/2) = 4, or a cell's sum of edges would not line up
    op = OPS[name](8, 2, True)
    y = op(torch.randn(2, 8, 7, 7))
    assert tuple(y.shape) == (2, 8, 4, 4)
    y = op(torch.randn(2, 8, 7, 10))
    assert tuple(y.shape) == (2, 8, 4, 5)


@pytest.mark.parametrize(
    "name,stride,expected",
    [
        ("none", 1, 0), ("none", 2, 0),
        ("max_pool_3x3", 1, 0), ("avg_pool_3x3", 2, 0),
        ("skip_connect", 1, 0),
        ("skip_connect", 2, 2 * 8 * 4 + 2 * 8),        # FactorizedReduce: two 1x1 convs 8->4, BN(8)
        ("sep_conv_3x3", 1, 2 * (8 * 9 + 8 * 8) + 2 * 2 * 8),   # two (depthwise 3x3 + pointwise) + two BN
        ("sep_conv_5x5", 2, 2 * (8 * 25 + 8 * 8) + 2 * 2 * 8),
        ("dil_conv_3x3", 1, 8 * 9 + 8 * 8 + 2 * 8),       # one depthwise + pointwise + BN
        ("dil_conv_5x5", 2, 8 * 25 + 8 * 8 + 2 * 8),
    ],
)
def test_op_parameter_counts(name, stride, expected):
    assert n_params(OPS[name](8, stride, True)) == expected
    # affine=False: only the BN affine parameters disappear
    n_bn = sum(m.num_features * 2 for m in OPS[name](8, stride, True).modules() if isinstance(m, nn.BatchNorm2d))
    assert n_params(OPS[name](8, stride, False)) == expected - n_bn


def test_op_types_and_structure():
    assert isinstance(OPS["skip_connect"](8, 1, True), Identity)
    assert isinstance(OPS["skip_connect"](8, 2, True), FactorizedReduce)
    assert isinstance(OPS["none"](8, 2, True), Zero)
    sep = OPS["sep_conv_3x3"](8, 2, True)
    assert isinstance(sep, SepConv)
    convs = [m for m in sep if isinstance(m, nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2), (1, 1), (1, 1), (1, 1)]  # only the first depthwise strides
    assert [c.groups for c in convs] == [8, 1, 8, 1]
    assert isinstance(sep[0], nn.ReLU) and isinstance(sep[4], nn.ReLU)
    dil = OPS["dil_conv_5x5"](8, 1, True)
    assert isinstance(dil, DilConv)
    assert dil[1].dilation == (2, 2) and dil[1].padding == (4, 4) and dil[1].kernel_size == (5, 5)
    dil3 = OPS["dil_conv_3x3"](8, 1, True)
    assert dil3[1].dilation == (2, 2) and dil3[1].padding == (2, 2)
    # affine flag reaches the BN layers
    assert all(not m.affine for m in OPS["sep_conv_5x5"](8, 1, False).modules() if isinstance(m, nn.BatchNorm2d))
    rcb = ReLUConvBN(4, 6, 1, 1, 0)
    assert [type(m) for m in rcb] == [nn.ReLU, nn.Conv2d, nn.BatchNorm2d]


def test_zero_op_values():
    x = torch.randn(2, 3, 7, 7)
    assert torch.equal(Zero(1)(x), torch.zeros(2, 3, 7, 7))
    assert torch.equal(Zero(2)(x), torch.zeros(2, 3, 4, 4))


def test_avg_pool_does_not_count_padding():
    op = OPS["avg_pool_3x3"](1, 1, True)
    y = op(torch.ones(1, 1, 4, 4))
    # the corner sees 4 real pixels (and 5 padded ones): 4/4 = 1 exactly, not 4/9
    assert y[0, 0, 0, 0].item() == 1.0
    assert torch.equal(y, torch.ones(1, 1, 4, 4))
    y2 = OPS["avg_pool_3x3"](1, 2, True)(torch.ones(1, 1, 5, 5))
    assert torch.equal(y2, torch.ones(1, 1, 3, 3))
    # a non-constant check: corner of arange(16) 4x4 = mean(0, 1, 4, 5) = 2.5
    z = op(torch.arange(16.0).view(1, 1, 4, 4))
    assert z[0, 0, 0, 0].item() == 2.5


def test_max_pool_pads_with_minus_infinity():
    y = OPS["max_pool_3x3"](1, 1, True)(-torch.ones(1, 1, 4, 4))
    assert torch.equal(y, -torch.ones(1, 1, 4, 4))


# --- FactorizedReduce ----------------------------------------------------------------------------------------
def _probe_fr(C_in=1):
    """FactorizedReduce with both 1x1 convs = 1 and BN in eval mode with identity statistics: it returns
    [x[::2, ::2], shifted[::2, ::2]] / sqrt(1 + eps)."""
    fr = FactorizedReduce(C_in, 2)
    with torch.no_grad():
        fr.conv_1.weight.fill_(1.0)
        fr.conv_2.weight.fill_(1.0)
    fr.eval()
    return fr


def test_factorized_reduce_even_size_values():
    fr = _probe_fr()
    x = torch.arange(16.0).view(1, 1, 4, 4)
    y = fr(x) * (1.0 + fr.bn.eps) ** 0.5
    assert torch.allclose(y[0, 0], torch.tensor([[0.0, 2.0], [8.0, 10.0]]))
    assert torch.allclose(y[0, 1], torch.tensor([[5.0, 7.0], [13.0, 15.0]]))  # shifted by one pixel


def test_factorized_reduce_odd_size_pads_the_shifted_branch():
    fr = _probe_fr()
    x = torch.arange(1.0, 26.0).view(1, 1, 5, 5)  # values 1..25, row-major
    y = fr(x) * (1.0 + fr.bn.eps) ** 0.5
    assert tuple(y.shape) == (1, 2, 3, 3)
    assert torch.allclose(y[0, 0], torch.tensor([[1.0, 3.0, 5.0], [11.0, 13.0, 15.0], [21.0, 23.0, 25.0]]))
    # shifted branch: x[1::2, 1::2] then zero padding for the third row/column
    assert torch.allclose(y[0, 1], torch.tensor([[7.0, 9.0, 0.0], [17.0, 19.0, 0.0], [0.0, 0.0, 0.0]]))


@pytest.mark.parametrize("hw,out_hw", [((7, 7), (4, 4)), ((7, 8), (4, 4)), ((9, 6), (5, 3)), ((1, 1), (1, 1))])
def test_factorized_reduce_shapes(hw, out_hw):
    fr = FactorizedReduce(8, 16)
    y = fr(torch.randn(2, 8, *hw))
    assert tuple(y.shape) == (2, 16) + out_hw


def test_factorized_reduce_rejects_odd_channels():
    with pytest.raises(ValueError, match="even"):
        FactorizedReduce(8, 7)


def test_factorized_reduce_applies_relu_first():
    fr = _probe_fr()
    y = fr(-torch.ones(1, 1, 4, 4))
    assert torch.equal(y, torch.zeros(1, 2, 2, 2))


# --- drop path -----------------------------------------------------------------------------------------------
def test_drop_path_zero_prob_is_identity():
    x = torch.randn(4, 3, 5, 5)
    assert torch.equal(drop_path(x, 0.0), x)
    assert torch.equal(drop_path(x, -0.1), x)


def test_drop_path_drops_whole_samples_and_rescales():
    torch.manual_seed(1234)
    x = torch.randn(64, 3, 5, 5) + 3.0  # no exact zeros in the input
    x_copy = x.clone()
    prob = 0.3
    y = drop_path(x, prob)
    assert y.shape == x.shape
    assert torch.equal(x, x_copy), "drop_path must not modify its input"
    kept = dropped = 0
    for i in range(x.shape[0]):
        if torch.equal(y[i], torch.zeros_like(y[i])):
            dropped += 1
        else:
            assert torch.allclose(y[i], x[i] / (1.0 - prob), rtol=1e-6, atol=0), f"sample {i} is neither 0 nor x/keep"
            kept += 1
    assert kept + dropped == 64
    assert 0 < dropped < 64  # both outcomes occur (P(all kept) = 0.7^64)
    # same seed, same mask
    torch.manual_seed(1234)
    _ = torch.randn(64, 3, 5, 5)
    assert torch.equal(drop_path(x, prob), y)


def test_drop_path_keeps_the_expectation():
    torch.manual_seed(0)
    y = drop_path(torch.ones(40000, 1, 1, 1), 0.25)
    nonzero = y[y != 0]
    assert torch.allclose(nonzero, torch.full_like(nonzero, 1 / 0.75))
    assert abs(y.mean().item() - 1.0) < 0.02
    assert abs((y == 0).float().mean().item() - 0.25) < 0.01


# --- channel shuffle -----------------------------------------------------------------------------------------
def _channel_ids(n_ch):
    return torch.arange(float(n_ch)).view(1, n_ch, 1, 1).expand(2, n_ch, 3, 3).contiguous()


def test_channel_shuffle_hand_checked():
    y = channel_shuffle(_channel_ids(8), 4)
    assert y[0, :, 0, 0].tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    y = channel_shuffle(_channel_ids(8), 2)
    assert y[0, :, 0, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    y = channel_shuffle(_channel_ids(6), 3)
    assert y[1, :, 2, 2].tolist() == [0, 2, 4, 1, 3, 5]
    assert torch.equal(channel_shuffle(_channel_ids(8), 1), _channel_ids(8))


def test_channel_shuffle_inverse():
    x = torch.randn(2, 12, 4, 4)
    assert torch.equal(channel_shuffle(channel_shuffle(x, 4), 3), x)
    assert torch.equal(channel_shuffle(channel_shuffle(x, 2), 6), x)


# --- MixedOp: partial channels --------------------------------------------------------------------------------
def _mixed_reference(m: MixedOp, xa, weights):
    return sum(w * op(xa) for w, op in zip(weights, m._ops))


def test_mixed_op_builds_ops_on_c_over_k_channels():
    m = MixedOp(16, 1, 4)
    assert m.k == 4 and len(m._ops) == len(PRIMITIVES) == 8
    for name, op in zip(PRIMITIVES, m._ops):
        convs = [c for c in op.modules() if isinstance(c, nn.Conv2d)]
        bns = [b for b in op.modules() if isinstance(b, nn.BatchNorm2d)]
        assert all(c.in_channels == 4 and c.out_channels == 4 for c in convs), name
        assert all(b.num_features == 4 and not b.affine for b in bns), name
        if "pool" in name:  # pooling gets an affine-free BN, as in DARTS
            assert isinstance(op, nn.Sequential) and len(bns) == 1
    assert isinstance(m._ops[PRIMITIVES.index("skip_connect")], Identity)
    assert isinstance(MixedOp(16, 2, 4)._ops[PRIMITIVES.index("skip_connect")], FactorizedReduce)
    with pytest.raises(ValueError, match="divisible"):
        MixedOp(10, 1, 4)


def test_mixed_op_stride1_bypass_channels_pass_unchanged():
    torch.manual_seed(0)
    m = MixedOp(16, 1, 4)
    x = torch.randn(2, 16, 8, 8)
    w = F.softmax(torch.randn(8), dim=-1)
    y = m(x, w)
    assert tuple(y.shape) == (2, 16, 8, 8)
    mixed = _mixed_reference(m, x[:, :4], w)
    # concat [mixed(4), x[4:16]] then shuffle with 4 groups: out[p] = cat[(p % 4) * 4 + p // 4]
    for p in range(16):
        src = (p % 4) * 4 + p // 4
        if src < 4:
            assert torch.allclose(y[:, p], mixed[:, src], atol=1e-6), p
        else:
            assert torch.equal(y[:, p], x[:, src]), p
    assert [p for p in range(16) if (p % 4) * 4 + p // 4 < 4] == [0, 4, 8, 12]


def test_mixed_op_skip_weight_gives_plain_shuffle():
    m = MixedOp(16, 1, 4)
    x = torch.randn(2, 16, 5, 5)
    w = torch.zeros(8)
    w[PRIMITIVES.index("skip_connect")] = 1.0
    assert torch.equal(m(x, w), channel_shuffle(x, 4))


def test_mixed_op_stride2_bypass_is_max_pooled():
    torch.manual_seed(1)
    m = MixedOp(16, 2, 4)
    x = torch.randn(2, 16, 8, 8)
    w = F.softmax(torch.randn(8), dim=-1)
    y = m(x, w)
    assert tuple(y.shape) == (2, 16, 4, 4)
    mixed = _mixed_reference(m, x[:, :4], w)
    pooled = F.max_pool2d(x, 2, 2)
    for p in range(16):
        src = (p % 4) * 4 + p // 4
        if src < 4:
            assert torch.allclose(y[:, p], mixed[:, src], atol=1e-6), p
        else:
            assert torch.equal(y[:, p], pooled[:, src]), p


def test_mixed_op_k2():
    torch.manual_seed(2)
    m = MixedOp(8, 1, 2)
    assert all(c.in_channels == 4 for op in m._ops for c in op.modules() if isinstance(c, nn.Conv2d))
    x = torch.randn(2, 8, 6, 6)
    w = F.softmax(torch.randn(8), dim=-1)
    y = m(x, w)
    mixed = _mixed_reference(m, x[:, :4], w)
    # 2 groups: even output channels are the op outputs, odd ones the bypass channels 4..7
    for p in range(8):
        if p % 2 == 0:
            assert torch.allclose(y[:, p], mixed[:, p // 2], atol=1e-6), p
        else:
            assert torch.equal(y[:, p], x[:, 4 + p // 2]), p
    m2 = MixedOp(8, 2, 2)
    y2 = m2(x, w)
    assert tuple(y2.shape) == (2, 8, 3, 3)
    assert torch.equal(y2[:, 1::2], F.max_pool2d(x[:, 4:], 2, 2))


def test_mixed_op_gradients_reach_weights():
    m = MixedOp(8, 1, 4)
    x = torch.randn(2, 8, 6, 6)
    w = torch.full((8,), 1 / 8, requires_grad=True)
    m(x, w).sum().backward()
    assert w.grad is not None and w.grad.shape == (8,)
    assert w.grad[PRIMITIVES.index("none")].item() == 0.0  # the zero op contributes nothing
    assert w.grad[PRIMITIVES.index("skip_connect")].item() == pytest.approx(x[:, :2].sum().item(), rel=1e-5)
