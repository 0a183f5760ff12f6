"""TGI's loader rules for speculator directories, as a checker (TGI itself cannot run here).

Text Generation Inference speculates with a Medusa or an MLP-speculator directory passed as
``--model-id`` (or with n-gram when none is). Each rule below is one :class:`Finding` whose
``source`` names the TGI file and function it encodes, read at huggingface/text-generation-
inference commit db931fcf42da (2026-01-08; TGI is in maintenance mode, so this is its last
state). Paths are relative to that repository. When TGI changes, re-read the named function
and adjust the rule.

Used by :func:`deepspec_plugin.exporters.tgi.export_tgi` on every export before it lands, and by
``dspec export check`` for TGI exports.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deepspec_plugin.errors import DspecError
from deepspec_plugin.exporters.findings import CheckReport
from deepspec_plugin.exporters.safetensors_io import (
    FLOAT_DTYPES,
    StoredTensor,
    read_dir,
    read_tensors,
)
from deepspec_plugin.models import PICKLE_SUFFIXES

MEDUSA = "medusa"
MLP_SPECULATOR = "mlp_speculator"
MEDUSA_WEIGHTS = "medusa_lm_head.safetensors"
MLP_ARCHITECTURE = "MLPSpeculatorPreTrainedModel"
MLP_PREFIX = "speculator."
SPECULATION_MAX_TOKENS = 128  # forward passes over this many tokens skip the speculator
DEFAULT_MAX_BATCH_PREFILL_TOKENS = 4096  # the launcher's default when the config has no limit
ENV_FILE = "serving_configs/tgi.env"

# Where each rule comes from (server/... is TGI's Python server, launcher/ and router/ its Rust).
SRC_GET_MODEL = "server/text_generation_server/models/__init__.py: get_model"
SRC_SPEC_HEAD = "server/text_generation_server/layers/speculative.py: SpeculativeHead.load"
SRC_MEDUSA_V1 = "server/text_generation_server/layers/medusa.py: MedusaHeadV1.load"
SRC_MEDUSA_HEAD = ("server/text_generation_server/layers/medusa.py: MedusaHead.__init__, "
                   "ResBlock.__init__")
SRC_MEDUSA_FWD = "server/text_generation_server/layers/medusa.py: MedusaModel.forward"
SRC_MLP_LOAD = "server/text_generation_server/layers/mlp.py: MLPSpeculatorHead.load"
SRC_MLP_TIED = "server/text_generation_server/layers/mlp.py: MLPSpeculatorModelTied.__init__"
SRC_MLP_TIED_FWD = "server/text_generation_server/layers/mlp.py: MLPSpeculatorModelTied.forward"
SRC_MLP_UNTIED = "server/text_generation_server/layers/mlp.py: MLPSpeculatorModel.__init__"
SRC_GET_TENSOR = "server/text_generation_server/utils/weights.py: Weights.get_tensor"
SRC_DOWNLOAD = "server/text_generation_server/cli.py: download_weights"
SRC_ROUTER_TOKENIZER = "router/src/server.rs: run (tokenizer and tokenizer_config.json)"
SRC_LAUNCHER_ARGS = "launcher/src/main.rs: Args (clap long + env), main (argument validation)"
SRC_PREFILL = "backends/v3/src/main.rs: main (max_batch_prefill_tokens >= max_input_tokens)"
SRC_DSPEC = "dspec: deepspec_plugin/manifest.py (the draft manifest)"


# --- the tensors TGI reads -----------------------------------------------------------------------


def medusa_shapes(num_heads: int, num_layers: int, hidden: int,
                  vocab: int) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of ``medusa_lm_head.safetensors``, as MedusaHeadV1 reads it.

    MedusaHead loads ``{head}.{layer}.linear`` (weight and bias) for each residual block
    ``x + SiLU(W x + b)``, which needs W square, then ``{head}.{num_layers}`` (no bias) mapping the
    hidden state to the vocabulary; no prefix (SRC_MEDUSA_HEAD).
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for h in range(num_heads):
        for la in range(num_layers):
            shapes[f"{h}.{la}.linear.weight"] = (hidden, hidden)
            shapes[f"{h}.{la}.linear.bias"] = (hidden,)
        shapes[f"{h}.{num_layers}.weight"] = (vocab, hidden)
    return shapes


def mlp_tied_shapes(inner: int, emb_dim: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape that MLPSpeculatorModelTied reads (SRC_MLP_TIED).

    One embedding, head and norm shared by every stage, ``proj.0`` from the target's hidden state
    and ``proj.1`` shared by the later stages; it loads ``proj.1`` whatever ``n_predict`` is.
    """
    p = MLP_PREFIX
    return {
        f"{p}emb.0.weight": (vocab, inner), f"{p}proj.0.weight": (inner, emb_dim),
        f"{p}proj.1.weight": (inner, inner), f"{p}head.0.weight": (vocab, inner),
        f"{p}ln.0.weight": (inner,), f"{p}ln.0.bias": (inner,),
    }


# --- helpers -----------------------------------------------------------------------------------


def detect_tgi_format(config: dict[str, Any]) -> str | None:
    """What TGI's get_model takes a ``--model-id`` config for: medusa, mlp_speculator or None
    (a plain model, served with n-gram speculation)."""
    if "medusa_num_heads" in config:  # checked first (SRC_GET_MODEL)
        return MEDUSA
    if config.get("model_type") == MLP_SPECULATOR:
        return MLP_SPECULATOR
    return None


def _is_int(v: Any, minimum: int = 1) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _int_or(value: Any, fallback: int | None) -> int | None:
    """A config size if it is a positive integer, else what the tensors say."""
    return value if _is_int(value) else fallback


def _read_env(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip().strip('"').strip("'")
    return env


def _load_tensors(report: CheckReport, rule: str, files: list[Path],
                  source: str) -> dict[str, StoredTensor] | None:
    try:
        index = read_dir(files[0].parent, [f.name for f in files]) if files else {}
    except DspecError as e:
        report.add(rule, False, e.problem, source)
        return None
    report.add(rule, True, f"{', '.join(f.name for f in files)} read: {len(index)} tensors, "
               "offsets and sizes consistent", source)
    return index


def _check_shapes(report: CheckReport, rule: str, index: dict[str, StoredTensor],
                  expected: dict[str, tuple[int, ...]], source: str) -> None:
    wrong = [f"{n} is {list(index[n].shape)}, expected {list(s)}"
             for n, s in expected.items() if n in index and index[n].shape != s]
    report.add(rule, not wrong, "; ".join(wrong[:4]) + (f" (and {len(wrong) - 4} more)"
               if len(wrong) > 4 else "") if wrong else
               f"all {len(expected)} tensor shapes match the config", source)


def _check_dtypes(report: CheckReport, index: dict[str, StoredTensor]) -> None:
    # Weights.get_tensor casts floating tensors to the serving dtype and passes integer and fp8
    # ones through uncast: an integer head weight would meet a float hidden state in F.linear.
    bad = sorted(f"{n} ({t.dtype})" for n, t in index.items() if t.dtype not in FLOAT_DTYPES)
    report.add("tensors.dtype", not bad,
               f"not floating point: {', '.join(bad[:4])}" if bad
               else f"all tensors are {'/'.join(sorted({t.dtype for t in index.values()}))}",
               SRC_GET_TENSOR)


# --- the check -----------------------------------------------------------------------------------


def check_tgi(export_dir: str | Path, target: str | Path | None = None) -> CheckReport:
    """Apply TGI's loader rules to a speculator directory; with ``target``, its compatibility."""
    export_dir = Path(export_dir)
    report = CheckReport(export_dir, "unknown")
    config_path = export_dir / "config.json"
    try:
        config = json.loads(config_path.read_text())
        ok = isinstance(config, dict)
    except (FileNotFoundError, NotADirectoryError):
        config, ok = None, False
    except (json.JSONDecodeError, UnicodeDecodeError):
        config, ok = None, False
    # get_model reads config.json of --model-id before anything else.
    if not report.add("files.config", ok, "config.json is a JSON object" if ok
                      else f"{config_path} is missing or not a JSON object", SRC_GET_MODEL):
        return report

    fmt = detect_tgi_format(config)
    report.format = fmt or "unknown"
    # Without medusa_num_heads or model_type mlp_speculator, get_model falls back to n-gram and
    # loads --model-id as the target itself: the heads would be silently ignored.
    if not report.add("format.detected", fmt is not None,
                      f"TGI detects a {fmt} speculator" if fmt else
                      "config.json has neither medusa_num_heads nor model_type mlp_speculator: "
                      "TGI would load this directory as a plain model and speculate with n-gram",
                      SRC_GET_MODEL):
        return report

    # The launcher's download step converts local .bin/.pt weights when it finds no safetensors,
    # which unpickles them; dspec ships no pickle at all.
    pickles = sorted(p.name for p in export_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    report.add("files.no_pickle", not pickles,
               f"pickle files present: {', '.join(pickles)}" if pickles else "no pickle files",
               SRC_DOWNLOAD)

    # The router loads the tokenizer (and tokenizer_config.json, with the chat template) from the
    # --model-id directory; only a config without model_type falls back to the base model's.
    has_tok = any((export_dir / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json"))
    report.add("files.tokenizer", has_tok,
               "tokenizer files present" if has_tok else
               "no tokenizer.json / tokenizer_config.json: the router loads the tokenizer from "
               "--model-id", SRC_ROUTER_TOKENIZER)

    base = config.get("base_model_name_or_path")
    # get_model replaces model_id with base_model_name_or_path to load the target.
    report.add("config.base_model_name_or_path", isinstance(base, str) and bool(base),
               f"base model {base!r}" if isinstance(base, str) and base else
               "base_model_name_or_path is missing: TGI cannot find the target", SRC_GET_MODEL)

    if fmt == MEDUSA:
        heads, hidden, vocab = _check_medusa(report, export_dir, config)
    else:
        heads, hidden, vocab = _check_mlp(report, export_dir, config)

    _check_manifest_and_launcher(report, export_dir, fmt, heads)
    if target is not None:
        _check_target(report, export_dir, Path(target), hidden, vocab)
    return report


def _check_medusa(report: CheckReport, export_dir: Path, config: dict[str, Any]):
    n_heads, n_layers = config.get("medusa_num_heads"), config.get("medusa_num_layers")
    # get_model reads medusa_num_heads; MedusaHead reads medusa_num_layers (a KeyError otherwise).
    keys_ok = _is_int(n_heads) and _is_int(n_layers, minimum=0)
    report.add("medusa.config.required", keys_ok,
               f"medusa_num_heads {n_heads}, medusa_num_layers {n_layers}" if keys_ok else
               f"medusa_num_heads ({n_heads!r}) and medusa_num_layers ({n_layers!r}) must be "
               "integers (>= 1 heads, >= 0 layers)", f"{SRC_GET_MODEL}; {SRC_MEDUSA_HEAD}")
    # SpeculativeHead.load tries config["architectures"][0] first: any architecture other than
    # MLPSpeculatorPreTrainedModel sets the speculator to None (and leaves no lm_head), so only a
    # KeyError, i.e. no `architectures` at all, reaches the Medusa loader.
    archs = config.get("architectures")
    report.add("medusa.config.no_architectures", "architectures" not in config,
               "no architectures key" if "architectures" not in config else
               f"config.json has architectures {archs!r}: TGI would skip the Medusa heads",
               SRC_SPEC_HEAD)

    # get_model hands exactly this file to the loader; other safetensors files are not read.
    weights = export_dir / MEDUSA_WEIGHTS
    others = sorted(p.name for p in export_dir.glob("*.safetensors") if p.name != MEDUSA_WEIGHTS)
    if not report.add("medusa.weights.file", weights.is_file(),
                      f"{MEDUSA_WEIGHTS} present" if weights.is_file() else
                      f"{MEDUSA_WEIGHTS} is missing (TGI reads no other file name)"
                      + (f"; found {', '.join(others)}" if others else ""),
                      f"{SRC_GET_MODEL}; {SRC_MEDUSA_V1}"):
        return (n_heads if keys_ok else None), config.get("hidden_size"), config.get("vocab_size")
    if others:
        report.add("medusa.weights.others", False,
                   f"{', '.join(others)} will not be read by TGI (only {MEDUSA_WEIGHTS} is)",
                   SRC_GET_MODEL, warning=True)
    index = _load_tensors(report, "medusa.weights.readable", [weights], SRC_MEDUSA_V1)
    if index is None or not keys_ok:
        return (n_heads if keys_ok else None), config.get("hidden_size"), config.get("vocab_size")

    out0 = index.get(f"0.{n_layers}.weight")
    out0_shape = out0.shape if out0 and len(out0.shape) == 2 else (None, None)
    hidden = _int_or(config.get("hidden_size"), out0_shape[1])
    vocab = _int_or(config.get("vocab_size"), out0_shape[0])
    if hidden is None or vocab is None:
        report.add("medusa.tensors.names", False, f"0.{n_layers}.weight is missing or not 2-D, "
                   "so the hidden and vocabulary sizes are unknown", SRC_MEDUSA_HEAD)
        return n_heads, hidden, vocab
    expected = medusa_shapes(n_heads, n_layers, int(hidden), int(vocab))
    missing = sorted(set(expected) - set(index))
    # Every key of the file is routed beside the target's weights (a name the target also has
    # raises "found in multiple files"); dspec writes exactly the names the config describes.
    extra = sorted(set(index) - set(expected))
    msg = []
    if missing:
        msg.append(f"missing {', '.join(missing[:4])}" + ("..." if len(missing) > 4 else ""))
    if extra:
        msg.append(f"unexpected {', '.join(extra[:4])}" + ("..." if len(extra) > 4 else ""))
    report.add("medusa.tensors.names", not msg, "; ".join(msg) if msg else
               f"{len(expected)} tensors named {{head}}.{{layer}}.linear.weight|bias and "
               f"{{head}}.{n_layers}.weight, no prefix", f"{SRC_MEDUSA_HEAD}; {SRC_MEDUSA_V1}")
    # ResBlock computes x + SiLU(Wx + b) (W square); the head output is stacked with the target's
    # logits, so its rows are the target's vocabulary.
    _check_shapes(report, "medusa.tensors.shapes", index, expected,
                  f"{SRC_MEDUSA_HEAD}; {SRC_MEDUSA_FWD}")
    _check_dtypes(report, index)
    return n_heads, int(hidden), int(vocab)


def _check_mlp(report: CheckReport, export_dir: Path, config: dict[str, Any]):
    archs = config.get("architectures")
    # SpeculativeHead.load picks the MLP loader only by architectures[0].
    arch_ok = isinstance(archs, list) and bool(archs) and archs[0] == MLP_ARCHITECTURE
    report.add("mlp.config.architectures", arch_ok,
               f"architectures[0] is {MLP_ARCHITECTURE}" if arch_ok else
               f"architectures must be a list starting with {MLP_ARCHITECTURE!r}, got {archs!r}",
               SRC_SPEC_HEAD)
    n_predict, inner = config.get("n_predict"), config.get("inner_dim")
    # get_model reads n_predict; the speculator model reads speculator_config["inner_dim"].
    keys_ok = _is_int(n_predict) and _is_int(inner)
    report.add("mlp.config.required", keys_ok,
               f"n_predict {n_predict}, inner_dim {inner}" if keys_ok else
               f"n_predict ({n_predict!r}) and inner_dim ({inner!r}) must be positive integers",
               f"{SRC_GET_MODEL}; {SRC_MLP_TIED}")
    # MLPSpeculatorHead.load takes tie_weights (default false). The untied MLPSpeculatorModel
    # runs `self.emb.weight *= ...` on an nn.ModuleList, which has no `weight`: AttributeError at
    # load. Only tied speculators load at TGI's last release.
    tie = config.get("tie_weights", False)
    report.add("mlp.config.tie_weights", tie is True,
               "tie_weights is true" if tie is True else
               f"tie_weights is {tie!r}: TGI's untied MLP speculator fails to load "
               "(MLPSpeculatorModel.__init__ multiplies ModuleList.weight)",
               f"{SRC_MLP_LOAD}; {SRC_MLP_UNTIED}")
    scale = config.get("scale_input", False)
    if not isinstance(scale, bool):
        report.add("mlp.config.scale_input", False, f"scale_input should be a boolean, got "
                   f"{scale!r} (TGI takes any truthy value)", SRC_MLP_LOAD, warning=True)
    elif scale:
        # fms-extras and vLLM normalise the target's state first (ln0(h) / sqrt 2) when it is
        # set; TGI's tied speculator has no ln0 and feeds h as it is.
        report.add("mlp.config.scale_input", False, "scale_input is true, which TGI ignores "
                   "(no input norm in MLPSpeculatorModelTied): TGI runs another function than "
                   "the one trained with scaled input, and accepts less", SRC_MLP_TIED_FWD,
                   warning=True)

    # get_model passes every *.safetensors file of the directory to the loader.
    files = sorted(export_dir.glob("*.safetensors"))
    if not report.add("mlp.weights.files", bool(files),
                      f"weights: {', '.join(p.name for p in files)}" if files else
                      "no *.safetensors file: TGI would load no speculator weights",
                      SRC_GET_MODEL):
        return (n_predict if keys_ok else None), config.get("emb_dim"), config.get("vocab_size")
    # Weights are routed by name across all of them; a name in two files is a RuntimeError.
    index = _load_tensors(report, "mlp.weights.readable", files, SRC_MLP_LOAD)
    if index is None:
        return (n_predict if keys_ok else None), config.get("emb_dim"), config.get("vocab_size")

    # The loader reads everything under the `speculator` prefix; anything else is routed beside
    # the target's weights and can collide with them.
    outside = sorted(n for n in index if not n.startswith(MLP_PREFIX))
    report.add("mlp.tensors.prefix", not outside,
               f"names without the speculator. prefix: {', '.join(outside[:4])}" if outside
               else "every tensor is under speculator.", SRC_MLP_LOAD)
    if not (keys_ok and tie is True):
        return (n_predict if keys_ok else None), config.get("emb_dim"), config.get("vocab_size")

    proj0 = index.get(f"{MLP_PREFIX}proj.0.weight")
    head0 = index.get(f"{MLP_PREFIX}head.0.weight")
    emb_dim = _int_or(config.get("emb_dim"),
                      proj0.shape[1] if proj0 and len(proj0.shape) == 2 else None)
    vocab = _int_or(config.get("vocab_size"),
                    head0.shape[0] if head0 and len(head0.shape) == 2 else None)
    if emb_dim is None or vocab is None:
        report.add("mlp.tensors.names", False, "proj.0.weight or head.0.weight is missing, so "
                   "the hidden and vocabulary sizes are unknown", SRC_MLP_TIED)
        return n_predict, emb_dim, vocab
    expected = mlp_tied_shapes(int(inner), int(emb_dim), int(vocab))
    missing = sorted(set(expected) - set(index))
    report.add("mlp.tensors.names", not missing,
               f"missing {', '.join(missing)}" if missing else
               f"the {len(expected)} tensors the tied speculator reads are present", SRC_MLP_TIED)
    unread = sorted(n for n in set(index) - set(expected) if n.startswith(MLP_PREFIX))
    if unread:
        report.add("mlp.tensors.unread", False, f"not read by TGI's tied speculator: "
                   f"{', '.join(unread[:4])}" + ("..." if len(unread) > 4 else ""),
                   SRC_MLP_TIED, warning=True)
    # proj.0 maps the target's hidden state (emb_dim) to inner_dim; the head's rows fill a
    # [batch, n_predict, vocab_size] buffer sized by the target's vocabulary.
    _check_shapes(report, "mlp.tensors.shapes", index, expected,
                  f"{SRC_MLP_TIED}; {SRC_MLP_TIED_FWD}")
    _check_dtypes(report, index)
    return n_predict, int(emb_dim), int(vocab)


def _check_manifest_and_launcher(report: CheckReport, export_dir: Path, fmt: str,
                                 heads: int | None) -> None:
    k = None
    if (export_dir / "deepspec.json").is_file():
        from deepspec_plugin.manifest import read_manifest

        try:
            manifest = read_manifest(export_dir)
            ok = manifest.method == fmt
            report.add("manifest.method", ok, f"deepspec.json: method {manifest.method}" if ok
                       else f"deepspec.json says method {manifest.method}, the directory is "
                       f"{fmt}", SRC_DSPEC)
            k = manifest.k
        except DspecError as e:
            report.add("manifest.valid", False, e.problem, SRC_DSPEC)
    env_path = export_dir / ENV_FILE
    env = _read_env(env_path) if env_path.is_file() else {}
    speculate = env.get("SPECULATE")
    for name, value in (("deepspec.json k", k), (f"{ENV_FILE} SPECULATE", speculate)):
        if value is None or heads is None:
            continue
        # get_model raises when --speculate exceeds the heads the checkpoint has.
        ok = str(value).isdigit() and 1 <= int(value) <= heads
        report.add("speculate.within_heads", ok, f"{name} = {value} <= {heads} heads" if ok else
                   f"{name} = {value} but the speculator has {heads} heads", SRC_GET_MODEL)
        if ok and fmt == MLP_SPECULATOR and int(value) != heads:
            # MLPSpeculatorModelTied: n_predict = get_speculate(), state_weight from it.
            report.add("mlp.speculate_is_n_predict", False, f"{name} = {value}, n_predict = "
                       f"{heads}: TGI weighs the stages' state by 0.5 ** (0.5 / --speculate), "
                       "so any other --speculate than n_predict changes the speculator",
                       SRC_MLP_TIED, warning=True)
    if env:
        try:
            mi, mt = int(env["MAX_INPUT_TOKENS"]), int(env["MAX_TOTAL_TOKENS"])
            prefill = int(env.get("MAX_BATCH_PREFILL_TOKENS", DEFAULT_MAX_BATCH_PREFILL_TOKENS))
        except (KeyError, ValueError) as e:
            report.add("launcher.tokens", False, f"{ENV_FILE}: MAX_INPUT_TOKENS and "
                       f"MAX_TOTAL_TOKENS must be integers ({type(e).__name__}: {e})",
                       SRC_LAUNCHER_ARGS)
            return
        report.add("launcher.tokens", 0 < mi < mt, f"max_input_tokens {mi} < max_total_tokens "
                   f"{mt}" if 0 < mi < mt else f"max_input_tokens ({mi}) must be < "
                   f"max_total_tokens ({mt})", SRC_LAUNCHER_ARGS)
        report.add("launcher.prefill", mi <= prefill, f"max_batch_prefill_tokens {prefill} >= "
                   f"max_input_tokens {mi}" if mi <= prefill else
                   f"max_input_tokens {mi} exceeds max_batch_prefill_tokens {prefill}: set "
                   "MAX_BATCH_PREFILL_TOKENS", SRC_PREFILL)
        has_model = bool(env.get("MODEL_ID"))
        report.add("launcher.model_id", has_model, "MODEL_ID set" if has_model else
                   f"{ENV_FILE} has no MODEL_ID", SRC_LAUNCHER_ARGS)


def _check_target(report: CheckReport, export_dir: Path, target: Path, hidden: int | None,
                  vocab: int | None) -> None:
    from deepspec_plugin.fileio import read_json
    from deepspec_plugin.models import tokenizer_fingerprint

    try:
        tcfg = read_json(target / "config.json")
    except DspecError as e:
        report.add("target.config", False, e.problem, SRC_GET_MODEL)
        return
    # The heads read the target's last hidden state and their logits are compared with the
    # target's: hidden and vocabulary sizes must be the target's.
    for key, have, src in (("hidden_size", hidden, f"{SRC_MEDUSA_HEAD}; {SRC_MLP_TIED}"),
                           ("vocab_size", vocab, f"{SRC_MEDUSA_FWD}; {SRC_MLP_TIED_FWD}")):
        want = tcfg.get(key)
        report.add(f"target.{key}", have is not None and have == want,
                   f"{key} {have} = target's" if have == want else
                   f"{key}: speculator has {have}, target {target} has {want}", src)
    try:
        same = tokenizer_fingerprint(export_dir) == tokenizer_fingerprint(target)
        msg = "tokenizer = target's" if same else "the tokenizer differs from the target's"
    except DspecError as e:
        same, msg = False, e.problem
    # The router tokenizes with the --model-id directory's tokenizer, the target generates with
    # its own ids: they must be one tokenizer.
    report.add("target.tokenizer", same, msg, SRC_ROUTER_TOKENIZER)
    try:
        target_names = set(read_dir(target))
        files = ([export_dir / MEDUSA_WEIGHTS] if report.format == MEDUSA
                 else sorted(export_dir.glob("*.safetensors")))
        mine = {n for f in files if f.is_file() for n in read_tensors(f)}
    except DspecError as e:
        report.add("target.no_name_collision", False, e.problem, SRC_MEDUSA_V1)
        return
    clash = sorted(mine & target_names)
    # The speculator's keys are routed beside the target's: a shared name raises
    # "Key ... was found in multiple files".
    report.add("target.no_name_collision", not clash,
               f"names also in the target: {', '.join(clash[:4])}" if clash else
               "no tensor name shared with the target",
               SRC_MEDUSA_V1 if report.format == MEDUSA else SRC_MLP_LOAD)
