"""Genotypes: derivation from alphas/betas, the published cells, JSON save/load and its error messages."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from hvd_pcdarts.errors import GenotypeError, UsageError
from hvd_pcdarts.models import SearchNetwork, derive_cell
from hvd_pcdarts.space.genotypes import (
    PRIMITIVES,
    Genotype,
    from_dict,
    load_genotype,
    save_genotype,
    to_dict,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")

# The published cells, as released with the PC-DARTS paper's code (genotypes.py of yuhuixu1993/PC-DARTS).
PUB_CIFAR_NORMAL = [("sep_conv_3x3", 1), ("skip_connect", 0), ("sep_conv_3x3", 0), ("dil_conv_3x3", 1),
                    ("sep_conv_5x5", 0), ("sep_conv_3x3", 1), ("avg_pool_3x3", 0), ("dil_conv_3x3", 1)]
PUB_CIFAR_REDUCE = [("sep_conv_5x5", 1), ("max_pool_3x3", 0), ("sep_conv_5x5", 1), ("sep_conv_5x5", 2),
                    ("sep_conv_3x3", 0), ("sep_conv_3x3", 3), ("sep_conv_3x3", 1), ("sep_conv_3x3", 2)]
PUB_IMAGE_NORMAL = [("skip_connect", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 0), ("skip_connect", 1),
                    ("sep_conv_3x3", 1), ("sep_conv_3x3", 3), ("sep_conv_3x3", 1), ("dil_conv_5x5", 4)]
PUB_IMAGE_REDUCE = [("sep_conv_3x3", 0), ("skip_connect", 1), ("dil_conv_5x5", 2), ("max_pool_3x3", 1),
                    ("sep_conv_3x3", 2), ("sep_conv_3x3", 1), ("sep_conv_5x5", 0), ("sep_conv_3x3", 3)]


def as_list(g: Genotype):
    return ([tuple(e) for e in g.normal], list(g.normal_concat), [tuple(e) for e in g.reduce], list(g.reduce_concat))


# --- derivation -----------------------------------------------------------------------------------------------
def _row(**vals):
    r = [0.0] * len(PRIMITIVES)
    for op, v in vals.items():
        r[PRIMITIVES.index(op)] = v
    return r


# 14 edges (steps=4): node 0 <- edges 0,1; node 1 <- 2,3,4; node 2 <- 5..8; node 3 <- 9..13.
# One raised alpha a per edge (others 0): softmax gives that op e^a / (e^a + 7), the others 1 / (e^a + 7).
ALPHAS_A = torch.tensor([
    _row(sep_conv_3x3=2.0),       # e0  in0: 0.5135
    _row(skip_connect=1.0),       # e1  in1: 0.2797
    _row(none=5.0),               # e2  in0: best non-none = 1/(e^5+7) = 0.0064 (all tie -> max_pool_3x3)
    _row(dil_conv_3x3=3.0),       # e3  in1: 0.7416
    _row(avg_pool_3x3=1.0),       # e4  in2: 0.2797
    _row(sep_conv_5x5=0.5),       # e5  in0: 0.1906
    _row(),                       # e6  in1: 0.125 (uniform)
    _row(max_pool_3x3=2.5),       # e7  in2: 0.6351
    _row(dil_conv_5x5=2.0),       # e8  in3: 0.5135
    _row(sep_conv_3x3=1.0),       # e9  in0: 0.2797
    _row(none=10.0, skip_connect=4.0),  # e10 in1: none dominates; skip = e^4/(e^10+e^4+6) = 0.0025
    _row(),                       # e11 in2: 0.125
    _row(sep_conv_5x5=3.0),       # e12 in3: 0.7416
    _row(dil_conv_3x3=1.5),       # e13 in4: 0.3903
], dtype=torch.float32)

# Uniform betas: every node weights its edges equally, so the alphas alone decide.
EXPECTED_A = [("sep_conv_3x3", 0), ("skip_connect", 1),
              ("dil_conv_3x3", 1), ("avg_pool_3x3", 2),
              ("max_pool_3x3", 2), ("dil_conv_5x5", 3),
              ("sep_conv_5x5", 3), ("dil_conv_3x3", 4)]

# Betas that change the decision:
#  node 0: betas (0, 3) -> edge weights (0.0474, 0.9526): in1 0.9526*0.2797 = 0.266 beats in0 0.0474*0.5135 =
#          0.0243, so the ORDER flips;
#  node 1: betas (5, 0, 0) -> (0.9867, 0.0066, 0.0066): in0 0.9867*0.0064 = 0.0064 > in1 0.0066*0.7416 =
#          0.0049 > in2 0.0066*0.2797 = 0.0019, so edge in0 (max_pool_3x3 by the tie rule) replaces in2;
#  node 3: betas (4, 0, 0, 0, 0) -> in0 e^4/(e^4+4) = 0.932 * 0.2797 = 0.261 beats in3 0.017 * 0.7416 = 0.0126.
BETAS_B = torch.tensor([0.0, 3.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0])
EXPECTED_B = [("skip_connect", 1), ("sep_conv_3x3", 0),
              ("max_pool_3x3", 0), ("dil_conv_3x3", 1),
              ("max_pool_3x3", 2), ("dil_conv_5x5", 3),
              ("sep_conv_3x3", 0), ("sep_conv_5x5", 3)]


def test_derive_cell_hand_computed():
    assert ALPHAS_A.shape == (14, 8)
    assert derive_cell(ALPHAS_A, torch.zeros(14), 4) == EXPECTED_A


def test_derive_cell_betas_change_the_edges():
    gene_b = derive_cell(ALPHAS_A, BETAS_B, 4)
    assert gene_b == EXPECTED_B
    assert gene_b != EXPECTED_A
    # node 1 now reads input 0 instead of input 2; node 3 input 0 instead of input 4
    assert {e[1] for e in gene_b[2:4]} == {0, 1} and {e[1] for e in EXPECTED_A[2:4]} == {1, 2}


def test_derive_cell_never_picks_none():
    alphas = torch.tensor([_row(none=5.0)] * 14)
    gene = derive_cell(alphas, torch.zeros(14), 4)
    # none dominates everywhere; all other ops tie -> lowest index (max_pool_3x3); edges tie -> inputs 0, 1
    assert gene == [("max_pool_3x3", 0), ("max_pool_3x3", 1)] * 4
    assert all(op != "none" for op, _ in derive_cell(ALPHAS_A, BETAS_B, 4))


def test_derive_cell_steps2():
    alphas = torch.tensor([_row(sep_conv_3x3=1.0), _row(dil_conv_5x5=2.0),
                           _row(avg_pool_3x3=0.3), _row(skip_connect=3.0), _row(sep_conv_5x5=4.0)])
    assert derive_cell(alphas, torch.zeros(5), 2) == [("dil_conv_5x5", 1), ("sep_conv_3x3", 0),
                                                      ("sep_conv_5x5", 2), ("skip_connect", 1)]


def _reference_parse(alphas, betas, steps):
    """Transcription of the PC-DARTS `genotype()._parse` (model_search.py) in plain Python."""
    def softmax(v):
        m = max(v)
        e = [math.exp(x - m) for x in v]
        return [x / sum(e) for x in e]

    W = [softmax(r) for r in alphas]
    W2, start, n = [], 0, 2
    for _ in range(steps):
        W2 += softmax(betas[start:start + n])
        start += n
        n += 1
    none = PRIMITIVES.index("none")
    gene, start, n = [], 0, 2
    for i in range(steps):
        end = start + n
        Wn = [[w * W2[j] for w in W[j]] for j in range(start, end)]
        edges = sorted(range(i + 2), key=lambda x: -max(Wn[x][k] for k in range(len(Wn[x])) if k != none))[:2]
        for j in edges:
            k_best = None
            for k in range(len(Wn[j])):
                if k != none and (k_best is None or Wn[j][k] > Wn[j][k_best]):
                    k_best = k
            gene.append((PRIMITIVES[k_best], j))
        start = end
        n += 1
    return gene


@pytest.mark.parametrize("seed", range(6))
def test_derive_cell_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    alphas = torch.randn(14, 8, generator=g, dtype=torch.float64) * 2
    betas = torch.randn(14, generator=g, dtype=torch.float64) * 2
    assert derive_cell(alphas, betas, 4) == _reference_parse(alphas.tolist(), betas.tolist(), 4)
    assert _reference_parse(ALPHAS_A.double().tolist(), BETAS_B.tolist(), 4) == EXPECTED_B


def test_search_network_genotype():
    net = SearchNetwork(4, 10, 3)
    for name in ("alphas_normal", "alphas_reduce", "betas_normal", "betas_reduce"):
        assert isinstance(getattr(net, name), torch.nn.Parameter)
    assert net.alphas_normal.shape == (14, 8) and net.alphas_reduce.shape == (14, 8)
    assert net.betas_normal.shape == (14,) and net.betas_reduce.shape == (14,)
    with torch.no_grad():
        net.alphas_normal.copy_(ALPHAS_A)
        net.betas_normal.zero_()
        net.alphas_reduce.copy_(ALPHAS_A)
        net.betas_reduce.copy_(BETAS_B)
    g = net.genotype()
    assert isinstance(g, Genotype)
    assert g.normal == EXPECTED_A
    assert g.reduce == EXPECTED_B
    assert list(g.normal_concat) == [2, 3, 4, 5] and list(g.reduce_concat) == [2, 3, 4, 5]
    # the derived genotype is valid and survives JSON
    assert as_list(from_dict(json.loads(json.dumps(to_dict(g))))) == as_list(g)
    # deriving does not touch the parameters or record autograd history
    assert torch.equal(net.alphas_normal.detach(), ALPHAS_A)
    state = net.arch_state()
    assert sorted(state) == ["alphas_normal", "alphas_reduce", "betas_normal", "betas_reduce"]
    assert state["betas_reduce"] == BETAS_B.double().tolist()


# --- published cells ------------------------------------------------------------------------------------------
def test_published_genotypes():
    for name, normal, reduce in [("PCDARTS", PUB_CIFAR_NORMAL, PUB_CIFAR_REDUCE),
                                 ("PC_DARTS_cifar", PUB_CIFAR_NORMAL, PUB_CIFAR_REDUCE),
                                 ("PC_DARTS_image", PUB_IMAGE_NORMAL, PUB_IMAGE_REDUCE)]:
        g = load_genotype(name)
        assert as_list(g) == (normal, [2, 3, 4, 5], reduce, [2, 3, 4, 5]), name
    assert as_list(load_genotype("PCDARTS")) == as_list(load_genotype("PC_DARTS_cifar"))


# --- JSON round trip ------------------------------------------------------------------------------------------
def test_to_dict_from_dict_round_trip():
    g = load_genotype("PC_DARTS_image")
    d = to_dict(g)
    assert d == {
        "normal": [list(e) for e in PUB_IMAGE_NORMAL],
        "normal_concat": [2, 3, 4, 5],
        "reduce": [list(e) for e in PUB_IMAGE_REDUCE],
        "reduce_concat": [2, 3, 4, 5],
    }
    back = from_dict(json.loads(json.dumps(d)))
    assert as_list(back) == as_list(g)
    assert to_dict(back) == d


def test_save_and_load_genotype(tmp_path):
    g = load_genotype("PC_DARTS_cifar")
    path = tmp_path / "genotype.json"
    extra = {"alphas_normal": [[0.5] * 8] * 14, "epoch": 49}
    save_genotype(g, str(path), extra=extra)
    on_disk = json.loads(path.read_text())
    assert on_disk["genotype"] == to_dict(g)
    assert on_disk["epoch"] == 49 and on_disk["alphas_normal"] == extra["alphas_normal"]
    assert as_list(load_genotype(str(path))) == (PUB_CIFAR_NORMAL, [2, 3, 4, 5], PUB_CIFAR_REDUCE, [2, 3, 4, 5])
    # no temporary files left next to it
    assert os.listdir(tmp_path) == ["genotype.json"]


def test_load_bare_and_search_style_files(tmp_path):
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(to_dict(load_genotype("PC_DARTS_image"))))
    assert as_list(load_genotype(str(bare)))[0] == PUB_IMAGE_NORMAL
    search = tmp_path / "search.json"
    search.write_text(json.dumps({"genotype": to_dict(load_genotype("PCDARTS")),
                                  "alphas_normal": [[0.0] * 8] * 14, "betas_normal": [0.0] * 14}))
    assert as_list(load_genotype(str(search))) == (PUB_CIFAR_NORMAL, [2, 3, 4, 5], PUB_CIFAR_REDUCE, [2, 3, 4, 5])


def test_load_genotype_object_is_validated():
    g = Genotype(normal=PUB_CIFAR_NORMAL, normal_concat=range(2, 6), reduce=PUB_CIFAR_REDUCE,
                 reduce_concat=range(2, 6))
    assert as_list(load_genotype(g)) == as_list(load_genotype("PCDARTS"))
    bad = g._replace(normal=[("conv_7x7", 0)] + PUB_CIFAR_NORMAL[1:])
    with pytest.raises(GenotypeError, match="conv_7x7"):
        load_genotype(bad)


# --- malformed inputs -----------------------------------------------------------------------------------------
def _valid():
    return to_dict(load_genotype("PCDARTS"))


def _write(tmp_path, obj, name="g.json"):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(p)


def _mut(**changes):
    d = _valid()
    for k, v in changes.items():
        if v is KeyError:
            del d[k]
        else:
            d[k] = v
    return d


def _edges_with(kind_index, edge):
    normal = [list(e) for e in PUB_CIFAR_NORMAL]
    normal[kind_index] = edge
    return normal


MALFORMED = [
    ("unknown_op", _mut(normal=_edges_with(3, ["conv_7x7", 1])), r"normal\[3\] names unknown operation 'conv_7x7'"),
    ("none_op", _mut(normal=_edges_with(0, ["none", 1])), r"normal\[0\] names unknown operation 'none'"),
    ("index_out_of_range", _mut(normal=_edges_with(2, ["sep_conv_3x3", 3])),
     r"normal\[2\] input index 3 is out of range for node 1 \(must be 0\.\.2\)"),
    ("negative_index", _mut(reduce=[list(e) for e in PUB_CIFAR_REDUCE[:7]] + [["sep_conv_3x3", -1]]),
     r"reduce\[7\] input index -1 is out of range"),
    ("odd_edge_count", _mut(normal=[list(e) for e in PUB_CIFAR_NORMAL[:7]]), r"'normal' .*got 7 edges"),
    ("empty_edges", _mut(reduce=[]), r"'reduce' .*got 0 edges"),
    ("edges_not_a_list", _mut(normal="sep_conv_3x3"), r"'normal' must be a list"),
    ("edge_not_a_pair", _mut(normal=_edges_with(1, ["sep_conv_3x3"])), r"normal\[1\] must be \[op_name, input_index\]"),
    ("float_index", _mut(normal=_edges_with(1, ["sep_conv_3x3", 1.0])), r"normal\[1\] must be \[op_name"),
    ("bool_index", _mut(normal=_edges_with(1, ["sep_conv_3x3", True])), r"normal\[1\] must be \[op_name"),
    ("concat_out_of_range", _mut(normal_concat=[2, 3, 4, 9]),
     r"'normal_concat' index 9 is out of range \(must be 0\.\.5\)"),
    ("concat_not_a_list", _mut(reduce_concat="range(2, 6)"), r"'reduce_concat' must be a non-empty list"),
    ("concat_empty", _mut(reduce_concat=[]), r"'reduce_concat' must be a non-empty list"),
    ("concat_repeated", _mut(normal_concat=[2, 3, 3, 5]), r"'normal_concat' repeats a node"),
    ("missing_key", _mut(reduce_concat=KeyError), r"missing key\(s\) reduce_concat"),
    ("missing_two_keys", _mut(normal=KeyError, reduce=KeyError), r"missing key\(s\) normal, reduce"),
    ("not_an_object", [["sep_conv_3x3", 0]], r"expected a JSON object"),
]


@pytest.mark.parametrize("obj,pattern", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_genotype_files(tmp_path, obj, pattern):
    path = _write(tmp_path, obj)
    with pytest.raises(GenotypeError, match=pattern) as ei:
        load_genotype(path)
    assert path in str(ei.value)  # the message names the file
    with pytest.raises(GenotypeError, match=pattern):
        from_dict(obj)


def test_not_json(tmp_path):
    path = _write(tmp_path, "{'normal': [('sep_conv_3x3', 1)],}")
    with pytest.raises(GenotypeError, match=r"not valid JSON \(line 1, column 2"):
        load_genotype(path)
    with pytest.raises(GenotypeError, match="not valid JSON"):
        load_genotype(_write(tmp_path, "", name="empty.json"))


def test_python_genotype_text_is_not_evaluated(tmp_path):
    text = ("Genotype(normal=[('sep_conv_3x3', 1), ('skip_connect', 0)], normal_concat=range(2, 3), "
            "reduce=[('sep_conv_3x3', 1), ('skip_connect', 0)], reduce_concat=range(2, 3))")
    with pytest.raises(GenotypeError, match="not valid JSON"):
        load_genotype(_write(tmp_path, text))


def test_code_is_never_executed(tmp_path):
    target = tmp_path / "pwned"
    code = f"__import__('os').system('touch {target}')"
    path = _write(tmp_path, code, name="evil.json")
    with pytest.raises(GenotypeError, match="not valid JSON"):
        load_genotype(path)
    with pytest.raises(GenotypeError):  # as a spec string it is neither a name nor a file
        load_genotype(code)
    assert not target.exists()


def test_directory_and_missing_paths(tmp_path):
    with pytest.raises(GenotypeError, match="is a directory"):
        load_genotype(str(tmp_path))
    missing = str(tmp_path / "nope.json")
    with pytest.raises(GenotypeError, match=r"no such file and not a published name \(PCDARTS, PC_DARTS_cifar, "
                                            r"PC_DARTS_image\)") as ei:
        load_genotype(missing)
    assert "nope.json" in str(ei.value)
    with pytest.raises(GenotypeError, match="no such file"):
        load_genotype("pcdarts")  # names are case-sensitive


def test_bad_spec_types_and_undecodable_file(tmp_path):
    for spec in (None, 42, ""):
        with pytest.raises(GenotypeError, match="published name or a JSON file path"):
            load_genotype(spec)
    p = tmp_path / "bin.json"
    p.write_bytes(b"\xff\xfe\x00\x80garbage")
    with pytest.raises(GenotypeError, match="cannot read"):
        load_genotype(str(p))


def test_genotype_error_is_a_usage_error():
    assert issubclass(GenotypeError, UsageError) and issubclass(GenotypeError, ValueError)


def test_other_step_counts_are_accepted():
    d = {"normal": [["sep_conv_3x3", 0], ["skip_connect", 1], ["max_pool_3x3", 2], ["dil_conv_5x5", 0]],
         "normal_concat": [2, 3],
         "reduce": [["sep_conv_5x5", 1], ["avg_pool_3x3", 0]],
         "reduce_concat": [2]}
    g = from_dict(d)
    assert g.normal[2] == ("max_pool_3x3", 2) and g.reduce_concat == [2]
    d["reduce_concat"] = [3]  # one step: nodes 0..2 only
    with pytest.raises(GenotypeError, match=r"'reduce_concat' index 3 is out of range \(must be 0\.\.2\)"):
        from_dict(d)
