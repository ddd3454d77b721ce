"""Errors a user can fix: the CLI prints them without a traceback and exits with code 2."""


class UserError(Exception):
    """Bad input (config, data, checkpoint path): the message says what and how to fix it."""


class ConfigError(UserError):
    """A config key, type or value is invalid."""


class DataError(UserError):
    """A corpus, file or prepared dataset is missing or malformed."""


class CheckpointError(UserError):
    """A checkpoint is missing, incomplete or does not match the run."""


class TrainingDiverged(UserError):
    """The loss or gradient norm became NaN, Inf or spiked and `training.on_nonfinite` is abort
    (or rolling back could not help): the message names the step and the ranks."""


class ExportError(UserError):
    """An export cannot start: unknown format, or an output folder that is not empty."""
