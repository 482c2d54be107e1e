"""The search supernet and the evaluation networks: structure, parameter counts, forward shapes."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import hvd_pcdarts.models.eval_network as eval_network
from hvd_pcdarts.models import (
    ARCH_PARAM_NAMES,
    MixedOp,
    NetworkCIFAR,
    NetworkImageNet,
    SearchNetwork,
    count_parameters,
)
from hvd_pcdarts.space.genotypes import PRIMITIVES, from_dict, load_genotype, to_dict
from hvd_pcdarts.space.ops import FactorizedReduce, Identity, ReLUConvBN, SepConv

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _n(params) -> int:
    return sum(p.numel() for p in params)


# --- SearchNetwork ----------------------------------------------------------------------------------------------
def test_search_network_parameter_groups():
    torch.manual_seed(0)
    net = SearchNetwork(16, 10, 8)
    arch = net.arch_parameters()
    weights = net.weight_parameters()
    assert ARCH_PARAM_NAMES == ("alphas_normal", "alphas_reduce", "betas_normal", "betas_reduce")
    assert [id(p) for p in arch] == [id(getattr(net, n)) for n in ARCH_PARAM_NAMES]
    assert [n for n, _ in net.named_arch_parameters()] == list(ARCH_PARAM_NAMES)
    arch_ids, weight_ids = {id(p) for p in arch}, {id(p) for p in weights}
    assert not arch_ids & weight_ids
    assert arch_ids | weight_ids == {id(p) for p in net.parameters()}
    assert len(weights) + 4 == len(list(net.parameters()))
    assert [tuple(p.shape) for p in arch] == [(14, 8), (14, 8), (14,), (14,)]
    assert all(p.requires_grad for p in arch)
    # exact counts (computed once with this implementation; K=4 partial channels)
    assert _n(arch) == 2 * 14 * 8 + 2 * 14 == 252
    assert _n(weights) == 299578
    assert _n(net.parameters()) == 299578 + 252
    assert _n(SearchNetwork(16, 10, 8, partial_k=2).weight_parameters()) == 671482
    # arch init: small (1e-3 * randn)
    assert net.alphas_normal.abs().max().item() < 0.01


@pytest.mark.parametrize("layers,expected", [(8, [2, 5]), (5, [1, 3]), (3, [1, 2]), (20, [6, 13])])
def test_search_network_reduction_positions(layers, expected):
    net = SearchNetwork(4, 10, layers)
    assert [i for i, c in enumerate(net.cells) if c.reduction] == expected
    assert len(net.cells) == layers


def test_search_network_structure():
    net = SearchNetwork(16, 10, 8)
    assert net.classifier.in_features == 4 * 64  # two doublings, multiplier 4
    assert net.stem[0].out_channels == 48  # stem_multiplier 3
    for i, cell in enumerate(net.cells):
        assert len(cell._ops) == 14
        assert all(isinstance(m, MixedOp) and m.k == 4 for m in cell._ops)
        strides = [m.stride for m in cell._ops]
        if cell.reduction:
            # edges from the two cell inputs stride: (in0, in1), (in0, in1, n0), ...
            assert strides == [2, 2, 2, 2, 1, 2, 2, 1, 1, 2, 2, 1, 1, 1]
        else:
            assert strides == [1] * 14
        prev_reduction = i > 0 and net.cells[i - 1].reduction
        assert isinstance(cell.preprocess0, FactorizedReduce if prev_reduction else ReLUConvBN)
    # cell 3 follows reduction cell 2 (C=32): preprocess0 takes cell 1's 4*16 channels, halves the resolution
    assert net.cells[3].preprocess0.conv_1.in_channels == 64
    assert net.cells[3].preprocess1[1].in_channels == 128


def test_search_network_forward_backward_cifar():
    torch.manual_seed(0)
    net = SearchNetwork(4, 10, 3)
    x = torch.randn(2, 3, 32, 32)
    logits = net(x)
    assert tuple(logits.shape) == (2, 10)
    logits.sum().backward()
    for name in ARCH_PARAM_NAMES:
        g = getattr(net, name).grad
        assert g is not None and g.abs().sum().item() > 0, name
    assert net.classifier.weight.grad is not None and net.stem[0].weight.grad.abs().sum().item() > 0
    # the first MixedOp's ops only see C/K = 1 channel
    assert net.cells[0]._ops[0]._ops[PRIMITIVES.index("sep_conv_3x3")][1].in_channels == 1


def test_search_network_imagenet_variant():
    torch.manual_seed(0)
    net = SearchNetwork(8, 100, 5, partial_k=2, stem="imagenet")
    assert not hasattr(net, "stem")
    assert net.stem0[0].stride == (2, 2) and net.stem0[3].stride == (2, 2) and net.stem1[1].stride == (2, 2)
    assert isinstance(net.cells[0].preprocess0, FactorizedReduce)  # s0 is at twice the resolution of s1
    assert all(m.k == 2 for c in net.cells for m in c._ops)
    sep = net.cells[0]._ops[0]._ops[PRIMITIVES.index("sep_conv_3x3")]
    assert sep[1].in_channels == 4  # C/K = 8/2
    logits = net(torch.randn(2, 3, 224, 224))
    assert tuple(logits.shape) == (2, 100)
    assert torch.isfinite(logits).all()


def test_search_network_rejects_unknown_stem():
    with pytest.raises(ValueError, match="stem"):
        SearchNetwork(8, 10, 3, stem="mnist")


def test_search_network_edge_weights_scale_the_mixture():
    # a node's output is sum_j softmax(beta)_j * MixedOp_j: with beta -> -inf on all but one edge, only that
    # input matters. Check through edge_softmax on a two-node cell.
    from hvd_pcdarts.models.search_network import edge_softmax, num_edges
    assert num_edges(4) == 14 and num_edges(2) == 5
    b = torch.tensor([0.0, 0.0, 1.0, 2.0, 3.0])
    e = edge_softmax(b, 2)
    assert torch.allclose(e[:2], torch.tensor([0.5, 0.5]))
    assert torch.allclose(e[2:], torch.softmax(torch.tensor([1.0, 2.0, 3.0]), 0))
    assert torch.allclose(e[2:].sum(), torch.tensor(1.0))


# --- evaluation networks: parameter counts -------------------------------------------------------------------------
def test_network_cifar_parameter_count_matches_paper():
    net = NetworkCIFAR(36, 10, 20, True, "PCDARTS")
    assert count_parameters(net) == 3634678  # paper: 3.6M
    assert count_parameters(net, exclude_auxiliary=False) == 4111104
    assert count_parameters(NetworkCIFAR(36, 10, 20, False, "PCDARTS")) == 3634678
    assert net.classifier.in_features == 576


def test_network_imagenet_parameter_count_matches_paper():
    net = NetworkImageNet(48, 1000, 14, True, "PC_DARTS_image")
    assert count_parameters(net) == 5342464  # paper: 5.3M
    assert count_parameters(net, exclude_auxiliary=False) == 6603240
    assert net.classifier.in_features == 768


def test_network_from_json_file_equals_named(tmp_path):
    p = tmp_path / "g.json"
    p.write_text(json.dumps({"genotype": to_dict(load_genotype("PCDARTS"))}))
    a = NetworkCIFAR(8, 10, 5, True, str(p))
    b = NetworkCIFAR(8, 10, 5, True, "PCDARTS")
    assert [(n, tuple(t.shape)) for n, t in a.state_dict().items()] == \
           [(n, tuple(t.shape)) for n, t in b.state_dict().items()]


def test_eval_cell_ops_follow_the_genotype():
    net = NetworkCIFAR(8, 10, 5, False, "PCDARTS")
    normal, reduce = net.cells[0], net.cells[1]
    assert not normal.reduction and reduce.reduction
    assert isinstance(normal._ops[1], Identity)  # ('skip_connect', 0)
    assert isinstance(normal._ops[6], nn.AvgPool2d)  # ('avg_pool_3x3', 0)
    assert normal._indices == [1, 0, 0, 1, 0, 1, 0, 1] and normal._concat == [2, 3, 4, 5]
    # reduce: ('sep_conv_5x5', 1) strides 2; ('max_pool_3x3', 0) strides 2; ('sep_conv_5x5', 2) strides 1
    assert isinstance(reduce._ops[0], SepConv) and reduce._ops[0][1].stride == (2, 2)
    assert isinstance(reduce._ops[1], nn.MaxPool2d) and reduce._ops[1].stride == 2
    assert reduce._ops[3][1].stride == (1, 1)
    assert isinstance(net.cells[2].preprocess0, FactorizedReduce)


# --- evaluation networks: forward ---------------------------------------------------------------------------------
def test_network_cifar_forward_full_size():
    torch.manual_seed(0)
    net = NetworkCIFAR(36, 10, 20, True, "PCDARTS")
    net.drop_path_prob = 0.2
    net.train()
    logits, aux = net(torch.randn(2, 3, 32, 32))
    assert tuple(logits.shape) == (2, 10) and tuple(aux.shape) == (2, 10)
    net.eval()
    with torch.no_grad():
        logits, aux = net(torch.randn(2, 3, 32, 32))
    assert tuple(logits.shape) == (2, 10) and aux is None


def test_network_cifar_small_on_16px():
    torch.manual_seed(0)
    net = NetworkCIFAR(8, 10, 5, True, "PCDARTS")
    x = torch.randn(2, 3, 16, 16)
    net.train()
    logits, aux = net(x)
    assert tuple(logits.shape) == (2, 10) and tuple(aux.shape) == (2, 10)
    (logits.sum() + aux.sum()).backward()
    assert net.auxiliary_head.classifier.weight.grad is not None
    net.eval()
    logits, aux = net(x)
    assert tuple(logits.shape) == (2, 10) and aux is None
    # without the head: no module, no aux logits even in training
    plain = NetworkCIFAR(8, 10, 5, False, "PCDARTS").train()
    assert not hasattr(plain, "auxiliary_head")
    assert plain(x)[1] is None


def test_network_imagenet_forward():
    torch.manual_seed(0)
    net = NetworkImageNet(48, 1000, 14, True, "PC_DARTS_image")
    net.train()
    logits, aux = net(torch.randn(1, 3, 224, 224))
    assert tuple(logits.shape) == (1, 1000) and tuple(aux.shape) == (1, 1000)
    net.eval()
    with torch.no_grad():
        logits, aux = net(torch.randn(2, 3, 224, 224))
    assert tuple(logits.shape) == (2, 1000) and aux is None
    small = NetworkImageNet(8, 20, 5, True, "PC_DARTS_image").train()
    logits, aux = small(torch.randn(2, 3, 64, 64))
    assert tuple(logits.shape) == (2, 20) and tuple(aux.shape) == (2, 20)


def _count_drop_path(monkeypatch):
    calls = []
    real = eval_network.drop_path

    def counting(x, p):
        calls.append(p)
        return real(x, p)

    monkeypatch.setattr(eval_network, "drop_path", counting)
    return calls


@pytest.mark.parametrize("cls,genotype,calls_expected,size", [
    # PCDARTS: normal cells have one Identity (skip_connect) -> 7 drop paths, reduce cells 8; 3 normal + 2 reduce
    (NetworkCIFAR, "PCDARTS", 3 * 7 + 2 * 8, 16),
    # PC_DARTS_image: normal cells have two Identities -> 6; the reduce cell's skip is a FactorizedReduce -> 8
    (NetworkImageNet, "PC_DARTS_image", 3 * 6 + 2 * 8, 64),
])
def test_drop_path_only_in_training(monkeypatch, cls, genotype, calls_expected, size):
    calls = _count_drop_path(monkeypatch)
    torch.manual_seed(0)
    net = cls(8, 10, 5, False, genotype)
    x = torch.randn(2, 3, size, size)

    net.drop_path_prob = 0.3
    net.train()
    net(x)
    assert len(calls) == calls_expected and set(calls) == {0.3}

    calls.clear()
    net.drop_path_prob = 0.0
    net(x)
    assert calls == []

    net.drop_path_prob = 0.3
    net.eval()
    with torch.no_grad():
        y1 = net(x)[0]
        net.drop_path_prob = 0.0
        y0 = net(x)[0]
    assert calls == []
    assert torch.equal(y1, y0)


def test_drop_path_changes_training_output():
    torch.manual_seed(0)
    net = NetworkCIFAR(8, 10, 5, False, "PCDARTS").train()
    x = torch.randn(4, 3, 16, 16)
    net.drop_path_prob = 0.0
    a, b = net(x)[0], net(x)[0]
    assert torch.equal(a, b)  # train mode without drop path is deterministic
    net.drop_path_prob = 0.5
    torch.manual_seed(1)
    c = net(x)[0]
    torch.manual_seed(1)
    d = net(x)[0]
    torch.manual_seed(2)
    e = net(x)[0]
    assert torch.equal(c, d)
    assert not torch.allclose(c, a) and not torch.allclose(c, e)


def test_eval_network_with_two_step_genotype():
    g = {"normal": [["sep_conv_3x3", 0], ["skip_connect", 1], ["max_pool_3x3", 2], ["dil_conv_5x5", 0]],
         "normal_concat": [2, 3],
         "reduce": [["sep_conv_5x5", 1], ["avg_pool_3x3", 0], ["skip_connect", 2], ["max_pool_3x3", 1]],
         "reduce_concat": [2, 3]}
    net = NetworkCIFAR(8, 10, 5, True, from_dict(g))
    assert all(c.multiplier == 2 for c in net.cells)
    assert net.classifier.in_features == 2 * 32
    logits, aux = net.train()(torch.randn(2, 3, 16, 16))
    assert tuple(logits.shape) == (2, 10) and tuple(aux.shape) == (2, 10)
