"""A running OpenAI-compatible server (vLLM or TGI) as an engine, measured through its counters.

Each prompt goes to ``POST {url}/v1/completions`` (up to the batch size at once, in threads);
acceptance comes from the DELTAS of the server's Prometheus counters, scraped from ``/metrics``
before and after each batch. Other traffic on the server during a batch is counted too: measure on
a server that serves only this run.

vLLM (prompt as token ids; ``return_token_ids`` gives the exact new ids back):
``vllm:spec_decode_num_drafts_total``, ``..._num_draft_tokens_total``,
``..._num_accepted_tokens_total`` and ``..._num_accepted_tokens_per_pos_total{position=i}``,
summed over the label sets of the served model (one per engine under data parallelism); label
sets of other models are left out. vLLM creates the per-position counters for positions 0..k-1
at start-up, so k is read from them.

TGI (prompt as text, decoded with the target's tokenizer; TGI adds the special tokens itself, so a
leading BOS is dropped; new ids are the returned text re-encoded): the deltas of
``tgi_request_skipped_tokens`` (``_sum``: accepted draft tokens; ``_count``: request-steps,
prefills included) and ``tgi_batch_next_size_sum`` (requests prefilled) become counts by
``metrics.tgi_spec_counts``, as in the TGI sidecar: drafts = request-steps - prefills, draft
tokens = drafts x N, where N is TGI's ``--speculate`` (TGI does not expose it: pass
``speculate``); no per-position data. A TGI server started without speculation records zeros in
the same metric: its acceptance then reads 0.

HTTP goes through ``deepspec_plugin.openai_http`` (timeouts, one-line errors).

The server cannot decode without its draft, so there is no baseline (``supports_baseline`` is
False) and counts exist only per batch (``per_request_counts`` is False).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from deepspec_plugin import metrics
from deepspec_plugin.bench import promparse
from deepspec_plugin.bench.engines.base import BatchResult, Engine, Generation, GenerationConfig
from deepspec_plugin.errors import DspecError
from deepspec_plugin.metrics import SpecCounts
from deepspec_plugin.openai_http import Client

FLAVORS = ("auto", "vllm", "tgi")
VERSION_TIMEOUT_S = 10.0

VLLM_DRAFTS = "vllm:spec_decode_num_drafts_total"
VLLM_DRAFT_TOKENS = "vllm:spec_decode_num_draft_tokens_total"
VLLM_ACCEPTED = "vllm:spec_decode_num_accepted_tokens_total"
VLLM_PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos_total"


class EndpointEngine(Engine):
    """A server configured with a draft; k is the server's."""

    name = "endpoint"
    supports_baseline = False
    per_request_counts = False

    def __init__(
        self,
        url: str,
        *,
        model: str | None = None,
        metrics_url: str | None = None,
        flavor: str = "auto",
        speculate: int | None = None,
        timeout: float = 600.0,
        tokenizer=None,
        max_concurrency: int | None = None,
    ):
        if flavor not in FLAVORS:
            raise DspecError(
                f"unknown server flavor {flavor!r}", f"use one of {', '.join(FLAVORS)}"
            )
        if speculate is not None and speculate < 1:
            raise DspecError(
                f"speculate is {speculate}", "pass the server's number of speculative tokens (>= 1)"
            )
        self.url = url.rstrip("/")
        self.metrics_url = metrics_url or f"{self.url}/metrics"
        self.timeout = timeout
        self.tokenizer = tokenizer
        self.max_concurrency = max_concurrency
        self._http = Client(timeout=timeout)

        samples = self._scrape()
        self.flavor = self._detect_flavor(samples) if flavor == "auto" else flavor
        if self.flavor == "vllm":
            self.model = model or self._served_model(samples)
            self.fixed_k = self._vllm_k(samples, speculate)
        else:
            if speculate is None:
                raise DspecError(
                    "TGI does not expose its number of speculative tokens",
                    "pass the server's --speculate value (--speculate N)",
                )
            if tokenizer is None:
                raise DspecError(
                    "TGI takes text prompts, and no tokenizer was given",
                    "pass the target's tokenizer",
                )
            self.model = model
            self.fixed_k = int(speculate)

    # --- HTTP --------------------------------------------------------------------------------

    def _scrape(self) -> list[promparse.Sample]:
        response = self._http.get(self.metrics_url)
        if response.status != 200:
            raise DspecError(
                f"{self.metrics_url} answered HTTP {response.status}: "
                "the server exposes no Prometheus metrics there",
                "point --metrics-url at the server's metrics (vLLM and TGI serve /metrics)",
            )
        try:
            return promparse.parse_samples(response.text)
        except ValueError as exc:
            raise DspecError(
                f"{self.metrics_url} is not Prometheus exposition text ({exc})",
                "point --metrics-url at the server's /metrics",
            ) from None

    def _detect_flavor(self, samples) -> str:
        has_vllm_spec = promparse.total(samples, VLLM_DRAFTS) is not None
        if has_vllm_spec:
            return "vllm"
        if promparse.has_prefix(samples, "tgi_"):
            return "tgi"
        if promparse.has_prefix(samples, "vllm:"):
            raise DspecError(
                f"the vLLM server at {self.url} exposes no speculative-decoding counters",
                "was it started with --speculative-config?",
            )
        raise DspecError(
            f"{self.metrics_url} exposes no speculative-decoding counters "
            "(neither vllm:spec_decode_* nor tgi_*)",
            "was the server started with --speculative-config (vLLM) / --speculate (TGI)?",
        )

    def _served_model(self, samples) -> str:
        names = promparse.label_values(samples, VLLM_DRAFTS, "model_name")
        if len(names) == 1:
            return next(iter(names))
        response = self._http.get(f"{self.url}/v1/models")
        if response.status == 200:
            models = [m.get("id") for m in response.json().get("data", [])]
            if len(models) == 1:
                return models[0]
        raise DspecError(
            f"the server at {self.url} serves several models "
            f"({', '.join(sorted(names)) or 'unknown'})",
            "name one with --model",
        )

    def _ours(self, labels: dict[str, str]) -> bool:
        return self.model is None or labels.get("model_name", self.model) == self.model

    def _vllm_k(self, samples, speculate: int | None) -> int:
        positions = promparse.by_label(samples, VLLM_PER_POS, "position", self._ours)
        if promparse.total(samples, VLLM_DRAFTS, self._ours) is None:
            raise DspecError(
                f"the vLLM server at {self.url} has no speculative-decoding counters "
                f"for model {self.model!r}",
                "check --model, and that the server was started with --speculative-config",
            )
        k = max((int(p) for p in positions), default=-1) + 1  # positions 0..k-1 exist from start-up
        if k == 0:
            if speculate is None:
                raise DspecError(
                    f"the vLLM server at {self.url} exposes no per-position counters "
                    "to read k from",
                    "pass the server's num_speculative_tokens (--speculate N)",
                )
            return int(speculate)
        if speculate is not None and speculate != k:
            raise DspecError(
                f"the vLLM server at {self.url} speculates {k} tokens, not {speculate}",
                f"pass --speculate {k} or leave it out",
            )
        return k

    # --- counters ----------------------------------------------------------------------------

    def _vllm_counters(self, samples) -> SpecCounts:
        def value(name):
            return int(promparse.total(samples, name, self._ours) or 0)

        per_pos = promparse.by_label(samples, VLLM_PER_POS, "position", self._ours)
        positions = [0] * (max((int(p) for p in per_pos), default=-1) + 1)
        for p, v in per_pos.items():
            positions[int(p)] = int(v)
        return SpecCounts(
            value(VLLM_DRAFTS), value(VLLM_DRAFT_TOKENS), value(VLLM_ACCEPTED), positions
        )

    def _read(self) -> SpecCounts | promparse.TgiTotals:
        samples = self._scrape()
        if self.flavor == "vllm":
            return self._vllm_counters(samples)
        return promparse.tgi_totals(samples)

    def _read_settled(self, tries: int = 40, pause_s: float = 0.05):
        """Counters after the batch: a server may record a step's stats just after it answers."""
        last = self._read()
        for _ in range(tries):
            time.sleep(pause_s)
            now = self._read()
            if now == last:
                return now
            last = now
        return last

    def _delta(self, before, after, num_requests: int) -> SpecCounts:
        if self.flavor == "vllm":
            return after.since(before)
        steps = (after.request_steps or 0) - (before.request_steps or 0)
        if steps == 0:
            raise DspecError(
                f"TGI at {self.url} recorded no tgi_request_skipped_tokens "
                f"for {num_requests} requests",
                "check --metrics-url, and that the server was started with --speculate",
            )
        if steps < num_requests:  # each request records at least its prefill step
            raise DspecError(
                f"TGI recorded {steps} request-steps for {num_requests} requests",
                "measure on a TGI server that serves only this run",
            )
        accepted = (after.accepted or 0) - (before.accepted or 0)
        prefills = None if after.prefills is None else after.prefills - (before.prefills or 0)
        return metrics.tgi_spec_counts(steps, accepted, prefills, self.fixed_k)

    # --- requests ----------------------------------------------------------------------------

    def _prompt(self, ids: list[int]):
        if self.flavor == "vllm":
            return list(ids)
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if bos is not None and ids and ids[0] == bos:
            ids = ids[1:]  # TGI adds the special tokens itself
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _complete(self, ids: list[int], cfg: GenerationConfig) -> list[int]:
        body = {
            "prompt": self._prompt(ids),
            "max_tokens": cfg.max_new_tokens,
            "temperature": cfg.temperature,
            "seed": cfg.seed,
        }
        if self.model:
            body["model"] = self.model
        if self.flavor == "vllm":
            # As in every engine, a request stops at exactly the given stop ids.
            body.update(
                stop_token_ids=list(cfg.stop_token_ids), ignore_eos=True, return_token_ids=True
            )
        url = f"{self.url}/v1/completions"
        response = self._http.post_json(url, body).check(
            "check the model name and the lengths against the server's configuration"
        )
        choice = response.json()["choices"][0]
        if choice.get("token_ids") is not None:
            return [int(t) for t in choice["token_ids"]]
        if self.tokenizer is None:
            raise DspecError(
                f"{url} returned text without token ids", "pass the target's tokenizer"
            )
        return list(self.tokenizer.encode(choice.get("text", ""), add_special_tokens=False))

    def generate(self, prompts: list[list[int]], cfg: GenerationConfig) -> BatchResult:
        if cfg.k is None:
            raise DspecError(
                "a speculative endpoint cannot decode without its draft, so it has no baseline",
                "measure plain decoding with another engine (reference, hf or vllm)",
            )
        if cfg.k != self.fixed_k:
            raise DspecError(
                f"the server speculates {self.fixed_k} tokens, not {cfg.k}", f"use k={self.fixed_k}"
            )
        if not prompts:
            raise DspecError("an empty batch", "give at least one prompt")
        before = self._read()
        start = time.perf_counter()
        workers = min(len(prompts), self.max_concurrency or len(prompts))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            outputs = list(pool.map(lambda p: self._complete(p, cfg), prompts))
        elapsed = time.perf_counter() - start
        after = self._read_settled()
        return BatchResult(
            generations=[Generation(token_ids=ids) for ids in outputs],
            elapsed_s=elapsed,
            counts=self._delta(before, after, len(prompts)),
        )

    def describe(self) -> dict:
        info = {
            "engine": self.name,
            "url": self.url,
            "metrics_url": self.metrics_url,
            "flavor": self.flavor,
            "model": self.model,
            "k": self.fixed_k,
            "counts": "batch deltas of the server's Prometheus counters",
        }
        path = "/version" if self.flavor == "vllm" else "/info"
        try:
            response = Client(timeout=VERSION_TIMEOUT_S).get(f"{self.url}{path}")
            if response.status == 200:
                info["server_version"] = response.json().get("version")
        except Exception:  # the version is a courtesy; the run does not depend on it
            pass
        return info
