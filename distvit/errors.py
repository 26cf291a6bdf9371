"""Errors a user can act on.

Every exception derived from `DistvitError` carries a message that says what is wrong, where (file or
config key) and how to fix it. Entry points print that message without a traceback and exit with
`EXIT_USER_ERROR`; anything else is a bug and keeps its traceback.
"""

EXIT_USER_ERROR = 2


class DistvitError(Exception):
    """Base class for errors caused by input (config, files, data), not by a bug."""

    exit_code = EXIT_USER_ERROR


class ConfigError(DistvitError):
    """The configuration is invalid: unknown key, wrong type, impossible value."""


class DataError(DistvitError):
    """A dataset on disk is missing, incomplete or inconsistent with its manifest."""


class CheckpointError(DistvitError):
    """A checkpoint is missing, incomplete or does not fit the model."""


class RunFinished(DistvitError):
    """Resuming a run that already finished: nothing to do (exit status 0, the run directory untouched)."""


EXIT_PEER_FAILURE = 4


class PeerFailure(DistvitError):
    """Another rank died or hangs: a collective failed or timed out (train.timeout_s)."""

    exit_code = EXIT_PEER_FAILURE
