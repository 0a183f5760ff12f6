"""`dspec push`: an export directory to a Hugging Face Hub model repo, in one commit, with a card.

:func:`push` checks the export (manifest, safetensors only), creates the repo if needed (and the
branch, with ``revision``), then uploads every file plus a generated ``README.md`` model card in
ONE commit (``HfApi.create_commit``): the repo never shows half an upload. The card is made in
memory; nothing in the export directory is written or changed, whatever happens.

The token comes only from huggingface_hub's own lookup (``HF_TOKEN``, or the file ``hf auth login``
writes), never from an argument; it never appears in a message, the card or any file (messages
are scrubbed of it as a last guard). Hub failures (auth, rate limit, server, network) become one
:class:`DspecError` naming the problem and the fix.

``huggingface_hub`` is the optional extra ``deepspec-plugin[hub]`` and is imported only in
:func:`push`; :func:`model_card` needs only the standard library (and PyYAML when present).
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepspec_plugin.errors import DspecError
from deepspec_plugin.manifest import FILENAME as MANIFEST_NAME
from deepspec_plugin.manifest import DraftManifest, read_manifest

CARD_NAME = "README.md"
# Pickle-based weight formats run code when loaded: an export never holds them, and a push
# refuses them rather than publish them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
METHOD_TAGS = {"draft_model": "draft-model", "eagle3": "eagle3", "medusa": "medusa",
               "mlp_speculator": "mlp-speculator"}
ENGINE_TAGS = {"vllm": ["vllm"], "tgi": ["tgi", "text-generation-inference"]}
ENGINE_NAMES = {"vllm": "vLLM", "tgi": "TGI (text-generation-inference)"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_PATH_CHARS = r"A-Za-z0-9_./~-"


@dataclass
class PushResult:
    repo_id: str
    repo_url: str
    commit_url: str
    commit_oid: str
    revision: str
    files: list[str] = field(default_factory=list)  # repo paths in the commit, README.md included
    private: bool = False  # what was asked; an existing public repo is refused with --private
    unchanged: bool = False  # the branch already held every file: no commit was made


# -- the export --------------------------------------------------------------------------------

def export_files(export_dir: str | Path) -> list[str]:
    """The files a push uploads, as POSIX paths relative to ``export_dir``, sorted.

    Hidden files and folders (a name starting with ``.``: half-written temp files of atomic
    writes, editor files) and ``__pycache__`` are left out; so is a local ``README.md``, whose text
    the generated card carries instead.
    """
    root = Path(export_dir)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel != CARD_NAME:
                out.append(rel)
    return sorted(out)


def validate_export(export_dir: str | Path) -> tuple[DraftManifest, list[str]]:
    """Refuse what must not be pushed, before any network call; returns (manifest, files)."""
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise DspecError(f"{export_dir} is not a directory",
                         "pass the directory that dspec export wrote")
    if not (export_dir / MANIFEST_NAME).is_file():
        raise DspecError(f"{export_dir} has no {MANIFEST_NAME}, so it is not a dspec export",
                         "export the draft with dspec export, which writes the manifest")
    manifest = read_manifest(export_dir)
    files = export_files(export_dir)
    pickles = [f for f in files if f.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise DspecError(
            f"{export_dir} holds pickle-format files ({', '.join(pickles[:5])}), which run code "
            "when loaded; dspec pushes safetensors only",
            "remove them, or re-export the draft (dspec export writes safetensors)")
    if "config.json" not in files:
        raise DspecError(f"{export_dir} has no config.json", "re-export the draft")
    if not any(f.endswith(".safetensors") for f in files):
        raise DspecError(f"{export_dir} has no .safetensors weights", "re-export the draft")
    return manifest, files


# -- the model card ----------------------------------------------------------------------------

def _export_info(manifest: DraftManifest) -> dict[str, Any]:
    info = manifest.extra.get("export")
    return info if isinstance(info, dict) else {}


def _engine(export_dir: Path, manifest: DraftManifest) -> str:
    engine = _export_info(manifest).get("engine")
    if engine in ENGINE_TAGS:
        return engine
    tgi_marks = ("medusa_lm_head.safetensors", "serving_configs/tgi-launcher.sh")
    return "tgi" if any((export_dir / m).exists() for m in tgi_marks) else "vllm"


def is_hub_id(name: Any) -> bool:
    """``org/name`` as on the Hub (not a local path like ``/x/y``, ``./x`` or ``runs/target/x``)."""
    return (isinstance(name, str) and bool(_HUB_ID.match(name)) and ".." not in name
            and not name.endswith((".", "-")))


def _target(manifest: DraftManifest, export_dir: Path) -> tuple[str | None, list[str]]:
    """(Hub id of the target or None, the local paths the export named the target by)."""
    target = _export_info(manifest).get("target")
    target = target if isinstance(target, dict) else {}
    name, path = target.get("name_or_path"), target.get("path")
    base = _config_base_model(export_dir)  # TGI speculators name their base model there
    locals_ = [p for p in (path, name, base) if isinstance(p, str) and p and not is_hub_id(p)]
    locals_ += [os.path.abspath(p) for p in locals_ if not os.path.isabs(p)]
    hub_id = next((n for n in (name, base) if is_hub_id(n) and n != path), None)
    return hub_id, list(dict.fromkeys(locals_))


def _yaml(meta: dict[str, Any]) -> str:
    try:
        import yaml

        return yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000)
    except ImportError:  # JSON is valid YAML (flow style); the Hub parses either
        return json.dumps(meta, indent=2) + "\n"


def _fmt(x: Any, digits: int) -> str:
    return f"{float(x):.{digits}f}" if isinstance(x, (int, float)) else "–"


def _positions(values: Any) -> str:
    return ", ".join(_fmt(v, 3) for v in values) if values else "–"


def _acceptance_section(manifest: DraftManifest) -> str:
    b = manifest.baseline
    if b is None:
        return ("## Acceptance\n\nNo offline baseline: the draft was exported without an eval "
                "report. Export it with `dspec export ... --report REPORT.json` to record one, "
                "or measure it with `dspec eval`.\n")
    cats = {name: e for name, e in sorted(b.categories.items()) if isinstance(e, dict)}
    counts = [e.get("num_draft_tokens") for e in cats.values()]
    pooled_tokens = sum(counts) if counts and all(isinstance(c, int) for c in counts) else None
    rows = [("**all (pooled)**", b.acceptance_rate, b.acceptance_length, b.per_position,
             pooled_tokens)]
    rows += [(name, e.get("acceptance_rate"), e.get("acceptance_length"), e.get("per_position"),
              e.get("num_draft_tokens")) for name, e in cats.items()]
    report = b.report or {}
    where = ", ".join(f"{k} {report[k]}" for k in ("bench", "engine", "created", "batch_size")
                      if report.get(k) is not None)
    lines = [
        "## Acceptance (offline baseline)", "",
        f"Measured by `dspec eval` at k = {b.k}, temperature {b.temperature:g}"
        + (f" ({where})" if where else "") + ".", "",
        "| Category | Acceptance rate | Mean acceptance length | Per-position acceptance "
        "| Draft tokens |",
        "|---|---|---|---|---|",
    ]
    for name, rate, length, per_pos, tokens in rows:
        lines.append(f"| {name} | {_fmt(rate, 3)} | {_fmt(length, 2)} | {_positions(per_pos)} | "
                     f"{tokens if tokens is not None else '–'} |")
    lines += [
        "",
        "Acceptance rate = accepted draft tokens / drafted tokens; mean acceptance length = "
        "1 + accepted / drafts (tokens produced per target step); per-position acceptance is the "
        "rate at which the i-th drafted token is accepted. These are the definitions of vLLM's "
        "`vllm:spec_decode_*` metrics. The deepspec serving plugin compares live acceptance with "
        f"this baseline, which it reads from `{MANIFEST_NAME}`.", "",
    ]
    return "\n".join(lines)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _replace_paths(text: str, replacements: dict[str, str]) -> str:
    """Replace whole paths only (not part of a longer path or name), longest first."""
    for old in sorted((o for o in replacements if o), key=len, reverse=True):
        # Not preceded by a path character, nor by a word's hyphen ("my-dir"); ":-" as in
        # "${VAR:-/path}" is fine.
        pattern = (rf"(?<![A-Za-z0-9_./~])(?<![A-Za-z0-9_]-){re.escape(old)}/?"
                   rf"(?![{_PATH_CHARS}])")
        text = re.sub(pattern, lambda _m, new=replacements[old]: new, text)
    return text


_DEFAULTED_VAR = re.compile(r'^(?:export\s+)?([A-Za-z_]\w*)="\$\{\1:-([^}]*)\}"$')
_MODEL_ID_ARG = re.compile(r"--model-id[ =]([\"']?)([^\s\"'$]+)\1")


def _command_snippet(script: str, replacements: dict[str, str], engine: str,
                     repo_id: str) -> str:
    """An exported launch script as a card snippet: comments, ``exec`` and ``"$@"`` dropped,
    ``VAR="${VAR:-value}"`` defaults inlined, local paths of the draft replaced by the repo id."""
    replacements = dict(replacements)
    values: dict[str, str] = {}
    lines = []
    for raw in script.strip().splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or line.startswith("set -"):
            continue
        m = _DEFAULTED_VAR.match(line)
        if m:
            values[m.group(1)] = m.group(2)
            continue
        line = re.sub(r"^exec\s+", "", line)
        line = re.sub(r'\s+"\$@"$', "", line)
        for name, value in values.items():
            line = line.replace(f'"${{{name}}}"', value).replace(f'"${name}"', value)
        lines.append(line)
    command = "\n".join(lines)
    if engine == "tgi":  # TGI's --model-id is the speculator, i.e. this export, wherever it was
        replacements.update({m.group(2): repo_id for m in _MODEL_ID_ARG.finditer(command)
                             if not is_hub_id(m.group(2))})
    return _replace_paths(command, replacements)


def _usage_section(export_dir: Path, manifest: DraftManifest, repo_id: str, engine: str,
                   target_id: str | None, target_locals: list[str]) -> str:
    configs = export_dir / "serving_configs"
    spec_config: dict[str, Any] = {}
    try:
        loaded = json.loads((configs / "speculative-config.json").read_text())
        spec_config = loaded if isinstance(loaded, dict) else {}
    except (OSError, ValueError):
        pass
    export = _export_info(manifest)
    # The draft as the exporter named it: the speculative config's "model" is the draft by
    # definition; the export directory itself, as given and resolved, covers the rest.
    draft_paths = {str(export_dir), str(export_dir.resolve()), os.path.abspath(export_dir)}
    draft_paths |= {v for v in (spec_config.get("model"), export.get("out"))
                    if isinstance(v, str) and not is_hub_id(v)}
    replacements = {p: repo_id for p in draft_paths}
    target_ref = target_id or "$TARGET"
    for local in target_locals:
        replacements.setdefault(local, target_ref)
    k = manifest.k or (manifest.baseline.k if manifest.baseline else None) or 4

    if engine == "tgi":
        script = _read_text(configs / "tgi-launcher.sh")
        fallback = (f"text-generation-launcher --model-id {repo_id} --speculate {k} "
                    "--max-input-tokens 1024 --max-total-tokens 2048")
        title = "TGI"
    else:
        script = _read_text(configs / "vllm-command.sh")
        config = {"method": manifest.method, "model": repo_id, "num_speculative_tokens": k}
        if spec_config:
            config = {**spec_config, "model": repo_id}
        fallback = f"vllm serve {target_ref} --speculative-config '{json.dumps(config)}'"
        title = "vLLM"
    command = _command_snippet(script, replacements, engine, repo_id) if script else ""
    command = command or fallback
    lines = [f"## Usage with {title}", ""]
    if target_id is None and "$TARGET" in command:
        lines += ["Set `TARGET` to the target model this draft was trained for (see below).", ""]
    lines += ["```bash", command, "```", "",
              "The engine downloads this repo by its id; for a private repo, export `HF_TOKEN` "
              "first."]
    present = sorted(p.name for p in configs.iterdir() if p.is_file()) if configs.is_dir() else []
    if present:
        lines += ["", "`serving_configs/` holds what `dspec export` wrote: "
                  + ", ".join(f"`{n}`" for n in present)
                  + ". Paths in those files are the exporting machine's; where they name the "
                  f"draft directory, use `{repo_id}` instead."]
    return "\n".join(lines) + "\n"


def _fingerprint_section(manifest: DraftManifest) -> str:
    rows = [("target model", manifest.target_fingerprint),
            ("tokenizer", manifest.tokenizer_fingerprint)]
    exported_target = (_export_info(manifest).get("target") or {})
    if isinstance(exported_target, dict):
        fp = exported_target.get("fingerprint")
        if isinstance(fp, str) and fp != manifest.target_fingerprint:
            rows.append(("target at export", fp))
    if manifest.baseline and manifest.baseline.report.get("draft_fingerprint"):
        rows.append(("draft (evaluated)", manifest.baseline.report["draft_fingerprint"]))
    lines = ["## Fingerprints", "",
             f"From `{MANIFEST_NAME}`: the target and tokenizer this draft was made for, and the "
             "draft the baseline was measured on (`dspec models fingerprint` prints them).", "",
             "| What | Fingerprint |", "|---|---|"]
    lines += [f"| {what} | `{fp}` |" for what, fp in rows]
    return "\n".join(lines) + "\n"


def model_card(export_dir: str | Path, repo_id: str) -> str:
    """README.md for the Hub: YAML metadata, what the draft is, its acceptance, usage, fingerprints.

    Metadata: ``base_model`` (the target's Hub id, when the manifest or config.json names one;
    omitted otherwise, and the card says why), ``library_name``, ``tags`` and a ``deepspec`` block
    with the method, k, engine, fingerprints and pooled acceptance.
    """
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    engine = _engine(export_dir, manifest)
    target_id, target_locals = _target(manifest, export_dir)
    method_tag = METHOD_TAGS[manifest.method]
    # library_name: the Hub's library list (huggingface.js model-libraries.ts) has `transformers`
    # but neither vLLM nor TGI, which the Hub shows as apps. A draft_model export is a plain
    # transformers causal LM, so `transformers` is true and gives a working snippet. EAGLE-3,
    # Medusa and MLP-speculator heads do not load in transformers: naming it would show a broken
    # snippet, so those name the engine that loads them (as model cards of vLLM-only checkpoints
    # do with `library_name: vllm`).
    if manifest.method == "draft_model":
        library = "transformers"
    else:
        library = "vllm" if engine == "vllm" else "text-generation-inference"
    meta: dict[str, Any] = {}
    if target_id:
        meta["base_model"] = target_id
    meta["library_name"] = library
    meta["tags"] = ["speculative-decoding", method_tag, *ENGINE_TAGS[engine], "deepspec"]
    deepspec: dict[str, Any] = {"method": manifest.method, "k": manifest.k, "engine": engine,
                                "target_fingerprint": manifest.target_fingerprint,
                                "tokenizer_fingerprint": manifest.tokenizer_fingerprint}
    if manifest.baseline:
        b = manifest.baseline
        deepspec.update(acceptance_rate=b.acceptance_rate, acceptance_length=b.acceptance_length,
                        baseline_k=b.k, temperature=b.temperature)
    meta["deepspec"] = deepspec

    target_name = f"[{target_id}](https://huggingface.co/{target_id})" if target_id else \
        "its target model"
    parts = [
        "---\n" + _yaml(meta) + "---\n",
        f"# {repo_id.split('/')[-1]}\n",
        f"A speculative-decoding draft ({manifest.method.replace('_', ' ')}, k = "
        f"{manifest.k if manifest.k is not None else 'not set'}) for {target_name}, exported by "
        f"deepspec (`dspec export`) for {ENGINE_NAMES[engine]}. The draft proposes tokens that "
        "the target verifies; the acceptance below says how many the target keeps.\n",
    ]
    if not target_id:
        where = f" (`{Path(target_locals[0]).name}`)" if target_locals else ""
        parts.append(
            f"`base_model` is not set: the draft was exported against a local target{where}, "
            "not a Hub repository, and the manifest does not say which Hub model that is. Add "
            "`base_model: ORG/NAME` to this card's metadata once the target is on the Hub.\n")
    parts.append(_acceptance_section(manifest))
    parts.append(_usage_section(export_dir, manifest, repo_id, engine, target_id, target_locals))
    base_in_config = _config_base_model(export_dir)
    if base_in_config and not is_hub_id(base_in_config):
        parts.append(f"Note: `config.json` names the base model by a local path "
                     f"(`{Path(base_in_config).name}`); the engine looks for it there.\n")
    parts.append(_fingerprint_section(manifest))
    local_readme = _read_text(export_dir / CARD_NAME)
    if local_readme:
        parts.append("## Notes from the export\n\n" + _strip_front_matter(local_readme).strip()
                     + "\n")
    return "\n".join(parts)


def _config_base_model(export_dir: Path) -> str | None:
    try:
        base = json.loads((export_dir / "config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return base if isinstance(base, str) else None


def _strip_front_matter(text: str) -> str:
    if text.startswith("---\n"):
        end = text.find("\n---", 4)
        if end >= 0:
            return text[end + 4:].lstrip("-\n")
    return text


# -- the push ----------------------------------------------------------------------------------

def _check_repo_id(repo_id: str) -> None:
    if not (isinstance(repo_id, str) and is_hub_id(repo_id) and len(repo_id) <= 96):
        raise DspecError(f"'{repo_id}' is not a Hub repo id",
                         "pass --repo ORG/NAME (letters, digits, '-', '_', '.'; one '/')")


def _import_hub():
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError:
        raise DspecError("huggingface_hub is not installed",
                         "pip install 'deepspec-plugin[hub]'") from None
    return huggingface_hub, constants


def _scrub(text: str | None, token: str | None) -> str | None:
    if text is None or not token:
        return text
    return text.replace(token, "hf_***")


def _network_error_types() -> tuple[type[BaseException], ...]:
    """Transport errors of whichever HTTP client this huggingface_hub uses (httpx2, httpx,
    requests), plus the builtin ones; only clients already imported are looked at."""
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests", ("ConnectionError", "Timeout"))):
        mod = sys.modules.get(module)
        types += [getattr(mod, n) for n in names if mod is not None and hasattr(mod, n)]
    return tuple(types)


def _retry_after(response: Any) -> str | None:
    headers = getattr(response, "headers", None) or {}
    value = headers.get("Retry-After")
    if value:
        return f"{value} s"
    try:  # the IETF RateLimit headers the Hub sends (huggingface_hub 1.x and later parse them)
        from huggingface_hub.utils import parse_ratelimit_headers

        info = parse_ratelimit_headers(headers)
        if info is not None and info.remaining == 0:
            return f"{info.reset_in_seconds} s"
    except Exception:  # a hint only: never let it hide the real error
        pass
    return None


def _hub_error(e: BaseException, repo_id: str, endpoint: str, step: str) -> DspecError | None:
    """The DspecError for a Hub failure, or None when ``e`` is not one (a bug: re-raised)."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    namespace = repo_id.split("/")[0]
    login_fix = "set HF_TOKEN to a token with write access, or run `hf auth login`"
    if isinstance(e, OfflineModeIsEnabled):
        return DspecError(f"offline mode is on (HF_HUB_OFFLINE), so {step} cannot reach the Hub",
                          "unset HF_HUB_OFFLINE for dspec push")
    if isinstance(e, HfHubHTTPError):
        response = getattr(e, "response", None)
        status = getattr(response, "status_code", None)
        server = (getattr(e, "server_message", None) or "").strip().splitlines()
        said = f": {server[0][:200]}" if server else ""
        if status == 401:
            return DspecError(
                f"the Hub rejected the token while {step} for {repo_id} (401 Unauthorized{said})",
                f"HF_TOKEN (or the token `hf auth login` saved) must be a valid token with write "
                f"access to '{namespace}': set HF_TOKEN, or run `hf auth login` again")
        if status == 403:
            return DspecError(
                f"the token may not write to {repo_id} (403 Forbidden while {step}{said})",
                f"use a token with write scope for '{namespace}' (a fine-grained token needs "
                f"write access to that namespace): {login_fix}")
        if status == 404:
            return DspecError(
                f"the Hub found no {repo_id} (or no such revision) while {step}, or the token "
                f"cannot see it (404{said})",
                f"check --repo and --revision, and that the token has write access to "
                f"'{namespace}'; {login_fix}")
        if status == 429:
            wait = _retry_after(response)
            return DspecError(
                f"the Hub rate-limited the push while {step} (429 Too Many Requests"
                + (f"; retry after {wait}" if wait else "") + "); nothing was committed",
                f"wait{' ' + wait if wait else ''} and run dspec push again")
        if status is not None and status >= 500:
            return DspecError(
                f"the Hub failed while {step} for {repo_id} ({status}{said}); a Hub commit is "
                "atomic, so nothing half-uploaded is left",
                "retry later; rerunning dspec push is safe")
        return DspecError(f"the Hub refused the push while {step} for {repo_id} "
                          f"({status}{said})", "check --repo, --revision and --commit-message")
    if isinstance(e, _network_error_types()):
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        return DspecError(
            f"cannot reach the Hub at {endpoint} while {step} ({type(e).__name__}"
            + (f": {detail}" if detail else "") + ")",
            "check the network and any proxy, and HF_ENDPOINT if you set it; then retry")
    if isinstance(e, ValueError) and "Invalid metadata in README.md" in str(e):
        return DspecError(f"the Hub rejected the model card's metadata ({e})",
                          "report this as a dspec bug; the card is generated")
    return None


def push(export_dir: str | Path, repo_id: str, *, private: bool = False,
         revision: str | None = None, commit_message: str | None = None) -> PushResult:
    """Upload ``export_dir`` and its model card to ``repo_id`` in one commit (see the module doc).

    ``private`` makes a new repo private; an existing public repo is refused rather than
    published to. ``revision`` names a branch, created from main when missing. The endpoint is
    ``HF_ENDPOINT`` (read now, not at import), else huggingface_hub's default. huggingface_hub
    itself retries a 408/429/5xx on the preupload step (up to 5 times, honouring Retry-After);
    create_repo, create_branch and the commit fail at once and become a DspecError here.
    """
    export_dir = Path(export_dir)
    _check_repo_id(repo_id)
    manifest, files = validate_export(export_dir)
    card = model_card(export_dir, repo_id)
    hf, constants = _import_hub()

    try:
        token = hf.get_token()
    except Exception as e:  # OIDC exchange failure (HF_OIDC_RESOURCE): huggingface_hub raises
        raise DspecError(f"no Hugging Face token: the token lookup failed ({type(e).__name__})",
                         "set HF_TOKEN, or run `hf auth login`") from None
    if not token:
        raise DspecError("no Hugging Face token: HF_TOKEN is not set and `hf auth login` has not "
                         "been run", "set HF_TOKEN to a token with write access, or run "
                         "`hf auth login`")
    if constants.is_offline_mode():
        raise DspecError("offline mode is on (HF_HUB_OFFLINE), and pushing needs the Hub",
                         "unset HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE) for dspec push")
    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    branch = revision or "main"
    target_id, _ = _target(manifest, export_dir)
    message = commit_message or (
        f"Upload {manifest.method} draft for {target_id or 'a local target'} (dspec push)")
    description = (f"k = {manifest.k}; target {manifest.target_fingerprint}; tokenizer "
                   f"{manifest.tokenizer_fingerprint}")

    api = hf.HfApi(endpoint=endpoint, token=token)
    step = "connecting"
    try:
        step = "creating the repo"
        repo_url = api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        if private:
            step = "checking the repo's visibility"
            if not api.repo_info(repo_id).private:
                raise DspecError(f"{repo_id} already exists and is public, but --private was "
                                 "given; nothing was uploaded",
                                 "make the repo private on the Hub first, or drop --private")
        if branch != "main":
            step = f"creating branch '{branch}'"
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        step = "uploading the files in one commit"
        operations = [hf.CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(export_dir / rel))
                      for rel in files]
        operations.append(hf.CommitOperationAdd(path_in_repo=CARD_NAME,
                                                path_or_fileobj=card.encode()))
        info = api.create_commit(repo_id, operations, commit_message=message,
                                 commit_description=description, revision=branch)
    except DspecError as e:
        raise DspecError(_scrub(e.problem, token), _scrub(e.fix, token)) from None
    except Exception as e:
        err = _hub_error(e, repo_id, endpoint, step)
        if err is not None:
            raise DspecError(_scrub(err.problem, token), _scrub(err.fix, token)) from None
        if token in str(e):  # a bug, but never let its message carry the token
            raise RuntimeError(_scrub(str(e), token)) from None
        raise
    return PushResult(repo_id=repo_id, repo_url=str(repo_url), commit_url=info.commit_url,
                      commit_oid=info.oid, revision=branch, files=sorted([*files, CARD_NAME]),
                      private=private, unchanged=_all_unchanged(operations))


def _all_unchanged(operations: list[Any]) -> bool:
    """Whether huggingface_hub skipped every file as already on the branch (then it makes no
    commit and returns the head). Read from its private bookkeeping, defensively: False when
    unsure."""
    try:
        return all(op._remote_oid is not None and op._remote_oid == op._local_oid
                   for op in operations)
    except Exception:
        return False


def push_and_report(export_dir: str | Path, repo_id: str, *, private: bool = False,
                    revision: str | None = None, commit_message: str | None = None,
                    echo: Callable[[str], Any] = print) -> PushResult:
    """What ``dspec push`` runs: :func:`push`, then three lines through ``echo`` (the first says
    "Nothing to push: ..." when the branch already held every file)::

        Pushed 12 files (README.md model card included) to ORG/NAME, branch main, in one commit.
        Repo:   https://huggingface.co/ORG/NAME
        Commit: https://huggingface.co/ORG/NAME/commit/<oid>
    """
    result = push(export_dir, repo_id, private=private, revision=revision,
                  commit_message=commit_message)
    if result.unchanged:
        echo(f"Nothing to push: {result.repo_id}, branch {result.revision}, already holds these "
             f"{len(result.files)} files.")
        echo(f"Repo:   {result.repo_url}")
        echo(f"Commit: {result.commit_url}")
        return result
    echo(f"Pushed {len(result.files)} files (README.md model card included) to {result.repo_id}, "
         f"branch {result.revision}, in one commit.")
    echo(f"Repo:   {result.repo_url}")
    echo(f"Commit: {result.commit_url}")
    return result
