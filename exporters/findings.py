"""What a check found, and what an export produced: small records shared by every exporter."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepspec_plugin.errors import DspecError


@dataclass
class Finding:
    """One rule applied to one export. ``source`` says where the rule comes from (the engine's
    loader file and function), so a rule can be re-checked when the engine changes."""

    rule: str
    ok: bool
    message: str
    source: str | None = None
    warning: bool = False  # a failed warning is reported but does not fail the check


@dataclass
class CheckReport:
    path: Path
    format: str  # "draft_model", "eagle3", "medusa", "mlp_speculator"
    findings: list[Finding] = field(default_factory=list)
    load: dict[str, Any] | None = None  # the real-engine load, where one ran

    @property
    def ok(self) -> bool:
        return all(f.ok or f.warning for f in self.findings)

    @property
    def failures(self) -> list[Finding]:
        return [f for f in self.findings if not f.ok and not f.warning]

    def add(self, rule: str, ok: bool, message: str, source: str | None = None,
            warning: bool = False) -> bool:
        self.findings.append(Finding(rule, bool(ok), message, source, warning))
        return bool(ok)

    def raise_if_failed(self) -> None:
        if self.failures:
            lines = "; ".join(f"{f.rule}: {f.message}" for f in self.failures)
            raise DspecError(f"{self.path} fails {len(self.failures)} {self.format} check(s): "
                             f"{lines}", "fix the draft or re-export it; `dspec export check "
                             f"{self.path}` lists every rule")


@dataclass
class ExportResult:
    out: Path
    method: str
    check: CheckReport
    notes: list[str] = field(default_factory=list)  # what the export changed or decided, said
