"""A loopback OpenAI-compatible server for tests: real HTTP, scripted failures, a fake "model".

    with ChatServer(script=["429", "500", "sleep"]) as server:
        ... --base-url server.url ...
        server.hits["chat"]    # requests that reached /v1/chat/completions

The "model" answers a rewrite request (k2's prompt format) by re-ordering the sentences of the
text to rewrite and prefixing a phrase, both drawn by the request's seed: a faithful rewrite. `mode="corrupt"` changes the first
four-digit year instead: an unfaithful one. Embeddings are bag-of-words vectors (or a 404 when
`embeddings=False`). `script` lists what the next chat requests get before normal service:
an HTTP status ("429", "500", "401": that error) or "sleep" (no answer within the client's timeout).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from k2cli.data.rephrase.chunking import split_sentences
from k2cli.data.rephrase.styles import CHUNK_HEADER


PREFIXES = ("In other words:", "Put differently:", "To restate:", "Briefly:", "In short:")


def fake_rewrite(user_message: str, mode: str, seed: int = 0) -> str:
    """Faithful: the sentences rotated and reversed, after a prefix (both drawn by the seed, as a
    sampling model would differ per seed). Corrupt: the first year changed."""
    chunk = user_message.split(CHUNK_HEADER + "\n", 1)[1]
    if mode == "corrupt":
        return re.sub(r"\b(1[89]\d\d|20\d\d)\b", lambda m: str(int(m.group(1)) + 1), chunk, count=1)
    sentences = split_sentences(chunk)
    k = seed % len(sentences)
    return PREFIXES[seed % len(PREFIXES)] + " " + " ".join(reversed(sentences[k:] + sentences[:k]))


def bag_of_words(text: str, dim: int = 64) -> list[float]:
    v = [0.0] * dim
    for w in re.findall(r"\w+", text.lower()):
        v[int(hashlib.md5(w.encode()).hexdigest(), 16) % dim] += 1.0
    return v


class ChatServer:
    def __init__(self, script=(), mode: str = "faithful", embeddings: bool = True, sleep_s: float = 1.0):
        self.script = list(script)
        self.mode = mode
        self.embeddings = embeddings
        self.sleep_s = sleep_s
        self.hits = {"chat": 0, "embeddings": 0}
        self.bodies: list[dict] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _reply(self, status: int, payload: dict):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/v1/embeddings":
                    with owner.lock:
                        owner.hits["embeddings"] += 1
                    if not owner.embeddings:
                        return self._reply(404, {"error": {"message": "no such route"}})
                    data = [{"index": i, "embedding": bag_of_words(t)} for i, t in enumerate(body["input"])]
                    return self._reply(200, {"object": "list", "data": data})
                if self.path != "/v1/chat/completions":
                    return self._reply(404, {"error": {"message": f"no route {self.path}"}})
                with owner.lock:
                    owner.hits["chat"] += 1
                    owner.bodies.append(body)
                    action = owner.script.pop(0) if owner.script else "ok"
                if action == "sleep":
                    time.sleep(owner.sleep_s)  # the client has given up by now
                    return
                if action.isdigit():
                    return self._reply(int(action), {"error": {"message": f"scripted {action}"}})
                text = fake_rewrite(body["messages"][-1]["content"], owner.mode, body.get("seed", 0))
                return self._reply(200, {"id": "x", "object": "chat.completion", "model": body["model"],
                                         "choices": [{"index": 0, "finish_reason": "stop",
                                                      "message": {"role": "assistant", "content": text}}]})

        return Handler
