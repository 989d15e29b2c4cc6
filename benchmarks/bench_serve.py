"""k2 serve under load: concurrent OpenAI clients against a loopback server, bounded in count and time.

    python benchmarks/bench_serve.py [--preset tiny] [--clients 32] [--requests 320] [--max-tokens 48] [--probe-requests 128]

The server is the real `k2 serve` process — FastAPI + uvicorn on 127.0.0.1 (a free port), the
continuous-batching engine, a randomly initialised model of the preset with a BPE tokenizer trained
on synthetic biographies (`--inprocess`: the same app in a thread of this process instead) — and the
clients are the official `openai` package, one per thread. Every 4th request
streams (its time to first token is recorded). A sequential baseline (one client, one request at a
time, the same prompts) shows what batching buys. Nothing leaves the machine; the run stops by
itself at --deadline seconds, and exits non-zero if any request failed.

Hostile clients (the second table): the latency of a small request (max_tokens 8) from 32 concurrent
clients, first on an otherwise idle server, then while one client keeps sending 16 MB bodies (in
turn with a Content-Length, refused from the head, and chunked, cut off at the body limit) and 16
slow-loris connections dribble a header byte a second (each reconnects when the server hangs up).
Acceptance: p99 under the hostile load stays under 2x the idle p99.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import write_section  # noqa: E402

from k2cli.artifacts import ArtifactWriter  # noqa: E402
from k2cli.data.synth import biographies  # noqa: E402
from k2cli.data.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402
from k2cli.data.world import build_world  # noqa: E402
from k2cli.model.config import ModelConfig  # noqa: E402
from k2cli.model.io import load_model, save_model_files  # noqa: E402
from k2cli.model.transformer import build_model  # noqa: E402


def make_artifact(preset: str, directory: Path, world):
    cfg = ModelConfig.from_preset(preset)
    tok = train_tokenizer([d["text"] for d in biographies(world, per_person=2)], vocab_size=cfg.vocab_size)
    cfg.vocab_size, cfg.eos_token_id = tok.vocab_size, tok.eot_id
    with ArtifactWriter(stage="bench-serve", kind="model", out=str(directory)) as w:
        save_model_files(build_model(cfg, seed=0), w.dir)
        tok.save(w.dir)
        return w.commit(summary=f"random {preset} model for the serving benchmark")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs)) - 1))] if xs else float("nan")


def run_clients(base_url: str, name: str, prompts: list[list[dict]], clients: int, per_client: int, max_tokens: int,
                deadline: float, stream_every: int = 4) -> dict:
    import openai

    lat, ttft, tokens, errors = [], [], [0], []
    lock = threading.Lock()

    def client_loop(c: int):
        client = openai.OpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=120)
        for i in range(per_client):
            if time.monotonic() > deadline:
                with lock:
                    errors.append("deadline reached before the request was sent")
                return
            k = c * per_client + i
            messages = prompts[k % len(prompts)]
            t0 = time.perf_counter()
            try:
                if stream_every and k % stream_every == stream_every - 1:
                    first, n = None, 0
                    for chunk in client.chat.completions.create(model=name, messages=messages, max_tokens=max_tokens,
                                                                temperature=0.7, seed=k, stream=True,
                                                                stream_options={"include_usage": True}):
                        if first is None and chunk.choices and chunk.choices[0].delta.content:
                            first = time.perf_counter() - t0
                        if chunk.usage:
                            n = chunk.usage.completion_tokens
                    with lock:
                        ttft.append(first if first is not None else time.perf_counter() - t0)
                else:
                    r = client.chat.completions.create(model=name, messages=messages, max_tokens=max_tokens,
                                                       temperature=0.7, seed=k)
                    n = r.usage.completion_tokens
                with lock:
                    lat.append(time.perf_counter() - t0)
                    tokens[0] += n
            except Exception as e:  # counted and reported; the run goes on
                with lock:
                    errors.append(f"{type(e).__name__}: {e}"[:200])

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"wall": wall, "ok": len(lat), "errors": errors, "tokens": tokens[0], "lat": lat, "ttft": ttft}


BIG = 16 << 20  # the hostile client's body size


def _address(base_url: str) -> tuple[str, int]:
    host, port = base_url.removeprefix("http://").removesuffix("/v1").rsplit(":", 1)
    return host, int(port)


def big_body_client(base_url: str, stop: threading.Event, out: dict) -> None:
    """Send 16 MB bodies until `stop`: Content-Length and chunked in turn. Records each answer's status
    and how long the server took to give it (from the first byte sent)."""
    import socket

    piece = b"x" * (256 << 10)
    k = 0
    while not stop.is_set():
        chunked = k % 2 == 1
        k += 1
        size = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {BIG}"
        head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n{size}\r\n\r\n".encode()
        t0 = time.perf_counter()
        try:
            with socket.create_connection(_address(base_url), timeout=30) as s:
                s.sendall(head)
                try:
                    for _ in range(BIG // len(piece)):
                        s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                    if chunked:
                        s.sendall(b"0\r\n\r\n")
                except OSError:  # the server answered and hung up mid-body: what we want
                    pass
                data = b""
                try:
                    while len(data) < 12 and (chunk := s.recv(4096)):
                        data += chunk
                except OSError:
                    pass
            status = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/1.1 ") else "reset"
        except OSError as e:
            status = type(e).__name__
        out.setdefault("chunked" if chunked else "content-length", []).append((status, time.perf_counter() - t0))


def slow_loris(base_url: str, stop: threading.Event, out: list) -> None:
    """One connection at a time that sends a request head one byte a second; records how long the
    server let each live."""
    import socket

    head = b"GET /v1/models HTTP/1.1\r\nHost: bench\r\n" + b"X-Slow: " + b"y" * 1000
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            with socket.create_connection(_address(base_url), timeout=30) as s:
                for byte in head:
                    s.sendall(bytes([byte]))
                    if stop.wait(1.0):
                        return
                    try:
                        if s.recv(1, socket.MSG_DONTWAIT) == b"":  # the server hung up
                            raise ConnectionResetError
                    except BlockingIOError:  # still open, nothing to read
                        pass
        except OSError:
            out.append(time.perf_counter() - t0)


def attack(base_url: str, loris: int) -> None:
    """`--attack URL`: the hostile clients, in a process of their own (as they would be on another
    machine: they must not slow the measuring clients down through this process's GIL). They run
    until stdin closes, then print what they saw as one JSON line."""
    stop, big, lives = threading.Event(), {}, []
    threads = [threading.Thread(target=big_body_client, args=(base_url, stop, big), daemon=True)]
    threads += [threading.Thread(target=slow_loris, args=(base_url, stop, lives), daemon=True) for _ in range(loris)]
    for t in threads:
        t.start()
    print("ready", flush=True)
    sys.stdin.read()
    stop.set()
    for t in threads:
        t.join(60)
    print(json.dumps({"big": big, "loris_lives": lives}))


def hostile_probe(base_url: str, name: str, prompts, clients: int, requests: int, deadline: float, loris: int = 16,
                  rounds: int = 2) -> dict:
    """Small-request latency on an idle server, then under the attack; `rounds` times in turn (the
    machine is shared: alternating keeps a drift in its load from landing on one phase), pooled."""
    per = max(1, requests // (clients * rounds))
    idle, loaded = {"lat": [], "errors": [], "ok": 0}, {"lat": [], "errors": [], "ok": 0}
    big, lives = {}, []

    def add(into, r):
        into["lat"] += r["lat"]
        into["errors"] += r["errors"]
        into["ok"] += r["ok"]

    for _ in range(rounds):
        add(idle, run_clients(base_url, name, prompts, clients, per, 8, deadline, stream_every=0))
        proc = subprocess.Popen([sys.executable, __file__, "--attack", base_url, "--loris", str(loris)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready", "the hostile clients did not start"
        t0 = time.monotonic()
        time.sleep(2.0)  # the big bodies are flowing and the loris connections are open
        add(loaded, run_clients(base_url, name, prompts, clients, per, 8, deadline, stream_every=0))
        time.sleep(max(0.0, 13.0 - (time.monotonic() - t0)))  # past the 10 s head deadline: the loris get closed
        seen = json.loads(proc.communicate("", timeout=120)[0])
        for kind, answers in seen["big"].items():
            big.setdefault(kind, []).extend(answers)
        lives += seen["loris_lives"]
    return {"idle": idle, "loaded": loaded, "big": big, "loris_lives": lives, "sent": clients * per * rounds}


def kept_alive_latency(base_url: str, n: int = 50) -> tuple[float, float]:
    """(first, median of the rest) ms of `models.list` on one kept-alive connection: the round trip
    itself, where Nagle + delayed ACK once added ~40 ms to every request after the first."""
    import statistics

    import openai

    client = openai.OpenAI(base_url=base_url, api_key="bench", max_retries=0)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        client.models.list()
        times.append((time.perf_counter() - t0) * 1000)
    return times[0], statistics.median(times[1:])


def rows_per_step(s0: dict, s1: dict) -> float:
    return (s1["stats"]["decode_rows"] - s0["stats"]["decode_rows"]) / max(1, s1["stats"]["steps"] - s0["stats"]["steps"])


class serving:
    """The server for the run: `k2 serve` in a subprocess (default) or the app in a thread.
    Yields (base_url, stats) where stats() reads /health (requests in flight + engine counters)."""

    def __init__(self, args, art, model, tok):
        self.args, self.art, self.model, self.tok = args, art, model, tok

    def __enter__(self):
        import urllib.request

        a = self.args
        if a.inprocess:
            from k2cli.serve.app import create_app
            from k2cli.serve.engine import Engine
            from k2cli.serve.server import BackgroundServer

            torch.set_num_threads(a.threads)
            self.engine = Engine(self.model, max_batch=a.max_batch).start()
            self.server = BackgroundServer(create_app(self.engine, self.tok, a.preset, default_max_tokens=a.max_tokens)).__enter__()
            url = self.server.base_url
        else:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "k2cli.cli", "serve", str(self.art.path), "--port", "0", "--name", a.preset,
                 "--max-batch", str(a.max_batch), "--max-tokens", str(a.max_tokens), "--threads", str(a.threads)],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=os.environ | {"K2_QUIET": "1"})
            url = self.proc.stdout.readline().strip()
            if not url.startswith("http://127.0.0.1:"):
                self.__exit__()
                raise SystemExit("k2 serve did not start")
        health = url.removesuffix("/v1") + "/health"
        return url, lambda: json.loads(urllib.request.urlopen(health, timeout=30).read())

    def __exit__(self, *exc):
        if self.args.inprocess:
            self.server.__exit__()
            self.engine.stop()
        else:
            self.proc.terminate()
            self.proc.wait(timeout=60)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=320, help="total, split evenly over the clients")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--baseline", type=int, default=32, help="requests of the one-client sequential baseline (0: skip)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the engine")
    ap.add_argument("--inprocess", action="store_true", help="serve from a thread of this process (clients share its GIL)")
    ap.add_argument("--deadline", type=float, default=600, help="seconds; the load stops sending after this")
    ap.add_argument("--probe-requests", type=int, default=128, help="small requests per phase of the hostile probe (0: skip)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    ap.add_argument("--attack", metavar="URL", help=argparse.SUPPRESS)  # internal: be the hostile clients
    ap.add_argument("--loris", type=int, default=16, help="slow-loris connections of the hostile probe")
    args = ap.parse_args()
    if args.attack:
        return attack(args.attack, args.loris)
    torch.set_num_threads(args.threads)

    world = build_world(64, seed=0)
    tmp = tempfile.TemporaryDirectory()
    art = make_artifact(args.preset, Path(tmp.name) / "model", world)
    model, _ = load_model(art.path)
    tok = load_tokenizer(art.path)
    system = {"role": "system", "content": "You answer questions about people in the directory."}
    prompts = [[system, {"role": "user", "content": f"Where was {p.name} born, and where does {p.first_name} work?"}]
               for p in world.people]
    per_client = max(1, args.requests // args.clients)
    load_before = os.getloadavg()
    start = time.monotonic()
    with serving(args, art, model, tok) as (base_url, stats):
        run_clients(base_url, args.preset, prompts[:4], 4, 1, 8, start + 60)  # warm-up
        keepalive = kept_alive_latency(base_url)
        base = None
        if args.baseline:
            s0 = stats()
            base = run_clients(base_url, args.preset, prompts, 1, args.baseline, args.max_tokens,
                               start + args.deadline, stream_every=0)
            base["rows"] = rows_per_step(s0, stats())
        s0 = stats()
        load = run_clients(base_url, args.preset, prompts, args.clients, per_client, args.max_tokens, start + args.deadline)
        s1 = stats()
        rows, left = rows_per_step(s0, s1), s1["active"]
        hostile = None
        if args.probe_requests:
            hostile = hostile_probe(base_url, args.preset, prompts, args.clients, args.probe_requests,
                                    time.monotonic() + args.deadline, args.loris)
            left = max(left, stats()["active"])
    load_after = os.getloadavg()
    tmp.cleanup()

    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    total = args.clients * per_client
    lines = [
        "## Serving: `k2 serve` under concurrent load",
        "",
        f"Model: `{args.preset}` preset, randomly initialised ({n_params / 1e6:.2f}M parameters, {cfg.num_hidden_layers} layers, "
        f"context {cfg.max_position_embeddings}), BPE tokenizer of {tok.vocab_size} tokens. Server: "
        f"{'the app in a thread of the client process' if args.inprocess else '`k2 serve` in its own process'} "
        f"(FastAPI + uvicorn on 127.0.0.1), continuous-batching engine (max {args.max_batch} rows, torch {args.threads} "
        f"thread(s)). Clients: the `openai` package, one thread each, in the benchmark process on the same machine; "
        f"temperature 0.7, seeded; max_tokens {args.max_tokens}; every 4th request streams. A random model often ends "
        "its turn early, so tokens/s counts the completion tokens actually generated. Load average (1 min) of the "
        f"machine, shared with other jobs: {load_before[0]:.1f} before, {load_after[0]:.1f} after.",
        "",
        "| run | requests ok / sent | errors | wall s | requests/s | completion tokens/s | latency p50 s | p90 s | p99 s | TTFT p50 s (streams) | TTFT p99 s | mean rows per step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def row(label, r, sent, rows_per_step):
        ttft = r["ttft"]
        return (f"| {label} | {r['ok']} / {sent} | {len(r['errors'])} | {r['wall']:.1f} | {r['ok'] / r['wall']:.1f} | "
                f"{r['tokens'] / r['wall']:.0f} | {pct(r['lat'], 50):.3f} | {pct(r['lat'], 90):.3f} | {pct(r['lat'], 99):.3f} | "
                f"{pct(ttft, 50):.3f} | {pct(ttft, 99):.3f} | {rows_per_step:.1f} |").replace("nan", "–")

    if base:
        lines.append(row("1 client, sequential", base, args.baseline, base["rows"]))
    lines.append(row(f"{args.clients} concurrent clients", load, total, rows))
    if base and base["tokens"]:
        lines += ["", f"Batching: {load['tokens'] / load['wall'] / (base['tokens'] / base['wall']):.1f}x the sequential "
                      f"token throughput; requests still active at the end: {left}."]
    lines += ["", f"Kept-alive connection, `models.list`: {keepalive[0]:.1f} ms the first request, {keepalive[1]:.1f} ms "
                  "median of the next 49 (TCP_NODELAY on accepted sockets; without it ~44 ms each, Nagle + delayed ACK)."]
    if load["errors"]:
        lines += ["", "Errors (first 3): " + "; ".join(load["errors"][:3])]
    failed = bool(load["errors"])
    if hostile:
        idle, loaded = hostile["idle"], hostile["loaded"]
        ratio = pct(loaded["lat"], 99) / pct(idle["lat"], 99)
        lines += ["", f"### Hostile clients: a small request while one client sends 16 MB bodies and {args.loris} slow-loris connections wait", "",
                  f"{args.clients} concurrent clients, {hostile['sent']} non-streaming requests per phase, max_tokens 8 (the "
                  "small request); default server limits (4 MiB body, 10 s request-head deadline). The hostile clients "
                  "run in a process of their own; idle and hostile phases alternate twice and are pooled. That process runs on "
                  "the same cores as the server and the measuring clients (2 here, shared with other jobs), so the rise "
                  "in p50 includes its own CPU use, not only the server's work for it.", "",
                  "| phase | requests ok / sent | errors | latency p50 s | p90 s | p99 s |", "|---|---:|---:|---:|---:|---:|"]
        for label, r in (("idle server", idle), ("16 MB bodies + slow loris", loaded)):
            lines.append(f"| {label} | {r['ok']} / {hostile['sent']} | {len(r['errors'])} | {pct(r['lat'], 50):.3f} | "
                         f"{pct(r['lat'], 90):.3f} | {pct(r['lat'], 99):.3f} |")
        lines += ["", f"p99 under the hostile load / idle p99: **{ratio:.2f}x** (acceptance: < 2x)."]
        for kind, answers in sorted(hostile["big"].items()):
            statuses = sorted({st for st, _ in answers})
            lines.append(f"16 MB bodies with {kind}: {len(answers)} sent, answered {', '.join(statuses)} in "
                         f"{pct([t for _, t in answers], 50) * 1000:.0f} ms (median; p99 {pct([t for _, t in answers], 99) * 1000:.0f} ms).")
        lives = hostile["loris_lives"]
        lines.append(f"Slow-loris connections closed by the server: {len(lives)}, after {pct(lives, 50):.1f} s (median; "
                     f"max {max(lives, default=float('nan')):.1f} s)." if lives else "Slow-loris connections closed by the server: none.")
        errs = idle["errors"] + loaded["errors"]
        if errs:
            lines += ["", "Errors (first 3): " + "; ".join(errs[:3])]
        failed |= bool(errs) or not lives or any(st != "413" for a in hostile["big"].values() for st, _ in a)
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("serve", body)
    sys.exit(1 if failed or (base and base["errors"]) or left else 0)


if __name__ == "__main__":
    main()
