"""k2 serve under load: concurrent OpenAI clients against a loopback server, bounded in count and time.

    python benchmarks/bench_serve.py [--preset tiny] [--clients 32] [--requests 320] [--max-tokens 48]

The server is the real `k2 serve` process — FastAPI + uvicorn on 127.0.0.1 (a free port), the
continuous-batching engine, a randomly initialised model of the preset with a BPE tokenizer trained
on synthetic biographies (`--inprocess`: the same app in a thread of this process instead) — and the
clients are the official `openai` package, one per thread. Every 4th request
streams (its time to first token is recorded). A sequential baseline (one client, one request at a
time, the same prompts) shows what batching buys. Nothing leaves the machine; the run stops by
itself at --deadline seconds, and exits non-zero if any request failed.
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
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()
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
    if load["errors"]:
        lines += ["", "Errors (first 3): " + "; ".join(load["errors"][:3])]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("serve", body)
    sys.exit(1 if load["errors"] or (base and base["errors"]) or left else 0)


if __name__ == "__main__":
    main()
