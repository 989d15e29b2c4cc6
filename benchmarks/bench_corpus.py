"""Memory and tokenisation speed of pre-training on a large corpus: k2 now vs an earlier commit.

    python benchmarks/bench_corpus.py --tokens 100e6 --before da1c17e --out benchmarks/RESULTS.md

1. Generates a corpus of about `--tokens` tokens (random words from a fixed 4,000-word vocabulary,
   documents of 100-1,500 words, one parquet file; cached under --work) and trains a 2,048-token k2
   BPE on a sample of it.
2. For each code version (this checkout, and `--before REV` checked out with git worktree), a fresh
   child process: imports, builds the tiny model, then reads the corpus and packs it exactly as
   `k2 pretrain` does (`build_lm_data`: tokenise, hold out 5%, pack) and trains 50 steps of 16 x 256
   tokens with the ONE training loop. It reports peak RSS (ru_maxrss) minus its RSS before the corpus
   was touched, per corpus token, and the tokenisation rate.
3. The yardstick for tokenisation speed: `tokenizers`' own batch encode over the same texts, ids
   discarded (what no pipeline can beat), measured in the same child right before.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def make_corpus(work: Path, tokens: float) -> Path:
    """~tokens tokens of random-word documents (about 3 tokens per word with a 2,048 BPE, measured)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = work / f"corpus-{int(tokens)}.parquet"
    if path.exists():
        return path
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = np.array(["".join(rng.choice(letters, size=rng.integers(2, 9))) for _ in range(4000)])
    n_words = int(tokens / 3.0)
    writer, written = None, 0
    tmp = path.with_suffix(".tmp")
    while written < n_words:
        lengths = rng.integers(100, 1500, size=2000)
        ids = rng.integers(0, len(words), size=int(lengths.sum()))
        cuts = np.cumsum(lengths)[:-1]
        docs = [" ".join(words[chunk]) + "." for chunk in np.split(ids, cuts)]
        table = pa.table({"text": docs})
        writer = writer or pq.ParquetWriter(tmp, table.schema)
        writer.write_table(table)
        written += int(lengths.sum())
    writer.close()
    tmp.rename(path)
    return path


def child(args) -> None:
    """One measurement, in its own process (so ru_maxrss is this run's alone)."""
    import torch

    from k2cli.data.lm_data import build_lm_data, load_documents, DataConfig
    from k2cli.data.tokenizer import load_tokenizer
    import dataclasses

    from k2cli.model.config import PRESETS
    from k2cli.model.transformer import build_model
    from k2cli.optim.muon import OptimConfig
    from k2cli.optim.schedule import ScheduleConfig
    from k2cli.train.lm_task import LMTask
    from k2cli.train.loop import TrainConfig, train

    torch.manual_seed(0)
    tokenizer = load_tokenizer(Path(args.tokenizer))
    cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=tokenizer.vocab_size)
    model = build_model(cfg, seed=0)
    ds, art, fingerprint = load_documents(DataConfig(input=args.corpus))

    # the yardstick: tokenizers' own batch encode, ids thrown away
    t0, n_ref = time.perf_counter(), 0
    for batch in ds.iter(batch_size=1024):
        n_ref += sum(len(e.ids) for e in tokenizer.tok.encode_batch(batch["text"], add_special_tokens=False))
    ref_s = time.perf_counter() - t0

    base = rss_mb()
    t0 = time.perf_counter()
    try:  # the held-out split: a lineage.Split now, (val_fraction, seed) in older versions
        from k2cli.lineage import Split

        split = Split(args.corpus, 0.05, 0, "bench")
    except ImportError:
        split = 0.05
    data = build_lm_data(ds, art, fingerprint, tokenizer, 256, split, 0)
    build_s = time.perf_counter() - t0
    data_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before any training step
    task = LMTask(data.train, data.val, batch_size=16, seed=0, eval_batches=1)
    tc = TrainConfig(steps=50, batch_size=16, seq_len=256, eval_every=0, checkpoint_every=0, peak_tflops=1.0, device="cpu")
    with tempfile.TemporaryDirectory() as run_dir:
        t1 = time.perf_counter()
        train(model, task, OptimConfig(name="muonclip", lr=0.01), ScheduleConfig(warmup_steps=5), tc, Path(run_dir), {}, title="bench")
        train_s = time.perf_counter() - t1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"tokens": n_ref, "ref_s": ref_s, "build_s": build_s, "train_s": train_s,
                      "base_mb": base, "data_peak_mb": data_peak, "peak_mb": peak}))


def measure(src: Path, corpus: Path, tokenizer: Path, root: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src), K2_ARTIFACTS=str(root), K2_QUIET="1")
    out = subprocess.run([sys.executable, __file__, "--child", "--corpus", str(corpus), "--tokenizer", str(tokenizer)],
                         env=env, capture_output=True, text=True, timeout=7200)
    if out.returncode:
        raise SystemExit(f"child failed ({src}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=float, default=100e6)
    ap.add_argument("--before", default="", help="an earlier commit to measure side by side (e.g. da1c17e)")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "k2-bench-corpus"))
    ap.add_argument("--out", default="")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--corpus")
    ap.add_argument("--tokenizer")
    args = ap.parse_args()
    if args.child:
        return child(args)

    sys.path.insert(0, str(REPO / "src"))
    from k2cli.data.tokenizer import train_tokenizer

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    corpus = make_corpus(work, args.tokens)
    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        import pyarrow.parquet as pq

        sample = pq.ParquetFile(corpus).read_row_group(0).column("text").to_pylist()[:500]
        tok_dir.mkdir(exist_ok=True)
        train_tokenizer(sample, vocab_size=2048).save(tok_dir)

    versions = {"now": REPO / "src"}
    if args.before:
        old = work / f"src-{args.before}"
        if not old.exists():
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(old), args.before], check=True,
                           capture_output=True)
        versions = {f"before ({args.before})": old / "src", **versions}
    rows = []
    for name, src in versions.items():
        with tempfile.TemporaryDirectory(dir=work) as root:  # a fresh token cache for each
            r = measure(src, corpus, tok_dir, Path(root))
        per_token = (r["data_peak_mb"] - r["base_mb"]) * 2**20 / r["tokens"]
        rows.append(f"| {name} | {r['tokens'] / 1e6:.1f}M | {r['base_mb']:.0f} MB | {r['data_peak_mb']:.0f} MB | "
                    f"**{per_token:.2f}** | {r['peak_mb']:.0f} MB | {r['build_s']:.0f} s | {r['tokens'] / r['build_s'] / 1e6:.2f}M | "
                    f"{r['tokens'] / r['ref_s'] / 1e6:.2f}M | {r['ref_s'] / r['build_s']:.2f}x | {r['train_s']:.0f} s |")
        print(rows[-1], flush=True)
    body = (
        "## Corpus memory and tokenisation: pre-training on a large corpus\n\n"
        "Read, tokenise, hold out, pack (`build_lm_data`, as `k2 pretrain` does), then 50 training steps of the tiny "
        "model (16 x 256 tokens), in a fresh process per row (tiny model already built). Bytes per token = (peak RSS "
        "once the corpus is read and packed - RSS before the corpus was touched) / corpus tokens; the training steps "
        "then add a constant (activations, optimizer state: the same for any corpus size), shown as the final peak. "
        "Tokenisation rate vs the yardstick: `tokenizers`' own batch encode of the same texts in the same process, ids "
        "discarded (1.00x = no overhead at all).\n\n"
        "| code | corpus tokens | RSS before | peak after read + pack | bytes / token | peak with 50 steps | "
        "read + tokenise + pack | tokens/s | tokenizers batch encode | speed vs it | 50 steps |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        + "\n".join(rows) + "\n"
    )
    if args.out:
        sys.path.insert(0, str(HERE))
        from common import write_section

        write_section("corpus", body, Path(args.out))
    print(body)


if __name__ == "__main__":
    main()
