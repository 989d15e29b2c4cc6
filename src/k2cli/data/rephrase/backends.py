"""What writes the text: one small interface, three implementations.

    backend.rewrite(requests) -> one rewritten text per request (a batch: the pipeline sends one
                                 request per rewrite in progress, so a backend can batch or run
                                 them concurrently)
    backend.embed(texts)      -> one vector per text, or None when the backend has no embeddings
    backend.identity          -> a string that changes whenever the backend would write differently
                                 (part of the run id, so a resumed run never mixes two writers)

Backends, chosen by `backend.name` in the recipe or `--backend`:

    builtin        offline, no model: re-expresses text written by `k2 data synth` (builtin.py)
    k2:<ref>       a k2 model artifact generating in process with its KV cache (k2_backend.py)
    openai         any OpenAI-compatible chat-completions endpoint (openai_backend.py)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from k2cli.errors import K2Error


@dataclass
class RewriteRequest:
    messages: list[dict]  # what a language model is sent: system prompt + user message (styles.build_messages)
    style: str  # the style name (styles.STYLES)
    kind: str  # "knowledge" | "math"
    chunk: str  # the source chunk to rewrite
    context: str  # the already-rewritten text before this chunk, in this rewrite ("" for the first chunk)
    seed: int  # differs per document, rewrite, chunk and attempt: a retry draws a different text
    doc_id: str = ""  # for messages


@dataclass
class BackendConfig:
    """Recipe section `backend`. Fields a backend does not use are ignored by it."""

    name: str = "builtin"  # builtin | k2:<model ref> | openai
    # openai: the endpoint
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = ""  # the model name the endpoint serves
    embedding_model: str = ""  # for /embeddings; "" = the same as `model`
    embeddings: bool = True  # record source/rewrite cosine similarity when the endpoint has /embeddings
    api_key_env: str = "OPENAI_API_KEY"  # the environment variable holding the key (unset: no Authorization header)
    timeout_s: float = 60.0  # per HTTP request
    max_retries: int = 4  # extra attempts on 429, 5xx, timeouts and refused connections
    backoff_s: float = 1.0  # first retry delay; doubles each attempt
    cache: bool = True  # on-disk response cache (<artifacts root>/cache/rephrase): a rerun does not pay twice
    # k2 and openai: sampling
    temperature: float = 0.7
    max_new_tokens: int = 512
    concurrency: int = 8  # HTTP requests in flight (openai), or rows per generation batch (k2)
    # builtin
    fullname_prob: float = 0.5  # chance that a sentence names the person in full instead of a pronoun

    def validate(self) -> "BackendConfig":
        kind = backend_kind(self.name)
        if kind == "openai" and not self.model:
            raise K2Error("the openai backend needs a model name", "pass --model NAME (or set backend.model)")
        if kind == "openai":
            from urllib.parse import urlsplit

            url = urlsplit(self.base_url)
            if url.scheme not in ("http", "https") or not url.hostname:
                raise K2Error(f"backend.base_url={self.base_url!r} is not an http(s) URL",
                              "write e.g. backend.base_url=http://127.0.0.1:8000/v1")
        if self.concurrency < 1 or self.max_retries < 0 or self.timeout_s <= 0 or self.max_new_tokens < 1:
            raise K2Error("backend.concurrency, timeout_s and max_new_tokens must be positive and max_retries >= 0",
                          "fix the backend section of the recipe")
        if not 0 <= self.fullname_prob <= 1:
            raise K2Error(f"backend.fullname_prob={self.fullname_prob} must be between 0 and 1", "e.g. 0.5")
        return self


# Fields that change how a run is carried out but not what it writes: left out of the run id, so
# that e.g. more concurrency resumes the same run.
OPERATIONAL_FIELDS = ("concurrency", "timeout_s", "max_retries", "backoff_s", "cache", "api_key_env")


class Backend(Protocol):
    name: str
    identity: str

    def rewrite(self, requests: list[RewriteRequest]) -> list[str]: ...

    def embed(self, texts: list[str]) -> list[list[float]] | None: ...


def backend_kind(name: str) -> str:
    if name == "builtin" or name == "openai":
        return name
    if name.startswith("k2:") and len(name) > 3:
        return "k2"
    raise K2Error(f"unknown rephrasing backend '{name}'", "use builtin, k2:<model ref> (e.g. k2:pretrain:latest) or openai")


def make_backend(cfg: BackendConfig) -> Backend:
    cfg.validate()
    kind = backend_kind(cfg.name)
    if kind == "builtin":
        from k2cli.data.rephrase.builtin import BuiltinBackend

        return BuiltinBackend(cfg)
    if kind == "k2":
        from k2cli.data.rephrase.k2_backend import K2Backend

        return K2Backend(cfg.name[3:], cfg)
    from k2cli.data.rephrase.openai_backend import OpenAIBackend

    return OpenAIBackend(cfg)
