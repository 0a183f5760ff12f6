"""vLLM's own reason for a failed start or run, in one line, and the error that carries it.

When vLLM cannot run a model, the process that called it sees only a wrapper
(``EngineDeadError: EngineCore encountered an issue. See stack trace (above) for the root cause``,
or ``Engine core initialization failed. See root cause above``); the cause is an exception line
that vLLM's engine-core or model worker process logged before it died, e.g.::

    (Worker pid=6012) ERROR 12-01 20:23:15 [multiproc_executor.py:1063] RuntimeError: Unsupported
    CPU attention configuration: head_dim=16 isa=2 kv_cache_idx=0

:func:`failure_reason` finds it: the first message of the exception chain that is not such a
wrapper, else the first such exception line in the worker's log.
"""

from __future__ import annotations

import re

from deepspec_plugin.errors import DspecError

ENGINE_FIX = ("use a target and draft this vLLM build supports, or another engine "
              "(--engine reference)")
MAX_REASON_CHARS = 400

# "(Worker pid=6012) " and "ERROR 12-01 20:23:15 [multiproc_executor.py:1063] ": vLLM's prefixes.
_PROCESS_PREFIX = re.compile(r"^\([\w ]+ pid=\d+\)\s*")
_LOG_PREFIX = re.compile(r"^(?:DEBUG|INFO|WARNING|ERROR|CRITICAL)\s+\d\d-\d\d \d\d:\d\d:\d\d"
                         r"(?:\.\d+)? \[[^\]]*\]\s?")
_EXCEPTION_LINE = re.compile(r"^((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit)): (.+)$")
# Messages that only point elsewhere for the cause.
_WRAPPERS = re.compile(r"see (?:the )?(?:stack trace|root cause)|check the stack trace|"
                       r"engine core initiali[sz]ation failed|EngineCore encountered|"
                       r"^the vLLM worker", re.IGNORECASE)
_WRAPPER_TYPES = ("EngineDeadError", "EngineGenerateError")


class VLLMEngineError(DspecError):
    """vLLM could not start or run the models, in one line: ``vLLM {what} {context}: {reason}``
    (``what``: failed, ran past N s, exited with status N; ``reason``: vLLM's own words)."""

    def __init__(self, what: str, reason: str, context: str, fix: str = ENGINE_FIX):
        self.what, self.reason, self.context = what, reason, context
        super().__init__(f"vLLM {what} {context}: {reason}", fix)

    def replaced(self, *, context: str | None = None, fix: str | None = None) -> VLLMEngineError:
        """The same failure told in the caller's terms (what it was running, the fix it has)."""
        return VLLMEngineError(self.what, self.reason, context or self.context, fix or self.fix)


def one_line(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """``text`` with its whitespace (newlines too) collapsed, cut at ``limit`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_wrapper(type_name: str, message: str) -> bool:
    return type_name.rsplit(".", 1)[-1] in _WRAPPER_TYPES or bool(_WRAPPERS.search(message))


def chain_reason(exc: BaseException) -> str | None:
    """The first message in ``exc``'s chain that is not a wrapper (followed as a traceback
    prints it: the cause, else the context unless ``from None`` suppressed it)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        message = str(exc).strip()
        if message and not _is_wrapper(type(exc).__name__, message):
            return one_line(message)
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return None


def log_reason(log: str) -> str | None:
    """The first exception line in vLLM's log that is not a wrapper (the root cause comes first:
    the dying process logs it before the others report that it died)."""
    for raw in log.splitlines():
        line = _LOG_PREFIX.sub("", _PROCESS_PREFIX.sub("", raw.strip())).strip()
        m = _EXCEPTION_LINE.match(line)
        if m and not _is_wrapper(m.group(1), m.group(2)):
            return one_line(m.group(2))
    return None


def log_tail(log: str, lines: int = 3) -> str:
    """The last non-empty lines of the log, on one line."""
    kept = [line.strip() for line in log.splitlines() if line.strip()][-lines:]
    return "last lines of its log: " + (" | ".join(one_line(x, 200) for x in kept) or "(empty)")


def failure_reason(log: str, worker_reason: str | None = None) -> str:
    """vLLM's reason for a failure: the worker's exception where it says more than a wrapper,
    else the root cause in the log, else the log's last lines."""
    return worker_reason or log_reason(log) or log_tail(log)
