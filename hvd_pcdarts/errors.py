"""Errors that the command-line tools turn into one line on stderr and exit status 2."""


class UsageError(Exception):
    """Bad user input (flags, files, data): reported as one line, exit status 2, no traceback."""


class GenotypeError(UsageError, ValueError):
    """A genotype spec that cannot be loaded; the message says what is wrong and where."""


class ConsistencyError(RuntimeError):
    """Ranks disagree about state that must be identical everywhere."""
