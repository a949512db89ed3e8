"""Errors a user can cause (bad config, corpus, checkpoint, request).

The CLI prints these as one line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class NanoseekError(Exception):
    """Bad input from the user: reported as one clear line."""


class ConfigError(NanoseekError, ValueError):
    """A model or training config that cannot describe a valid model."""


class CheckpointError(NanoseekError):
    """A checkpoint directory that is missing, truncated or does not match its config."""
