"""Errors a user can act on. The CLI prints their message alone, without a traceback."""


class LlamaCoreError(Exception):
    """Base class for errors caused by input, configuration or environment, not by a bug.

    `retryable` says whether running the same stage again could succeed (a network that was down);
    a deterministic error (bad input, a wrong setting) is not, so orchestrators fail it at once.
    """

    retryable = False


class InputError(LlamaCoreError, ValueError):
    """Bad input data. The message names the file, record and field (or tensor) at fault."""


class ConfigError(LlamaCoreError, ValueError):
    """A configuration value that cannot work (wrong type, inconsistent shapes, unknown key)."""


class DiskFullError(LlamaCoreError):
    """A write ran out of disk space or quota (ENOSPC, EDQUOT). The message names the stage, the path
    and the free space; nothing partial is left under a final name, so running the stage again once
    space is freed resumes it. Not retryable: a retry finds the disk as full as it was."""
