"""`dspec export check DIR`: does an export hold what its engine's loader needs, for this target?

Run at the end of every export (before the export is renamed into place) and on its own. The
format comes from the manifest's ``method``: TGI's head formats are checked by
:mod:`deepspec_plugin.exporters.tgi_rules`, EAGLE-3 by
:mod:`deepspec_plugin.exporters.eagle3_rules`, Medusa for vLLM by
:mod:`deepspec_plugin.exporters.medusa_vllm`, a vLLM ``draft_model`` here:

* files: ``config.json``, safetensors weights only (pickles refused, never read), the tokenizer
  files, ``deepspec.json``, the serving configs, whose speculative config must name the draft
  sampling rule (``draft_sample_method``, greedy or probabilistic; older exports without it get
  a warning: vLLM then uses its default, greedy);
* every safetensors file readable end to end (offsets inside the file, sizes matching shapes);
* vocabulary size, tokenizer fingerprint and special tokens equal to the target's; the target's
  fingerprint equal to the manifest's; the draft's max positions against the target's;
* dtype: floating point, one dtype for the whole draft;
* tensor names and shapes: exactly those of the config's architecture (built on the meta
  device, so nothing is allocated), a tied head allowed to be absent.

Then, where vLLM is installed and ``load`` is set, a real load: vLLM's offline engine runs the
target with the exported draft on three prompts (chat, code, math), greedy, and its acceptance
counts must equal those of the harness's reference engine on the same prompts (both follow the
same rule at temperature 0, so any difference means vLLM loaded or ran something else).
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
from pathlib import Path
from typing import Any

from deepspec_plugin import models
from deepspec_plugin.errors import DspecError
from deepspec_plugin.exporters import safetensors_io as st
from deepspec_plugin.exporters.findings import CheckReport
from deepspec_plugin.exporters.serving import SERVING_DIR, VLLM_FILES
from deepspec_plugin.fileio import read_json
from deepspec_plugin.manifest import FILENAME, read_manifest

LOAD_PROMPT_FILES = (("chat", "mt-bench.jsonl"), ("code", "humaneval.jsonl"),
                     ("math", "gsm8k.jsonl"))
LOAD_PROMPTS = 3
LOAD_NEW_TOKENS = 16
COUNT_KEYS = ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "accepted_per_position")
LOAD_FIX = ("pass --no-load to skip the real load in vLLM, or use a target and draft this vLLM "
            "build supports")
_TOKENIZER_ANY = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def _short(fp: str | None) -> str:
    return (fp or "none")[:19]  # "sha256:" and 12 hex digits: enough to tell two apart


def export_target(path: Path, target: str | Path | None) -> Path | None:
    """The target to check against: the one given, else the manifest's, where it still exists."""
    if target is not None:
        return models.resolve_model(str(target))
    recorded = ((read_manifest(path).extra.get("export") or {}).get("target") or {}).get("path")
    return Path(recorded) if recorded and Path(recorded).is_dir() else None


def check_export(path: str | Path, target: str | Path | None = None, *, load: bool = True,
                 target_fingerprint: str | None = None) -> CheckReport:
    """Check the export in ``path`` (against ``target``, default the manifest's); never raises
    for a failed rule: read ``report.ok`` / ``report.failures``, or call ``raise_if_failed``.

    ``target_fingerprint``, when the caller has just computed it, saves hashing the target again.
    """
    path = Path(path)
    if not path.is_dir():
        raise DspecError(f"export directory {path} does not exist", "fix the path")
    if not (path / FILENAME).is_file():
        raise DspecError(f"{path} has no {FILENAME}, so it is not a dspec export",
                         "export the draft with dspec export vllm or dspec export tgi")
    manifest = read_manifest(path)
    target_path = export_target(path, target)
    engine = (manifest.extra.get("export") or {}).get("engine")
    if manifest.method in ("medusa", "mlp_speculator") and engine != "vllm":
        from deepspec_plugin.exporters.tgi_rules import check_tgi

        return check_tgi(path, target_path)
    report = CheckReport(path=path, format=manifest.method)
    if manifest.method == "medusa":
        from deepspec_plugin.exporters.medusa_vllm import check_vllm_medusa

        check_vllm_medusa(report, path, target_path)
        _common_rules(report, path, manifest, target_path, target_fingerprint)
        if load and report.ok and target_path is not None and _vllm_installed(report):
            report.load = _vllm_load(real_load, path, target_path, manifest.k or 1)
            report.add("vllm_load", report.load["equal"], report.load["summary"])
        return report
    if manifest.method == "eagle3":
        from deepspec_plugin.exporters.eagle3_rules import check_vllm_eagle3
        from deepspec_plugin.exporters.speculators import check_speculators_dir

        report.findings += check_vllm_eagle3(path, target_path).findings
        check_speculators_dir(path, report)
        _common_rules(report, path, manifest, target_path, target_fingerprint)
        if load and report.ok and target_path is not None and _vllm_installed(report):
            from deepspec_plugin.exporters.eagle3_load import vllm_load_eagle3

            # No reference engine runs EAGLE-3: the check is that vLLM loads the head, drafts
            # with it, and its greedy output equals plain decoding.
            report.load = _vllm_load(vllm_load_eagle3, path, target_path, manifest.k or 1)
            report.add("vllm_load", report.load["equal"], report.load["summary"])
        return report
    _draft_model_rules(report, path, manifest, target_path, target_fingerprint)
    if load and report.ok and target_path is not None and _vllm_installed(report):
        report.load = _vllm_load(real_load, path, target_path, manifest.k or 1)
        report.add("vllm_load", report.load["equal"], report.load["summary"])
    return report


def _vllm_load(load, path: Path, target: Path, k: int) -> dict[str, Any]:
    """``load(path, target, k)``; where vLLM cannot run the pair, vLLM's reason in one line with
    the fixes the export commands have (the path may be an export's staging directory, so the
    message does not name it)."""
    from deepspec_plugin.bench.engines.vllm_failure import VLLMEngineError

    try:
        return load(path, target, k)
    except VLLMEngineError as e:
        raise e.replaced(context=f"loading the export with the target {target}",
                         fix=LOAD_FIX) from None


def _vllm_installed(report: CheckReport) -> bool:
    if importlib.util.find_spec("vllm") is None:
        report.add("vllm_load", True, "skipped: vLLM is not installed here", warning=True)
        return False
    return True


def _common_rules(report: CheckReport, path: Path, manifest, target: Path | None,
                  target_fp: str | None = None) -> None:
    """File set, integrity, tokenizer and target identity: every vLLM export."""
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in models.PICKLE_SUFFIXES)
    report.add("no_pickle", not pickles, "no pickle files" if not pickles else
               f"pickle files present ({', '.join(pickles)}); vLLM could load them instead of "
               "the safetensors, and they are never read here")
    weights = sorted(path.glob("*.safetensors"))
    report.add("weights", bool(weights), f"{len(weights)} safetensors file(s)")
    for w in weights:
        try:
            st.read_tensors(w)
            report.add("integrity", True, f"{w.name} reads end to end")
        except DspecError as e:
            report.add("integrity", False, str(e))
    has_tok = any((path / f).is_file() for f in _TOKENIZER_ANY)
    report.add("tokenizer_files", has_tok, "tokenizer files present" if has_tok else
               "no tokenizer files: vLLM drafts with the target's tokenizer, copy them in")
    missing = [f for f in VLLM_FILES if not (path / SERVING_DIR / f).is_file()]
    report.add("serving_configs", not missing, "serving configs present" if not missing else
               f"{SERVING_DIR}/ lacks {', '.join(missing)}", warning=True)
    _sample_rule(report, path)
    if has_tok:
        tok = models.tokenizer_fingerprint(path)
        report.add("tokenizer_fingerprint_manifest", tok == manifest.tokenizer_fingerprint,
                   f"tokenizer {_short(tok)} "
                   f"{'matches' if tok == manifest.tokenizer_fingerprint else 'differs from'}"
                   f" the manifest's {_short(manifest.tokenizer_fingerprint)}")
    if target is None:
        report.add("target", True, "no target given and the manifest's is not here: the "
                   "checks against the target were skipped", warning=True)
        return
    forced = (manifest.extra.get("export") or {}).get("forced") or []
    tfp = target_fp or models.fingerprint(target)
    same = tfp == manifest.target_fingerprint
    report.add("target_fingerprint", same,
               f"target {target} is {_short(tfp)}" + ("" if same else
               f"; the draft was made for {_short(manifest.target_fingerprint)}"
               + (" (exported with --force)" if "target_fingerprint" in forced else "")),
               warning="target_fingerprint" in forced)
    if has_tok:
        ttok = models.tokenizer_fingerprint(target)
        same_tok = models.tokenizer_fingerprint(path) == ttok
        report.add("tokenizer_fingerprint", same_tok,
                   f"tokenizer {'equals' if same_tok else 'differs from'} the target's "
                   f"({_short(ttok)})")
        ts, ds = models.special_tokens(target), models.special_tokens(path)
        report.add("special_tokens", ts == ds, "special tokens equal the target's" if ts == ds
                   else f"special tokens differ: target {ts}, export {ds}")


def _sample_rule(report: CheckReport, path: Path) -> None:
    """The speculative config names vLLM's draft sampling rule, one vLLM knows."""
    from deepspec_plugin.bench.engines.base import DRAFT_SAMPLE_METHODS

    spec_path = path / SERVING_DIR / "speculative-config.json"
    if not spec_path.is_file():
        return  # the serving_configs rule said so
    try:
        rule = json.loads(spec_path.read_text()).get("draft_sample_method")
    except (OSError, ValueError, AttributeError):
        report.add("draft_sample_method", False, f"{SERVING_DIR}/speculative-config.json is not "
                   "a JSON object")
        return
    source = "vllm/config/speculative.py: SpeculativeConfig.draft_sample_method"
    if rule is None:
        report.add("draft_sample_method", False, "the speculative config does not name the draft "
                   "sampling rule: vLLM uses its default (greedy); re-export to write it",
                   source, warning=True)
        return
    report.add("draft_sample_method", rule in DRAFT_SAMPLE_METHODS,
               f"draft_sample_method {rule!r}" + ("" if rule in DRAFT_SAMPLE_METHODS else
               f": vLLM knows {' and '.join(DRAFT_SAMPLE_METHODS)}"), source)


def _draft_model_rules(report: CheckReport, path: Path, manifest, target: Path | None,
                       target_fp: str | None = None) -> None:
    _common_rules(report, path, manifest, target, target_fp)
    config = read_json(path / "config.json")
    report.add("causal_lm", models.is_causal_lm(config),
               f"architectures {config.get('architectures')}")
    if target is not None:
        tcfg = read_json(target / "config.json")
        tv, dv = tcfg.get("vocab_size"), config.get("vocab_size")
        report.add("vocab_size", tv == dv, f"vocab_size {dv}, target {tv}" + (
            "" if tv == dv else ": vLLM's draft_model needs them equal"))
        tp, dp = tcfg.get("max_position_embeddings"), config.get("max_position_embeddings")
        report.add("max_positions", not (tp and dp and dp < tp),
                   f"max_position_embeddings {dp}, target {tp}" + (
                       "" if not (tp and dp and dp < tp) else
                       f": speculation stops past {dp} tokens; serve with --max-model-len {dp} "
                       "or extend the draft's positions"), warning=True)
    try:
        stored = st.read_dir(path)
    except DspecError as e:
        report.add("tensors", False, str(e))
        return
    dtypes = sorted({t.dtype for t in stored.values()})
    floating = [d for d in dtypes if d in st.FLOAT_DTYPES]
    report.add("dtype", len(floating) == 1 and len(dtypes) == 1,
               f"dtypes {', '.join(dtypes)}" + ("" if len(dtypes) == 1 and floating else
                                                ": expected one floating dtype"))
    expected = expected_tensors(path)
    if expected is None:
        report.add("tensor_names", True, "architecture not known to transformers here: names "
                   "and shapes not checked", warning=True)
        return
    tied = bool(config.get("tie_word_embeddings"))
    missing = [n for n in expected if n not in stored and not (tied and n == "lm_head.weight")]
    unexpected = [n for n in stored if n not in expected]
    report.add("tensor_names", not missing and not unexpected,
               f"{len(stored)} tensors, as {config.get('architectures', ['?'])[0]} expects"
               if not missing and not unexpected else
               f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
               f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    wrong = [f"{n} {list(stored[n].shape)} (config: {list(expected[n])})" for n in stored
             if n in expected and tuple(stored[n].shape) != tuple(expected[n])]
    report.add("tensor_shapes", not wrong, "every shape matches the config" if not wrong else
               "; ".join(wrong[:5]))


def expected_tensors(path: Path) -> dict[str, tuple[int, ...]] | None:
    """Names and shapes the config's architecture has: computed for the Llama family (the
    drafts this project makes; no torch needed), else built by transformers on the meta device."""
    config = read_json(Path(path) / "config.json")
    if config.get("model_type") in models.LLAMA_LIKE_MODEL_TYPES:
        return llama_tensors(config)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        hf_config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
    except (ValueError, KeyError, OSError):
        return None
    return {n: tuple(p.shape) for n, p in model.state_dict().items()}


def llama_tensors(c: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The state dict shapes of a Llama, Mistral, Qwen2 or Qwen3 causal LM from its config
    (`tests/test_export_vllm.py` checks this against transformers' own models)."""
    h, v, i = c["hidden_size"], c["vocab_size"], c["intermediate_size"]
    heads = c["num_attention_heads"]
    kv = c.get("num_key_value_heads") or heads
    d = c.get("head_dim") or h // heads
    qwen2 = c.get("model_type") == "qwen2"
    attn_bias = True if qwen2 else bool(c.get("attention_bias", False))
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h),
                                       "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        for name, shape in (("q_proj", (heads * d, h)), ("k_proj", (kv * d, h)),
                            ("v_proj", (kv * d, h))):
            out[f"{p}self_attn.{name}.weight"] = shape
            if attn_bias:
                out[f"{p}self_attn.{name}.bias"] = shape[:1]
        out[f"{p}self_attn.o_proj.weight"] = (h, heads * d)
        if attn_bias and not qwen2:  # Llama's attention_bias also covers o_proj; Qwen2's not
            out[f"{p}self_attn.o_proj.bias"] = (h,)
        if c.get("model_type") == "qwen3":
            out[f"{p}self_attn.q_norm.weight"] = (d,)
            out[f"{p}self_attn.k_norm.weight"] = (d,)
        for name, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
            out[f"{p}mlp.{name}.weight"] = shape
            if c.get("mlp_bias"):
                out[f"{p}mlp.{name}.bias"] = shape[:1]
        out[f"{p}input_layernorm.weight"] = (h,)
        out[f"{p}post_attention_layernorm.weight"] = (h,)
    return out


def real_load(path: Path, target: Path, k: int, num_prompts: int = LOAD_PROMPTS,
              max_new_tokens: int = LOAD_NEW_TOKENS) -> dict[str, Any]:
    """vLLM's offline engine and the reference engine on the same prompts, greedy: counts."""
    from deepspec_plugin.bench.run import evaluate
    from deepspec_plugin.bench.spec import SCHEMA

    with tempfile.TemporaryDirectory(prefix="dspec-check-") as tmp:
        bench = Path(tmp) / "load-check.json"
        bench.write_text(json.dumps({
            "schema": SCHEMA, "name": "export-load-check",
            "description": "export check: vLLM against the reference engine, greedy",
            # One prompt per kind of text: acceptance differs a lot between them.
            "categories": {name: {"files": [f], "num_prompts": 1} for name, f in
                           LOAD_PROMPT_FILES[:num_prompts]},
            "max_new_tokens": max_new_tokens, "temperatures": [0.0], "k": [int(k)],
            "batch_sizes": [1],
        }))
        reports = {engine: evaluate(target, path, bench, engine, Path(tmp) / engine,
                                    progress=False) for engine in ("vllm", "reference")}
    counts = {engine: {key: getattr(rep.overall[0].counts, key) for key in COUNT_KEYS}
              for engine, rep in reports.items()}
    equal = counts["vllm"] == counts["reference"]
    v = counts["vllm"]
    summary = (f"vLLM {reports['vllm'].engine.get('vllm', '')} loaded the draft: "
               f"{v['num_accepted_tokens']}/{v['num_draft_tokens']} draft tokens accepted over "
               f"{v['num_drafts']} drafts (k={k}, {num_prompts} prompts, greedy)")
    summary += (", the same counts as the reference engine" if equal else
                f"; the reference engine counted {counts['reference']}: vLLM runs something else")
    return {"equal": equal, "counts": counts, "summary": summary}
