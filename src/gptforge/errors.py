"""Errors a user can cause. The CLI prints the message as one line and exits 2."""


class GPTForgeError(Exception):
    """Base class: a user mistake (bad file, bad column, bad config) with a message naming the fix."""


class ConfigError(GPTForgeError):
    """A configuration value is invalid or cannot be represented."""


class ConversionError(GPTForgeError):
    """A checkpoint cannot be converted exactly (unsupported setting, unexpected or missing tensor)."""


class DataError(GPTForgeError):
    """A data file, row, column or split is unusable."""


class CheckpointError(GPTForgeError):
    """A checkpoint directory is missing, incomplete or inconsistent."""


class TrainingError(GPTForgeError):
    """Training cannot go on (a non-finite loss, a checkpoint that does not fit the run)."""
