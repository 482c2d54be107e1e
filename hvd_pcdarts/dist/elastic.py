"""Horovod Elastic and the run state: the `--elastic` flags, the state a normal run advances (`LocalState`), the
per-rank batch after a resize, and the checks an elastic run makes without collectives (a worker that joins later
would meet a collective alone). The loop that uses them: `loop.RunLoop`."""

from __future__ import annotations

from . import horovod as dist
from ..errors import UsageError
from ..runtime import writable_error


class LocalState:
    """Stand-in for the elastic state in a normal run: the same counters as attributes, nothing to commit."""

    def __init__(self, **counters):
        self.__dict__.update(counters)

    def commit(self) -> None:
        pass


def add_elastic_args(parser) -> None:
    from ..cli import positive_int

    parser.add_argument("--elastic", action="store_true",
                        help="Horovod Elastic: survive lost workers and take in new ones (launch with horovodrun "
                             "--min-np/--max-np --host-discovery-script; needs --output-dir on a shared file system)")
    parser.add_argument("--commit-interval", type=positive_int, default=20,
                        help="elastic: commit the state to host memory every N steps (and at each epoch end); "
                             "a lost worker costs at most N steps")


def check_elastic_args(args) -> None:
    launched = dist.elastic_enabled()
    if args.elastic and not launched:
        raise UsageError("--elastic needs an elastic launch: horovodrun -np N --min-np M --max-np X "
                         "--host-discovery-script hostfiles/discover_hosts.sh python ... --elastic")
    if launched and not args.elastic:
        raise UsageError("this job was launched in Horovod elastic mode (--min-np/--max-np/--host-discovery-script) "
                         "but --elastic is not set: add --elastic, or launch with -np/-H only")
    if args.elastic and args.output_dir is None:
        raise UsageError("--elastic needs --output-dir (every worker, also one that joins later, must find the "
                         "same run folder)")


def per_rank_batch(global_batch: int, world: int, strict: bool = False) -> tuple[int, str | None]:
    """(per-rank batch, warning or None) for a global batch over `world` ranks. `strict` (the start of a run):
    the global batch must divide evenly; after an elastic resize a remainder is dropped, with a warning."""
    if global_batch < world:
        raise UsageError(f"--batch-size {global_batch} is smaller than the number of ranks ({world}): every rank "
                         f"needs at least one sample; use a batch of at least {world}")
    if global_batch % world == 0:
        return global_batch // world, None
    if strict:
        raise UsageError(f"--batch-size {global_batch} does not divide by the {world} ranks: use a multiple of "
                         f"{world}")
    lb = global_batch // world
    return lb, (f"global batch {global_batch} does not divide by {world} ranks: using {lb} per rank "
                f"(global {lb * world}) until the world changes again")


def local_checks_only() -> dict:
    """load_dataset arguments for an elastic run: no barrier/agreement collectives before the elastic loop (a
    worker that joins later would meet them alone and hang)."""
    return dict(is_local_root=True, barrier=lambda: None, agree=lambda ok: ok)


def check_writable_locally(out_dir: str) -> None:
    """check_writable without a collective (elastic): every rank proves it could write the run folder, since
    any of them may become rank 0."""
    err = writable_error(out_dir)
    if err:
        raise UsageError(err)
