"""The batching engine behind `k2 serve` and `k2 chat`: continuous batching over the MLA latent cache.

Why a step-wise loop and not "collect the requests that arrive together, call generate()":
`model.generate.generate` runs a batch to completion, so a request that arrives a moment after a
batch started waits for that batch's longest member; it returns nothing until the end, so
streaming would be fake; it takes one SamplingConfig, while every request brings its own
temperature / top_p / seed; and a client that disconnects could not give its row back. The loop
below is small and does all four:

    waiting requests ──admit (FIFO, up to max_batch rows)──> prefill (left-padded, one forward)
        └─> merge their cache rows into the running batch ──> decode: ONE token for EVERY running row
    a row leaves when it samples a stop id, reaches its max_tokens, or its request is cancelled;
    rows that left are dropped from the cache before the next step.

The running cache follows generate()'s layout: every row ends at the same column `length`, row b's
tokens sit in columns pads[b]..length-1 (left padding), its positions count from 0 at pads[b], and
an attention mask hides the padding, so a row computes what it would compute alone (greedy output
equals `generate()` on that prompt; tested). Merging new rows or dropping finished ones rebuilds
the cache right-aligned and trimmed to the longest live row, so its width never exceeds the model's
context. Rebuilding copies the cache, O(rows x width) per change: cheap at the sizes k2 serves.

Each row samples from its own random stream (seeded from the request's seed and the choice index),
so a seeded request draws the same tokens whatever else shares its batch, up to float rounding of the
batched matmuls.

Threading: `start()` runs the loop in one background thread (the only thread touching the model);
`submit()` / `cancel()` / `active` are safe from any thread. Without `start()`, `stream()` steps the
loop inline (the terminal chat does that). Events reach a request's `sink(events)` from the engine
thread once per step, as a list of ("token", choice, token_id) / ("done", choice, reason) /
("error", choice, message) tuples, reason being "stop" or "length". A request with `logprobs` set
also gets ("logprob", choice, (logprob, [(token_id, logprob), ...])) just before each token event:
the token's log-probability under the model's own distribution (before temperature and top-p) and
the `logprobs` most likely tokens.
"""

from __future__ import annotations

import itertools
import random
import secrets
import threading
import traceback
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from k2cli.model.generate import _left_pad
from k2cli.model.precision import inference_dtype

HEADROOM = 64  # cache columns allocated beyond the longest row, so most steps append in place


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh random seed per row
    stop_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # None: none; k >= 0: each token's logprob and the k most likely alternatives


class Request:
    """One submitted prompt, generating `n` choices (one cache row each)."""

    _ids = itertools.count()

    def __init__(self, prompt: list[int], params: SamplingParams, n: int, sink: Callable[[list], None] | None):
        self.id = next(Request._ids)
        self.prompt = list(prompt)
        self.params = params
        self.n = n
        self.sink = sink or (lambda events: None)
        self.cancelled = False
        self.stopped: set[int] = set()  # choices ended from outside (a stop string matched)
        self.remaining = n  # choices still generating (engine thread only)
        self.cut = False  # cancelled before all its choices finished (engine thread only)

    def cancel(self, choice: int | None = None) -> None:
        """Stop every choice (client gone), or one choice (its stop string matched). Thread-safe."""
        if choice is None:
            self.cancelled = True
        else:
            self.stopped.add(choice)


@dataclass
class _Row:
    request: Request
    choice: int
    gen: random.Random | None  # this row's sampling stream (None: greedy)
    produced: int = 0
    pending: int = -1  # the last sampled token: not in the cache yet, the next decode step feeds it
    done: bool = False

    @property
    def dropped(self) -> bool:
        return self.request.cancelled or self.choice in self.request.stopped


class BatchCache:
    """The running rows' latent cache: latent [L, B, C, r], k_rope [L, B, C, dr], C = capacity.

    Duck-types `generate.KVCache` for the model (append / advance / length), plus per-row left pads.
    """

    def __init__(self, latent: torch.Tensor, k_rope: torch.Tensor, length: int, pads: torch.Tensor):
        self.latent, self.k_rope, self.length, self.pads = latent, k_rope, length, pads

    @classmethod
    def empty(cls, model, batch: int, capacity: int, pads: torch.Tensor) -> "BatchCache":
        cfg = model.config
        p = next(model.parameters())
        L = cfg.num_hidden_layers
        dtype = getattr(model, "compute_dtype", None) or p.dtype  # the activations' dtype (bf16 on CUDA, see Engine)
        latent = torch.zeros(L, batch, capacity, cfg.kv_lora_rank, device=p.device, dtype=dtype)
        k_rope = torch.zeros(L, batch, capacity, cfg.qk_rope_head_dim, device=p.device, dtype=dtype)
        return cls(latent, k_rope, 0, pads)

    @property
    def capacity(self) -> int:
        return self.latent.shape[2]

    def append(self, layer: int, latent: torch.Tensor, k_rope: torch.Tensor):
        end = self.length + latent.shape[1]
        if end > self.capacity:
            raise ValueError(f"batch cache overflow: {end} > {self.capacity}")
        self.latent[layer, :, self.length : end] = latent
        self.k_rope[layer, :, self.length : end] = k_rope
        return self.latent[layer, :, :end], self.k_rope[layer, :, :end]

    def advance(self, n: int) -> None:
        self.length += n


def rebuild(parts: list[tuple[BatchCache, torch.Tensor]], headroom: int = HEADROOM) -> BatchCache:
    """Concatenate rows `idx` of each cache, right-aligned and trimmed to the longest real row.

    A row keeps its tokens and its positions (its rope keys were rotated by position, which does
    not depend on the column); only its pad changes, by the column offset of its block.
    """
    parts = [(c, idx) for c, idx in parts if len(idx)]
    width = max(int((c.length - c.pads[idx]).max()) for c, idx in parts)
    first = parts[0][0]
    B = sum(len(idx) for _, idx in parts)
    L, _, _, r = first.latent.shape
    dr = first.k_rope.shape[-1]
    latent = first.latent.new_zeros(L, B, width + headroom, r)
    k_rope = first.k_rope.new_zeros(L, B, width + headroom, dr)
    pads, b = [], 0
    for c, idx in parts:
        offset = width - c.length  # < 0: the leftmost -offset columns are padding in every kept row
        src, dst = max(0, -offset), max(0, offset)
        latent[:, b : b + len(idx), dst:width] = c.latent[:, idx, src : c.length]
        k_rope[:, b : b + len(idx), dst:width] = c.k_rope[:, idx, src : c.length]
        pads.append(c.pads[idx] + offset)
        b += len(idx)
    return BatchCache(latent, k_rope, width, torch.cat(pads))


class Engine:
    def __init__(self, model, max_batch: int = 32, max_context: int | None = None, precision: str = "auto"):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        # The served model computes in bf16 on CUDA, in its weights' dtype on CPU (auto), or as asked:
        # weights stay float32, each matmul casts them (model/precision.py).
        model.compute_dtype = inference_dtype(model, self.device, precision)
        self.max_batch = max_batch
        limit = model.config.max_position_embeddings
        self.context = min(max_context, limit) if max_context else limit
        self._cond = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._live: set[Request] = set()  # waiting or running: what `active` counts
        self._rows: list[_Row] = []  # aligned with the cache's batch dimension (engine thread only)
        self._cache: BatchCache | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        # steps: decode steps; decode_rows: rows summed over them (their ratio: the mean batch);
        # tokens: sampled (prefills included); cancelled: requests that left before finishing (client gone)
        self.stats = {"steps": 0, "decode_rows": 0, "prefills": 0, "tokens": 0, "max_rows": 0, "cancelled": 0}

    # ------------------------------------------------------------------ the public side (any thread)

    def submit(self, prompt: list[int], params: SamplingParams, n: int = 1, sink=None) -> Request:
        """Queue a prompt for `n` choices. The caller validates sizes; these are programming errors."""
        if not prompt:
            raise ValueError("empty prompt")
        if len(prompt) + params.max_tokens > self.context:
            raise ValueError(f"{len(prompt)} prompt + {params.max_tokens} new tokens > context {self.context}")
        if not 1 <= n <= self.max_batch:
            raise ValueError(f"n={n} outside 1..{self.max_batch}")
        req = Request(prompt, params, n, sink)
        with self._cond:
            self._waiting.append(req)
            self._live.add(req)
            self._cond.notify()
        return req

    def cancel(self, req: Request, choice: int | None = None) -> None:
        req.cancel(choice)
        with self._cond:
            self._cond.notify()

    @property
    def active(self) -> int:
        """Requests waiting or generating (a cancelled one leaves at the next step)."""
        with self._cond:
            return len(self._live)

    @property
    def waiting(self) -> int:
        """Requests queued for a free row."""
        with self._cond:
            return len(self._waiting)

    @property
    def running_rows(self) -> int:
        return len(self._rows)

    def start(self) -> "Engine":
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="k2-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def stream(self, prompt: list[int], params: SamplingParams, n: int = 1):
        """Inline generation (no background thread): yields the events of one request as they come."""
        assert self._thread is None, "stream() steps the loop itself; do not combine it with start()"
        events: list = []
        req = self.submit(prompt, params, n, sink=events.extend)
        try:
            while req in self._live or events:
                if not events:
                    self.step()
                while events:
                    yield events.pop(0)
        finally:
            if req in self._live:
                req.cancel()
                self.step()  # drops its rows

    # ------------------------------------------------------------------ the loop (engine thread)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._rows:
                    self._cond.wait()
                if self._stopping:
                    return
            self.step()

    def step(self) -> None:
        """Admit waiting requests (prefill), then decode one token for every running row."""
        with self._cond:
            admitted, free = [], self.max_batch - len(self._rows)
            while self._waiting and self._waiting[0].n <= free:
                req = self._waiting.popleft()
                if req.cancelled:
                    self._live.discard(req)
                    self.stats["cancelled"] += 1
                    continue
                admitted.append(req)
                free -= req.n
        self._drop_rows()
        try:
            if admitted:
                self._prefill(admitted)
            if self._rows:
                self._decode()
        except Exception as e:  # a failed forward (out of memory, ...) must not kill the server
            traceback.print_exc()
            self._fail_all(f"{type(e).__name__}: {e}", admitted)

    @torch.no_grad()
    def _prefill(self, reqs: list[Request]) -> None:
        ids, pads = _left_pad([r.prompt for r in reqs], 0, self.device)  # [R, P]
        R, P = ids.shape
        cache = BatchCache.empty(self.model, R, P, pads)
        positions = (torch.arange(P, device=self.device)[None, :] - pads[:, None]).clamp(min=0)
        mask = None
        if bool(pads.any()):
            col = torch.arange(P, device=self.device)
            causal = col[None, :] <= col[:, None]  # [P, P]
            mask = (causal[None] & (col[None, :] >= pads[:, None])[:, None, :])[:, None]  # [R, 1, P, P]
        logits = self.model(ids, positions=positions, mask=mask, cache=cache, last_only=True)[:, -1]  # [R, V]
        # n choices of one request share its prompt: prefill once, then repeat its cache row n times
        rep = torch.tensor([i for i, r in enumerate(reqs) for _ in range(r.n)], device=self.device)
        rows = [_Row(r, j, self._generator(r, j)) for r in reqs for j in range(r.n)]
        tokens = self._sample(rows, logits[rep])
        lps = self._logprobs(rows, logits[rep], tokens)
        parts = [(cache, rep)]
        if self._rows:
            parts.insert(0, (self._cache, torch.arange(len(self._rows), device=self.device)))
        self._cache = rebuild(parts)
        self._rows += rows
        self.stats["prefills"] += 1
        self._emit(rows, tokens, lps)

    @torch.no_grad()
    def _decode(self) -> None:
        c = self._cache
        if c.length + 1 > c.capacity:
            self._cache = c = rebuild([(c, torch.arange(len(self._rows), device=self.device))])
        L = c.length
        x = torch.tensor([[row.pending] for row in self._rows], device=self.device)  # [B, 1]
        positions = (L - c.pads)[:, None]
        mask = None
        if bool(c.pads.any()):
            mask = (torch.arange(L + 1, device=self.device)[None, :] >= c.pads[:, None])[:, None, None, :]  # [B,1,1,L+1]
        logits = self.model(x, positions=positions, mask=mask, cache=c)[:, -1]
        self.stats["steps"] += 1
        self.stats["decode_rows"] += len(self._rows)
        self.stats["max_rows"] = max(self.stats["max_rows"], len(self._rows))
        tokens = self._sample(self._rows, logits)
        self._emit(list(self._rows), tokens, self._logprobs(self._rows, logits, tokens))

    def _generator(self, req: Request, choice: int) -> random.Random | None:
        if req.params.temperature <= 0:
            return None
        seed = secrets.randbits(62) if req.params.seed is None else (req.params.seed * 1_000_003 + choice) % 2**62
        return random.Random(seed)

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        """logits [B, V] -> one token per row: argmax for greedy rows; the sampled rows in one
        vectorised pass (temperature, top-p as `generate.sample_next` applies it, then inverse-CDF
        with a uniform drawn from each row's own seeded stream)."""
        out = logits.argmax(-1)
        hot = [i for i, row in enumerate(rows) if row.request.params.temperature > 0]
        if hot:
            dev = logits.device
            temp = torch.tensor([rows[i].request.params.temperature for i in hot], device=dev)[:, None]
            top_p = torch.tensor([rows[i].request.params.top_p for i in hot], device=dev)[:, None]
            probs = torch.softmax(logits[hot].float() / temp, dim=-1)  # [H, V]
            order = None
            if bool((top_p < 1).any()):
                probs, order = probs.sort(dim=-1, descending=True)
                probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)  # keep the nucleus (and the top token)
            cdf = probs.cumsum(-1)
            u = torch.tensor([rows[i].gen.random() for i in hot], device=dev, dtype=cdf.dtype)[:, None] * cdf[:, -1:]
            pick = torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[-1] - 1)  # [H, 1]
            out[hot] = (order.gather(-1, pick) if order is not None else pick).squeeze(-1)
        return out.tolist()

    def _logprobs(self, rows: list[_Row], logits: torch.Tensor, tokens: list[int]) -> list | None:
        """Per row, for rows whose request asks: (logprob of its token, the k most likely as
        [(id, logprob)]) under log_softmax(logits) [B, V]; None for the others (None if none asks)."""
        want = [i for i, row in enumerate(rows) if row.request.params.logprobs is not None]
        if not want:
            return None
        logp = torch.log_softmax(logits[want].float(), dim=-1)  # [W, V]
        chosen = logp.gather(-1, torch.tensor([tokens[i] for i in want], device=logp.device)[:, None])[:, 0]
        k = max(1, max(rows[i].request.params.logprobs for i in want))
        top_lp, top_id = logp.topk(min(k, logp.shape[-1]), dim=-1)  # [W, k]
        out: list = [None] * len(rows)
        for i, lp, ids, lps in zip(want, chosen.tolist(), top_id.tolist(), top_lp.tolist()):
            n = rows[i].request.params.logprobs
            out[i] = (lp, list(zip(ids[:n], lps[:n])))
        return out

    def _emit(self, rows: list[_Row], tokens: list[int], lps: list | None = None) -> None:
        """Record each row's new token, finish rows that are done, send each request its events."""
        events: dict[Request, list] = {}
        for i, (row, tok) in enumerate(zip(rows, tokens)):
            if row.dropped:
                continue
            row.pending = tok
            row.produced += 1
            ev = events.setdefault(row.request, [])
            if lps is not None and lps[i] is not None:
                ev.append(("logprob", row.choice, lps[i]))
            ev.append(("token", row.choice, tok))
            reason = "stop" if tok in row.request.params.stop_ids else "length" if row.produced >= row.request.params.max_tokens else None
            if reason:
                row.done = True
                ev.append(("done", row.choice, reason))
        self.stats["tokens"] += len(tokens)
        for req, ev in events.items():
            try:
                req.sink(ev)
            except Exception:  # a broken consumer cancels its own request, nothing else
                req.cancel()
        self._drop_rows()

    def _drop_rows(self) -> None:
        """Remove finished and cancelled rows from the batch (and their requests from `active`)."""
        keep = [i for i, row in enumerate(self._rows) if not (row.done or row.dropped)]
        if len(keep) == len(self._rows):
            return
        kept = set(keep)
        gone = [row for i, row in enumerate(self._rows) if i not in kept]
        self._cache = rebuild([(self._cache, torch.tensor(keep, device=self.device))]) if keep else None
        self._rows = [self._rows[i] for i in keep]
        with self._cond:
            for row in gone:
                row.request.remaining -= 1
                row.request.cut |= row.request.cancelled and not row.done
            for req in {row.request for row in gone}:
                if req in self._live and (req.remaining == 0 or req.cancelled):
                    self._live.discard(req)
                    self.stats["cancelled"] += req.cut

    def _fail_all(self, message: str, admitted: list[Request]) -> None:
        """Every running and just-admitted request gets an ("error", ...) event and leaves."""
        with self._cond:
            reqs = {row.request for row in self._rows} | set(admitted)
            self._rows, self._cache = [], None
            for req in reqs:
                self._live.discard(req)
        for req in reqs:
            try:
                req.sink([("error", c, message) for c in range(req.n)])
            except Exception:
                pass
