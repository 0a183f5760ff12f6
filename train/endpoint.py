"""Training responses written by a running OpenAI-compatible server (vLLM, TGI, SGLang).

``dspec data generate --endpoint URL`` uses ``EndpointGenerator`` in place of the local target's
plain decoding; the local target still scores each finished sequence
(`deepspec_plugin.train.data`). So a server must serve the SAME target: the stored ids have to be
the target tokenizer's, and the responses the target's own.

Requests: ``POST {url}/v1/completions`` per context (in threads, through
``deepspec_plugin.openai_http``: the bench's timeouts and one-line errors). The prompt goes as
TEXT, the context decoded with the target's tokenizer (special tokens kept, a leading BOS dropped:
servers add the special tokens themselves), so that any OpenAI-compatible server takes it.
vLLM-like extras ride along (``stop_token_ids``, ``return_token_ids``,
``skip_special_tokens: false``, ``spaces_between_special_tokens: false``); a server that rejects
unknown fields (4xx) is asked once more without them, and not sent them again.

Back to token ids, with checks (counts in ``stats``):

* ``roundtrip_mismatches``: the response text, encoded with the target's tokenizer
  (``add_special_tokens=False``), does not decode back to exactly that text.
* ``server_id_mismatches``: the server returned token ids (vLLM) and, in the target's tokenizer,
  they decode to something other than the text it returned (special tokens kept or skipped;
  a trailing incomplete character is ignored: servers hold back bytes that do not yet form one).
  Ids that DO decode to the text but differ from the text's re-encoding are the same tokenizer
  sampling a non-canonical split ("a" + "b" where "ab" exists; frequent for random tiny models,
  rarer for trained ones): they are counted in ``noncanonical`` and kept as they are, since they
  are exactly what the target sampled. Otherwise the re-encoded text is kept.
* ``prompt_mismatches``: the server returned the prompt ids it used (vLLM's
  ``prompt_token_ids``) and they differ from the target tokenizer's encoding of the prompt text.
* ``context_mismatches``: the target tokenizer's own encoding of the prompt text
  (``add_special_tokens=True``, as a server encodes it) differs from the stored context. This is
  a property of the chat template and tokenizer, not of the server: chat-formatted contexts are
  encoded from the template's text with its special tokens recognised, so for byte-level BPE
  tokenizers (and templates that write their own BOS) the round trip holds; where it does not
  (some SentencePiece tokenizers re-split a leading space), the server answered a context that
  differs slightly from the stored one. The stored sample stays self-consistent (the local target
  scores exactly the stored sequence), so this is counted, warned about once, and not an error.

``disagreements`` counts responses with a round-trip, server-id or prompt mismatch (a
round trip of text whose server ids were kept does not count). Past ``MIN_CHECKED`` responses,
more than ``MAX_DISAGREEMENT`` of them disagreeing raises DspecError: the server's tokenizer is
not the target's.

A response ends where the local engine's would: it is cut after the first stop id, and a
response the server ended with ``finish_reason: "stop"`` gets its stop id appended when the ids
lack it (text never holds it): the server's ``stop_reason`` where it is one of the stop ids, else
the first stop id.
"""

from __future__ import annotations

import time
import warnings
from concurrent.futures import ThreadPoolExecutor

from deepspec_plugin.bench.engines.base import BatchResult, Engine, Generation, GenerationConfig
from deepspec_plugin.errors import DspecError
from deepspec_plugin.openai_http import Client

MIN_CHECKED = 20  # responses checked before the disagreement share can raise
MAX_DISAGREEMENT = 0.01  # share of disagreeing responses tolerated
REPLACEMENT_CHAR = "\ufffd"
# Fields of a completion request that every OpenAI-compatible server knows.
STANDARD_FIELDS = ("model", "prompt", "max_tokens", "temperature", "seed")
# owned_by of /v1/models, by server.
FLAVORS_BY_OWNER = {"vllm": "vllm", "sglang": "sglang", "text-generation-inference": "tgi",
                    "tgi": "tgi"}


def _cut_at_stop(ids: list[int], stops: tuple[int, ...]) -> list[int]:
    """ids up to and including the first stop id (the local engine stops there)."""
    for i, t in enumerate(ids):
        if t in stops:
            return ids[: i + 1]
    return ids


def _same_text(decoded: str, text: str) -> bool:
    return decoded == text or decoded.rstrip(REPLACEMENT_CHAR) == text.rstrip(REPLACEMENT_CHAR)


class EndpointGenerator(Engine):
    """Plain decoding (k=None) of the target by a running OpenAI-compatible server."""

    name = "endpoint-generator"
    per_request_counts = False

    def __init__(self, url: str, tokenizer, *, model: str | None = None, timeout: float = 600.0,
                 max_concurrency: int | None = None):
        if max_concurrency is not None and max_concurrency < 1:
            raise DspecError(f"max_concurrency is {max_concurrency}", "use 1 or more")
        self.url = url.rstrip("/")
        self.tokenizer = tokenizer
        self.timeout = timeout
        self.max_concurrency = max_concurrency
        self.flavor: str | None = None
        self.stats = {"responses": 0, "roundtrip_mismatches": 0, "server_id_mismatches": 0,
                      "prompt_mismatches": 0, "context_mismatches": 0, "noncanonical": 0,
                      "disagreements": 0}
        self._send_extras = True  # until a server rejects them
        self._warned_context = False
        self._http = Client(timeout=timeout)
        self.model = self._served_model(model)

    # --- HTTP --------------------------------------------------------------------------------

    def _served_model(self, model: str | None) -> str | None:
        url = f"{self.url}/v1/models"
        response = self._http.get(url)
        if response.status == 404:  # older TGI: no model list; requests work without one
            return model
        response.check("check --endpoint (the base URL of an OpenAI-compatible server)")
        try:
            cards = [c for c in response.json().get("data", []) if isinstance(c, dict)]
        except (ValueError, AttributeError):
            raise DspecError(f"{url} did not answer with a model list",
                             "check --endpoint (the base URL of an OpenAI-compatible server)"
                             ) from None
        ids = [str(c.get("id")) for c in cards]
        owners = {str(c.get("owned_by", "")).lower() for c in cards}
        self.flavor = next((FLAVORS_BY_OWNER[o] for o in owners if o in FLAVORS_BY_OWNER), None)
        if model is not None:
            if ids and model not in ids:
                raise DspecError(f"the server at {self.url} serves {', '.join(ids)}, not {model}",
                                 f"use one of {', '.join(ids)}")
            return model
        if len(ids) == 1:
            return ids[0]
        own = str(getattr(self.tokenizer, "name_or_path", ""))  # vLLM names a model by its path
        if own in ids:
            return own
        if not ids:
            return None
        raise DspecError(f"the server at {self.url} serves several models ({', '.join(ids)})",
                         "serve only the target there")

    def _post(self, body: dict) -> dict:
        url = f"{self.url}/v1/completions"
        response = self._http.post_json(url, body)
        extras = [k for k in body if k not in STANDARD_FIELDS]
        if 400 <= response.status < 500 and extras:
            # Some servers refuse fields they do not know: ask once more with the standard ones.
            retry = self._http.post_json(
                url, {k: v for k, v in body.items() if k in STANDARD_FIELDS})
            if retry.status == 200:
                self._send_extras = False
            response = retry
        response.check("check that the server serves the target, and that its context length "
                       "holds the prompts plus --max-new-tokens")
        try:
            choice = response.json()["choices"][0]
            text = choice["text"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise DspecError(f"{url} did not answer with an OpenAI completion "
                             f"({response.text[:200]!r})",
                             "point --endpoint at an OpenAI-compatible server") from None
        if not isinstance(text, str):
            raise DspecError(f"{url} answered a completion without text",
                             "point --endpoint at an OpenAI-compatible server")
        return choice

    # --- one request -------------------------------------------------------------------------

    def _prompt_text(self, ids: list[int]) -> str:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if bos is not None and ids and ids[0] == bos:
            ids = ids[1:]  # servers add the special tokens themselves
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _encode(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _complete(self, context: list[int], cfg: GenerationConfig) -> tuple[list[int], dict]:
        """(response ids in the target's tokenizer, the checks' flags) for one context."""
        prompt = self._prompt_text(context)
        body = {"prompt": prompt, "max_tokens": cfg.max_new_tokens,
                "temperature": cfg.temperature, "seed": cfg.seed}
        if self.model:
            body["model"] = self.model
        if self._send_extras:
            body.update(return_token_ids=True, skip_special_tokens=False,
                        spaces_between_special_tokens=False)
            if cfg.stop_token_ids:
                body["stop_token_ids"] = list(cfg.stop_token_ids)
        choice = self._post(body)
        return self._response_ids(choice, context, prompt, cfg.stop_token_ids)

    def _response_ids(self, choice: dict, context: list[int], prompt: str,
                      stops: tuple[int, ...]) -> tuple[list[int], dict]:
        text = choice["text"]
        decode = self.tokenizer.decode
        encoded = self._encode(text, special=False)
        flags = {"roundtrip": decode(encoded, skip_special_tokens=False) == text,
                 "server_ids": None, "prompt": None, "noncanonical": False}
        expected_prompt = self._encode(prompt, special=True)
        flags["context"] = expected_prompt == list(context)
        if isinstance(choice.get("prompt_token_ids"), list):
            flags["prompt"] = [int(t) for t in choice["prompt_token_ids"]] == expected_prompt

        ids = encoded
        server_ids = choice.get("token_ids")
        if isinstance(server_ids, list):
            server_ids = _cut_at_stop([int(t) for t in server_ids], stops)
            body = server_ids[:-1] if server_ids and server_ids[-1] in stops else server_ids
            # A server that skipped special tokens in its text despite our request still agrees.
            flags["server_ids"] = any(
                _same_text(decode(body, skip_special_tokens=skip), text) for skip in (False, True))
            if flags["server_ids"]:
                ids = server_ids  # exactly what the target sampled, in the target's ids
                flags["noncanonical"] = body != encoded
        ids = _cut_at_stop(ids, stops)
        if choice.get("finish_reason") == "stop" and stops and (not ids or ids[-1] not in stops):
            reason = choice.get("stop_reason")
            ids = ids + [reason if isinstance(reason, int) and reason in stops else stops[0]]
        return ids, flags

    # --- the engine --------------------------------------------------------------------------

    def _record(self, flags: dict) -> None:
        s = self.stats
        s["responses"] += 1
        s["roundtrip_mismatches"] += not flags["roundtrip"]
        s["server_id_mismatches"] += flags["server_ids"] is False
        s["prompt_mismatches"] += flags["prompt"] is False
        s["context_mismatches"] += not flags["context"]
        s["noncanonical"] += flags["noncanonical"]
        # A failed text round trip does not matter where the server's own ids were kept.
        roundtrip_used = not flags["roundtrip"] and not flags["server_ids"]
        s["disagreements"] += (roundtrip_used or flags["server_ids"] is False
                               or flags["prompt"] is False)

    def _check_agreement(self) -> None:
        s = self.stats
        n, bad = s["responses"], s["disagreements"]
        if n >= MIN_CHECKED and bad > MAX_DISAGREEMENT * n:
            raise DspecError(
                f"the server at {self.url} tokenises differently from the target's tokenizer: "
                f"{bad} of {n} responses disagree ({s['roundtrip_mismatches']} text round trips, "
                f"{s['server_id_mismatches']} server token ids, {s['prompt_mismatches']} prompts "
                "differ)",
                "serve the same target (with its tokenizer) on the server, or generate locally "
                "without --endpoint")
        if s["context_mismatches"] and not self._warned_context:
            self._warned_context = True
            warnings.warn(
                f"{s['context_mismatches']} chat-formatted contexts do not survive a text round "
                "trip through the target's tokenizer: the server answered slightly different "
                "contexts than the ones stored (the stored samples stay consistent)",
                stacklevel=3)

    def generate(self, prompts: list[list[int]], cfg: GenerationConfig) -> BatchResult:
        if cfg.k is not None:
            raise DspecError("the endpoint generator only decodes plainly (k=None)",
                             "measure speculation with the bench's endpoint engine")
        start = time.perf_counter()
        if not prompts:
            return BatchResult(generations=[], elapsed_s=0.0)
        workers = min(len(prompts), self.max_concurrency or len(prompts))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            outputs = list(pool.map(lambda ctx: self._complete(ctx, cfg), prompts))
        elapsed = time.perf_counter() - start
        for _, flags in outputs:
            self._record(flags)
        self._check_agreement()
        return BatchResult(generations=[Generation(token_ids=ids) for ids, _ in outputs],
                           elapsed_s=elapsed)

    def describe(self) -> dict:
        return {"engine": self.name, "url": self.url, "model": self.model,
                "flavor": self.flavor, "stats": dict(self.stats)}
