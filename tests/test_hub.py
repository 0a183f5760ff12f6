"""`dspec push` end to end against a local STAND-IN for the Hugging Face Hub (tests/hub_standin.py).

huggingface_hub makes its real HTTP calls (create_repo, create_branch, validate-yaml, preupload,
commit, repo_info) to the stand-in on 127.0.0.1; nothing reaches the network. Exports are built by
hand in the layout the exporters write.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import struct
from pathlib import Path

import pytest

pytest.importorskip("huggingface_hub")
yaml = pytest.importorskip("yaml")

import huggingface_hub.constants  # noqa: E402
from hub_standin import HubStandIn  # noqa: E402  (tests/ is on sys.path: no __init__.py)

from deepspec_plugin.errors import DspecError  # noqa: E402
from deepspec_plugin.exporters.hub import model_card, push, push_and_report  # noqa: E402
from deepspec_plugin.manifest import write_manifest  # noqa: E402

TOKEN = "hf_standinWriteToken0123456789abcdef"
READ_TOKEN = "hf_standinReadOnlyToken0123456789ab"
WRONG_TOKEN = "hf_notAValidToken99999999999999999"
ORG = "deepspec-org"
REPO = f"{ORG}/smollm2-draft"
TARGET = "HuggingFaceTB/SmolLM2-135M-Instruct"
FP_TARGET = "sha256:" + "a" * 64
FP_TOKENIZER = "sha256:" + "b" * 64
FP_DRAFT = "sha256:" + "c" * 64


# -- fixtures ----------------------------------------------------------------------------------

def write_safetensors(path: Path, tensors: dict[str, tuple[list[int], bytes]]) -> None:
    """A valid safetensors file (8-byte header length, JSON header, raw F32 data), by hand."""
    header, data = {}, b""
    for name, (shape, raw) in tensors.items():
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [len(data),
                                                                         len(data) + len(raw)]}
        data += raw
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)


def floats(n: int, seed: int) -> bytes:
    return struct.pack(f"<{n}f", *[((i * 7919 + seed) % 97) / 97.0 - 0.5 for i in range(n)])


def baseline() -> dict:
    return {
        "k": 4, "temperature": 0.0, "acceptance_rate": 0.412, "acceptance_length": 2.31,
        "per_position": [0.71, 0.52, 0.33, 0.09],
        "categories": {
            "chat": {"acceptance_rate": 0.455, "acceptance_length": 2.62,
                     "per_position": [0.75, 0.58, 0.4, 0.1], "num_draft_tokens": 1640},
            "code": {"acceptance_rate": 0.367, "acceptance_length": 2.04,
                     "per_position": [0.66, 0.45, 0.25, 0.08], "num_draft_tokens": 1200},
        },
        "report": {"bench": "quick", "engine": "reference", "created": "2025-01-01T00:00:00Z",
                   "batch_size": 1, "draft_fingerprint": FP_DRAFT},
    }


def build_vllm_export(root: Path, target_name: str = TARGET) -> Path:
    d = root / "vllm-draft"
    (d / "serving_configs").mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8,
        "num_hidden_layers": 1, "vocab_size": 16}))
    write_safetensors(d / "model.safetensors", {
        "model.embed_tokens.weight": ([16, 8], floats(128, 1)),
        "lm_head.weight": ([16, 8], floats(128, 2))})
    (d / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    spec = {"method": "draft_model", "model": str(d), "num_speculative_tokens": 4}
    (d / "serving_configs" / "speculative-config.json").write_text(json.dumps(spec, indent=2))
    compact = json.dumps(spec, separators=(",", ":"))
    (d / "serving_configs" / "vllm-command.sh").write_text(  # as exporters/serving.py writes it
        "#!/bin/sh\n# Serve the target with this draft (written by dspec export vllm).\n"
        f"#   python -m vllm.entrypoints.openai.api_server --model {target_name} ...\n"
        f"vllm serve {target_name} --speculative-config '{compact}' --max-model-len 2048 "
        '"$@"\n')
    (d / "serving_configs" / "vllm-serve.yaml").write_text(f"model: {target_name}\n")
    (d / "serving_configs" / "helm-values.yaml").write_text("draft:\n  path: /models/draft\n")
    write_manifest({
        "schema": "deepspec-draft/v1", "target_fingerprint": FP_TARGET,
        "tokenizer_fingerprint": FP_TOKENIZER, "method": "draft_model", "k": 4,
        "baseline": baseline(),
        "export": {"engine": "vllm", "target": {"path": "/models/smollm2",
                                                "name_or_path": target_name,
                                                "fingerprint": FP_TARGET}},
    }, d)
    return d


def build_tgi_medusa_export(root: Path) -> Path:
    d = root / "tgi-medusa"
    (d / "serving_configs").mkdir(parents=True)
    local_target = str(root / "targets" / "my-llama")
    (d / "config.json").write_text(json.dumps({
        "medusa_num_heads": 3, "medusa_num_layers": 1, "base_model_name_or_path": local_target}))
    write_safetensors(d / "medusa_lm_head.safetensors",
                      {"0.0.linear.weight": ([8, 8], floats(64, 3))})
    (d / "tokenizer.json").write_text(json.dumps({"version": "1.0"}))
    exported_at = "/srv/exports/medusa-v1"  # the export was made elsewhere, then moved here
    (d / "serving_configs" / "tgi-launcher.sh").write_text(  # as exporters/tgi.py writes it
        "#!/bin/sh\n# TGI with the medusa speculator exported by dspec (k = 3).\n"
        f'MODEL_ID="${{MODEL_ID:-{exported_at}}}"\n'
        'exec text-generation-launcher --model-id "$MODEL_ID" --speculate 3 '
        '--max-input-tokens 1024 --max-total-tokens 2048 "$@"\n')
    (d / "serving_configs" / "tgi.env").write_text(f"MODEL_ID={exported_at}\nSPECULATE=3\n")
    write_manifest({
        "schema": "deepspec-draft/v1", "target_fingerprint": FP_TARGET,
        "tokenizer_fingerprint": FP_TOKENIZER, "method": "medusa", "k": 3, "baseline": None,
        "export": {"engine": "tgi", "target": {"path": local_target,
                                               "name_or_path": local_target,
                                               "fingerprint": FP_TARGET}},
    }, d)
    return d


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(p.relative_to(root).as_posix().encode())
        if p.is_file():
            h.update(p.read_bytes())
            h.update(str(p.stat().st_mode).encode())
    return h.hexdigest()


def assert_token_nowhere(*texts: str, root: Path | None = None) -> None:
    for token in (TOKEN, READ_TOKEN, WRONG_TOKEN):
        for text in texts:
            assert token not in text
        if root is not None:
            for p in root.rglob("*"):
                assert not (p.is_file() and token.encode() in p.read_bytes()), p


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The stand-in, with HF_ENDPOINT and HF_TOKEN pointing at it and offline mode off."""
    with HubStandIn(tokens={TOKEN: ("alice", "write"), READ_TOKEN: ("alice", "read")},
                    orgs={ORG}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        for var in ("HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
            monkeypatch.delenv(var, raising=False)
        # conftest sets HF_HUB_OFFLINE=1 before huggingface_hub is imported, which reads it once.
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH",
                            str(tmp_path / "no-login" / "token"))
        yield server


@pytest.fixture
def export(tmp_path):
    return build_vllm_export(tmp_path / "exports")


# -- end to end --------------------------------------------------------------------------------

def test_push_uploads_everything_in_one_commit(hub, export, tmp_path, capsys, caplog):
    before = tree_hash(export)
    caplog.set_level(logging.DEBUG)
    result = push_and_report(export, REPO)
    out = capsys.readouterr()

    assert [p["repo_id"] for p in hub.commit_payloads] == [REPO]  # exactly one commit
    assert hub.routes().count("commit") == 1
    commit = hub.commit_payloads[0]
    local = {p.relative_to(export).as_posix(): p.read_bytes()
             for p in export.rglob("*") if p.is_file()}
    assert sorted(op["value"]["path"] for op in commit["operations"]) == sorted(
        [*local, "README.md"])
    remote = hub.files(REPO)
    for rel, data in local.items():
        assert remote[rel] == data, rel  # byte-identical
    assert set(remote) == {*local, "README.md", ".gitattributes"}
    assert result.files == sorted([*local, "README.md"])
    assert result.revision == "main"
    assert result.commit_url == f"{hub.url}/{REPO}/commit/{commit['oid']}"
    assert result.commit_oid == commit["oid"] == hub.head(REPO).oid
    assert result.repo_url == f"{hub.url}/{REPO}"
    assert result.commit_url in out.out.splitlines()[-1]
    assert commit["header"]["summary"] == f"Upload draft_model draft for {TARGET} (dspec push)"

    card = remote["README.md"].decode()
    assert card == model_card(export, REPO)
    assert not (export / "README.md").exists()  # the card is not written locally
    assert tree_hash(export) == before
    # the token went to the Hub as a bearer token, and nowhere else
    assert f"Bearer {TOKEN}" in hub.auth_headers
    assert_token_nowhere(out.out, out.err, caplog.text, card, root=tmp_path)


def test_model_card_metadata_table_and_usage(export):
    card = model_card(export, REPO)
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == TARGET
    assert meta["library_name"] == "transformers"  # a draft_model export is a transformers LM
    assert {"speculative-decoding", "draft-model", "vllm", "deepspec"} <= set(meta["tags"])
    assert meta["deepspec"]["acceptance_rate"] == 0.412
    assert meta["deepspec"]["target_fingerprint"] == FP_TARGET
    rows = {line.split("|")[1].strip(): line for line in card.splitlines()
            if line.startswith("| ")}
    assert "0.412 | 2.31 | 0.710, 0.520, 0.330, 0.090 | 2840" in rows["**all (pooled)**"]
    assert "0.455 | 2.62 | 0.750, 0.580, 0.400, 0.100 | 1640" in rows["chat"]
    assert "0.367 | 2.04 | 0.660, 0.450, 0.250, 0.080 | 1200" in rows["code"]
    assert "k = 4, temperature 0" in card
    for fp in (FP_TARGET, FP_TOKENIZER, FP_DRAFT):
        assert fp in card
    # the usage snippet is the exported command with the draft path replaced by the repo id
    usage = card.split("```bash\n")[1].split("```")[0]
    assert usage.startswith(f"vllm serve {TARGET} --speculative-config")
    assert usage.strip() == (
        f"vllm serve {TARGET} --speculative-config "
        f"'{{\"method\":\"draft_model\",\"model\":\"{REPO}\",\"num_speculative_tokens\":4}}'"
        " --max-model-len 2048")
    assert str(export) not in card


def test_card_with_local_target_uses_a_placeholder(tmp_path):
    local_target = str(tmp_path / "models" / "my-target")
    export = build_vllm_export(tmp_path / "exports", target_name=local_target)
    card = model_card(export, REPO)
    meta = yaml.safe_load(card.split("---\n")[1])
    assert "base_model" not in meta and "`base_model` is not set" in card
    usage = card.split("```bash\n")[1].split("```")[0]
    assert usage.startswith("vllm serve $TARGET --speculative-config") and REPO in usage
    assert "Set `TARGET` to the target model" in card
    assert str(tmp_path) not in card


def test_card_without_hub_target_or_baseline_tgi_medusa(tmp_path):
    export = build_tgi_medusa_export(tmp_path)
    card = model_card(export, REPO)
    meta = yaml.safe_load(card.split("---\n")[1])
    assert "base_model" not in meta
    assert "`base_model` is not set" in card and "local target (`my-llama`)" in card
    assert meta["library_name"] == "text-generation-inference"
    assert {"speculative-decoding", "medusa", "tgi", "deepspec"} <= set(meta["tags"])
    assert "No offline baseline" in card
    usage = card.split("```bash\n")[1].split("```")[0]
    assert usage.strip() == (f"text-generation-launcher --model-id {REPO} --speculate 3 "
                             "--max-input-tokens 1024 --max-total-tokens 2048")
    assert str(tmp_path) not in card  # no local absolute paths in a public card


def test_private_repo_and_revision_branch(hub, export):
    result = push(export, REPO, private=True, revision="exp/v1", commit_message="try v1")
    assert hub.repos[REPO].private
    assert result.revision == "exp/v1" and result.private
    assert "branch" in hub.routes()
    assert hub.commit_payloads[0]["revision"] == "exp/v1"
    assert hub.commit_payloads[0]["header"]["summary"] == "try v1"
    assert "README.md" in hub.files(REPO, "exp/v1")
    assert set(hub.files(REPO, "main")) == {".gitattributes"}  # main untouched
    # a second push to the same branch of the existing repo works too (exist_ok everywhere)
    (export / "serving_configs" / "vllm-serve.yaml").write_text("model: changed\n")
    push(export, REPO, private=True, revision="exp/v1")
    assert len(hub.commit_payloads) == 2
    assert hub.files(REPO, "exp/v1")["serving_configs/vllm-serve.yaml"] == b"model: changed\n"


def test_second_push_to_existing_repo(hub, export, capsys):
    push(export, REPO)
    (export / "generation_config.json").write_text(json.dumps({"eos_token_id": 3}))
    second = push(export, REPO)
    assert len(hub.commit_payloads) == 2 and not second.unchanged
    # huggingface_hub skips files the Hub already has: the second commit holds only the change
    assert [op["value"]["path"] for op in hub.commit_payloads[1]["operations"]] == [
        "generation_config.json"]
    assert hub.files(REPO)["generation_config.json"] == b'{"eos_token_id": 3}'
    assert "model.safetensors" in hub.files(REPO)
    # nothing changed: no empty commit, and the report says so
    third = push_and_report(export, REPO)
    assert third.unchanged and len(hub.commit_payloads) == 2
    assert third.commit_oid == hub.head(REPO).oid
    assert capsys.readouterr().out.startswith("Nothing to push")


def test_hidden_files_skipped_and_local_readme_carried_into_card(hub, export):
    (export / ".deepspec.json.tmp42").write_text("{half written")
    (export / "README.md").write_text("---\nfoo: 1\n---\nTrained on the support-chat mix.\n")
    result = push(export, REPO)
    remote = hub.files(REPO)
    assert ".deepspec.json.tmp42" not in remote and ".deepspec.json.tmp42" not in result.files
    card = remote["README.md"].decode()
    assert "## Notes from the export\n\nTrained on the support-chat mix." in card
    assert yaml.safe_load(card.split("---\n")[1])["base_model"] == TARGET  # one front matter
    assert "foo: 1" not in card


def test_private_flag_refuses_existing_public_repo(hub, export):
    push(export, REPO)
    with pytest.raises(DspecError, match="already exists and is public"):
        push(export, REPO, private=True, revision="secret")
    assert len(hub.commit_payloads) == 1 and "secret" not in hub.repos[REPO].branches


# -- Hub failures: a clear message, nothing committed, nothing local changed -------------------

def test_bad_token_is_an_auth_error(hub, export, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", WRONG_TOKEN)
    before = tree_hash(export)
    with pytest.raises(DspecError) as e:
        push(export, REPO)
    msg = str(e.value)
    assert "401" in msg and "HF_TOKEN" in msg and REPO in msg
    assert_token_nowhere(msg, repr(e.value))
    assert hub.commit_payloads == [] and REPO not in hub.repos
    assert tree_hash(export) == before


def test_read_only_token_needs_write_scope(hub, export, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", READ_TOKEN)
    with pytest.raises(DspecError) as e:
        push(export, REPO)
    msg = str(e.value)
    assert "403" in msg and "write scope" in msg and ORG in msg
    assert_token_nowhere(msg)
    assert hub.commit_payloads == []


def test_rate_limit(hub, export):
    before = tree_hash(export)
    hub.fail("create_repo", 429, retry_after=30)
    with pytest.raises(DspecError) as e:
        push(export, REPO)
    msg = str(e.value)
    assert "rate-limited" in msg and "429" in msg and "30 s" in msg
    assert hub.commit_payloads == []
    assert tree_hash(export) == before
    assert_token_nowhere(msg)


def test_server_error_during_commit(hub, export):
    before = tree_hash(export)
    hub.fail("commit", 500)
    with pytest.raises(DspecError) as e:
        push(export, REPO)
    msg = str(e.value)
    assert "500" in msg and "retry later" in msg and "uploading the files" in msg
    assert set(hub.files(REPO)) == {".gitattributes"}  # the repo exists, the commit did not land
    assert tree_hash(export) == before
    push(export, REPO)  # and a rerun succeeds
    assert "model.safetensors" in hub.files(REPO)


def test_unreachable_endpoint_names_it(hub, export, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    before = tree_hash(export)
    with pytest.raises(DspecError) as e:
        push(export, REPO)
    msg = str(e.value)
    assert f"cannot reach the Hub at {endpoint}" in msg and "HF_ENDPOINT" in msg
    assert_token_nowhere(msg)
    assert tree_hash(export) == before


def test_missing_token(hub, export, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(DspecError, match="HF_TOKEN") as e:
        push(export, REPO)
    assert "hf auth login" in str(e.value)
    assert hub.requests == []


def test_offline_mode_is_named(hub, export, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DspecError, match="HF_HUB_OFFLINE"):
        push(export, REPO)
    assert hub.requests == []


# -- refused before any network call -----------------------------------------------------------

def test_refuses_directory_without_manifest(hub, export):
    (export / "deepspec.json").unlink()
    with pytest.raises(DspecError, match="no deepspec.json"):
        push(export, REPO)
    assert hub.requests == []


@pytest.mark.parametrize("name", ["pytorch_model.bin", "sub/extra.pt", "heads.pkl"])
def test_refuses_pickle_files(hub, export, name):
    (export / name).parent.mkdir(exist_ok=True)
    (export / name).write_bytes(b"\x80\x04pickle")
    before = tree_hash(export)
    with pytest.raises(DspecError, match="pickle"):
        push(export, REPO)
    assert hub.requests == [] and tree_hash(export) == before


@pytest.mark.parametrize("repo_id", ["no-namespace", "a/b/c", "/abs/path", "org/", "org/na me"])
def test_refuses_malformed_repo_id(hub, export, repo_id):
    with pytest.raises(DspecError, match="not a Hub repo id"):
        push(export, repo_id)
    assert hub.requests == []


def test_env_token_not_an_argument():
    import inspect

    assert "token" not in inspect.signature(push).parameters
    assert "token" not in inspect.signature(push_and_report).parameters


# -- the CLI, on a real export ----------------------------------------------------------------

def test_cli_push_of_a_real_export(hub, tiny, tmp_path, capsys, monkeypatch):
    """`dspec export vllm` output pushed with `dspec push`: exit codes, output, no token."""
    from deepspec_plugin.cli import main
    from deepspec_plugin.exporters.vllm import export_vllm

    out = export_vllm(tiny.draft, tiny.target, tmp_path / "exported", load=False).out
    assert main(["push", str(out), "--repo", REPO, "--revision", "v1"]) == 0
    printed = capsys.readouterr()
    assert "in one commit" in printed.out and f"{hub.url}/{REPO}/commit/" in printed.out
    remote = hub.files(REPO, "v1")
    assert remote["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert "speculative-decoding" in remote["README.md"].decode()
    monkeypatch.setenv("HF_TOKEN", WRONG_TOKEN)
    assert main(["push", str(out), "--repo", REPO]) == 2
    printed = capsys.readouterr()
    assert "401" in printed.err
    assert_token_nowhere(printed.out, printed.err, root=tmp_path)
