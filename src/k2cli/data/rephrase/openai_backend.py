"""The `openai` backend: any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, SGLang, ...).

Standard library only (urllib + a thread pool):

* concurrency: the requests of a round run `backend.concurrency` at a time;
* timeouts per request, and retries with exponential backoff on 429, 5xx, timeouts and refused
  connections (a `Retry-After` header is honoured); any other HTTP error stops at once with the
  server's message. After `max_retries` the run stops with a clear error, and the shards already
  finished stay in the run directory for the next attempt;
* an on-disk response cache keyed by a hash of the URL and request body (the key is not part of
  it): a rerun, or a resumed run, never pays for the same request twice. A retry of a chunk that
  failed verification is a different request (another seed), so it is asked anew;
* embeddings from `/embeddings` where the endpoint has them, to record the cosine similarity of
  each source chunk and its rewrite; an endpoint without them (404/400/405/501) records none.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from k2cli.console import info
from k2cli.data.rephrase.backends import BackendConfig, RewriteRequest
from k2cli.errors import K2Error

RETRY_STATUS = {429, 500, 502, 503, 504}
NO_EMBEDDINGS_STATUS = {400, 404, 405, 501}


class RetryableError(Exception):
    """429, 5xx, a timeout or a refused connection: worth another attempt."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class OpenAIBackend:
    name = "openai"

    def __init__(self, cfg: BackendConfig, cache_dir: Path | None = None):
        from k2cli.artifacts import artifacts_root

        self.cfg = cfg
        self.base_url = cfg.base_url.rstrip("/")
        self.key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        self.cache_dir = (cache_dir or artifacts_root() / "cache" / "rephrase" / "http") if cfg.cache else None
        self.embeddings_ok = cfg.embeddings
        self.identity = (f"openai:{self.base_url}:{cfg.model}:emb={cfg.embedding_model or cfg.model if cfg.embeddings else '-'}"
                         f":t={cfg.temperature}:n={cfg.max_new_tokens}")
        self.stats = {"http_requests": 0, "cache_hits": 0, "retries": 0}
        self._lock = threading.Lock()
        self._stop = threading.Event()  # set when one of the concurrent requests has failed for good

    # ------------------------------------------------------------------ the interface

    def rewrite(self, requests: list[RewriteRequest]) -> list[str]:
        return self._parallel(self._complete, requests)

    def embed(self, texts: list[str]) -> list[list[float]] | None:
        if not self.embeddings_ok or not texts:
            return None
        batches = [texts[i:i + 64] for i in range(0, len(texts), 64)]
        vectors = []
        for part in self._parallel(self._embed_batch, batches):
            if part is None:
                return None
            vectors += part
        return vectors

    # ------------------------------------------------------------------ requests

    def _complete(self, req: RewriteRequest) -> str:
        body = {"model": self.cfg.model, "messages": req.messages, "temperature": self.cfg.temperature,
                "max_tokens": self.cfg.max_new_tokens, "seed": req.seed % (2**31)}
        data = self._post("/chat/completions", body)
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise K2Error(f"{self.base_url}/chat/completions returned no choices[0].message.content: {str(data)[:200]}",
                          "is --base-url an OpenAI-compatible endpoint?")
        return content or ""

    def _embed_batch(self, texts: list[str]) -> list[list[float]] | None:
        body = {"model": self.cfg.embedding_model or self.cfg.model, "input": texts}
        try:
            data = self._post("/embeddings", body, no_embeddings_ok=True)
        except _NoEmbeddings:
            if self.embeddings_ok:
                info(f"[yellow]{self.base_url} has no /embeddings: similarity is not recorded[/]")
            self.embeddings_ok = False
            return None
        try:
            rows = sorted(data["data"], key=lambda r: r.get("index", 0))
            return [r["embedding"] for r in rows]
        except (KeyError, TypeError):
            raise K2Error(f"{self.base_url}/embeddings returned no data[].embedding", "check the endpoint, or set backend.embeddings=false")

    def _parallel(self, fn, items: list) -> list:
        """fn over items, `concurrency` at a time. When one call fails for good, the others stop
        at their next attempt and queued ones never start: a dead endpoint costs one request's
        retries. The error raised is that first failure."""
        self._stop.clear()
        if len(items) <= 1 or self.cfg.concurrency == 1:
            return [fn(x) for x in items]
        failures = []

        def guarded(x):
            try:
                return fn(x)
            except _Stopped:
                raise
            except BaseException as e:
                with self._lock:
                    failures.append(e)
                self._stop.set()
                raise

        pool = ThreadPoolExecutor(max_workers=min(self.cfg.concurrency, len(items)))
        try:
            futures = [pool.submit(guarded, x) for x in items]
            try:
                return [f.result() for f in futures]
            except BaseException as e:  # a failure, or Ctrl-C in this thread: the workers stop too
                self._stop.set()
                raise failures[0] if failures else e  # a _Stopped only follows a recorded failure
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _cache_path(self, url: str, body: dict) -> Path | None:
        if self.cache_dir is None:
            return None
        key = hashlib.sha256(json.dumps({"url": url, "body": body}, sort_keys=True).encode()).hexdigest()
        return self.cache_dir / key[:2] / f"{key}.json"

    def _post(self, path: str, body: dict, no_embeddings_ok: bool = False) -> dict:
        url = self.base_url + path
        cached = self._cache_path(url, body)
        if cached is not None and cached.is_file():
            self._count("cache_hits")
            return json.loads(cached.read_text())
        data = self._send_with_retries(url, body, no_embeddings_ok)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".tmp-{uuid.uuid4().hex[:8]}")
            tmp.write_text(json.dumps(data))
            os.replace(tmp, cached)  # atomic: concurrent writers of the same key write the same bytes
        return data

    def _send_with_retries(self, url: str, body: dict, no_embeddings_ok: bool) -> dict:
        for attempt in range(self.cfg.max_retries + 1):
            if self._stop.is_set():
                raise _Stopped()
            try:
                return self._send(url, body, no_embeddings_ok)
            except RetryableError as e:
                last = e
                if attempt < self.cfg.max_retries:
                    self._count("retries")
                    delay = e.retry_after if e.retry_after is not None else self.cfg.backoff_s * 2**attempt
                    time.sleep(min(delay, 30.0))
        raise K2Error(f"{url} failed after {self.cfg.max_retries + 1} attempts: {last}",
                      "check that the server is up and --base-url is right; for a slow or busy server raise "
                      "backend.timeout_s or backend.max_retries")

    def _count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1

    def _send(self, url: str, body: dict, no_embeddings_ok: bool) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
        self._count("http_requests")
        try:
            with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode("utf-8", "replace").strip()
            if e.code in RETRY_STATUS:
                after = e.headers.get("Retry-After") if e.headers else None
                seconds = float(after) if after and after.replace(".", "", 1).isdigit() else None
                raise RetryableError(f"HTTP {e.code} {detail}".strip(), seconds)
            if no_embeddings_ok and e.code in NO_EMBEDDINGS_STATUS:
                raise _NoEmbeddings()
            hint = {401: f"set ${self.cfg.api_key_env} to a valid key", 403: f"check the key in ${self.cfg.api_key_env}",
                    404: "check --base-url (it usually ends in /v1) and --model"}.get(e.code, "check --base-url and --model")
            raise K2Error(f"{url} answered HTTP {e.code}: {detail[:200]}", hint)
        except (urllib.error.URLError, TimeoutError, socket.timeout, ConnectionError) as e:
            reason = getattr(e, "reason", e)
            raise RetryableError(f"{type(reason).__name__}: {reason}")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RetryableError(f"the response is not JSON: {raw[:100]!r}")


class _NoEmbeddings(Exception):
    pass


class _Stopped(Exception):
    """Another concurrent request failed for good; this one gives up too."""
