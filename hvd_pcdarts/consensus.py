"""The consensus of several searches (`train_search.py --replicas R`): a majority cell and how far the runs agree.

Pure functions on genotype dicts (`space.genotypes.to_dict`); no Horovod, no files.

Majority rule, per cell type (normal, reduce) and intermediate node:
1. inputs: the two inputs that most replicas connect to the node (a replica's vote counts once per input);
2. operation: on each chosen input, the operation that most of the replicas connecting it chose;
3. ties (in 1 or 2) go to the choice of the lowest-numbered replica making one of the tied choices, and within
   that replica to its earlier edge: replica 0 (the first seed) is the reference.
An edge is (node, input, operation). Its votes: the replicas whose cell holds exactly that edge. Agreement: the
votes of the majority cell's edges over (replicas x edges): the share of the majority cell's edges that a replica
chose, averaged over the replicas (1.0: every run found the same cell).
"""

from __future__ import annotations

from collections import Counter

RULE = ("per node: the 2 inputs most replicas connect, on each the operation most of those replicas chose; ties to "
        "the lowest-numbered replica's choice; agreement = mean over replicas of the share of the majority cell's "
        "edges (node, input, operation) that the replica chose")


def cell_edges(cell: list) -> list[tuple[int, int, str]]:
    """[[op, input], ...] (two edges per node) as (node, input, op) triples."""
    return [(e // 2, int(i), op) for e, (op, i) in enumerate(cell)]


def _ranked(votes: Counter, first_seen: dict, n: int) -> list:
    """The `n` keys with most votes; ties by first appearance (replica order, then edge order)."""
    return sorted(votes, key=lambda k: (-votes[k], first_seen[k]))[:n]


def majority_cell(cells: list[list]) -> list[list]:
    """The majority cell of the replicas' cells ([[op, input], ...] each, same number of nodes)."""
    per_replica = [cell_edges(c) for c in cells]
    nodes = len(cells[0]) // 2
    out = []
    for node in range(nodes):
        input_votes, op_votes, first_seen = Counter(), Counter(), {}
        for r, edges in enumerate(per_replica):
            mine = [(i, op) for n, i, op in edges if n == node]
            for pos, (i, op) in enumerate(mine):
                first_seen.setdefault(i, (r, pos))
                first_seen.setdefault((i, op), (r, pos))
                op_votes[(i, op)] += 1
            for i in dict.fromkeys(i for i, _ in mine):
                input_votes[i] += 1
        for i in _ranked(input_votes, first_seen, 2):
            ops = Counter({k: v for k, v in op_votes.items() if k[0] == i})
            _, op = _ranked(ops, first_seen, 1)[0]
            out.append([op, i])
    return out


def edge_votes(cells: list[list]) -> Counter:
    """(node, input, op) -> the number of replicas whose cell holds that edge."""
    votes = Counter()
    for c in cells:
        votes.update(set(cell_edges(c)))
    return votes


def consensus(genotypes: list[dict]) -> dict:
    """The majority genotype of the replicas' genotypes (to_dict form, in replica order), with the votes.

    Returns {"genotype", "agreement", "unanimous_edges", "edges", "votes", "replica_agreement"}: `edges`, per cell
    type, the votes of each edge of the majority cell; `votes`, per cell type, every edge any replica chose with its
    votes (most first); `replica_agreement`, per replica, the share of the majority cell's edges it chose."""
    n = len(genotypes)
    if n == 0:
        raise ValueError("consensus of no genotype")
    major = {k: genotypes[0][k] for k in ("normal_concat", "reduce_concat")}
    edges, votes, hits, total = {}, {}, [0] * n, 0
    for kind in ("normal", "reduce"):
        cells = [g[kind] for g in genotypes]
        major[kind] = majority_cell(cells)
        count = edge_votes(cells)
        chosen = cell_edges(major[kind])
        edges[kind] = [count[e] for e in chosen]
        votes[kind] = [dict(node=nd, input=i, op=op, votes=v, in_majority=(nd, i, op) in chosen)
                       for (nd, i, op), v in sorted(count.items(), key=lambda kv: (kv[0][0], -kv[1], kv[0][1:]))]
        for r, c in enumerate(cells):
            hits[r] += len(set(chosen) & set(cell_edges(c)))
        total += len(chosen)
    all_votes = edges["normal"] + edges["reduce"]
    return dict(genotype=major, agreement=sum(all_votes) / (n * total),
                unanimous_edges=sum(v == n for v in all_votes), edges=edges, votes=votes,
                replica_agreement=[h / total for h in hits])
