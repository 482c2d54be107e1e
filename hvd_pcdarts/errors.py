"""Errors that the command-line tools turn into one line on stderr and an exit status (cli.run_main)."""


class UsageError(Exception):
    """Bad user input (flags, files, data): reported as one line, exit status 2, no traceback."""


class GenotypeError(UsageError, ValueError):
    """A genotype spec that cannot be loaded; the message says what is wrong and where."""


class ConsistencyError(RuntimeError):
    """Ranks disagree about state that must be identical everywhere."""


class OutputWriteError(RuntimeError):
    """A run's outputs could not be written (disk full, quota, a vanished folder): one line, exit status 1; the
    previous checkpoint is kept."""


class DivergenceError(RuntimeError):
    """A loss or the parameters became non-finite (the same verdict on every rank): one line, exit status 3; the
    last checkpoint and genotype stay as they were."""


class Preempted(RuntimeError):
    """SIGTERM or SIGUSR1 stopped the run after a step, its checkpoint written (the same on every rank): one line,
    exit status 75 for the job script to requeue; `--resume auto` continues at that step."""
