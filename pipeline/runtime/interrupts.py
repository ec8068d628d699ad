"""Ctrl-C and SIGTERM end a run the same way: as an exception that unwinds the stack.

Unwinding lets every layer clean up on its usual path: executors stop waiting for their Ray
tasks (`except BaseException`), the staged output keeps its finished files and records where
(`exc.staging_dir`), and `main()` shuts down the embedded cluster (which stops the tasks),
prints one line and exits with 128 + the signal number (130, 143).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread. A KeyboardInterrupt, so that everything on the stack
    (Ray's waits included, which turn any other exception raised by a signal handler into a
    SystemError) treats it as the user stopping the run, and no `except Exception` swallows it.
    Ray may re-raise it as a plain KeyboardInterrupt: `signals_unwind` remembers the signal."""

    signum = signal.SIGTERM


HANDLED = (signal.SIGINT, signal.SIGTERM)


class Received:
    """The first signal that `signals_unwind` turned into an exception (None: none yet)."""

    signum: int | None = None

    def of(self, exc: BaseException) -> int:
        """The signal behind `exc`: the one received, else what the exception says."""
        if self.signum is not None:
            return self.signum
        return int(signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)


_ACTIVE: Received | None = None  # the innermost active `signals_unwind`


def active() -> bool:
    """Whether a `signals_unwind` is in force (signals end the run as exceptions)."""
    return _ACTIVE is not None


def received_signal() -> int | None:
    """The signal an active `signals_unwind` has turned into an exception, if any: code that
    converts exceptions (Ray's start-up may turn one into SystemExit) checks it first."""
    return _ACTIVE.signum if _ACTIVE is not None else None


def reraise_if_interrupted(exc: BaseException | None = None) -> None:
    """Raise the interruption (again) if a signal arrived. Called at checkpoints, because the
    exception a handler raises can be swallowed (Python only prints exceptions raised in fork
    callbacks, `__del__`, weakref callbacks), and from an `except` that would convert it: a
    SystemExit(SIGTERM) is what Ray's own SIGTERM handler raises, our SIGTERM too."""
    if (_ACTIVE is not None and _ACTIVE.signum is None and isinstance(exc, SystemExit)
            and exc.code == signal.SIGTERM):
        _ACTIVE.signum = signal.SIGTERM
    signum = received_signal()
    if signum == signal.SIGTERM:
        raise Terminated() from None
    if signum is not None:
        raise KeyboardInterrupt from None


def exit_code(signum: int) -> int:
    return 128 + int(signum)


def describe(signum: int, exc: BaseException, resumable: bool) -> str:
    """The one line the user sees: what stopped the run and how to pick it up again."""
    what = ("terminated (SIGTERM)" if signum == signal.SIGTERM
            else "interrupted by Ctrl-C (SIGINT)")
    staging = getattr(exc, "staging_dir", None)
    if staging:
        return (f"{what}: finished files are kept in {staging}; run the same command with "
                f"--resume to reuse them")
    if resumable:
        return (f"{what} before any output file was written; run the same command with "
                f"--resume to carry on")
    return f"{what}; run the same command again to start over"


def kept_note(exc: BaseException, prefix: str = "") -> str:
    """Where a run that stopped on an error kept its finished files ("" if it kept none)."""
    staging = getattr(exc, "staging_dir", None)
    return (f"{prefix}finished files are kept in {staging}: run the same command with "
            f"--resume to reuse them") if staging else ""


@contextlib.contextmanager
def signals_unwind() -> Iterator[Received]:
    """While active (main thread only): the first SIGINT raises KeyboardInterrupt, the first
    SIGTERM raises `Terminated`; later ones are ignored, so the cleanup they started (cancelling
    Ray tasks, shutting the cluster down) is not itself interrupted. A signal that was ignored
    when we started (`nohup`, a background job) stays ignored. Where Python swallows that
    exception (it only reports exceptions raised in fork callbacks, `__del__`...), the report
    is dropped: `reraise_if_interrupted` raises it again at the next checkpoint."""
    global _ACTIVE
    received = Received()
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, frame):
        if received.signum is not None:
            return  # already unwinding
        received.signum = signum
        if signum == signal.SIGTERM:
            raise Terminated()
        raise KeyboardInterrupt

    def unraisable(report):
        if received.signum is not None and isinstance(report.exc_value, KeyboardInterrupt):
            return  # ours: raised again at the next checkpoint
        hook_before(report)

    hook_before, sys.unraisablehook = sys.unraisablehook, unraisable
    previous = {}
    for signum in HANDLED:
        current = signal.getsignal(signum)
        if current is signal.SIG_IGN:
            continue
        previous[signum] = current
        signal.signal(signum, handler)
    outer, _ACTIVE = _ACTIVE, received
    try:
        yield received
    finally:
        _ACTIVE = outer
        sys.unraisablehook = hook_before
        for signum, handler_before in previous.items():
            signal.signal(signum, handler_before if handler_before is not None
                          else signal.SIG_DFL)
