"""`dspec export vllm`: a draft into a directory vLLM loads as its speculative model.

Three methods:

* ``draft_model``: a standalone draft LM. The output is self-contained: safetensors weights
  (streamed tensor by tensor from the draft's files), its config with the target's vocabulary
  size, and the *target's* tokenizer files (vLLM drafts with the target's tokenizer). Where draft
  and target differ only by padding rows of the vocabulary, the embedding and head are padded (or
  cut back to unused rows) to the target's size, and the export says so. Where the tokenizers
  truly differ the export is refused, naming the first differing tokens.
* ``medusa``: Medusa heads (``dspec train --draft-type medusa``, TGI's layout) renamed into
  vLLM 0.32's ``MedusaModel`` (:mod:`deepspec_plugin.exporters.medusa_vllm`; vLLM 0.33 removed
  Medusa, and 0.32 cannot run the MLP speculator, whose export is refused for TGI's);
* ``eagle3``: an EAGLE-3 head in DeepSpec's layout, converted by
  :mod:`deepspec_plugin.exporters.eagle3`, or one of the project's own heads (already vLLM's
  layout: ``dspec train --draft-type eagle3``), checked and copied by
  :mod:`deepspec_plugin.exporters.eagle3_own`. Beside vLLM's layout the same head is written in
  the speculators format (``speculators/``, :mod:`deepspec_plugin.exporters.speculators`).

Beside the weights: ``deepspec.json`` (the draft manifest: the target's and tokenizer's
fingerprints, method, k, the baseline acceptance from ``--report``, and the draft's training
record carried over; the export's own record, under ``export``, includes the draft sampling rule
served) and ``serving_configs/`` (:mod:`deepspec_plugin.exporters.serving`), whose speculative
config names the method and the draft sampling rule (``draft_sample_method``: vLLM's default
``greedy``, or ``probabilistic``).
Everything is written into a staging directory, checked
(:func:`deepspec_plugin.exporters.check.check_export`, with a real vLLM load where vLLM is
installed) and only then renamed to ``out``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from deepspec_plugin import models, tensorfiles
from deepspec_plugin.bench.report_schema import EvalReport, load_report
from deepspec_plugin.errors import DspecError
from deepspec_plugin.exporters import safetensors_io as st
from deepspec_plugin.exporters.findings import ExportResult
from deepspec_plugin.exporters.output import copy_tokenizer_files, refuse_existing, staged_output
from deepspec_plugin.exporters.serving import (
    DEFAULT_DRAFT_SAMPLE_METHOD,
    SERVING_DIR,
    check_draft_sample_method,
    write_speculators_command,
    write_vllm_configs,
)
from deepspec_plugin.fileio import read_json
from deepspec_plugin.manifest import (
    FILENAME,
    DraftManifest,
    baseline_from_report,
    read_manifest,
    report_model_mismatches,
    write_manifest,
)

METHODS = ("draft_model", "eagle3", "medusa")
DEFAULT_K = 4
INDEX_FILE = "model.safetensors.index.json"
# Tensors whose first dimension is the vocabulary (Llama-like names and GPT-2's).
VOCAB_TENSOR_SUFFIXES = ("embed_tokens.weight", "lm_head.weight", "wte.weight", "embed_in.weight",
                         "embed_out.weight")


@dataclass
class WeightPlan:
    files: dict[str, list[st.Planned]]
    config: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def export_vllm(
    draft: str | Path,
    target: str | Path,
    out: str | Path,
    *,
    k: int | None = None,
    method: str = "draft_model",
    report: str | Path | None = None,
    target_name: str | None = None,
    force: bool = False,
    overwrite: bool = False,
    load: bool = True,
    draft_sample_method: str = DEFAULT_DRAFT_SAMPLE_METHOD,
) -> ExportResult:
    """Export ``draft`` for ``target`` into ``out`` for vLLM; returns what was written and checked.

    ``target_name`` is how the server will name the target (a Hub id or a path; default: the
    target's absolute path). ``force`` exports a draft made for another target, or with a report
    of another draft, and records that in the manifest. ``load=False`` skips the real vLLM load.
    ``draft_sample_method`` is how vLLM drafts at T > 0 (``greedy``: its argmax, vLLM's default;
    ``probabilistic``: sampled), written into the speculative config and the manifest.
    """
    draft, out = Path(draft), Path(out).absolute()
    target = models.resolve_model(str(target))
    if method == "mlp_speculator":
        from deepspec_plugin.bench.engines.vllm_offline import MLP_SPECULATOR_REFUSAL

        raise DspecError(MLP_SPECULATOR_REFUSAL, "export it for TGI (dspec export tgi), the "
                         "engine that serves MLP speculators")
    if method not in METHODS:
        raise DspecError(f"unknown vLLM export method {method!r}",
                         f"use one of {', '.join(METHODS)}")
    check_draft_sample_method(draft_sample_method)
    refuse_existing(out, overwrite)
    if not draft.is_dir():
        raise DspecError(f"draft directory {draft} does not exist", "fix --draft")
    if out.resolve() in (draft.resolve(), target.resolve()):
        raise DspecError(f"--out {out} is the draft or the target directory",
                         "choose a new directory for the export")
    tcfg = read_json(target / "config.json")
    models.require_causal_lm(target, tcfg)

    forced: list[str] = []
    target_fp = models.fingerprint(target)
    source = read_manifest(draft) if (draft / FILENAME).is_file() else None
    if source is not None and source.target_fingerprint != target_fp:
        _refuse_unless_forced(
            force, forced, "target_fingerprint",
            f"the draft was made for another target: its manifest names {source.target_fingerprint}"
            f", {target} is {target_fp} (the target was updated, or this is the wrong target)",
            "retrain or re-distil the draft for this target, or pass --force to export anyway "
            "(recorded in the manifest)",
        )
    if method == "draft_model" and source is None:
        from deepspec_plugin.exporters.eagle3 import is_deepspec_eagle3
        from deepspec_plugin.models.files import is_eagle3_dir

        if is_deepspec_eagle3(draft) or is_eagle3_dir(draft):
            layout = "DeepSpec's" if is_deepspec_eagle3(draft) else "vLLM's"
            raise DspecError(f"{draft} is an EAGLE-3 head ({layout} layout), not a draft model",
                             "pass --method eagle3")
    if method == "draft_model":
        from deepspec_plugin.models.files import head_draft_kind

        kind = head_draft_kind(draft)
        if kind is not None:
            raise DspecError(f"{draft} is a {kind} draft (heads on the target), not a draft "
                             "model", f"pass --method {kind}")
    if source is not None and source.method != method:
        raise DspecError(f"{draft} is a {source.method} draft (its manifest says so), not {method}",
                         f"pass --method {source.method}")
    layout = eagle3_layout(draft) if method == "eagle3" else None

    rep = load_report(report, require_complete=True) if report is not None else None
    k = int(k or (source.k if source and source.k else 0) or _report_k(rep) or DEFAULT_K)
    if k < 1:
        raise DspecError(f"k must be at least 1, got {k}", "pass --k N with N >= 1")
    baseline, source_fp = None, None  # the draft is hashed only to match it with a report
    if rep is not None:
        source_fp = _fingerprint_or_none(draft)
        _check_report_models(rep, Path(report), source_fp, target_fp, force, forced)
        baseline = baseline_from_report(rep, k=k, where=str(report))

    if method == "draft_model":
        plan = plan_draft_model(draft, target, tcfg, force=force, forced=forced)
    notes: list[str] = sample_rule_notes(rep, baseline, draft_sample_method)
    name = target_name or str(target.resolve())
    speculators = None
    with staged_output(out, overwrite=True) as stage:
        if method == "draft_model":
            write_weights(plan, stage)
            notes += plan.notes
        elif method == "medusa":
            from deepspec_plugin.exporters.medusa_vllm import write_vllm_medusa

            notes += write_vllm_medusa(draft, tcfg, stage, k)
        else:
            notes += write_eagle3(draft, target, stage, layout)
            from deepspec_plugin.exporters.speculators import SPECULATORS_DIR, write_speculators

            notes += write_speculators(stage, tcfg, verifier=name, k=k)
            speculators = SPECULATORS_DIR
        copy_tokenizer_files(target, stage)
        write_vllm_configs(stage / SERVING_DIR, target=name, method=method, draft=str(out), k=k,
                           draft_name=out.name, draft_sample_method=draft_sample_method)
        if speculators:
            write_speculators_command(stage / SERVING_DIR, speculator=str(out / speculators),
                                      draft_sample_method=draft_sample_method)
        manifest = DraftManifest(
            target_fingerprint=target_fp,
            tokenizer_fingerprint=models.tokenizer_fingerprint(target),
            method=method, k=k, baseline=baseline,
            extra={**(source.extra if source else {}), "export": {
                "engine": "vllm", "format": method,
                "target": {"path": str(target.resolve()), "name_or_path": name,
                           "fingerprint": target_fp},
                "source": {"path": str(draft.resolve()), "fingerprint": source_fp,
                           **({"layout": layout} if layout else {})},
                "draft_sample_method": draft_sample_method, "speculators": speculators,
                "report": str(Path(report).resolve()) if report else None,
                "forced": forced, "notes": notes,
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
            }},
        )
        write_manifest(manifest, stage / FILENAME)
        from deepspec_plugin.exporters.check import check_export

        check = check_export(stage, target, load=load, target_fingerprint=target_fp)
        check.path = out
        check.raise_if_failed()
    return ExportResult(out=out, method=method, check=check, notes=notes)


def eagle3_layout(draft: Path) -> str:
    """``"deepspec"`` (DeepSpec's layout, converted) or ``"vllm"`` (the project's own heads and
    earlier exports, copied); anything else is refused before a byte is written."""
    from deepspec_plugin.exporters.eagle3 import is_deepspec_eagle3

    if is_deepspec_eagle3(draft):
        return "deepspec"
    from deepspec_plugin.models.files import is_eagle3_dir

    if is_eagle3_dir(draft):
        return "vllm"
    raise DspecError(f"{draft} is not an EAGLE-3 head: its config is neither DeepSpec's layout "
                     "(target_layer_ids) nor vLLM's (architectures Eagle3*ForCausalLM)",
                     "point --draft at a head written by dspec train --draft-type eagle3 or a "
                     "DeepSpec EAGLE-3 checkpoint, or pass --method draft_model")


def write_eagle3(draft: Path, target: Path, stage: Path, layout: str) -> list[str]:
    """The head's weights and config in vLLM's layout into ``stage``; notes."""
    if layout == "deepspec":
        from deepspec_plugin.exporters.eagle3 import write_vllm_eagle3

        return write_vllm_eagle3(draft, target, stage)
    from deepspec_plugin.exporters.eagle3_own import copy_vllm_eagle3

    return copy_vllm_eagle3(draft, target, stage)


def sample_rule_notes(rep: EvalReport | None, baseline, rule: str) -> list[str]:
    """Where the baseline was measured at T > 0 with the other draft sampling rule, its
    acceptance is not what this server will show: say so (greedy drafting accepts less)."""
    if rep is None or baseline is None or not baseline.temperature:
        return []
    measured = (rep.engine or {}).get("draft_sample_method")
    if measured and measured != rule:
        return [f"the baseline was measured with draft_sample_method {measured!r} at T = "
                f"{baseline.temperature:g}, the export serves {rule!r}: live acceptance will "
                "differ from it (pass --draft-sample-method to match, or re-evaluate)"]
    return []


def _refuse_unless_forced(force: bool, forced: list[str], what: str, problem: str,
                          fix: str) -> None:
    if not force:
        raise DspecError(problem, fix)
    forced.append(what)


def _fingerprint_or_none(path: Path) -> str | None:
    try:
        return models.fingerprint(path)
    except DspecError:
        return None


def _report_k(rep: EvalReport | None) -> int | None:
    """The report's k where it measured only one."""
    if rep is None:
        return None
    ks = {e.k for e in rep.overall}
    return ks.pop() if len(ks) == 1 else None


def _check_report_models(rep: EvalReport, path: Path, draft_fp: str | None, target_fp: str,
                         force: bool, forced: list[str]) -> None:
    """The baseline must have been measured on this draft with this target."""
    for what, problem, fix in report_model_mismatches(rep, str(path), target_fp, draft_fp):
        _refuse_unless_forced(force, forced, what, problem, fix)


# --- draft_model ----------------------------------------------------------------------------


def plan_draft_model(draft: Path, target: Path, tcfg: dict, *, force: bool = False,
                     forced: list[str] | None = None) -> WeightPlan:
    """What to write for a standalone draft: its tensors (vocab rows resized) and config."""
    dcfg = read_json(draft / "config.json")
    models.require_causal_lm(draft, dcfg)
    tensors = st.read_dir(draft) if list(draft.glob("*.safetensors")) else None
    if tensors is None:
        tensorfiles.refuse_missing_weights(draft)
    tv, dv = int(tcfg["vocab_size"]), int(dcfg.get("vocab_size") or 0)
    notes = _check_tokenizers(draft, target, tv, dv, force, forced if forced is not None else [])
    resize = {}
    if dv != tv:
        resize = {n: t for n, t in tensors.items()
                  if n.endswith(VOCAB_TENSOR_SUFFIXES) and t.shape and t.shape[0] == dv}
        if not resize:
            raise DspecError(f"{draft}: vocab_size {dv} differs from the target's {tv} and no "
                             "embedding or head tensor has that many rows",
                             "fix the draft's config.json")
        verb = "padded with zero rows" if dv < tv else "cut back (the rows past it are padding)"
        notes.append(f"vocabulary {verb} from {dv} to the target's {tv} in "
                     f"{', '.join(sorted(resize))}: the tokenizers are the same, only padding "
                     "differed")
    files: dict[str, list[st.Planned]] = {}
    for name, t in sorted(tensors.items(), key=lambda kv: (kv[1].path.name, kv[1].offset)):
        if name in resize:
            planned = (st.padded_rows(t, name, tv) if tv > dv else _first_rows(t, tv))
        else:
            planned = st.renamed(t, name)
        files.setdefault(t.path.name, []).append(planned)
    config = {k: v for k, v in dcfg.items() if k != "_name_or_path"}
    config["vocab_size"] = tv
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in tcfg:
            config[key] = tcfg[key]
    tdt, ddt = tcfg.get("torch_dtype") or tcfg.get("dtype"), dcfg.get("torch_dtype") \
        or dcfg.get("dtype")
    if tdt and ddt and tdt != ddt:
        notes.append(f"the draft is stored in {ddt}, the target in {tdt}: vLLM runs the draft in "
                     "the target's dtype")
    return WeightPlan(files=files, config=config, notes=notes)


def _first_rows(t: st.StoredTensor, rows: int) -> st.Planned:
    row = t.nbytes // t.shape[0]
    cut = st.StoredTensor(t.name, t.path, t.offset, rows * row, t.dtype, (rows, *t.shape[1:]))
    return st.renamed(cut, t.name)


def _check_tokenizers(draft: Path, target: Path, tv: int, dv: int, force: bool,
                      forced: list[str]) -> list[str]:
    """Same token for every id both know, same merges; say what else differs."""
    has_tok = any((draft / f).exists() for f in ("tokenizer.json", "tokenizer_config.json",
                                                  "vocab.json"))
    if not has_tok:
        _refuse_unless_forced(
            force, forced, "draft_tokenizer",
            f"{draft} has no tokenizer files, so its vocabulary cannot be checked against the "
            "target's", "copy the tokenizer files the draft was trained with into it, or pass "
            "--force if it was trained with the target's tokenizer")
        return ["the draft had no tokenizer files; exported with --force and the target's"]
    if models.tokenizer_fingerprint(draft) == models.tokenizer_fingerprint(target):
        return []
    t_ids, d_ids = models.id_to_token(target), models.id_to_token(draft)
    differing = [i for i in sorted(set(t_ids) & set(d_ids)) if t_ids[i] != d_ids[i]]
    extra = [i for i in t_ids if i not in d_ids]
    beyond = [i for i in sorted(d_ids) if i >= tv]
    if differing or beyond:
        shown = ", ".join(f"id {i}: target {t_ids.get(i)!r}, draft {d_ids.get(i)!r}"
                          for i in (differing or beyond)[:3])
        raise DspecError(
            f"the draft's tokenizer differs from the target's ({len(differing)} ids map to other "
            f"tokens, {len(beyond)} draft tokens lie past the target's vocabulary of {tv}; first: "
            f"{shown})",
            "a draft must use its target's tokenizer: build it from the target (dspec models "
            "draft-init, dspec train), or choose the target this draft was trained for")
    if models.tokenizer_table(target)["merges"] != models.tokenizer_table(draft)["merges"]:
        raise DspecError("the draft's tokenizer has the same tokens as the target's but other BPE "
                         "merges, so the same text tokenizes differently",
                         "retokenise: train the draft with the target's tokenizer")
    note = "the draft's tokenizer files differ from the target's outside the token table "
    note += f"({models.first_tokenizer_difference(target, draft)})"
    if extra:
        note += f"; the target defines {len(extra)} ids the draft's tokenizer lacks"
    return [note + "; the target's tokenizer files were written (vLLM drafts with them)"]


def write_weights(plan: WeightPlan, stage: Path) -> None:
    """Stream every planned file into ``stage``; an index file when there are several."""
    weight_map: dict[str, str] = {}
    total = 0
    for fname, planned in plan.files.items():
        st.write_or_copy(stage / fname, planned, metadata={"format": "pt"})
        for p in planned:
            weight_map[p.name] = fname
            total += p.nbytes
    if len(plan.files) > 1:
        (stage / INDEX_FILE).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
            indent=2) + "\n")
    (stage / "config.json").write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n")
