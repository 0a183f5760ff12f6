"""``dspec export tgi``: a head draft as the speculator directory TGI's ``--model-id`` points at.

TGI (Text Generation Inference) speculates only with Medusa heads, an MLP speculator, or n-gram
lookups: it cannot run a standalone draft model, so one is refused with that reason and the
alternative. The export directory holds what TGI's loader reads (see
:mod:`deepspec_plugin.exporters.tgi_rules`, where every rule names its source in TGI):

- Medusa: ``medusa_lm_head.safetensors`` with unprefixed names and a ``config.json`` without
  ``architectures``; MLP speculator: ``model.safetensors`` under ``speculator.``, tied weights;
- the target's tokenizer files (TGI's router tokenizes with the ``--model-id`` directory);
- ``deepspec.json``: target and tokenizer fingerprints, method, k (= ``--speculate``) and, with a
  report, the offline acceptance baseline;
- ``serving_configs/``: the launcher command, its env file, Helm values, and a compose file that
  runs TGI with the ``dspec monitor tgi`` sidecar, Prometheus and Grafana.

Weights are streamed tensor by tensor from the source files. Everything is written into a staging
directory, checked against TGI's rules, and only then renamed into place.
"""

from __future__ import annotations

import json
import shlex
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from deepspec_plugin.bench.report_schema import load_report, report_file
from deepspec_plugin.errors import DspecError
from deepspec_plugin.exporters import heads
from deepspec_plugin.exporters.findings import ExportResult
from deepspec_plugin.exporters.output import copy_tokenizer_files, refuse_existing, staged_output
from deepspec_plugin.exporters.safetensors_io import Planned, renamed, write_safetensors
from deepspec_plugin.exporters.serving import write_helm_values, write_tgi_compose
from deepspec_plugin.exporters.tgi_rules import (
    DEFAULT_MAX_BATCH_PREFILL_TOKENS,
    MEDUSA_WEIGHTS,
    MLP_ARCHITECTURE,
    MLP_PREFIX,
    SPECULATION_MAX_TOKENS,
    check_tgi,
    medusa_shapes,
    mlp_tied_shapes,
)
from deepspec_plugin.fileio import read_json
from deepspec_plugin.manifest import (
    DraftManifest,
    baseline_from_report,
    read_manifest,
    report_model_mismatches,
    write_manifest,
)
from deepspec_plugin.models import (
    config_and_weights_fingerprint,
    fingerprint,
    tokenizer_fingerprint,
)

LAUNCHER_SCRIPT = "serving_configs/tgi-launcher.sh"
ENV_FILE = "serving_configs/tgi.env"


def export_tgi(draft: str | Path, target: str | Path, out: str | Path, *,
               speculate: int | None = None, max_input_tokens: int | None = None,
               max_total_tokens: int | None = None, report: str | Path | None = None,
               force: bool = False, overwrite: bool = False,
               model_id: str | None = None) -> ExportResult:
    """Export the head draft ``draft`` of ``target`` for TGI into ``out``.

    ``model_id`` is the target's name as TGI should load it (written as
    ``base_model_name_or_path``; default: the target's absolute path). ``speculate`` defaults to
    the number of heads; the token limits to the target's ``max_position_embeddings`` (TGI's own
    defaults, written explicitly). ``force`` accepts a draft whose manifest names another target.
    """
    draft, target, out = Path(draft), Path(target), Path(out)
    for what, d in (("draft", draft), ("target", target)):
        if not d.is_dir():
            raise DspecError(f"{what} directory {d} does not exist", f"fix the --{what} path")
    refuse_existing(out, overwrite)
    if out.resolve() in (draft.resolve(), target.resolve()):
        raise DspecError(f"--out {out} is the draft or the target directory",
                         "choose a new directory for the export")

    fmt = heads.detect_head_format(draft)
    if fmt == heads.DRAFT_MODEL:
        raise DspecError(
            f"{draft} is a standalone draft model; TGI cannot serve one: it speculates only with "
            "Medusa heads, an MLP speculator or n-gram lookups (--speculate without a speculator)",
            f"export it for vLLM instead (dspec export vllm --draft {draft} --target {target} "
            "--out DIR), or train a Medusa / MLP-speculator head draft for TGI",
        )
    notes: list[str] = []
    pickles = heads.pickle_files(draft)
    source = heads.read_medusa(draft) if fmt == heads.MEDUSA else heads.read_mlp_speculator(draft)
    # Cheap refusals first, fingerprints (which stream every byte) after.
    tcfg = read_json(target / "config.json")
    _require_same_dims(source, fmt, tcfg, draft, target)
    plan = _medusa_plan(source) if fmt == heads.MEDUSA else _mlp_plan(source, notes)
    n_heads = source.num_heads if fmt == heads.MEDUSA else source.n_predict
    k = _speculate(speculate, n_heads, fmt)
    limits = _token_limits(tcfg, target, max_input_tokens, max_total_tokens, notes)

    target_tok = tokenizer_fingerprint(target)
    if _has_tokenizer(draft) and tokenizer_fingerprint(draft) != target_tok:
        raise DspecError(f"the tokenizer in {draft} differs from the target's ({target})",
                         "train the heads with the target's tokenizer, or remove the draft's "
                         "tokenizer files if they were copied from another model")
    target_fp = fingerprint(target)
    src_manifest, forced = _source_manifest(draft, target, target_fp, target_tok, force, notes)
    source_fp = _source_fingerprint(draft)
    baseline = (_baseline(report, k, target_fp, source_fp, force, forced, notes)
                if report is not None else None)

    base_name = model_id or str(target.resolve())
    config = (_medusa_config(source, base_name) if fmt == heads.MEDUSA
              else _mlp_config(source, base_name))
    weights_file = MEDUSA_WEIGHTS if fmt == heads.MEDUSA else "model.safetensors"
    if pickles:
        notes.append(f"ignored pickle files in the draft ({', '.join(pickles)}): never loaded, "
                     "not copied")
    notes.append(f"TGI loads the target from base_model_name_or_path = {base_name!r}: it must "
                 "be reachable where TGI runs (export with model_id=<Hub id> to write one)")
    notes.append(f"TGI skips the speculator on forward passes over {SPECULATION_MAX_TOKENS} "
                 "tokens (prefills, large batches): acceptance there is not measured")

    served = str(out.resolve())
    launch = _launcher(served, k, limits)
    manifest = DraftManifest(
        target_fingerprint=target_fp, tokenizer_fingerprint=target_tok, method=fmt, k=k,
        baseline=baseline,
        extra={**(src_manifest.extra if src_manifest else {}), "export": {
            "engine": "tgi", "format": fmt,
            "target": {"path": str(target), "name_or_path": base_name, "fingerprint": target_fp},
            "source": {"path": str(draft), "fingerprint": source_fp},
            "forced": forced, "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "launcher": launch["args"], "notes": notes,
        }},
    )

    with staged_output(out, overwrite) as tmp:
        write_safetensors(tmp / weights_file, plan, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        copy_tokenizer_files(target, tmp)
        write_manifest(manifest, tmp)
        _write_serving_configs(tmp, out.name, fmt, k, launch, base_name)
        check = check_tgi(tmp, target)
        check.path = out
        check.raise_if_failed()  # a failing export never lands
    return ExportResult(out=out, method=fmt, check=check, notes=notes)


# --- compatibility -------------------------------------------------------------------------------


def _has_tokenizer(path: Path) -> bool:
    return any((path / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json",
                                              "vocab.json"))


def _require_same_dims(source, fmt: str, tcfg: dict[str, Any], draft: Path,
                       target: Path) -> None:
    hidden = source.hidden_size if fmt == heads.MEDUSA else source.emb_dim
    for key, have in (("hidden_size", hidden), ("vocab_size", source.vocab_size)):
        want = tcfg.get(key)
        if have != want:
            raise DspecError(f"the {fmt} draft {draft} has {key} {have}, the target {target} has "
                             f"{want}: the heads were trained for another model",
                             "pass the target the heads were trained on")


def _source_manifest(draft: Path, target: Path, target_fp: str, target_tok: str, force: bool,
                     notes: list[str]) -> tuple[DraftManifest | None, list[str]]:
    if not (draft / "deepspec.json").is_file():
        notes.append("the draft has no deepspec.json: its target could not be verified by "
                     "fingerprint (sizes and tokenizer were)")
        return None, []
    src = read_manifest(draft)
    if src.tokenizer_fingerprint != target_tok:
        raise DspecError(f"{draft}/deepspec.json names tokenizer {src.tokenizer_fingerprint}, "
                         f"the target {target} has {target_tok}",
                         "pass the target the draft was trained for")
    if src.target_fingerprint == target_fp:
        return src, []
    if not force:
        raise DspecError(
            f"the draft {draft} was made for target {src.target_fingerprint}, but {target} is "
            f"{target_fp}", "pass the target it was trained for, retrain it, or pass --force to "
            "export anyway (recorded in the manifest)")
    notes.append(f"forced: the draft was made for target {src.target_fingerprint}, exported "
                 f"for {target_fp}")
    return src, ["target_fingerprint"]


def _source_fingerprint(draft: Path) -> str:
    """The draft's fingerprint; without tokenizer files, a hash of its config and weights."""
    if _has_tokenizer(draft):
        return fingerprint(draft)
    return config_and_weights_fingerprint(draft)


def _speculate(speculate: int | None, n_heads: int, fmt: str) -> int:
    if speculate is None:
        return n_heads
    if not isinstance(speculate, int) or speculate < 1:
        raise DspecError(f"--speculate must be a positive integer, got {speculate!r}",
                         f"pass --speculate 1..{n_heads}")
    if speculate > n_heads:
        # TGI's get_model raises the same at startup.
        raise DspecError(f"--speculate {speculate} exceeds the {n_heads} heads of this {fmt} "
                         "draft (TGI refuses to start)", f"pass --speculate 1..{n_heads}")
    return speculate


def _token_limits(tcfg: dict[str, Any], target: Path, max_input: int | None,
                  max_total: int | None, notes: list[str]) -> dict[str, int]:
    max_pos = tcfg.get("max_position_embeddings")
    if max_total is None:
        if not isinstance(max_pos, int):
            raise DspecError(f"{target}/config.json has no max_position_embeddings",
                             "pass --max-total-tokens (and --max-input-tokens)")
        max_total = max_pos
    if max_input is None:
        max_input = max_total - 1  # TGI's own default
        notes.append(f"max_input_tokens {max_input} = max_total_tokens - 1 (TGI's default); "
                     "lower it to leave room for generation")
    if not (0 < max_input < max_total):
        raise DspecError(f"--max-input-tokens ({max_input}) must be positive and below "
                         f"--max-total-tokens ({max_total}) (TGI's launcher refuses otherwise)",
                         "pass a smaller --max-input-tokens")
    if isinstance(max_pos, int) and max_total > max_pos:
        notes.append(f"max_total_tokens {max_total} exceeds the target's max_position_embeddings "
                     f"{max_pos}")
    limits = {"max_input_tokens": max_input, "max_total_tokens": max_total}
    if max_input > DEFAULT_MAX_BATCH_PREFILL_TOKENS:
        # The router refuses max_input_tokens above max_batch_prefill_tokens (default 4096 here:
        # the speculator's config has no max_position_embeddings for the launcher to use).
        limits["max_batch_prefill_tokens"] = max_input
    return limits


def _baseline(report: str | Path, k: int, target_fp: str, source_fp: str, force: bool,
              forced: list[str], notes: list[str]):
    """The manifest's baseline: a complete report of this draft on this target (as the vLLM
    export checks it)."""
    rep = load_report(report, require_complete=True)
    path = report_file(report)
    for what, problem, fix in report_model_mismatches(rep, str(path), target_fp, source_fp):
        if not force:
            raise DspecError(problem, fix)
        forced.append(what)
        notes.append(f"forced: {problem}")
    baseline = baseline_from_report(rep, k=k, where=str(path))
    notes.append(f"baseline from {path}: k {baseline.k}, temperature {baseline.temperature:g}, "
                 f"acceptance rate {baseline.acceptance_rate:.3f}")
    return baseline


# --- what is written -----------------------------------------------------------------------------


def _medusa_plan(src: heads.MedusaSource) -> list[Planned]:
    expected = medusa_shapes(src.num_heads, src.num_layers, src.hidden_size, src.vocab_size)
    plan = []
    for name in expected:  # read_medusa guaranteed every name; the checker verifies shapes
        plan.append(renamed(src.tensors[name], name))
    return plan


def _medusa_config(src: heads.MedusaSource, base_name: str) -> dict[str, Any]:
    # No `architectures` and no model_type: TGI tells Medusa apart by medusa_num_heads and by
    # the absence of architectures (exporters/tgi_rules.py).
    return {"medusa_num_heads": src.num_heads, "medusa_num_layers": src.num_layers,
            "base_model_name_or_path": base_name, "hidden_size": src.hidden_size,
            "vocab_size": src.vocab_size}


def _mlp_plan(src: heads.MlpSource, notes: list[str]) -> list[Planned]:
    if not src.tie_weights:
        raise DspecError(
            f"{src.path} is an untied MLP speculator (tie_weights false); TGI cannot load those: "
            "its MLPSpeculatorModel multiplies `self.emb.weight` on a ModuleList and fails "
            "(server/text_generation_server/layers/mlp.py: MLPSpeculatorModel.__init__)",
            "train the speculator with tie_weights true, or serve it with vLLM 0.32 "
            "(method mlp_speculator)")
    if src.untied_duplicates:
        raise DspecError(f"{src.path} says tie_weights true but these copies differ from the "
                         f"shared tensor: {', '.join(src.untied_duplicates[:4])}",
                         "re-save the speculator (its tied stages must be identical)")
    if "proj.1.weight" not in src.tensors:
        raise DspecError(f"{src.path} has no proj.1.weight (n_predict {src.n_predict}); TGI's "
                         "tied speculator always loads it",
                         "train the speculator with n_predict >= 2")
    expected = mlp_tied_shapes(src.inner_dim, src.emb_dim, src.vocab_size)
    plan = [renamed(src.tensors[name[len(MLP_PREFIX):]], name) for name in expected]
    dropped = len(src.tensors) - len(plan)
    if dropped:
        notes.append(f"tied MLP speculator: wrote the {len(plan)} tensors TGI reads; "
                     f"{dropped} identical tied copies left out")
    return plan


def _mlp_config(src: heads.MlpSource, base_name: str) -> dict[str, Any]:
    return {"architectures": [MLP_ARCHITECTURE], "model_type": heads.MLP_SPECULATOR,
            "n_predict": src.n_predict, "inner_dim": src.inner_dim, "emb_dim": src.emb_dim,
            "vocab_size": src.vocab_size, "tie_weights": True, "scale_input": src.scale_input,
            "base_model_name_or_path": base_name}


def _launcher(model_id: str, k: int, limits: dict[str, int]) -> dict[str, Any]:
    """Launcher arguments and their env equivalents (clap `long, env`: --max-input-tokens is
    MAX_INPUT_TOKENS; launcher/src/main.rs: Args)."""
    pairs = [("model-id", model_id), ("speculate", str(k))]
    pairs += [(key.replace("_", "-"), str(v)) for key, v in limits.items()]
    args = [a for key, v in pairs for a in (f"--{key}", v)]
    env = {key.replace("-", "_").upper(): v for key, v in pairs}
    return {"args": args, "env": env}


def _write_serving_configs(tmp: Path, name: str, fmt: str, k: int, launch: dict[str, Any],
                           base_model: str) -> None:
    d = tmp / "serving_configs"
    d.mkdir()
    args, env = launch["args"], launch["env"]
    # MODEL_ID may be overridden where the export is mounted elsewhere; the rest is as exported.
    rest = " ".join(shlex.quote(a) for a in args[2:])
    script = (
        "#!/bin/sh\n"
        f"# TGI with the {fmt} speculator exported by dspec (k = {k}).\n"
        "# Override MODEL_ID where this directory is mounted elsewhere.\n"
        f"MODEL_ID=\"${{MODEL_ID:-{env['MODEL_ID']}}}\"\n"
        f"exec text-generation-launcher --model-id \"$MODEL_ID\" {rest} \"$@\"\n"
    )
    (tmp / LAUNCHER_SCRIPT).write_text(script)
    (tmp / LAUNCHER_SCRIPT).chmod(0o755)
    (tmp / ENV_FILE).write_text(
        f"# text-generation-launcher settings for the {fmt} speculator (dspec export tgi)\n"
        + "".join(f"{key}={shlex.quote(v)}\n" for key, v in env.items()))
    # The chart passes --model-id (the draft where it mounts it) and --speculate itself.
    write_helm_values(d, engine="tgi", model="", draft_name=name, method=fmt, k=k, args=args[4:])
    write_tgi_compose(d, base_model=base_model, k=k, draft_name=name,
                      env_file=Path(ENV_FILE).name)
