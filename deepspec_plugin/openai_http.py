"""Talking to a running server (vLLM, TGI, any OpenAI-compatible one) over HTTP.

One behaviour for every caller (the bench's endpoint engine, ``dspec data generate --endpoint``,
the TGI sidecar): ``POST`` a JSON body to ``/v1/completions`` or ``/v1/chat/completions``,
``GET`` a JSON document or the Prometheus text of ``/metrics``.

* Connecting takes at most ``CONNECT_TIMEOUT_S`` (an unreachable host fails fast); after that the
  server has ``timeout`` seconds for each read, long enough for a whole generation.
* Nothing answering (refused, reset, unknown host, a bad URL) and no answer in time raise a
  one-line ``DspecError`` naming the URL and the fix.
* Any HTTP status comes back as a ``Response``: a 404 or a 4xx often means something to the
  caller; ``Response.check`` turns a status other than 200 into a ``DspecError`` with the
  server's own error text.

Standard library only (``urllib``), which honours the usual proxy variables (``HTTP_PROXY``,
``NO_PROXY``): the serving side has no ``requests``. Each call opens its own connection, so
threads may share a ``Client``.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from dataclasses import dataclass

from deepspec_plugin.errors import DspecError

CONNECT_TIMEOUT_S = 5.0
TIMEOUT_FIX = "check the server, or raise the timeout"


@dataclass(frozen=True)
class Response:
    """A server's answer, whatever its status."""

    url: str
    status: int
    reason: str
    text: str

    def json(self):
        """The body as JSON; ValueError if it is not JSON."""
        return json.loads(self.text)

    def message(self) -> str:
        """The error text a server put in its body (vLLM: error.message; TGI: error)."""
        try:
            body = self.json()
        except ValueError:
            return self.text.strip()[:300] or self.reason
        if isinstance(body, dict):
            err = body.get("error", body.get("message", body.get("detail")))
            if isinstance(err, dict):
                err = err.get("message", err)
            if err:
                return str(err)[:300]
        return str(body)[:300]

    def check(self, fix: str) -> Response:
        """This response if its status is 200, else DspecError with the server's message."""
        if self.status != 200:
            raise DspecError(f"{self.url} answered HTTP {self.status}: {self.message()}", fix)
        return self


@dataclass(frozen=True)
class Client:
    """How to reach one server, and what to tell the user when it does not answer."""

    timeout: float = 600.0  # seconds for each read, once connected
    fix: str = "start it or check --endpoint"  # when nothing answers at the URL
    # What should answer ("TGI"): "cannot reach TGI at URL" rather than "no server at URL".
    name: str | None = None

    def get(self, url: str) -> Response:
        return self._send("GET", url)

    def post_json(self, url: str, body: dict) -> Response:
        return self._send("POST", url, json.dumps(body).encode(),
                          {"Content-Type": "application/json"})

    def get_text(self, url: str, fix: str) -> str:
        """The body of ``GET url`` (e.g. /metrics); DspecError with ``fix`` on a status not 200."""
        return self.get(url).check(fix).text

    def _send(self, method: str, url: str, data: bytes | None = None,
              headers: dict[str, str] | None = None) -> Response:
        opener = urllib.request.build_opener(_HTTPHandler, _HTTPSHandler)
        try:
            request = urllib.request.Request(url, data, headers or {}, method=method)
            with opener.open(request, timeout=self.timeout) as answer:
                return Response(url, answer.status, answer.reason, _text(answer))
        except urllib.error.HTTPError as e:  # a status urllib does not pass (4xx, 5xx)
            try:
                return Response(url, e.code, str(e.reason), _text(e))
            finally:
                e.close()
        except TimeoutError:  # connected, then no answer in time (urllib wraps connect timeouts)
            raise DspecError(f"{url} did not answer within {self.timeout:g} s",
                             TIMEOUT_FIX) from None
        except (OSError, http.client.HTTPException, ValueError) as e:
            # URLError (refused, unknown host, connect timeout), a dropped connection, a bad URL.
            reason = getattr(e, "reason", None) or str(e) or type(e).__name__
            raise self._unreachable(url, reason) from None

    def _unreachable(self, url: str, reason) -> DspecError:
        where = f"cannot reach {self.name} at {url}" if self.name else f"no server at {url}"
        return DspecError(f"{where} ({reason})", self.fix)


def _text(answer) -> str:
    data = answer.read()
    try:
        return data.decode(answer.headers.get_content_charset() or "utf-8", errors="replace")
    except LookupError:  # a charset Python does not know
        return data.decode("utf-8", errors="replace")


class _ConnectTimeout:
    """Connect within ``CONNECT_TIMEOUT_S`` (or the whole timeout if shorter), then give each read
    the whole timeout."""

    def connect(self):
        whole = self.timeout
        self.timeout = min(whole, CONNECT_TIMEOUT_S)
        try:
            super().connect()
        finally:
            self.timeout = whole
        self.sock.settimeout(whole)


class _HTTPConnection(_ConnectTimeout, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_ConnectTimeout, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_HTTPConnection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(_HTTPSConnection, req)
