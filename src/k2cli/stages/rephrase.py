"""`k2 rephrase INPUT`: K2's knowledge rephrasing — N faithful rewrites of every document.

    INPUT (a dataset artifact, or .txt / .jsonl files)
      -> per document and rewrite: a sampled style; chunk-wise autoregressive rewriting by the
         backend (builtin | k2:<model ref> | openai); fidelity verification per chunk with retries
      -> shards of results in <root>/rephrase/runs/<run id>/ (an interrupted run resumes there)
      -> a dataset artifact: corpus/ with the kept rewrites (and the originals, unless
         --drop-original), each row with its provenance; world.json, qa_train/, qa_test/, math/
         copied unchanged, so the output replaces its input in every later stage

The run id hashes the input's content, the recipe (minus how-to-run settings such as concurrency)
and the backend's identity: the same command on the same input continues the same run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field

import rich_click as click

from k2cli.commands.common import recipe_options, run_options
from k2cli.console import info
from k2cli.data.loading import corpus_fingerprint, load_corpus
from k2cli.data.rephrase.backends import OPERATIONAL_FIELDS, BackendConfig, make_backend
from k2cli.data.rephrase.fidelity import FactExtractor
from k2cli.data.rephrase.pipeline import RUN_FORMAT, FidelityConfig, RewriteConfig, rephrase_documents, tally
from k2cli.data.synth import estimate_tokens, save_dataset
from k2cli.data.world import WORLD_FILE, load_world
from k2cli.errors import K2Error
from k2cli.stages.runner import RunOptions, Stage
from k2cli.recipes import to_dict


@dataclass
class RephraseRecipe:
    seed: int = 0
    input: str = "synth:latest"  # a dataset artifact, or .txt / .jsonl files (one document per file / line)
    rewrite: RewriteConfig = field(default_factory=RewriteConfig)
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)


PROVENANCE = ("source_doc_id", "rewrite", "style", "chunk_ids", "fidelity", "facts_checked", "similarity", "attempts")


def _features(input_features):
    """The input's columns (carried through) plus the provenance columns."""
    import datasets

    string, seq = datasets.Value("string"), getattr(datasets, "List", datasets.Sequence)
    features = {k: v for k, v in input_features.items() if k not in PROVENANCE}
    features.setdefault("source", string)
    features |= {"source_doc_id": string, "rewrite": datasets.Value("int32"), "style": string,
                 "chunk_ids": seq(string), "fidelity": string, "facts_checked": datasets.Value("int32"),
                 "similarity": datasets.Value("float64"), "attempts": datasets.Value("int32")}
    return datasets.Features(features)


def output_rows(docs: list[dict], records: list[dict], keep_original: bool) -> list[dict]:
    """Per input document: the original (if kept), then its kept rewrites, each with provenance."""
    by_doc: dict[str, list[dict]] = {}
    for r in records:
        by_doc.setdefault(r["doc_id"], []).append(r)
    rows = []
    for d in docs:
        if keep_original:
            rows.append(d | {"source_doc_id": d["doc_id"], "rewrite": 0, "style": "original", "chunk_ids": [],
                             "fidelity": "original", "facts_checked": 0, "similarity": None, "attempts": 0})
        for r in by_doc.get(d["doc_id"], []):
            if r["kept"]:
                rows.append(d | {"text": r["text"], "doc_id": f"{d['doc_id']}~r{r['rewrite']}", "source_doc_id": d["doc_id"],
                                 "rewrite": r["rewrite"], "style": r["style"], "chunk_ids": r["chunk_ids"],
                                 "fidelity": "passed", "facts_checked": r["facts"], "similarity": r["similarity"],
                                 "attempts": r["attempts"]})
    return rows


def run_id(fingerprint: str, recipe: RephraseRecipe, backend_identity: str) -> str:
    what = to_dict(recipe)
    what.pop("input")  # the content fingerprint stands for it
    for key in OPERATIONAL_FIELDS:
        what["backend"].pop(key)
    key = json.dumps({"format": RUN_FORMAT, "input": fingerprint, "recipe": what, "backend": backend_identity}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _input_documents(ds) -> list[dict]:
    """Rows as dicts (a `source` column added for plain files); doc ids must be unique."""
    docs = ds.to_list()
    seen = set()
    for d in docs:
        d.setdefault("source", "file")
        if d["doc_id"] in seen:
            raise K2Error(f"the input has two documents with doc_id '{d['doc_id']}'", "give every document a unique doc_id")
        seen.add(d["doc_id"])
    return docs


def _summary(recipe, m: dict, styles: Counter, example: tuple[str, str] | None) -> str:
    lines = [
        "# rephrased corpus",
        "",
        f"- backend `{recipe.backend.name}`; {recipe.rewrite.rewrites} rewrites per document; originals "
        + ("kept" if recipe.rewrite.keep_original else "dropped"),
        f"- {m['documents']} input documents -> {m['corpus_documents']} output documents, about {m['tokens_estimate']:,} tokens",
        f"- rewrites kept {m['rewrites_kept']} of {m['rewrites_requested']}; rejected {m['rewrites_rejected']} "
        f"(missing fact {m['rejected_missing_fact']}, invented fact {m['rejected_invented_fact']}, unchanged "
        f"{m['rejected_unchanged']}, empty {m['rejected_empty']}, low similarity {m['rejected_low_similarity']})",
        f"- chunks: {m['chunk_attempts']} attempts, {m['chunk_retries']} retries; {m['facts_verified']} facts verified",
        f"- mean source/rewrite similarity: {m['similarity_mean']}" if m["similarity_mean"] is not None
        else "- similarity: not recorded (the backend has no embeddings)",
        "- styles: " + ", ".join(f"{s} {n}" for s, n in sorted(styles.items())),
    ]
    if example:
        lines += ["", "## example", "", "original:", "", "```", example[0], "```", "", "rewrite:", "", "```", example[1], "```"]
    return "\n".join(lines) + "\n"


def run(recipe: RephraseRecipe, input_ref: str | None = None, opts: RunOptions = RunOptions(), backend=None):
    """Rephrase a corpus; returns the dataset Artifact. `backend` overrides recipe.backend (tests).
    opts.resume "no" (--restart) discards the finished shards of this run."""
    t0 = time.time()
    if input_ref:
        recipe = dataclasses.replace(recipe, input=input_ref)
    with Stage("rephrase", "dataset", recipe, opts) as st:
        ds, art = load_corpus(recipe.input)  # clear errors: missing, empty, not UTF-8, no text field
        docs = _input_documents(ds)
        lexicon = load_world(art.file(WORLD_FILE)).lexicon() if art is not None and art.has(WORLD_FILE) else None
        backend = backend or make_backend(recipe.backend)
        if done := st.up_to_date([art, getattr(backend, "artifact", None)]):
            return done
        run_dir = st.run_dir([], name=run_id(corpus_fingerprint(recipe.input), recipe, backend.identity))
        extract = FactExtractor(lexicon)
        info(f"rephrase: {len(docs)} documents x {recipe.rewrite.rewrites} rewrites with {backend.identity}; run dir {run_dir}")
        records, resumed = rephrase_documents(docs, recipe.rewrite, recipe.fidelity, backend, extract, recipe.seed, run_dir)
        rows = output_rows(docs, records, recipe.rewrite.keep_original)
        if not rows:
            raise K2Error(f"no rewrite of the {len(docs)} documents passed fidelity verification, and originals are dropped",
                          "see the rejection counts above; use a stronger backend, raise fidelity.retries, or --keep-original")
        with st.writer() as w:
            if art is not None:  # everything but the corpus passes through unchanged
                for part in sorted(art.path.iterdir()):
                    if part.name in ("manifest.json", "corpus", "summary.md"):
                        continue
                    (shutil.copytree if part.is_dir() else shutil.copy2)(part, w.dir / part.name)
            save_dataset(rows, w.dir / "corpus", features=_features(ds.features))
            w.metrics = {
                "documents": len(docs),
                "rewrites_per_document": recipe.rewrite.rewrites,
                **tally(records),
                "originals_kept": len(docs) if recipe.rewrite.keep_original else 0,
                "corpus_documents": len(rows),
                "tokens_estimate": estimate_tokens(r["text"] for r in rows),
                "backend": recipe.backend.name,
                "shards": -(-len(docs) // recipe.rewrite.shard_size),
                "shards_resumed": resumed,
                "wall_s": round(time.time() - t0, 2),
            }
            m = w.metrics
            kept = [r for r in records if r["kept"]]
            example = None
            if kept:
                original = next(d["text"] for d in docs if d["doc_id"] == kept[0]["doc_id"])
                example = (original, kept[0]["text"])
            (w.dir / "summary.md").write_text(_summary(recipe, m, Counter(r["style"] for r in kept), example))
            result = w.commit(summary=f"{m['rewrites_kept']} rewrites kept, {m['rewrites_rejected']} rejected; "
                                      f"{m['corpus_documents']} documents")
        info(f"[green]wrote[/] {result.path} ({result.id}): {m['corpus_documents']} documents; rewrites kept "
             f"{m['rewrites_kept']}, rejected {m['rewrites_rejected']}; {m['wall_s']} s")
        return result


@click.command("rephrase")
@click.argument("input_ref", metavar="[INPUT]", required=False)
@recipe_options("rephrase", RephraseRecipe)
@click.option("--rewrites", type=int, default=None, help="Faithful rewrites per document (overrides rewrite.rewrites).")
@click.option("--keep-original/--drop-original", default=None, help="Keep each original document next to its rewrites.")
@click.option("--backend", "backend_name", default=None, metavar="NAME",
              help="`builtin` (offline), `k2:MODEL_REF` (e.g. k2:pretrain:latest), or `openai` (overrides backend.name).")
@click.option("--base-url", default=None, help="openai: the endpoint, e.g. http://127.0.0.1:8000/v1.")
@click.option("--model", default=None, help="openai: the model name the endpoint serves.")
@click.option("--api-key-env", default=None, metavar="VAR", help="openai: the environment variable with the API key.")
@click.option("--concurrency", type=int, default=None, help="Requests in flight (openai) or generation batch rows (k2).")
@run_options(restart="Discard this run's finished shards and start over.")
def rephrase_cmd(input_ref, recipe, recipe_source, rewrites, keep_original, backend_name, base_url, model, api_key_env,
                 concurrency, opts):
    """Rewrite every document of INPUT (a dataset artifact, or .txt/.jsonl files; default: the
    recipe's `input`, synth:latest) N times in diverse styles, verifying each rewritten chunk
    against its source (Kimi K2 section 2.2).

    An interrupted run continues where it stopped when the same command is run again.
    """
    rw = {k: v for k, v in {"rewrites": rewrites, "keep_original": keep_original}.items() if v is not None}
    be = {k: v for k, v in {"name": backend_name, "base_url": base_url, "model": model, "api_key_env": api_key_env,
                            "concurrency": concurrency}.items() if v is not None}
    recipe = dataclasses.replace(recipe, rewrite=dataclasses.replace(recipe.rewrite, **rw),
                                 backend=dataclasses.replace(recipe.backend, **be))
    run(recipe, input_ref=input_ref, opts=opts)


COMMANDS = [rephrase_cmd]
