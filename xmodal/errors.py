"""Exceptions shared by every layer.

Each error names the file, field or value at fault and what was expected, so a user can fix
their input without reading a traceback.
"""

from __future__ import annotations

from collections.abc import Iterator


class XmodalError(Exception):
    """Base class of every error xmodal raises on purpose."""


class DataError(XmodalError):
    """A dataset file or manifest entry is missing, corrupt or inconsistent."""


class PairingError(DataError):
    """Two modalities of one sample do not line up (CRS, bounds, shape or footprint)."""


class LeakageError(DataError):
    """Train and test tiles overlap on the ground."""


class ConfigError(XmodalError):
    """A configuration file or override is invalid."""


class TrainingError(XmodalError):
    """Training cannot go on: a non-finite loss (from the data, its statistics or the settings)."""


class RunFailedError(XmodalError):
    """A training run failed after its retries (the workers' error is in the message).

    Attributes:
        permanent: The cause is an error that running again cannot fix (a bad config, bad data, a
            non-finite loss), not a lost worker or node.
    """

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


# Errors that come back on every attempt: retrying them only costs worker starts.
PERMANENT_ERRORS = (ConfigError, DataError, TrainingError)


def _wrapped(exc: BaseException) -> list[BaseException]:
    """The exceptions ``exc`` carries: Python's cause and context, and the attributes Ray's
    wrappers keep them in (a task error's ``cause``, a Train user error's ``_base_exc``, a worker
    group's ``worker_failures``). Read by attribute, so nothing here imports Ray."""
    inner: list[BaseException] = []
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict):
        inner += [failures[rank] for rank in sorted(failures)]
    for name in ("_base_exc", "cause", "__cause__", "__context__"):
        value = getattr(exc, name, None)
        if isinstance(value, BaseException) and value is not exc:
            inner.append(value)
    return inner


def _is_permanent(exc: BaseException) -> bool:
    return isinstance(exc, PERMANENT_ERRORS) or (isinstance(exc, RunFailedError) and exc.permanent)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception it carries (:func:`_wrapped`), breadth first, each once."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop(0)
        if id(current) not in seen:
            seen.add(id(current))
            yield current
            todo += _wrapped(current)


def permanent_cause(exc: BaseException) -> XmodalError | None:
    """The permanent xmodal error (:data:`PERMANENT_ERRORS`, or a permanent :class:`RunFailedError`)
    that ``exc`` is or wraps, else ``None``; the innermost one when they wrap each other (a Ray
    task error posing as the worker's ``DataError`` wraps the original)."""
    outer = next((current for current in _chain(exc) if _is_permanent(current)), None)
    if outer is None:
        return None
    seen = {id(outer)}
    inner = [e for e in _wrapped(outer) if _is_permanent(e)]
    while inner and id(inner[0]) not in seen:
        outer = inner[0]
        seen.add(id(outer))
        inner = [e for e in _wrapped(outer) if _is_permanent(e)]
    return outer  # type: ignore[return-value]


def cuda_out_of_memory(exc: BaseException) -> BaseException | None:
    """The CUDA out-of-memory error ``exc`` is or wraps (Ray Train wraps a worker's in its own
    errors), else ``None``. Running the same configuration again on the same GPU share cannot fix
    it, so runs do not retry it and sweeps record the trial as failed and go on."""
    import torch  # here only: this module is imported by everything, before torch is needed

    return next((current for current in _chain(exc) if isinstance(current, torch.OutOfMemoryError)), None)


def _own_message(exc: BaseException) -> str:
    """An exception's own message: Ray's task errors print a traceback before it, so the message
    is taken from their original exception's arguments when they hold one."""
    if exc.args and isinstance(exc.args[0], str) and "Traceback (most recent call last)" not in exc.args[0]:
        return exc.args[0]
    return str(exc)


def error_line(exc: BaseException) -> str:
    """One line saying what went wrong: a permanent xmodal error's message when ``exc`` carries one
    (that names the file, key or value), else the innermost error as ``Type: message``."""
    found = permanent_cause(exc)
    if found is not None:  # xmodal's messages are one line; Ray Data appends its retry advice on the next
        lines = [line.strip() for line in _own_message(found).splitlines() if line.strip()]
        return lines[0] if lines else type(found).__name__
    innermost = exc
    while True:
        inner = [e for e in _wrapped(innermost) if e is not innermost]
        if not inner:
            break
        innermost = inner[0]
    lines = [line.strip() for line in _own_message(innermost).splitlines() if line.strip()]
    message = next((line for line in lines if not line.startswith(("Traceback", "File ", "^"))), "") if lines else ""
    return f"{type(innermost).__name__}: {message}" if message else type(innermost).__name__
