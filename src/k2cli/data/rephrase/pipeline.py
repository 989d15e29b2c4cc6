"""The rephrasing pipeline: K2's three parts, the same whichever backend writes the text.

    for each shard of documents (in order; a finished shard is a JSONL file in the run directory):
        jobs = one per (document, rewrite k): a style sampled per rewrite, the document's chunks
        rounds: every unfinished job sends the request for its next chunk — the style's prompt,
                the chunk, and the text this job has rewritten so far as context — and the whole
                round goes to the backend as one batch (batched generation, concurrent requests)
        verify: each rewritten chunk against its source chunk (fidelity.py); a pass appends it,
                a failure retries the chunk (a new seed), and after `fidelity.retries` retries the
                rewrite of this document is dropped. Every decision is counted.
    a resumed run skips the shards already on disk; the output is assembled from all of them.

Knowledge documents are cut into sentence-aware chunks (chunking.py). A math document is one
chunk: a learning note restructures the whole problem.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from k2cli.console import err, info, quiet
from k2cli.data.rephrase.backends import Backend, RewriteRequest
from k2cli.data.rephrase.chunking import chunk_text, tail
from k2cli.data.rephrase.fidelity import FactExtractor, Facts, cosine, verify_chunk
from k2cli.data.rephrase.styles import KNOWLEDGE_STYLES, MATH_STYLES, build_messages, check_styles, sample_styles
from k2cli.errors import Interrupted, K2Error

RUN_FORMAT = 1  # bump when what a run directory holds, or how it is made, changes: old runs are not resumed
FAIL_REASONS = ("empty", "unchanged", "missing_fact", "invented_fact", "low_similarity", "duplicate")


@dataclass
class RewriteConfig:
    """Recipe section `rewrite`: what is asked for."""

    rewrites: int = 2  # faithful rewrites per document
    keep_original: bool = True  # the output corpus keeps each original next to its rewrites
    styles: list[str] = field(default_factory=lambda: list(KNOWLEDGE_STYLES))
    math_styles: list[str] = field(default_factory=lambda: list(MATH_STYLES))
    math_source: str = "math"  # corpus rows with this `source` are math documents (learning-note styles)
    chunk_tokens: int = 256  # chunk budget (estimated tokens; whole sentences)
    context_tokens: int = 512  # the tail of the already-rewritten text sent with each chunk
    shard_size: int = 256  # documents per shard (the unit of resumption)

    def validate(self) -> "RewriteConfig":
        if self.rewrites < 1:
            raise K2Error(f"--rewrites {self.rewrites}: at least one rewrite per document is needed",
                          "pass --rewrites 1 or more (to copy a corpus unchanged, use the input itself)")
        if self.chunk_tokens < 8 or self.context_tokens < 0 or self.shard_size < 1:
            raise K2Error("rewrite.chunk_tokens must be >= 8, context_tokens >= 0 and shard_size >= 1",
                          "fix the rewrite section of the recipe")
        check_styles(self.styles, "knowledge")
        check_styles(self.math_styles, "math")
        return self


@dataclass
class FidelityConfig:
    """Recipe section `fidelity`: how strict verification is."""

    retries: int = 2  # further attempts at a failing chunk before the document's rewrite is dropped
    min_similarity: float = 0.0  # with embeddings: the lowest cosine similarity a chunk may have

    def validate(self) -> "FidelityConfig":
        if self.retries < 0 or not -1 <= self.min_similarity <= 1:
            raise K2Error("fidelity.retries must be >= 0 and fidelity.min_similarity in [-1, 1]", "fix the fidelity section")
        return self


def derive_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big")


def join_pieces(pieces: list[str]) -> str:
    """Rewritten chunks in order: line-oriented styles (timelines, Q&A) join with a line break."""
    text = ""
    for p in pieces:
        p = p.strip()
        text = p if not text else text + ("\n" if "\n" in text or "\n" in p else " ") + p
    return text


# ----------------------------------------------------------------------------- one rewrite of one document


@dataclass
class Job:
    doc_id: str
    rewrite: int  # 1..N
    style: str
    kind: str  # "knowledge" | "math"
    chunks: list[str]
    doc_facts: Facts  # everything the source document says: what a rewrite may mention
    pieces: list[str] = field(default_factory=list)  # accepted rewritten chunks
    attempt: int = 0  # failed attempts at the current chunk
    tries: list = field(default_factory=list)  # attempts each accepted chunk took
    attempts: int = 0  # attempts over all chunks
    facts: list = field(default_factory=list)  # source facts verified, per accepted chunk
    similarities: list = field(default_factory=list)
    failures: dict = field(default_factory=dict)  # reason -> failed attempts
    status: str = "active"  # active | kept | rejected
    last_failure: dict = field(default_factory=dict)

    def request(self, seed: int, context_tokens: int) -> RewriteRequest:
        i = len(self.pieces)
        context = tail(join_pieces(self.pieces), context_tokens) if context_tokens else ""
        return RewriteRequest(messages=build_messages(self.style, self.chunks[i], context), style=self.style,
                              kind=self.kind, chunk=self.chunks[i], context=context,
                              seed=derive_seed(seed, self.doc_id, self.rewrite, i, self.attempt), doc_id=self.doc_id)

    def record(self, verdict, text: str, retries: int) -> None:
        """The outcome of one attempt at the current chunk."""
        self.attempts += 1
        if not verdict.ok:
            self.fail(verdict.reason, retries, verdict.missing, verdict.invented)
            return
        self.pieces.append(text.strip())
        self.facts.append(verdict.facts)
        self.similarities.append(verdict.similarity)
        self.tries.append(self.attempt + 1)
        self.attempt = 0
        if len(self.pieces) == len(self.chunks):
            self.status = "kept"

    def fail(self, reason: str, retries: int, missing=(), invented=()) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + 1
        self.last_failure = {"chunk": len(self.pieces), "reason": reason, "missing": list(missing), "invented": list(invented)}
        self.attempt += 1
        if self.attempt > retries:
            self.status = "rejected"

    def undo_last(self, reason: str, retries: int) -> None:
        """Reopen a finished rewrite: its last chunk's accepted attempt now counts as a failure, so
        the retries of that chunk stay bounded however often this happens."""
        self.pieces.pop()
        self.facts.pop()
        self.similarities.pop()
        self.attempt = self.tries.pop() - 1  # the failures before the accepted attempt
        self.status = "active"
        self.fail(reason, retries)

    def result(self) -> dict:
        kept = self.status == "kept"
        sims = [s for s in self.similarities if s is not None]
        return {
            "doc_id": self.doc_id,
            "rewrite": self.rewrite,
            "style": self.style,
            "kept": kept,
            "text": join_pieces(self.pieces) if kept else None,
            "chunk_ids": [f"{self.doc_id}#c{i}" for i in range(len(self.chunks))],
            "attempts": self.attempts,
            "retries": self.attempts - len(self.pieces) - (0 if kept else 1),
            "facts": sum(self.facts),
            "similarity": round(sum(sims) / len(sims), 4) if kept and sims else None,
            "failures": self.failures,
            "rejected": None if kept else self.last_failure,
        }


def plan_jobs(docs: list[dict], cfg: RewriteConfig, seed: int, extract: FactExtractor) -> list[Job]:
    jobs = []
    for d in docs:
        kind = "math" if d.get("source") == cfg.math_source else "knowledge"
        chunks = [d["text"].strip()] if kind == "math" else chunk_text(d["text"], cfg.chunk_tokens)
        names = cfg.math_styles if kind == "math" else cfg.styles
        styles = sample_styles(names, cfg.rewrites, random.Random(derive_seed(seed, "styles", d["doc_id"])))
        doc_facts = extract(d["text"])
        jobs += [Job(d["doc_id"], k + 1, style, kind, chunks, doc_facts) for k, style in enumerate(styles)]
    return jobs


def run_rounds(jobs: list[Job], backend: Backend, extract: FactExtractor, fid: FidelityConfig, seed: int,
               context_tokens: int, on_round=None) -> None:
    """Advance every job one chunk per round until each is kept or rejected."""
    while active := [j for j in jobs if j.status == "active"]:
        requests = [j.request(seed, context_tokens) for j in active]
        texts = backend.rewrite(requests)
        if len(texts) != len(requests):
            raise K2Error(f"the {backend.name} backend returned {len(texts)} texts for {len(requests)} requests",
                          "this is a bug in the backend")
        sims = similarities(backend, [r.chunk for r in requests], texts)
        for job, req, text, sim in zip(active, requests, texts, sims):
            verdict = verify_chunk(req.chunk, text or "", job.doc_facts, extract, sim, fid.min_similarity)
            job.record(verdict, text or "", fid.retries)
        reject_duplicates(active, jobs, fid.retries)
        if on_round:
            on_round(jobs)


def reject_duplicates(just_ran: list[Job], jobs: list[Job], retries: int) -> None:
    """N rewrites means N different texts: a finished rewrite equal to a kept one of the same
    document is retried (likely with a greedy model, rare with sampling or the builtin backend)."""
    for job in just_ran:
        if job.status != "kept":
            continue
        text = join_pieces(job.pieces)
        if any(o is not job and o.doc_id == job.doc_id and o.status == "kept" and join_pieces(o.pieces) == text for o in jobs):
            job.undo_last("duplicate", retries)


def similarities(backend: Backend, sources: list[str], rewrites: list[str]) -> list[float | None]:
    vectors = backend.embed(sources + [t if t and t.strip() else " " for t in rewrites])
    if vectors is None:
        return [None] * len(sources)
    n = len(sources)
    return [cosine(vectors[i], vectors[n + i]) for i in range(n)]


# ----------------------------------------------------------------------------- shards and the run directory


def shard_path(run_dir: Path, k: int) -> Path:
    return run_dir / f"shard-{k:05d}.jsonl"


def write_shard(path: Path, records: list[dict]) -> None:
    """Atomic: a shard file exists only complete, so a resumed run can trust every one it finds."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    os.replace(tmp, path)


def read_shard(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class ShardProgress:
    """documents done / total, documents per second, kept / rejected rewrites, ETA."""

    def __init__(self, total: int, done: int, kept: int, rejected: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.total, self.base, self.kept, self.rejected = total, done, kept, rejected
        self.t0 = time.time()
        self.live = not quiet() and err.is_terminal
        self.progress = None
        if self.live:
            self.progress = Progress(TextColumn("[bold]rephrase"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[rate]} docs/s"),
                                     TextColumn("kept [green]{task.fields[kept]}[/] rejected [red]{task.fields[rejected]}[/]"),
                                     TimeRemainingColumn(), console=err, transient=False)
            self.task = self.progress.add_task("rephrase", total=total, completed=done, rate="-", kept=kept, rejected=rejected)
            self.progress.start()

    def update(self, done: int, kept: int, rejected: int, final: bool = False) -> None:
        rate = (done - self.base) / max(time.time() - self.t0, 1e-9)
        if self.live:
            self.progress.update(self.task, completed=done, rate=f"{rate:,.1f}", kept=kept, rejected=rejected)
        elif final and done == self.base:
            info(f"rephrase: all {done} documents were already done (kept {kept}, rejected {rejected})")
        elif final:
            info(f"rephrase: {done}/{self.total} documents, {rate:,.1f} docs/s, kept {kept}, rejected {rejected}")

    def close(self):
        if self.progress is not None:
            self.progress.stop()


def rephrase_documents(docs, cfg: RewriteConfig, fid: FidelityConfig, backend: Backend, extract: FactExtractor,
                       seed: int, run_dir: Path) -> tuple[list[dict], int]:
    """Rewrite `docs` (a sequence of dicts with text, doc_id, source), shard by shard, resuming from
    `run_dir`. Returns (one record per document x rewrite, in document order; shards found done)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    n = len(docs)
    n_shards = (n + cfg.shard_size - 1) // cfg.shard_size
    done = [k for k in range(n_shards) if shard_path(run_dir, k).is_file()]
    finished = [r for k in done for r in read_shard(shard_path(run_dir, k))]
    docs_done = sum(min(cfg.shard_size, n - k * cfg.shard_size) for k in done)
    if done:
        info(f"rephrase: resuming {run_dir.name}: {len(done)} of {n_shards} shards already done")
    progress = ShardProgress(n, docs_done, sum(r["kept"] for r in finished), sum(not r["kept"] for r in finished))
    kept, rejected = progress.kept, progress.rejected
    try:
        for k in range(n_shards):
            if k in done:
                continue
            lo, hi = k * cfg.shard_size, min(n, (k + 1) * cfg.shard_size)
            shard_docs = [docs[i] for i in range(lo, hi)]
            jobs = plan_jobs(shard_docs, cfg, seed, extract)

            def on_round(jobs):
                finished_docs = len({j.doc_id for j in jobs} - {j.doc_id for j in jobs if j.status == "active"})
                progress.update(docs_done + finished_docs, kept + sum(j.status == "kept" for j in jobs),
                                rejected + sum(j.status == "rejected" for j in jobs))

            run_rounds(jobs, backend, extract, fid, seed, cfg.context_tokens, on_round)
            records = [j.result() for j in jobs]
            write_shard(shard_path(run_dir, k), records)
            docs_done += hi - lo
            kept += sum(r["kept"] for r in records)
            rejected += sum(not r["kept"] for r in records)
            progress.update(docs_done, kept, rejected)
    except KeyboardInterrupt:
        progress.close()
        raise Interrupted(f"rephrase stopped: {docs_done} of {n} documents are done and saved in {run_dir}",
                          "run the same command again to resume")
    progress.update(docs_done, kept, rejected, final=True)
    progress.close()
    return [r for k in range(n_shards) for r in read_shard(shard_path(run_dir, k))], len(done)


# ----------------------------------------------------------------------------- counting


def tally(records: list[dict]) -> dict:
    """Flat counts of every decision (for the artifact's metrics)."""
    kept = [r for r in records if r["kept"]]
    sims = [r["similarity"] for r in kept if r["similarity"] is not None]
    failures = {reason: 0 for reason in FAIL_REASONS}
    for r in records:
        for reason, count in r["failures"].items():
            failures[reason] = failures.get(reason, 0) + count
    rejected_by = {reason: 0 for reason in FAIL_REASONS}
    for r in records:
        if not r["kept"]:
            rejected_by[r["rejected"]["reason"]] = rejected_by.get(r["rejected"]["reason"], 0) + 1
    return {
        "rewrites_requested": len(records),
        "rewrites_kept": len(kept),
        "rewrites_rejected": len(records) - len(kept),
        "chunk_attempts": sum(r["attempts"] for r in records),
        "chunk_retries": sum(r["retries"] for r in records),
        "facts_verified": sum(r["facts"] for r in kept),
        **{f"chunk_failed_{k}": v for k, v in failures.items()},
        **{f"rejected_{k}": v for k, v in rejected_by.items()},
        "similarity_mean": round(sum(sims) / len(sims), 4) if sims else None,
    }
