"""The endpoint engine against a local stand-in server: counter deltas, flavors and errors."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler

import pytest
from local_http import LocalServer, free_port  # tests/ is on sys.path: no __init__.py
from tgi_standin import StandInTgi

from deepspec_plugin.bench import promparse
from deepspec_plugin.bench.engines.base import GenerationConfig
from deepspec_plugin.bench.engines.endpoint import EndpointEngine
from deepspec_plugin.bench.engines.factory import ENGINES, make_engine
from deepspec_plugin.errors import DspecError
from deepspec_plugin.metrics import SpecCounts
from deepspec_plugin.serving.tgi_sidecar import TgiSidecar, build_telemetry, read_tgi_once

MODEL = "tiny-target"
K = 3
# What each request does to the stand-in's counters: its drafts' accepted lengths (vLLM), or its
# tgi_request_skipped_tokens observations (TGI: the prefill step's 0, then one per decode step).
VLLM_ACCEPTED_PER_DRAFT = (3, 1, 0, 2)
TGI_SKIPPED_PER_STEP = (0, 2, 1, 0, 3)


class StandInServer(LocalServer):
    """A STAND-IN for vLLM / TGI (not a model server): a tiny http.server on 127.0.0.1.

    It answers ``/v1/completions`` with fixed tokens and serves ``/metrics`` in the exact text
    format of the real servers, advancing its counters per request:

    * ``vllm``: vLLM 0.32's spec-decode counters as its prometheus_client exposes them (names,
      HELP/TYPE lines, ``_total`` and ``_created`` samples, labels ``engine`` and ``model_name``,
      and ``position``; copied from the output of vLLM's own SpecDecodingProm class). Requests
      alternate between engines 0 and 1 of MODEL (data parallelism); the label sets of another
      model advance on every request too and must not be counted.
    * ``tgi``: TGI's page as ``StandInTgi`` (tests/tgi_standin.py) renders it, the same page the
      TGI sidecar's tests read: each request is queued and prefilled alone, then decoded step by
      step. ``other_client_steps``, when set, are the decode steps of another client's request,
      prefilled and decoded along with the next request.
    * ``vllm-nospec``: a vLLM server without speculation (no spec-decode counters).
    """

    def __init__(self, flavor: str):
        self.flavor = flavor
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        # vLLM counters per (model, engine): drafts, draft tokens, accepted, per position
        self.vllm = {
            (MODEL, "0"): [0, 0, 0, [0] * K],
            (MODEL, "1"): [0, 0, 0, [0] * K],
            ("other-model", "0"): [7, 21, 9, [5, 3, 1]],
        }
        self.tgi = StandInTgi(speculate=K)
        self.other_client_steps: tuple[int, ...] = ()
        super().__init__(self._handler())

    # --- what a request does ---------------------------------------------------------------

    def _advance(self) -> None:
        with self.lock:
            n = len(self.requests)
            if self.flavor == "vllm":
                for key in ((MODEL, str(n % 2)), ("other-model", "0")):
                    c = self.vllm[key]
                    for a in VLLM_ACCEPTED_PER_DRAFT:
                        c[0] += 1
                        c[1] += K
                        c[2] += a
                        for i in range(a):
                            c[3][i] += 1
            elif self.flavor == "tgi":
                for steps in (TGI_SKIPPED_PER_STEP[1:], self.other_client_steps):
                    if steps:
                        self.tgi.prefill(1)
                        for accepted in steps:
                            self.tgi.decode([accepted])
                        self.tgi.finish(len(steps) + sum(steps))
                self.other_client_steps = ()

    # --- exposition text -------------------------------------------------------------------

    def metrics_text(self) -> str:
        with self.lock:
            if self.flavor == "tgi":
                return self.tgi.render()
            if self.flavor == "vllm":
                return self._vllm_text()
            return (
                "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
                "# TYPE vllm:num_requests_running gauge\n"
                f'vllm:num_requests_running{{engine="0",model_name="{MODEL}"}} 0.0\n'
            )

    def _vllm_text(self) -> str:
        created = 1.7958718852329009e09
        out = []
        specs = [
            ("vllm:spec_decode_num_drafts", "Number of spec decoding drafts.", 0),
            ("vllm:spec_decode_num_draft_tokens", "Number of draft tokens.", 1),
            ("vllm:spec_decode_num_accepted_tokens", "Number of accepted tokens.", 2),
        ]
        for name, doc, i in specs:
            out += [f"# HELP {name}_total {doc}", f"# TYPE {name}_total counter"]
            for (model, engine), c in self.vllm.items():
                out.append(f'{name}_total{{engine="{engine}",model_name="{model}"}} {float(c[i])}')
            out += [f"# HELP {name}_created {doc}", f"# TYPE {name}_created gauge"]
            for model, engine in self.vllm:
                out.append(f'{name}_created{{engine="{engine}",model_name="{model}"}} {created}')
        name, doc = (
            "vllm:spec_decode_num_accepted_tokens_per_pos",
            "Accepted tokens per draft position.",
        )
        out += [f"# HELP {name}_total {doc}", f"# TYPE {name}_total counter"]
        for (model, engine), c in self.vllm.items():
            for pos, v in enumerate(c[3]):
                labels = f'engine="{engine}",model_name="{model}",position="{pos}"'
                out.append(f"{name}_total{{{labels}}} {float(v)}")
        out += [f"# HELP {name}_created {doc}", f"# TYPE {name}_created gauge"]
        for model, engine in self.vllm:
            for pos in range(K):
                labels = f'engine="{engine}",model_name="{model}",position="{pos}"'
                out.append(f"{name}_created{{{labels}}} {created}")
        return "\n".join(out) + "\n"

    # --- HTTP ------------------------------------------------------------------------------

    def _handler(self):
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body: str, content_type="application/json"):
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/metrics":
                    self._send(200, stand_in.metrics_text(), "text/plain; version=0.0.4")
                elif self.path == "/v1/models":
                    self._send(200, json.dumps({"object": "list", "data": [{"id": MODEL}]}))
                elif self.path == "/version":
                    self._send(200, json.dumps({"version": "0.32.0"}))
                else:
                    self._send(404, json.dumps({"detail": "Not Found"}))

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/completions":
                    return self._send(404, json.dumps({"detail": "Not Found"}))
                if body.get("max_tokens", 0) > 64:
                    msg = "max_tokens is too large: the model's context length is 256"
                    err = {"error": {"message": msg, "type": "BadRequestError", "code": 400}}
                    if stand_in.flavor == "tgi":
                        err = {"error": msg, "error_type": "validation"}
                    return self._send(400 if stand_in.flavor != "tgi" else 422, json.dumps(err))
                with stand_in.lock:
                    stand_in.requests.append(body)
                time.sleep(0.02)  # requests overlap, as on a real server
                stand_in._advance()
                n = body["max_tokens"]
                choice = {
                    "index": 0,
                    "text": "a b c" if stand_in.flavor == "tgi" else "",
                    "finish_reason": "length",
                }
                if stand_in.flavor != "tgi" and body.get("return_token_ids"):
                    choice["token_ids"] = list(range(10, 10 + n))
                self._send(
                    200,
                    json.dumps({"id": "cmpl-1", "object": "text_completion", "choices": [choice]}),
                )

        return Handler


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from deepspec_plugin.models import load_tokenizer

    return load_tokenizer(tiny.target)


PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]


def test_the_stand_in_vllm_text_parses_like_vllms():
    """The stand-in's text reads back through the same parser, with the sums expected."""
    with StandInServer("vllm") as server:
        samples = promparse.parse_samples(server.metrics_text())
    assert promparse.total(samples, "vllm:spec_decode_num_drafts_total") == 7
    assert promparse.by_label(
        samples, "vllm:spec_decode_num_accepted_tokens_per_pos_total", "position"
    ) == {
        "0": 5.0,
        "1": 3.0,
        "2": 1.0,
    }
    assert promparse.total(samples, "vllm:spec_decode_num_drafts_created") is not None


def test_vllm_deltas_sum_our_model_over_engines_and_skip_other_models():
    with StandInServer("vllm") as server:
        engine = EndpointEngine(server.url)
        assert (engine.flavor, engine.model, engine.fixed_k) == ("vllm", MODEL, K)
        assert engine.supports_baseline is False and engine.per_request_counts is False
        for _ in range(2):  # the second batch must count only its own requests
            result = engine.generate(
                PROMPTS, GenerationConfig(max_new_tokens=5, k=K, stop_token_ids=(2,))
            )
            expected = SpecCounts()
            for _ in PROMPTS:
                for a in VLLM_ACCEPTED_PER_DRAFT:
                    expected.record_draft(K, a)
            assert result.counts == expected
        assert [g.token_ids for g in result.generations] == [list(range(10, 15))] * 3
        assert all(g.counts is None for g in result.generations)
        sent = server.requests[-1]
        assert sent["model"] == MODEL and sent["prompt"] in PROMPTS and sent["max_tokens"] == 5
        assert (
            sent["stop_token_ids"] == [2]
            and sent["ignore_eos"] is True
            and sent["return_token_ids"] is True
        )
        assert engine.describe()["server_version"] == "0.32.0"
        engine.close()


def test_vllm_k_from_the_server_and_mismatches():
    with StandInServer("vllm") as server:
        with pytest.raises(DspecError, match="speculates 3 tokens, not 5"):
            EndpointEngine(server.url, speculate=5)
        engine = EndpointEngine(server.url, speculate=3)
        with pytest.raises(DspecError, match="no baseline"):
            engine.generate(PROMPTS, GenerationConfig(max_new_tokens=4))
        with pytest.raises(DspecError, match="not 2"):
            engine.generate(PROMPTS, GenerationConfig(max_new_tokens=4, k=2))
        with pytest.raises(DspecError, match="HTTP 400: max_tokens is too large"):
            engine.generate(PROMPTS, GenerationConfig(max_new_tokens=100, k=3))
        with pytest.raises(DspecError, match="no speculative-decoding counters for model 'nope'"):
            EndpointEngine(server.url, model="nope")


def test_tgi_deltas(tokenizer):
    with StandInServer("tgi") as server:
        with pytest.raises(DspecError, match="--speculate"):
            EndpointEngine(server.url, tokenizer=tokenizer)
        engine = EndpointEngine(server.url, speculate=K, tokenizer=tokenizer)
        assert engine.flavor == "tgi" and engine.fixed_k == K
        prompt = tokenizer("Janet has three apples").input_ids
        for _ in range(2):
            result = engine.generate([prompt, prompt], GenerationConfig(max_new_tokens=6, k=K))
            drafts = 2 * (len(TGI_SKIPPED_PER_STEP) - 1)  # the prefill step is not a draft
            assert result.counts == SpecCounts(
                drafts, drafts * K, 2 * sum(TGI_SKIPPED_PER_STEP), []
            )
        assert result.generations[0].token_ids == tokenizer.encode(
            "a b c", add_special_tokens=False
        )
        sent = server.requests[-1]
        assert isinstance(sent["prompt"], str) and "stop_token_ids" not in sent
        assert tokenizer(sent["prompt"]).input_ids[-3:] == prompt[-3:]
        with pytest.raises(DspecError, match="HTTP 422: max_tokens is too large"):
            engine.generate([prompt], GenerationConfig(max_new_tokens=100, k=K))


def test_tgi_counts_are_the_sidecars(tokenizer):
    """One TGI page, read by the endpoint engine (batch deltas, the report's figures) and by the
    TGI sidecar (scrape deltas, the dashboard's), gives the same counts, here with another client's
    request served during the batch: its prefill step is not a draft either."""
    with StandInServer("tgi") as server:
        engine = EndpointEngine(server.url, speculate=K, tokenizer=tokenizer)
        metrics_url = f"{server.url}/metrics"
        sidecar = TgiSidecar(metrics_url, K, build_telemetry(K, model_name="m"))
        assert sidecar.scrape_once() is not None  # the sidecar's starting point
        server.other_client_steps = (1, 3, 0)
        prompt = tokenizer("Janet has three apples").input_ids
        result = engine.generate([prompt, prompt], GenerationConfig(max_new_tokens=6, k=K))
        fed = sidecar.scrape_once()
        once = read_tgi_once(metrics_url, K)  # since TGI started, which is this batch here
    drafts = 2 * (len(TGI_SKIPPED_PER_STEP) - 1) + 3
    accepted = 2 * sum(TGI_SKIPPED_PER_STEP) + 1 + 3 + 0
    expected = SpecCounts(drafts, drafts * K, accepted, [])
    assert result.counts == expected
    assert SpecCounts(fed.drafts, fed.draft_tokens, fed.accepted, []) == expected
    assert once.counts == expected


def test_unreachable_server_fails_fast():
    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(DspecError, match="no server at") as err:
        EndpointEngine(url)
    assert time.monotonic() - start < 5
    assert "start it or check --endpoint" in str(err.value)


def test_a_bad_url_is_a_one_line_error():
    with pytest.raises(DspecError, match="no server at notaurl/metrics") as err:
        EndpointEngine("notaurl")
    assert "start it or check --endpoint" in str(err.value)


def test_server_without_spec_metrics():
    with StandInServer("vllm-nospec") as server:
        with pytest.raises(DspecError, match="exposes no speculative-decoding counters") as err:
            EndpointEngine(server.url)
        assert "--speculative-config" in str(err.value)


def test_metrics_endpoint_missing():
    with StandInServer("vllm") as server:
        with pytest.raises(DspecError, match="HTTP 404: the server exposes no Prometheus metrics"):
            EndpointEngine(server.url, metrics_url=f"{server.url}/nometrics")


def test_factory_makes_the_endpoint_engine_and_refuses_unknown_names():
    with StandInServer("vllm") as server:
        engine = make_engine("endpoint", target=None, draft=None, endpoint=server.url)
        assert isinstance(engine, EndpointEngine) and engine.fixed_k == K
    with pytest.raises(DspecError, match="needs a server URL"):
        make_engine("endpoint", target=None, draft=None)
    with pytest.raises(DspecError, match="unknown engine 'sglang'") as err:
        make_engine("sglang", target=None, draft=None)
    assert all(name in str(err.value) for name in ENGINES)
    with pytest.raises(DspecError, match="needs a target"):
        make_engine("hf", target=None, draft=None)
