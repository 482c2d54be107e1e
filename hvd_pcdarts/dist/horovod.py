"""Everything Horovod: the ONLY module of the package that imports horovod.

Training loops call these helpers so that they stay importable and testable without MPI: a plain `python`
process is a size-1 Horovod job.

Replicas (`train_search.py --replicas R`): the W ranks form R groups of W/R consecutive ranks, each a Horovod
process set running a search of its own. After `init(replicas=R)` every collective below runs inside this rank's
group, and rank()/size()/is_root() are those within it; `whole_job()` runs collectives over all W ranks.
"""

from __future__ import annotations

import contextlib
import os
import zlib

import torch
import torch.nn as nn

from ..errors import ConsistencyError, UsageError

_INSTALL_HINT = ("Horovod is not installed (or does not import) in this environment: run `make setup` or "
                 "`PYTHON=.venv/bin/python scripts/install_horovod.sh` (it patches Horovod 0.28.1 to build "
                 "against torch 2.14)")


def _hvd():
    try:
        import horovod.torch as hvd
    except Exception as e:  # ImportError, or a broken build's OSError/undefined symbol
        first = str(e).splitlines()[0] if str(e) else ""
        raise SystemExit(f"error: {_INSTALL_HINT} [{type(e).__name__}: {first}]") from None
    return hvd


def hvd():
    """The horovod.torch module (one clear line and exit 1 if Horovod is missing)."""
    return _hvd()


CPU_CYCLE_TIME_MS = 20


def init(cpu_tuning: bool = False, replicas: int = 1) -> None:
    # Synchronized batch norm issues two named allreduces per BN layer and step (well over a thousand in the
    # search supernet): give Horovod's response cache room for all of them, unless the user chose a size.
    os.environ.setdefault("HOROVOD_CACHE_CAPACITY", "16384")
    cpu_only = not torch.cuda.is_available()
    if cpu_tuning and cpu_only:
        # CPU-only machine: Horovod's background loop, waking every millisecond by default, takes CPU from the
        # compute threads; a 20 ms cycle raised 2-rank loopback scaling from 0.65 to 0.80-0.89 (benchmarks/RESULTS.md,
        # "Horovod cycle time"). Callers pass cpu_tuning=False with synchronized BN, whose per-layer allreduces run
        # one after another and would each wait up to a cycle. The environment's value wins.
        os.environ.setdefault("HOROVOD_CYCLE_TIME", str(CPU_CYCLE_TIME_MS))
    if cpu_only:
        # Open MPI (horovodrun --mpi, mpirun) busy-polls while a rank waits in a collective unless it was told the
        # node is oversubscribed: ranks spin on the cores their own and their peers' compute threads need. With
        # yielding, a 2-rank --sync-bn search under --mpi beside one busy process took 56 s instead of 219 s
        # (benchmarks/RESULTS.md, "Open MPI yield-when-idle"); yielding costs a waiting rank a
        # system call per poll, not a cycle's wait, so synchronized BN gets it too. Read by MPI_Init, i.e. by
        # hvd.init() below; the environment's value wins; Gloo runs ignore it.
        os.environ.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
    h = _hvd()
    if not h.is_initialized():
        # process sets formed after init (once the number of ranks is known) need Horovod's dynamic mode
        h.init(process_sets="dynamic" if replicas > 1 else None)
    _install_lost_peer_hook()
    if replicas > 1 and _group["set"] is None:
        _form_replicas(h, replicas)


def _install_lost_peer_hook() -> None:
    """Make an uncaught HorovodInternalError (a collective failed or timed out: a rank died or the network between
    the nodes broke) one clear line on stderr and exit status 1, and leave at once: Horovod's shutdown at exit
    could wait for peers that are gone. Elastic runs catch these errors themselves and never get here."""
    import sys

    prev = sys.excepthook
    if getattr(prev, "_hvd_pcdarts", False):
        return

    def hook(etype, value, tb):
        try:
            from horovod.common.exceptions import HorovodInternalError
        except Exception:  # pragma: no cover - Horovod imported fine in init()
            HorovodInternalError = None
        if HorovodInternalError is None or not issubclass(etype, HorovodInternalError):
            return prev(etype, value, tb)
        import socket

        rank = next((os.environ[v] for v in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
                     if os.environ.get(v, "").isdigit()), "?")
        sys.stdout.flush()
        sys.stderr.write(f"{os.path.basename(sys.argv[0])}: error: rank {rank} on host {socket.gethostname()} lost "
                         f"contact with the other ranks: a rank died or the network between the nodes failed "
                         f"(Horovod's own error is above). Stopped; the last checkpoint written is intact "
                         f"(search/retraining: rerun with --resume auto to continue from it)\n")
        sys.stderr.flush()
        os._exit(1)

    hook._hvd_pcdarts = True
    sys.excepthook = hook


# this rank's replica: its index, the number of replicas, its process set (None: the whole job) and this rank's
# rank and the size within it
_group = dict(index=0, count=1, set=None, rank=0, size=1)
_whole_job = [False]


def _form_replicas(h, count: int) -> None:
    """Split the W ranks into `count` process sets of W/count consecutive ranks; this rank joins its own.
    Every rank creates every set, in the same order (Horovod's add_process_set is collective)."""
    world = h.size()
    if world % count:
        raise UsageError(f"--replicas {count} does not divide the {world} rank(s) of this launch: launch a "
                         f"multiple of {count} ranks, the same number for every replica")
    per = world // count
    try:
        sets = [h.add_process_set(list(range(r * per, (r + 1) * per))) for r in range(count)]
    except (ValueError, NotImplementedError, RuntimeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"--replicas {count}: this launch's Horovod controller cannot form process sets "
                         f"({first}); launch with horovodrun --gloo, horovodrun --mpi, mpirun or srun") from None
    index = h.rank() // per
    _group.update(index=index, count=count, set=sets[index], rank=h.rank() - index * per, size=per)


def replica() -> tuple[int, int]:
    """(this rank's replica, the number of replicas); (0, 1) without --replicas."""
    return _group["index"], _group["count"]


def replica_root() -> bool:
    """Whether this rank is the first of its replica (of the job without replicas), also within whole_job()."""
    return _group["rank"] == 0 if _group["set"] is not None else _hvd().rank() == 0


def global_rank() -> int:
    """This rank among all the ranks of the job (rank() is the one within its replica)."""
    return _hvd().rank()


@contextlib.contextmanager
def whole_job():
    """Within: the collectives, rank(), size() and is_root() are those of all the job's ranks, every replica's."""
    prev, _whole_job[0] = _whole_job[0], True
    try:
        yield
    finally:
        _whole_job[0] = prev


def job_wide(fn):
    """`fn` run within whole_job()."""
    def wrapped(*args, **kwargs):
        with whole_job():
            return fn(*args, **kwargs)
    return wrapped


def _scoped() -> bool:
    return _group["set"] is not None and not _whole_job[0]


def _pset():
    """The process set of the collectives: this rank's replica, or the whole job."""
    return _group["set"] if _scoped() else _hvd().global_process_set


def _root(root_rank: int) -> int:
    """Horovod names a broadcast's root by its rank in the whole job: that of `root_rank` within the set."""
    return _group["set"].ranks[root_rank] if _scoped() else root_rank


def rank() -> int:
    return _group["rank"] if _scoped() else _hvd().rank()


def size() -> int:
    return _group["size"] if _scoped() else _hvd().size()


def local_rank() -> int:
    return _hvd().local_rank()


def local_size() -> int:
    return _hvd().local_size()


def is_root() -> bool:
    return rank() == 0


def setup_device(want_gpu: bool | None = None) -> torch.device:
    """One process per GPU, pinned by local rank; the CPU where no GPU is visible."""
    if torch.cuda.is_available() and want_gpu is not False:
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    # several ranks share a CPU machine: give each its share of the cores
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_size())))
    return torch.device("cpu")


# --- collectives --------------------------------------------------------------------------------------------
def allreduce(t: torch.Tensor, name: str | None = None, average: bool = True) -> torch.Tensor:
    h = _hvd()
    return h.allreduce(t, name=name, op=h.Average if average else h.Sum, process_set=_pset())


def allreduce_sum(t: torch.Tensor, name: str | None = None) -> torch.Tensor:
    """Differentiable Sum-allreduce (its backward allreduces the gradient)."""
    h = _hvd()
    return h.allreduce(t, name=name, op=h.Sum, process_set=_pset())


def grouped_average(tensors: list[torch.Tensor], name: str) -> list[torch.Tensor]:
    h = _hvd()
    if size() == 1:
        return list(tensors)
    return h.grouped_allreduce(list(tensors), name=name, op=h.Average, process_set=_pset())


def allgather_object(obj, name: str | None = None) -> list:
    """Every rank's `obj`, in rank order (hvd.allgather_object, within the process set of the collectives)."""
    import io

    import cloudpickle

    h = _hvd()
    name = name or type(obj).__name__
    buf = io.BytesIO()
    cloudpickle.dump(obj, buf)
    t = torch.ByteTensor(bytearray(buf.getvalue()))
    sizes = h.allgather(torch.IntTensor([t.shape[0]]), name=name + ".sz", process_set=_pset()).tolist()
    data = h.allgather(t, name=name + ".t", process_set=_pset()).numpy().tobytes()
    offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    return [cloudpickle.loads(data[offsets[i]:offsets[i + 1]]) for i in range(len(sizes))]


def broadcast_object(obj, root_rank: int = 0, name: str | None = None):
    h = _hvd()
    if size() == 1:
        return obj
    return h.broadcast_object(obj, root_rank=_root(root_rank), name=name, process_set=_pset())


def broadcast_parameters(module: nn.Module, root_rank: int = 0) -> None:
    """Parameters and buffers (weights, alphas, betas, BN statistics) from root to every rank (what
    hvd.broadcast_parameters does, within the process set of the collectives)."""
    h = _hvd()
    if size() == 1:
        return
    handles = [h.broadcast_async_(p, _root(root_rank), name, process_set=_pset())
               for name, p in sorted(module.state_dict().items())]
    for handle in handles:
        h.synchronize(handle)


def broadcast_optimizer(optimizer: torch.optim.Optimizer, root_rank: int = 0, name: str = "opt") -> None:
    """Broadcast an optimizer's whole state_dict from root.

    Deliberately not `hvd.broadcast_optimizer_state`: for a fresh optimizer that one runs a real step with zero
    gradients, which with weight decay changes the weights and the momentum buffers - a one-rank run would then
    differ from the published recipe.
    """
    if size() == 1:
        return
    optimizer.load_state_dict(broadcast_object(optimizer.state_dict(), root_rank, name=f"bcast.{name}"))


def average_buffers(module: nn.Module, name: str = "bn_stats") -> None:
    """Average the floating-point buffers (BN running statistics) over ranks, in place.

    Without synchronized BN every rank accumulates statistics of its own shards; averaging them before an
    evaluation makes every rank (and the checkpoint, written by rank 0) hold the same network."""
    h = _hvd()
    if size() == 1:
        return
    bufs = [b for b in module.buffers() if b.is_floating_point()]
    if not bufs:
        return
    out = h.grouped_allreduce(bufs, name=name, op=h.Average, process_set=_pset())
    with torch.no_grad():
        for b, o in zip(bufs, out):
            b.copy_(o)


def barrier() -> None:
    h = _hvd()
    if size() > 1:
        h.allreduce(torch.zeros(1), name="barrier", op=h.Sum, process_set=_pset())


def distributed_optimizer(optimizer, named_parameters, fp16_allreduce: bool = False):
    h = _hvd()
    compression = h.Compression.fp16 if fp16_allreduce else h.Compression.none
    return h.DistributedOptimizer(optimizer, named_parameters=named_parameters, compression=compression,
                                  process_set=_pset())


def sum_metrics(values: list[float], name: str) -> list[float]:
    """Sum a few float64 scalars over ranks (loss sums, correct counts, sample counts)."""
    t = torch.tensor(values, dtype=torch.float64)
    if size() > 1:
        t = allreduce_sum(t, name=name)
    return t.tolist()


# --- consistency ---------------------------------------------------------------------------------------------
def tensors_checksum(tensors) -> int:
    """CRC32 over the raw bytes of the tensors, in order: equal iff the ranks hold bit-identical values."""
    crc = 0
    for t in tensors:
        crc = zlib.crc32(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes(), crc)
    return crc


def check_consistency(named_tensors: dict[str, list[torch.Tensor]], where: str) -> dict[str, int]:
    """Every rank computes a checksum per group; any disagreement stops every rank with a clear error."""
    local = {k: tensors_checksum(v) for k, v in named_tensors.items()}
    if size() == 1:
        return local
    everyone = allgather_object(local)
    bad = [k for k in local if len({d[k] for d in everyone}) != 1]
    if bad:
        detail = "; ".join(f"{k}: " + ", ".join(f"rank {r}={d[k]:08x}" for r, d in enumerate(everyone)) for k in bad)
        raise ConsistencyError(f"ranks disagree on {', '.join(bad)} at {where} ({detail}): the replicas have "
                               f"diverged, stopping every rank")
    return local


# --- elastic (Horovod Elastic: workers may leave or join; the job goes on from the last commit) ---------------
def elastic_enabled() -> bool:
    """True inside a job launched by `horovodrun --min-np/--max-np/--host-discovery-script` (elastic mode)."""
    return os.environ.get("HOROVOD_ELASTIC") == "1"


def elastic_state(stateful: dict, **counters):
    """An `hvd.elastic` state holding everything a run needs to continue after a reset.

    `stateful` maps names to objects with state_dict()/load_state_dict() (the model - whose parameters include
    the alphas and betas, so they roll back with the weights -, both optimizers, a grad scaler); `counters` are
    plain values (epoch, step, sample positions, metric sums) exposed as attributes of the state.
    commit() keeps a deep copy in host memory; restore() goes back to it after a failed collective; sync()
    makes every rank equal to rank 0 after a reset. Optimizer states are broadcast as whole state_dicts (never
    `hvd.broadcast_optimizer_state`, which steps a fresh optimizer with zero gradients and so applies weight
    decay once).

    Over 60 lines because the state class is defined in here: its base class comes from
    `horovod.common.elastic`, imported only when an elastic run asks for a state (no horovod import at load).
    """
    import copy

    from horovod.common.elastic import State

    h = _hvd()

    class _ElasticState(State):
        def __init__(self):
            self._synced = False
            super().__init__(bcast_object=lambda obj: broadcast_object(obj, name="elastic.host_updates"),
                             get_rank=h.rank)
            self._stateful = dict(stateful)
            self._counter_names = list(counters)
            for k, v in counters.items():
                setattr(self, k, v)
            self.save()

        def save(self):
            self._saved = {k: copy.deepcopy(o.state_dict()) for k, o in self._stateful.items()}
            self._saved_counters = copy.deepcopy({k: getattr(self, k) for k in self._counter_names})

        def restore(self):
            for k, o in self._stateful.items():
                o.load_state_dict(copy.deepcopy(self._saved[k]))
            for k, v in copy.deepcopy(self._saved_counters).items():
                setattr(self, k, v)

        def on_reset(self):
            self._synced = False
            super().on_reset()

        def ensure_synced(self):
            """sync() unless it ran since the last reset. Horovod skips the sync after a reset whose host update
            was a removal only (the survivors agree), but a worker that joins in the same re-formed ring always
            syncs first: with a removal seen at one commit and the addition arriving before the rendezvous, the
            survivors went on to the next collective while the new worker waited in its broadcasts (a hang seen
            in test_elastic). Survivors all skip or all sync (Horovod broadcasts the update from rank 0), so
            calling this first thing after every reset keeps every rank's collectives in step."""
            if not self._synced:
                self.sync()

        def sync(self):
            self._synced = True
            for k, o in self._stateful.items():
                if isinstance(o, nn.Module):
                    broadcast_parameters(o, 0)
                elif isinstance(o, torch.optim.Optimizer):
                    broadcast_optimizer(o, 0, name=f"elastic.{k}")
                else:
                    o.load_state_dict(broadcast_object(o.state_dict(), name=f"elastic.{k}"))
            for k, v in broadcast_object({k: getattr(self, k) for k in self._counter_names},
                                         name="elastic.counters").items():
                setattr(self, k, v)
            self.save()

    return _ElasticState()


def elastic_run(fn):
    """`hvd.elastic.run`: call fn(state) after a sync; on a lost worker restore the last commit, re-form the
    ring with the survivors (reset callbacks run), sync and call fn again."""
    return _hvd().elastic.run(fn)
