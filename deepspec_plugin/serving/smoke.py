"""Is a deployed draft being watched? One request through the server, then the deepspec metrics.

What the Helm chart's ``helm test`` pod runs (``python -m deepspec_plugin.serving.smoke``), and
what anyone can run against a server: it sends one completion (vLLM: ``/v1/completions``; TGI:
``/generate``), then reads the metrics page (vLLM's own ``/metrics``, where the plugin's metrics
live; for TGI the sidecar's) until ``deepspec_draft_tokens_total`` counts the drafts of that
request. Every failure is one line that says what is missing and where to look.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

from deepspec_plugin.bench import promparse
from deepspec_plugin.errors import DspecError
from deepspec_plugin.openai_http import Client

PROMPT = "Write one sentence about the sea."
DRAFT_TOKENS = "deepspec_draft_tokens_total"


@dataclass(frozen=True)
class SmokeResult:
    generated: str  # the completion's text
    draft_tokens: float  # deepspec_draft_tokens_total after it
    accepted_tokens: float
    metrics_url: str

    def line(self) -> str:
        rate = self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0
        return (f"ok: {self.draft_tokens:g} draft tokens, {self.accepted_tokens:g} accepted "
                f"(acceptance {rate:.3f}) on {self.metrics_url}")


def check_server(url: str, *, engine: str = "vllm", metrics_url: str | None = None,
                 model: str | None = None, max_tokens: int = 24,
                 timeout_s: float = 120.0) -> SmokeResult:
    """One greedy request to the server at ``url``, then wait until its deepspec metrics count
    drafts; DspecError naming what is missing otherwise."""
    if engine not in ("vllm", "tgi"):
        raise DspecError(f"unknown engine {engine!r}", "use vllm or tgi")
    url = url.rstrip("/")
    metrics_url = metrics_url or f"{url}/metrics"
    client = Client(timeout=timeout_s, fix="check the Service and that the pod is ready",
                    name=engine)
    deadline = time.monotonic() + timeout_s
    _wait_healthy(client, f"{url}/health", deadline)
    if engine == "vllm":
        model = model or _first_model(client, url)
        body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
        answer = client.post_json(f"{url}/v1/completions", body).check(
            "check the model name (--model) and the server's log")
        generated = answer.json()["choices"][0]["text"]
    else:
        body = {"inputs": PROMPT, "parameters": {"max_new_tokens": max_tokens}}
        answer = client.post_json(f"{url}/generate", body).check("check TGI's log")
        generated = answer.json()["generated_text"]
    return _wait_for_drafts(client, metrics_url, deadline, generated, engine)


def _wait_healthy(client: Client, health_url: str, deadline: float) -> None:
    while True:
        try:
            if client.get(health_url).status == 200:
                return
        except DspecError:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise DspecError(f"{health_url} never answered 200", "check the pod's log")
        time.sleep(2.0)


def _first_model(client: Client, url: str) -> str:
    models = client.get(f"{url}/v1/models").check(
        "pass --model (with --api-key, /v1/models needs the key)").json()
    return models["data"][0]["id"]


def _wait_for_drafts(client: Client, metrics_url: str, deadline: float, generated: str,
                     engine: str) -> SmokeResult:
    where = ("the plugin is not loaded in vLLM (check plugin.install and the engine's log)"
             if engine == "vllm" else "check the deepspec-sidecar container's log")
    seen_any = False
    while True:
        samples = promparse.parse_samples(client.get_text(metrics_url, "check the metrics port"))
        seen_any = seen_any or promparse.has_prefix(samples, "deepspec_")
        drafted = promparse.total(samples, DRAFT_TOKENS) or 0.0
        if drafted > 0:
            accepted = promparse.total(samples, "deepspec_accepted_tokens_total") or 0.0
            return SmokeResult(generated, drafted, accepted, metrics_url)
        if time.monotonic() > deadline:
            if not seen_any:
                raise DspecError(f"no deepspec_ metric on {metrics_url}", where)
            raise DspecError(f"{metrics_url} counts no draft token after a request",
                             "speculation is off: check the speculative config in the log")
        time.sleep(2.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deepspec_plugin.serving.smoke",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the server, e.g. http://my-release-deepspec-serving:8000")
    parser.add_argument("--engine", default="vllm", choices=("vllm", "tgi"))
    parser.add_argument("--metrics-url", help="the deepspec metrics (default: URL/metrics)")
    parser.add_argument("--model", help="the served model name (default: the first of /v1/models)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds in all")
    args = parser.parse_args(argv)
    try:
        result = check_server(args.url, engine=args.engine, metrics_url=args.metrics_url,
                              model=args.model, timeout_s=args.timeout)
    except DspecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(result.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
