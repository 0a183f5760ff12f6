"""The vLLM stat-logger plugin: live acceptance, baseline and drift alarm in vLLM's ``/metrics``.

Installed with the package (entry point group ``vllm.stat_logger_plugins``, name ``deepspec``), it
runs under ``vllm serve`` with no flag and no code change: vLLM's ``AsyncLLM`` builds one
``DeepSpecStatLogger`` per front-end process and calls ``record`` after every engine step. It is
off for a server without speculative decoding, and ``VLLM_PLUGINS`` can leave it out.

Configuration (environment, all optional):

* ``DSPEC_MANIFEST``: the draft's ``deepspec.json`` (or its directory). Default: the
  ``deepspec.json`` in the draft's directory (``--speculative-config '{"model": DIR}'``).
* ``DSPEC_WINDOWS``: window spans in seconds, comma-separated (default ``60,300,3600``).
* ``DSPEC_DRIFT_RELATIVE_DROP`` (default 0.2) and ``DSPEC_DRIFT_ARL0_TOKENS`` (default 1e8): the
  acceptance drop the CUSUM looks for, and the mean number of draft tokens between false alarms.

Never raises into vLLM (an exception in ``record`` would fail vLLM's output handler): every error is
counted in ``deepspec_plugin_errors_total{kind}`` and logged once per kind. vLLM marks its stats
classes unstable, so they are read with ``getattr`` and checked; tested with ``TESTED_VLLM``.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from pathlib import Path
from typing import Any

import vllm
from vllm.v1.metrics.loggers import StatLoggerBase

from deepspec_plugin.errors import DspecError
from deepspec_plugin.manifest import DraftManifest, manifest_path, read_manifest
from deepspec_plugin.serving import exposition
from deepspec_plugin.serving.drift import Cusum
from deepspec_plugin.serving.telemetry import (
    DraftInfo,
    DriftSettings,
    SpecTelemetry,
    window_label,
)
from deepspec_plugin.serving.windows import DEFAULT_SPANS

try:  # one logger for all data-parallel engines (vLLM >= 0.11); else vLLM makes one per engine
    from vllm.v1.metrics.loggers import AggregateStatLoggerBase as _Base
except ImportError:  # pragma: no cover - older vLLM
    _Base = StatLoggerBase

log = logging.getLogger("deepspec_plugin.serving")

TESTED_VLLM = ("0.32.0",)
MANIFEST_ENV = "DSPEC_MANIFEST"


class DeepSpecStatLogger(_Base):
    """Feeds vLLM's per-step speculative-decoding stats into ``SpecTelemetry``."""

    def __init__(self, vllm_config: Any, engine_indexes: list[int] | int | None = None):
        if engine_indexes is None:
            engine_indexes = [0]
        elif isinstance(engine_indexes, int):  # the per-engine signature of older vLLM
            engine_indexes = [engine_indexes]
        self.telemetry: SpecTelemetry | None = None
        if getattr(vllm_config, "speculative_config", None) is None:
            # Nothing to watch, and "tokens but no drafts" would read as a broken draft.
            log.info("deepspec plugin: off (this server has no speculative decoding)")
            return
        try:
            self.telemetry = _telemetry_for(vllm_config, engine_indexes)
            exposition.install(self.telemetry)
        except Exception as e:  # a broken plugin must not stop the server from starting
            log.warning("deepspec plugin disabled: %s", e, exc_info=True)
            self.telemetry = None
            return
        self._engine_labels = {i: str(i) for i in engine_indexes}
        version = getattr(vllm, "__version__", "?")
        if version.split("+")[0] not in TESTED_VLLM:
            log.info("deepspec plugin: tested with vLLM %s, running in %s; vLLM's stats classes "
                     "are not a stable interface: errors reading them are counted in "
                     "deepspec_plugin_errors_total{kind=\"record\"}", ", ".join(TESTED_VLLM),
                     version)
        threading.Thread(target=self._check_target, args=(vllm_config,),
                         name="deepspec-fingerprint", daemon=True).start()

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
        t = self.telemetry
        if t is None:
            return
        try:
            sd = getattr(scheduler_stats, "spec_decoding_stats", None)
            generated = getattr(iteration_stats, "num_generation_tokens", 0) or 0
            if sd is None:
                if not generated:
                    return
                drafts = draft_tokens = accepted = 0
                per_position = ()
            else:
                drafts = sd.num_drafts
                draft_tokens = sd.num_draft_tokens
                accepted = sd.num_accepted_tokens
                # Not needed for the counts: without it, all but the per-position series count.
                per_position = getattr(sd, "num_accepted_tokens_per_pos", None) or ()
            engine = self._engine_labels.get(engine_idx)
            if engine is None:
                engine = self._engine_labels[engine_idx] = str(engine_idx)
            t.observe(engine, drafts, draft_tokens, accepted, per_position, generated)
        except Exception as e:
            t.count_error("record", e)

    def log_engine_initialized(self):
        pass

    def log(self):
        pass

    def _check_target(self, vllm_config: Any) -> None:
        """Fingerprint the served target and compare it with the manifest's (in a thread: a large
        target takes seconds to hash the first time; later starts read the stat cache)."""
        t = self.telemetry
        try:
            target = _local_dir(getattr(vllm_config.model_config, "model", None),
                                getattr(vllm_config.model_config, "revision", None))
            if target is None:
                t.count_error("fingerprint", "the target is not a local directory or a cached "
                              "Hub snapshot; the fingerprint check is off")
                return
            from deepspec_plugin.models import fingerprint

            served = fingerprint(target)
            expected = t.info.manifest_target_fingerprint
            if expected and served != expected:  # logged before the metric shows it
                log.warning(
                    "deepspec: the served target %s (%s) is not the target the draft was made "
                    "for (%s): acceptance will differ from the baseline. Fix: re-export the draft "
                    "for this target (dspec export --target ...), or serve the original target.",
                    t.info.target, served, expected)
            t.info.target_fingerprint = served
        except Exception as e:
            t.count_error("fingerprint", e)


def _telemetry_for(vllm_config: Any, engine_indexes: list[int]) -> SpecTelemetry:
    model_config = vllm_config.model_config
    spec = getattr(vllm_config, "speculative_config", None)
    name = getattr(model_config, "served_model_name", None) or model_config.model
    if isinstance(name, (list, tuple)):
        name = name[0]
    draft = str(getattr(spec, "model", "") or "") if spec is not None else ""
    info = DraftInfo(
        model_name=str(name), draft=draft,
        revision=str(getattr(spec, "revision", "") or "") if spec is not None else "",
        method=str(getattr(spec, "method", "") or "") if spec is not None else "",
        k=getattr(spec, "num_speculative_tokens", None) if spec is not None else None,
        target=str(model_config.model),
    )
    errors: list[tuple[str, str]] = []
    manifest = _find_manifest(draft, errors)
    if manifest is not None:
        info.manifest_target_fingerprint = manifest.target_fingerprint
        if not info.method:
            info.method = manifest.method
    spans, drift = _settings(errors)
    telemetry = SpecTelemetry(info, manifest, engines=engine_indexes, spans=spans, drift=drift)
    for kind, message in errors:
        telemetry.count_error(kind, message)
    if manifest is not None and manifest.baseline is None:
        log.warning("deepspec: the draft manifest has no baseline: no drift alarm. Fix: export "
                    "the draft with --report (an eval report of this draft on this target).")
    return telemetry


def _find_manifest(draft: str, errors: list[tuple[str, str]]) -> DraftManifest | None:
    where = os.environ.get(MANIFEST_ENV)
    if not where and draft and (Path(draft) / "deepspec.json").is_file():
        where = draft
    if not where:
        log.warning("deepspec: no draft manifest (deepspec.json) found: no baseline, no drift "
                    "alarm, no fingerprint check. Fix: serve a draft exported by dspec export, or "
                    "set %s=/path/to/deepspec.json.", MANIFEST_ENV)
        return None
    try:
        return read_manifest(where)
    except Exception as e:
        errors.append(("manifest", f"{manifest_path(where)}: {e}"))
        return None


def _settings(errors: list[tuple[str, str]]) -> tuple[tuple[float, ...], DriftSettings]:
    spans: tuple[float, ...] = DEFAULT_SPANS
    drift = DriftSettings()
    try:
        if os.environ.get("DSPEC_WINDOWS"):
            spans = tuple(float(s) for s in os.environ["DSPEC_WINDOWS"].split(","))
            # Finite (a window of inf or nan seconds cannot be built) and distinct (two equal
            # window labels would expose every windowed gauge twice).
            if not all(0 < s < math.inf for s in spans):
                raise ValueError("spans must be positive, finite seconds")
            if len({window_label(s) for s in spans}) != len(spans):
                raise ValueError("spans must be distinct")
        if os.environ.get("DSPEC_DRIFT_RELATIVE_DROP"):
            drift.relative_drop = float(os.environ["DSPEC_DRIFT_RELATIVE_DROP"])
        if os.environ.get("DSPEC_DRIFT_ARL0_TOKENS"):
            drift.target_arl0_tokens = float(os.environ["DSPEC_DRIFT_ARL0_TOKENS"])
        Cusum(0.5, relative_drop=drift.relative_drop,  # refuses what the engines' CUSUMs would
              target_arl0_tokens=drift.target_arl0_tokens)
    except (ValueError, ArithmeticError, DspecError) as e:  # a huge ARL0 overflows h
        errors.append(("config", f"bad DSPEC_* setting ({e}); using the defaults"))
        return DEFAULT_SPANS, DriftSettings()
    return spans, drift


def _local_dir(model: str | None, revision: str | None) -> Path | None:
    """The directory of the served target: a local path, or a Hub id already in the local cache."""
    if not model:
        return None
    if Path(model).is_dir():
        return Path(model)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, revision=revision, local_files_only=True))
    except Exception:
        return None
