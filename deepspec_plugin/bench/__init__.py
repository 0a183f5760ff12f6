"""The evaluation harness: run a bench (``spec``) of prompts (``prompts``) through an engine
(``engines``) by a fixed protocol (``run``), with bootstrap intervals (``stats``), into a report
(``report``: json, md, png) that two runs can be compared by (``compare``).

``evaluate`` is re-exported here and imported on first use, so importing ``deepspec_plugin.bench``
(as every engine module does) stays cheap.
"""

from __future__ import annotations

__all__ = ["evaluate"]


def __getattr__(name: str):
    if name == "evaluate":
        from deepspec_plugin.bench.run import evaluate

        return evaluate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
