"""Seed ensembles (`train_search.py --replicas R`): replica r of a launch equals the search of its seed alone on W/R
ranks, under every launcher; RUN/consensus.json (the majority cell, consensus.py) loads as a genotype; refusals;
resume of every replica."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import REPO_ROOT, describe, horovodrun_cmd, launch, mpirun_cmd, output_lines, python_exe
from test_search import EQUIV, SCRIPT, TINY

from hvd_pcdarts.consensus import consensus, majority_cell
from hvd_pcdarts.space.genotypes import from_dict, load_genotype

TRAIN = str(REPO_ROOT / "bin" / "train.py")
SEED = 3  # EQUIV's --seed


def _with_seed(args: list, seed: int) -> list:
    i = args.index("--seed")
    return [*args[:i + 1], str(seed), *args[i + 2:]]


def _cmd(launcher: str, ranks: int, args: list) -> list:
    if ranks == 1:
        return [python_exe(), *args]
    if launcher == "mpirun":
        return mpirun_cmd(ranks, args)
    return horovodrun_cmd(ranks, args, controller=launcher.split("-")[1])


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """`single(seed, ranks)`: the output folder of an EQUIV search of that seed on `ranks` ranks (mpirun)."""
    runs = {}

    def get(seed: int, ranks: int = 1):
        if (seed, ranks) not in runs:
            out = tmp_path_factory.mktemp(f"seed{seed}-{ranks}ranks")
            res = launch(_cmd("mpirun", ranks, [SCRIPT, *_with_seed(EQUIV, seed), "--output-dir", out]), timeout=600)
            assert res.returncode == 0, describe(res)
            runs[seed, ranks] = out
        return runs[seed, ranks]

    return get


@pytest.fixture(scope="module")
def replicated(tmp_path_factory):
    """`replicated(launcher, ranks, extra)`: (RUN folder, CompletedProcess) of an EQUIV search with --replicas 2."""
    runs = {}

    def get(launcher: str, ranks: int = 2, extra=()):
        key = (launcher, ranks, tuple(extra))
        if key not in runs:
            out = tmp_path_factory.mktemp("replicas")
            res = launch(_cmd(launcher, ranks, [SCRIPT, *EQUIV, "--replicas", "2", *extra, "--output-dir", out]),
                         timeout=600)
            assert res.returncode == 0, describe(res)
            runs[key] = out, res
        return runs[key]

    return get


def _assert_same_search(a, b) -> None:
    """Two search folders: every floating-point checkpoint entry (weights, alphas, betas, BN statistics) to 1e-10,
    the same genotype, the same epochs' search-valid losses."""
    ma = torch.load(a / "checkpoint.pt", weights_only=True)["model"]
    mb = torch.load(b / "checkpoint.pt", weights_only=True)["model"]
    assert list(ma) == list(mb)
    worst = max(float((ma[k].double() - mb[k].double()).abs().max()) for k in ma if ma[k].is_floating_point())
    assert worst <= 1e-10, f"{a} and {b} differ by {worst}"
    assert float(ma["alphas_normal"].abs().max()) > 0  # the architecture was trained: the comparison is not vacuous
    ga, gb = (json.loads((d / "genotype.json").read_text())["genotype"] for d in (a, b))
    assert ga == gb
    rows = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b)]
    assert [r["epoch"] for r in rows[0]] == [r["epoch"] for r in rows[1]] == [0, 1]
    assert all(abs(x["valid_loss"] - y["valid_loss"]) <= 1e-10 for x, y in zip(*rows))


def _assert_consensus(run, seeds: list[int]) -> dict:
    """RUN/consensus.json: loads as a genotype; its majority cell, votes and agreement are those of the replicas'
    genotype.json files; each replica's seed and final search-valid accuracy."""
    doc = json.loads((run / "consensus.json").read_text())
    genos = [json.loads((run / f"replica-{r}" / "genotype.json").read_text())["genotype"] for r in range(len(seeds))]
    assert load_genotype(str(run / "consensus.json")) == from_dict(consensus(genos)["genotype"])
    assert doc["agreement"] == pytest.approx(consensus(genos)["agreement"]) and 0 < doc["agreement"] <= 1
    assert [r["replica"] for r in doc["replicas"]] == list(range(len(seeds)))
    assert [r["seed"] for r in doc["replicas"]] == seeds
    for r, g in zip(doc["replicas"], genos):
        last = json.loads((run / f"replica-{r['replica']}" / "metrics.jsonl").read_text().splitlines()[-1])
        assert r["genotype"] == g and r["valid_acc"] == last["valid_acc"] and r["epochs"] == 2
    assert "consensus of 2 replica(s)" in (run / "log.txt").read_text()
    return doc


@pytest.mark.ranks
@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["horovodrun-gloo", "horovodrun-mpi", "mpirun"])
def test_each_replica_of_two_ranks_equals_one_rank_of_its_seed(launcher, single, replicated):
    run, res = replicated(launcher)
    for r in range(2):
        _assert_same_search(run / f"replica-{r}", single(SEED + r))
        args = json.loads((run / f"replica-{r}" / "args.json").read_text())
        assert (args["seed"], args["replica"], args["world_size"]) == (SEED + r, r, 1)
    _assert_consensus(run, [SEED, SEED + 1])
    assert sum("consensus of 2 replica(s)" in x for x in output_lines(res.stdout)) == 1  # rank 0 of the job only


@pytest.mark.ranks
@pytest.mark.slow
def test_each_replica_of_four_ranks_equals_two_ranks_of_its_seed(single, replicated):
    """4 ranks, 2 replicas of 2 ranks (synchronized BN, gradient and arch-gradient averaging within each), seeds
    given by --seeds in reverse order: replica 0 is the 2-rank search of seed 4, replica 1 that of seed 3."""
    run, _ = replicated("mpirun", 4, ["--seeds", f"{SEED + 1},{SEED}"])
    _assert_same_search(run / "replica-0", single(SEED + 1, 2))
    _assert_same_search(run / "replica-1", single(SEED, 2))
    assert json.loads((run / "replica-0" / "args.json").read_text())["world_size"] == 2
    _assert_consensus(run, [SEED + 1, SEED])


@pytest.mark.ranks
@pytest.mark.slow
def test_train_accepts_the_consensus_as_its_genotype(replicated, tmp_path):
    run, _ = replicated("horovodrun-gloo")
    out = tmp_path / "train"
    res = launch([python_exe(), TRAIN, "--genotype", run / "consensus.json", "--dataset", "digits",
                  "--init-channels", "8", "--layers", "3", "--workers", "0", "--no-tensorboard", "--no-progress",
                  "--batch-size", "32", "--epochs", "1", "--steps-per-epoch", "1", "--eval-steps", "1",
                  "--output-dir", out], timeout=300)
    assert res.returncode == 0, describe(res)
    resolved = json.loads((out / "args.json").read_text())["genotype_resolved"]
    assert resolved == json.loads((run / "consensus.json").read_text())["genotype"]


@pytest.mark.ranks
@pytest.mark.slow
def test_a_stopped_launch_resumes_every_replica(replicated, tmp_path):
    """Every rank stops after the first step (SIGTERM): exit 75 with one line naming both replicas, no consensus;
    --resume auto continues each replica from its checkpoint and ends equal to the uninterrupted launch."""
    full, _ = replicated("horovodrun-gloo")
    part = tmp_path / "part"
    args = [SCRIPT, *EQUIV, "--replicas", "2", "--output-dir", part]
    res = launch(horovodrun_cmd(2, [*args, "--raise-signal", "TERM@1"]), timeout=600)
    assert res.returncode != 0, describe(res)
    stops = [x for x in output_lines(res.stderr) if "stopped by a signal" in x]
    assert stops and all(x.endswith("replica(s) 0, 1 stopped by a signal, their checkpoints written; continue "
                                    "every replica with --resume auto") for x in stops), describe(res)
    assert not (part / "consensus.json").exists()
    res = launch(horovodrun_cmd(2, [*args, "--resume", "auto"]), timeout=600)
    assert res.returncode == 0, describe(res)
    for r in range(2):
        assert f"resumed from {part / f'replica-{r}' / 'checkpoint.pt'} at epoch 1 step 1" in res.stdout
        _assert_same_search(part / f"replica-{r}", full / f"replica-{r}")
    assert (json.loads((part / "consensus.json").read_text())["genotype"]
            == json.loads((full / "consensus.json").read_text())["genotype"])


@pytest.mark.parametrize("extra,env,needle", [
    (["--replicas", "2"], {}, "--replicas 2 does not divide the 1 rank(s) of this launch"),
    (["--replicas", "2", "--seeds", "1,2,3"], {}, "--seeds gives 3 seed(s) for --replicas 2"),
    (["--replicas", "2", "--seeds", "1,1"], {}, "repeats a seed"),
    (["--seeds", "1,x"], {}, "expected comma-separated integers"),
    (["--replicas", "2", "--elastic", "--output-dir", "somewhere"], {"HOROVOD_ELASTIC": "1"},
     "cannot run under Horovod Elastic"),
    (["--replicas", "2", "--resume", "some/checkpoint.pt"], {}, "use --resume auto"),
], ids=["not-dividing", "seeds-count", "seeds-repeat", "seeds-syntax", "elastic", "resume-path"])
def test_replica_refusals_are_one_line_exit_2(extra, env, needle, tmp_path):
    res = launch([python_exe(), SCRIPT, *TINY, "--epochs", "2", "--arch-start-epoch", "0", "--batch-size", "32",
                  "--output-dir", tmp_path / "run", *extra], env=env, timeout=120)
    assert res.returncode == 2, describe(res)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], describe(res)
    assert not (tmp_path / "run" / "replica-0").exists()


class _Controller:
    """Stand-in for horovod.torch: 4 ranks whose controller cannot form process sets."""

    def size(self):
        return 4

    def rank(self):
        return 0

    def add_process_set(self, ranks):
        raise ValueError("Set HOROVOD_DYNAMIC_PROCESS_SETS=1 to allow adding process sets after Horovod init")


def test_a_controller_without_process_sets_is_refused():
    from hvd_pcdarts.dist import horovod as dist
    from hvd_pcdarts.errors import UsageError

    with pytest.raises(UsageError, match=r"^--replicas 2: this launch's Horovod controller cannot form process sets"):
        dist._form_replicas(_Controller(), 2)
    with pytest.raises(UsageError, match=r"^--replicas 3 does not divide the 4 rank"):
        dist._form_replicas(_Controller(), 3)
    assert dist.replica() == (0, 1)


# --- the majority rule ------------------------------------------------------------------------------------------
def _geno(normal, reduce=None):
    return {"normal": [list(e) for e in normal], "normal_concat": [2, 3, 4, 5],
            "reduce": [list(e) for e in (reduce or normal)], "reduce_concat": [2, 3, 4, 5]}


A = [("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("skip_connect", 0), ("sep_conv_5x5", 2),
     ("dil_conv_3x3", 1), ("sep_conv_3x3", 3), ("max_pool_3x3", 0), ("avg_pool_3x3", 4)]
B = [("sep_conv_3x3", 1), ("sep_conv_5x5", 0), ("skip_connect", 0), ("sep_conv_5x5", 2),
     ("dil_conv_5x5", 2), ("sep_conv_3x3", 0), ("max_pool_3x3", 1), ("avg_pool_3x3", 3)]
C = [("dil_conv_3x3", 0), ("sep_conv_3x3", 1), ("skip_connect", 1), ("sep_conv_3x3", 2),
     ("dil_conv_3x3", 1), ("sep_conv_3x3", 0), ("avg_pool_3x3", 0), ("avg_pool_3x3", 4)]


def test_unanimous_replicas_give_their_cell_and_agreement_one():
    c = consensus([_geno(A), _geno(A), _geno(A)])
    assert c["genotype"] == _geno(A) and c["agreement"] == 1.0 and c["unanimous_edges"] == 16
    assert c["replica_agreement"] == [1.0, 1.0, 1.0] and c["edges"]["normal"] == [3] * 8


def test_split_replicas_follow_the_majority_per_input_and_operation():
    """Node 0: inputs 0 and 1 in all three; on input 0 sep_conv_3x3 (A), sep_conv_5x5 (B) and dil_conv_3x3 (C)
    tie: A's; on input 1 sep_conv_3x3 (3 votes). Node 1: input 2 (3 replicas) and 0 (A, B) beat 1 (C); on 2
    sep_conv_5x5 (A, B) beats sep_conv_3x3 (C). Node 2: inputs 1 (A, C) and 0 (B, C) tie at 2 above 3 and 2: A's
    input first. Node 3: inputs 0 and 4 (A, C) beat 1 and 3 (B); on 0 max_pool_3x3 (A) ties avg_pool_3x3 (C): A's.
    Every node's two inputs are distinct."""
    c = consensus([_geno(A), _geno(B), _geno(C)])
    assert c["genotype"]["normal"] == [["sep_conv_3x3", 0], ["sep_conv_3x3", 1], ["sep_conv_5x5", 2],
                                       ["skip_connect", 0], ["dil_conv_3x3", 1], ["sep_conv_3x3", 0],
                                       ["max_pool_3x3", 0], ["avg_pool_3x3", 4]]
    assert c["edges"]["normal"] == [1, 3, 2, 2, 2, 2, 1, 2]
    assert c["agreement"] == pytest.approx(15 / 24) and c["unanimous_edges"] == 2
    assert c["replica_agreement"] == pytest.approx([7 / 8, 4 / 8, 4 / 8])
    normal = from_dict(c["genotype"]).normal
    assert all(normal[2 * n][1] != normal[2 * n + 1][1] for n in range(4))
    votes = {(v["node"], v["input"], v["op"]): v["votes"] for v in c["votes"]["normal"]}
    assert votes[(0, 1, "sep_conv_3x3")] == 3 and votes[(0, 0, "sep_conv_5x5")] == 1


def test_ties_between_two_replicas_go_to_replica_zero():
    c = consensus([_geno(B, A), _geno(A, B)])
    assert c["genotype"]["normal"] == _geno(B)["normal"] and c["genotype"]["reduce"] == _geno(A)["reduce"]
    assert majority_cell([[list(e) for e in A], [list(e) for e in B]]) == [list(e) for e in A]
    assert c["replica_agreement"][0] == 1.0 and 0 < c["replica_agreement"][1] < 1
