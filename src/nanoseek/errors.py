"""Errors a user can cause (bad config, corpus, checkpoint, request).

The CLI prints these as one line and exits non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import resource
import shutil
from pathlib import Path


class NanoseekError(Exception):
    """Bad input from the user: reported as one clear line."""


class ConfigError(NanoseekError, ValueError):
    """A model or training config that cannot describe a valid model."""


class CheckpointError(NanoseekError):
    """A checkpoint directory that is missing, truncated or does not match its config."""


class RunInterrupted(Exception):
    """A run asked to stop (SIGTERM, Ctrl-C) that finished its step and wrote a checkpoint: not a failure, but not
    done either. The CLI prints the message (how to resume) and exits with EXIT_INTERRUPTED."""


EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: try again later, i.e. resume
EXIT_ABORTED = 130  # a second Ctrl-C: stopped at once, nothing written (the shell's code for SIGINT)


def first_line(e: BaseException) -> str:
    """What went wrong, in a few words: an OSError's reason and file, or the first line of the message (DCP wraps
    each failed rank's error as an (exception, traceback) pair)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        failure = next(iter(failures.values()))
        return first_line(failure[0] if isinstance(failure, tuple) else failure)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror + (f" ({e.filename})" if e.filename else "")
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def describe_write_failure(directory: Path, error: BaseException | None) -> str:
    """The likely reason a write under `directory` failed. torch's and safetensors' writers report a refused write
    as a bare 'unexpected pos' or I/O error, so a full disk or a file-size limit (ulimit -f) is looked for first."""
    free = shutil.disk_usage(directory).free
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if free < 64 << 20:
        return f"No space left on device ({free / 2**20:.1f} MiB free)"
    if limit != resource.RLIM_INFINITY:
        return f"File too large (the file-size limit, ulimit -f, is {limit:,} bytes)"
    return first_line(error) if error is not None else "another process failed to write its part"
