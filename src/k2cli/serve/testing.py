"""A scripted engine: the documented test hook for the server's and the chat's response assembly.

A randomly initialised model almost never writes a well-formed tool call, and training one that
reliably does costs minutes of CPU, so tests of tool calling stand a `ScriptedEngine` in for the
batching engine (`create_app(engine=...)`, `ChatSession(engine, ...)`). It decides a completion
from the prompt's text (`script(prompt_text) -> completion text`, special tokens allowed), encodes
it with the real tokenizer and emits it token by token through the same event protocol as
`serve.engine.Engine` (honouring max_tokens, stop ids, n, cancellation; every logprob is 0, as the
script is sure of what it writes). Everything downstream —
rendering, tool_choice pre-fill, incremental decoding, the tool-call parser, the OpenAI response
and its stream, the chat's tool loop — is the real code. What it does not prove: that the batching
engine or any model produces those tokens (tests/test_serve.py checks the engine against
`generate()` and serves a real micro model separately).
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from k2cli.serve.engine import Request, SamplingParams
from k2cli.serve.turns import encode_with_specials


class ScriptedEngine:
    def __init__(self, tokenizer, script: Callable[[str], str], context: int = 256, max_batch: int = 8,
                 delay_s: float = 0.0):
        self.tok, self.script, self.context, self.max_batch, self.delay_s = tokenizer, script, context, max_batch, delay_s
        self.prompts: list[str] = []  # every prompt seen, decoded (tests inspect them)
        self._live: set[Request] = set()
        self._lock = threading.Lock()

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._live)

    def cancel(self, req: Request, choice: int | None = None) -> None:
        req.cancel(choice)

    def _events(self, req: Request):
        """Per choice: its tokens (stopping at a stop id or max_tokens), then its end."""
        text = self.tok.decode(req.prompt)
        self.prompts.append(text)
        ids = encode_with_specials(self.tok, self.script(text))
        for c in range(req.n):
            for k, tok in enumerate(ids):
                if req.cancelled or c in req.stopped:
                    break
                if req.params.logprobs is not None:  # the script is certain of every token it writes
                    yield ("logprob", c, (0.0, [(tok, 0.0)][: req.params.logprobs]))
                yield ("token", c, tok)
                if tok in req.params.stop_ids:
                    yield ("done", c, "stop")
                    break
                if k + 1 >= req.params.max_tokens:
                    yield ("done", c, "length")
                    break
            else:
                yield ("done", c, "stop")

    def submit(self, prompt: list[int], params: SamplingParams, n: int = 1, sink=None) -> Request:
        req = Request(prompt, params, n, sink)
        with self._lock:
            self._live.add(req)

        def run():
            try:
                for ev in self._events(req):
                    if req.cancelled:
                        break
                    if self.delay_s:
                        time.sleep(self.delay_s)
                    req.sink([ev])
            finally:
                with self._lock:
                    self._live.discard(req)

        threading.Thread(target=run, daemon=True).start()
        return req

    def stream(self, prompt: list[int], params: SamplingParams, n: int = 1):
        req = Request(prompt, params, n, None)
        yield from self._events(req)
