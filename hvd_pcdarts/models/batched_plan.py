"""Which edges of a search cell the batched op computes together (groups of edges that read states available at
the same time), and the BatchNorm slots of one edge whose running statistics it shares per group."""

from __future__ import annotations

from .weight_pack import DIL, SEP


def edge_offset(node: int) -> int:
    """Index of the first incoming edge of intermediate node `node` (node i has 2 + i incoming edges)."""
    return sum(2 + i for i in range(node))


class Group:
    """Edges that read states available at the same time: `edges[k]` reads state `inputs[k]` (0, 1: the cell's
    inputs; t >= 2: node t-2) and feeds node `nodes[k]`; ordered by node, then input."""

    def __init__(self, edges, inputs, nodes, stride):
        self.edges, self.inputs, self.nodes, self.stride = list(edges), list(inputs), list(nodes), stride
        # inputs == distinct * repeats (group 0: [0, 1] * steps; later groups: [t] * E)
        distinct = list(dict.fromkeys(self.inputs))
        r = len(self.inputs) // len(distinct)
        self.repeats = r if distinct * r == self.inputs else 1


def plan(steps: int, reduction: bool):
    groups = []
    e = [(edge_offset(i) + j, j, i) for i in range(steps) for j in (0, 1)]
    groups.append(Group([x[0] for x in e], [x[1] for x in e], [x[2] for x in e], 2 if reduction else 1))
    for t in range(2, steps + 1):
        e = [(edge_offset(i) + t, t, i) for i in range(t - 1, steps)]
        groups.append(Group([x[0] for x in e], [x[1] for x in e], [x[2] for x in e], 1))
    return groups


# BatchNorm slots inside one edge's op: name -> accessor
SLOTS = {
    "pool": lambda op: op[1],  # Sequential(pool, BatchNorm2d)
    "fr": lambda op: op.bn,  # FactorizedReduce (stride-2 skip_connect)
    "last": lambda op: op[-1],  # SepConv's second BN, DilConv's BN
    "mid": lambda op: op[3],  # SepConv's first BN
}


def bn_slots(stride: int):
    """(primitive, slot) of every BatchNorm of one edge, in a fixed order."""
    out = [("max_pool_3x3", "pool"), ("avg_pool_3x3", "pool")]
    if stride != 1:
        out.append(("skip_connect", "fr"))
    for name in SEP:
        out += [(name, "mid"), (name, "last")]
    for name in DIL:
        out.append((name, "last"))
    return out
