"""Error types that separate the user's mistakes from our failures.

The CLI maps `InputError` to exit code 2 with a one-line message, because a bad path or a
mismatched checkpoint is something the user fixes, not a crash to debug. Ray retries never
re-run an `InputError`: retrying cannot fix the input.
"""

from __future__ import annotations


def one_line(exc: BaseException) -> str:
    """An exception's message as one line (at most 300 characters, its type when empty): what
    a one-line error quotes from a library (pyarrow, transformers, PIL spread theirs over
    lines)."""
    text = " ".join(str(exc).split())
    return (text[:300] + "...") if len(text) > 300 else (text or type(exc).__name__)


class PipelineError(Exception):
    """Base class for every error this package raises on purpose."""


class InputError(PipelineError):
    """The inputs or options are wrong: missing file, mismatched keys, NaN, bad parameter."""


class CorruptFileError(InputError):
    """A checkpoint file is truncated or its header lies about its contents."""


class OutputConflictError(InputError):
    """The destination changed under a run (another output appeared at `--out`): the run's
    finished files are kept in its staging directory, so `--resume` can commit them."""


class StorageError(InputError, OSError):
    """A store (s3://, gs://, ...) could not be reached or refused the request: its endpoint,
    credentials or network are the user's to fix, so one line and exit 2; and still an OSError
    to code that keeps its staging or retries when storage fails."""


class OutputError(PipelineError):
    """Writing the output failed (full disk, permissions); nothing was left at the destination."""


class UnverifiedOutputError(OutputError):
    """A written file is missing or differs from what its writer reported: never committed."""


class TransientError(PipelineError):
    """A failure worth retrying (flaky storage, an injected fault in tests)."""
