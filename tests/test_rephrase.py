"""k2 rephrase: styles, chunk-wise autoregressive rewriting, fidelity verification, the three
backends (the openai one against a real loopback HTTP server), resumable shards, bad input."""

import dataclasses
import datetime
import json
import socket

import datasets
import pytest

from chat_server import PREFIXES, ChatServer
from conftest import assert_clean_error
from k2cli.artifacts import ArtifactWriter, open_artifact
from k2cli.data.rephrase.backends import RewriteRequest
from k2cli.data.rephrase.builtin import BuiltinBackend
from k2cli.data.rephrase.chunking import approx_tokens, chunk_text, split_sentences, tail
from k2cli.data.rephrase.fidelity import FactExtractor, verify_chunk
from k2cli.data.rephrase.pipeline import join_pieces, read_shard
from k2cli.data.rephrase.styles import CHUNK_HEADER, NO_CONTEXT, STYLES, build_messages, sample_styles
from k2cli.data.world import format_date, load_world
from k2cli.errors import Interrupted, K2Error
from k2cli.recipes import resolve_recipe
from k2cli.stages import rephrase, synth
from k2cli.stages.runner import RunOptions


@pytest.fixture
def synth_art():
    recipe, _ = resolve_recipe(synth.SynthRecipe, "synth", "micro")
    return synth.run(recipe)


def micro_recipe(**rewrite) -> rephrase.RephraseRecipe:
    recipe, _ = resolve_recipe(rephrase.RephraseRecipe, "rephrase", "micro")
    return dataclasses.replace(recipe, rewrite=dataclasses.replace(recipe.rewrite, **rewrite))


def corpus(art) -> list[dict]:
    return datasets.load_from_disk(str(art.path / "corpus")).to_list()


class Recording:
    """The builtin backend, recording every (request, output); optionally failing at round N."""

    name = "recording"

    def __init__(self, fail_at_round=None, error=RuntimeError("the backend crashed")):
        self.inner = BuiltinBackend()
        self.identity = self.inner.identity  # the same run as the builtin backend
        self.calls, self.rounds = [], 0
        self.fail_at_round, self.error = fail_at_round, error

    def rewrite(self, requests):
        self.rounds += 1
        if self.rounds == self.fail_at_round:
            raise self.error
        outputs = self.inner.rewrite(requests)
        self.calls += list(zip(requests, outputs))
        return outputs

    def embed(self, texts):
        return None


def request(chunk, style="encyclopedic", context="", seed=1, kind="knowledge"):
    return RewriteRequest(messages=build_messages(style, chunk, context), style=style, kind=kind, chunk=chunk,
                          context=context, seed=seed, doc_id="d0")


# ----------------------------------------------------------------------------- fidelity


def test_fidelity_rejects_a_corrupted_fact_and_accepts_a_restyle(synth_art):
    world = load_world(synth_art.path)
    p = world.people[0]
    attrs = world.attributes(p)
    bio = next(d["text"] for d in corpus(synth_art) if d["person_id"] == p.id)
    extract = FactExtractor(world.lexicon())
    doc = extract(bio)
    restyled = BuiltinBackend().rewrite_one(request(bio, "news"))
    assert restyled != bio and verify_chunk(bio, restyled, doc, extract).ok
    reordered = " ".join(reversed(split_sentences(bio)))
    assert verify_chunk(bio, reordered, doc, extract).ok
    assert len(doc) == 1 + 6  # the name and six attribute values

    next_day = format_date((datetime.date.fromisoformat(p.birth_date) + datetime.timedelta(days=1)).isoformat())
    v = verify_chunk(bio, restyled.replace(attrs["birth_date"], next_day), doc, extract)
    assert (v.ok, v.reason) == (False, "missing_fact") and v.missing == [f"date {p.birth_date}"]

    other = next(o.name for o in world.companies if o.name != attrs["employer"])
    v = verify_chunk(bio, restyled.replace(attrs["employer"], other), doc, extract)
    assert (v.ok, v.reason) == (False, "missing_fact") and v.missing == [f"entity {attrs['employer']}"]
    v = verify_chunk(bio, restyled + f" Later {p.name} also joined {other}.", doc, extract)
    assert (v.ok, v.reason, v.invented) == (False, "invented_fact", [f"entity {other}"])
    v = verify_chunk(bio, restyled + " In 2031 that changed.", doc, extract)
    assert (v.reason, v.invented) == ("invented_fact", ["number 2031"])

    # without a world lexicon, proper nouns are guessed: a changed employer is still caught
    guess = FactExtractor()
    assert verify_chunk(bio, restyled, guess(bio), guess).ok
    assert verify_chunk(bio, restyled.replace(attrs["employer"], other), guess(bio), guess).reason == "missing_fact"

    # other date formats are the same date; an echo or nothing is not a rewrite; similarity gates
    y, m, d = p.birth_date.split("-")
    for same in (f"{int(d)} {format_date(p.birth_date).split()[0]} {y}", p.birth_date):
        assert verify_chunk(bio, restyled.replace(attrs["birth_date"], same), doc, extract).ok
    assert verify_chunk(bio, "  " + bio + "\n", doc, extract).reason == "unchanged"
    assert verify_chunk(bio, " ", doc, extract).reason == "empty"
    v = verify_chunk(bio, restyled, doc, extract, similarity=0.2, min_similarity=0.5)
    assert (v.reason, v.similarity) == ("low_similarity", 0.2)


def test_fidelity_numbers_and_list_markers():
    src = "Mia saves 250 dollars every month for 12 months. How much does she save?"
    ok = "Question: how much does Mia save?\n1. 12 * 250 = 3,000\nFinal answer: 3000"
    guess = FactExtractor()
    doc = guess(src + " 12 * 250 = 3000")  # the document's solution holds the result
    assert verify_chunk(src, ok, doc, guess).ok  # "1." is a list marker, "3,000" is 3000
    assert verify_chunk(src, "Mia saves 250 dollars a month for twelve months.", doc, guess).ok
    assert verify_chunk(src, "Mia saves 250 dollars a month for 11 months.", doc, guess).reason == "missing_fact"


# ----------------------------------------------------------------------------- chunks, styles, builtin


def test_chunks_are_whole_sentences_within_the_budget(synth_art):
    for doc in corpus(synth_art)[:10]:
        sentences = split_sentences(doc["text"])
        chunks = chunk_text(doc["text"], 24)
        assert [s for c in chunks for s in split_sentences(c)] == sentences  # nothing cut, lost or moved
        assert all(approx_tokens(c) <= 24 or len(split_sentences(c)) == 1 for c in chunks)
        assert len(chunks) > 1
    assert tail("One. Two two. Three three three.", 5) == "Three three three."


def test_styles_are_sampled_without_repeats_while_possible():
    import random

    names = [s for s in STYLES if STYLES[s].kind == "knowledge"]
    picked = sample_styles(names, 5, random.Random(0))
    assert len(set(picked)) == 5
    assert sorted(sample_styles(names, len(names) * 2, random.Random(1))) == sorted(names * 2)


def test_builtin_continues_from_the_rewritten_context():
    chunk = "She works for Nimbus Cloud. She works in Oslo."
    for name in ("Anna Avery Berg", "Vera Kit Olsen"):
        context = f"Questions and answers about {name}.\nQ: When was {name} born? A: On May 1, 1990."
        out = BuiltinBackend().rewrite_one(request(chunk, "qa", context))
        assert name in out and "Nimbus Cloud" in out and "Oslo" in out
        assert not out.startswith("Questions and answers")  # the opener belongs to the first chunk only
    with pytest.raises(K2Error, match="no earlier text names the person"):
        BuiltinBackend().rewrite_one(request(chunk, "qa", context=""))


def test_builtin_refuses_text_it_cannot_parse():
    with pytest.raises(K2Error) as e:
        BuiltinBackend().rewrite_one(request("The weather in Oslo was mild all week."))
    assert "--backend k2:" in e.value.line() and "openai" in e.value.line()
    with pytest.raises(K2Error, match="not a math document"):
        BuiltinBackend().rewrite_one(request("What is 2 + 2?", "learning_note", kind="math"))


# ----------------------------------------------------------------------------- the pipeline


def test_chunked_rewriting_conditions_on_the_rewritten_text_so_far(synth_art):
    backend = Recording()
    rephrase.run(micro_recipe(chunk_tokens=16, rewrites=2), backend=backend)
    jobs = {}
    for req, out in backend.calls:
        jobs.setdefault((req.doc_id, req.style), []).append((req, out))
    long_jobs = [calls for calls in jobs.values() if len(calls) > 2]
    assert len(long_jobs) > 40  # biographies are cut into several chunks
    for calls in long_jobs:
        for i, (req, _) in enumerate(calls):
            so_far = join_pieces([out for _, out in calls[:i]])
            assert req.context == so_far  # the rewritten text before this chunk, exactly
            user = req.messages[-1]["content"]
            assert (so_far in user) if i else (NO_CONTEXT in user)
            assert user.endswith(CHUNK_HEADER + "\n" + req.chunk)


class SameTextForEveryStyle:
    """A greedy model ignoring the style: both rewrites of a document come out the same."""

    name, identity = "same-text", "same-text"

    def __init__(self):
        self.calls = 0

    def rewrite(self, requests):
        self.calls += len(requests)
        assert self.calls < 5000, "the pipeline keeps asking: retries are not bounded"
        return ["Put differently: " + " ".join(reversed(split_sentences(r.chunk))) for r in requests]

    def embed(self, texts):
        return None


def test_duplicate_rewrites_are_retried_then_rejected(synth_art):
    art = rephrase.run(micro_recipe(rewrites=2), backend=SameTextForEveryStyle())
    m = art.metrics
    n = m["documents"]
    assert m["rewrites_kept"] == n and m["rejected_duplicate"] == n  # one survives per document
    assert m["chunk_failed_duplicate"] == n * 3  # the last chunk: 1 try + fidelity.retries=2 retries
    rows = corpus(art)
    assert len({(r["source_doc_id"], r["text"]) for r in rows}) == len(rows)


def test_interrupted_run_resumes_without_repeating_work(synth_art, artifacts_root):
    recipe = micro_recipe()
    crashing = Recording(fail_at_round=6)
    with pytest.raises(RuntimeError, match="crashed"):
        rephrase.run(recipe, backend=crashing)
    assert not (artifacts_root / "rephrase" / "v1").exists()  # no artifact until the run is complete
    (run_dir,) = (artifacts_root / "rephrase" / "runs").iterdir()
    shards = sorted(run_dir.glob("shard-*.jsonl"))
    assert 1 <= len(shards) < 4
    done = {r["doc_id"] for s in shards for r in read_shard(s)}

    resumed = Recording()
    art = rephrase.run(recipe, backend=resumed)
    redone = {req.doc_id for req, _ in resumed.calls}
    assert not redone & done and redone | done == {d["doc_id"] for d in corpus(synth_art)}
    assert art.metrics["shards_resumed"] == len(shards) and art.metrics["shards"] == 4

    fresh = rephrase.run(recipe, backend=Recording(), opts=RunOptions(resume="no"))  # an uninterrupted run
    assert fresh.metrics["shards_resumed"] == 0
    assert corpus(fresh) == corpus(art)

    with pytest.raises(Interrupted, match="resume"):
        rephrase.run(recipe, backend=Recording(fail_at_round=2, error=KeyboardInterrupt()), opts=RunOptions(resume="no"))


def test_rephrase_cli_end_to_end(k2, synth_art, artifacts_root):
    k2("rephrase", "synth:latest", "--preset", "micro")
    art = open_artifact("rephrase:latest", kind="dataset", verify=True)
    m, source = art.metrics, corpus(synth_art)
    assert m["rewrites_requested"] == 2 * len(source) == m["rewrites_kept"] + m["rewrites_rejected"]
    assert m["rewrites_kept"] > 0.9 * m["rewrites_requested"] and m["chunk_attempts"] >= m["rewrites_requested"]
    rows = corpus(art)
    assert len(rows) == len(source) + m["rewrites_kept"] == m["corpus_documents"]
    world = load_world(art.path)
    by_id = {d["doc_id"]: d for d in source}
    for row in rows:
        assert set(rephrase.PROVENANCE) <= set(row)
        if row["style"] == "original":
            assert row["text"] == by_id[row["doc_id"]]["text"] and row["rewrite"] == 0
            continue
        src = by_id[row["source_doc_id"]]
        assert row["fidelity"] == "passed" and row["rewrite"] in (1, 2) and row["style"] in STYLES
        assert row["chunk_ids"][0] == f"{src['doc_id']}#c0" and row["source"] == src["source"]
        assert row["text"] != src["text"]
        if src["source"] == "bio":  # every fact of the person survived
            assert row["person_id"] == src["person_id"]
            for value in world.attributes(world.person(src["person_id"])).values():
                assert value in row["text"]
        else:
            answer = src["text"].rsplit("The answer is ", 1)[1].rstrip(".")
            assert f"Final answer: {answer}" in row["text"]
    # everything but the corpus is copied through unchanged; lineage points at the input
    for name, info in synth_art.manifest["files"].items():
        if not name.startswith("corpus/") and name != "summary.md":
            assert art.manifest["files"][name]["sha256"] == info["sha256"], name
    assert art.manifest["inputs"][0]["id"] == synth_art.id
    assert "rephrase/v1" in k2("artifacts", "show", "rephrase:latest").output

    k2("rephrase", "synth:latest", "--preset", "micro", "--rewrites", 1, "--drop-original")
    rows = corpus(open_artifact("rephrase:latest"))
    assert rows and all(r["style"] != "original" and r["rewrite"] == 1 for r in rows)


def test_tiny_recipe_gives_several_rewrites_per_biography(k2):
    k2("data", "synth", "--preset", "tiny")
    k2("rephrase", "synth:latest", "--preset", "tiny")
    art = open_artifact("rephrase:latest")
    per_bio = {}
    for row in corpus(art):
        if row["source"] == "bio" and row["style"] != "original":
            per_bio[row["source_doc_id"]] = per_bio.get(row["source_doc_id"], 0) + 1
    assert len(per_bio) == art.metrics["documents"] - 160 and min(per_bio.values()) >= 3
    assert {"rewrites_kept", "rewrites_rejected", "chunk_retries"} <= set(art.metrics)


# ----------------------------------------------------------------------------- the openai backend, over HTTP


@pytest.fixture
def docs_file(synth_art, tmp_path):
    """Four biographies and a math document as local JSON lines (no world: proper nouns are guessed)."""
    rows = corpus(synth_art)
    picked = [r for r in rows if r["source"] == "bio"][:4] + [r for r in rows if r["source"] == "math"][:1]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": r["text"], "doc_id": r["doc_id"], "source": r["source"]}) + "\n" for r in picked))
    return path


def openai_args(server_url, *extra):
    return ("--preset", "micro", "--backend", "openai", "--base-url", server_url, "--model", "fake-model",
            "--set", "backend.backoff_s=0.01", "--set", "backend.timeout_s=0.5", "--set", "backend.max_retries=3", *extra)


def test_openai_backend_over_loopback_http(k2, docs_file):
    with ChatServer(script=["429", "500", "sleep"]) as server:  # two error statuses and a timeout first
        k2("rephrase", docs_file, *openai_args(server.url))
        art = open_artifact("rephrase:latest")
        m = art.metrics
        assert m["rewrites_kept"] == m["rewrites_requested"] == 10 and m["backend"] == "openai"
        assert server.hits["chat"] == m["chunk_attempts"] + 3  # the three failures were retried
        rows = [r for r in corpus(art) if r["style"] != "original"]
        assert all(r["similarity"] is not None and 0 < r["similarity"] <= 1 for r in rows)
        assert server.hits["embeddings"] > 0 and m["similarity_mean"] is not None
        body = server.bodies[-1]
        assert body["model"] == "fake-model" and [x["role"] for x in body["messages"]] == ["system", "user"]
        # later chunks carry the endpoint's own rewrite of the earlier ones
        later = [b["messages"][-1]["content"] for b in server.bodies if NO_CONTEXT not in b["messages"][-1]["content"]]
        assert later and all(any(p in u.split(CHUNK_HEADER)[0] for p in PREFIXES) for u in later)

        hits = dict(server.hits)
        k2("rephrase", docs_file, *openai_args(server.url), "--restart")  # the request cache pays nothing twice
        assert server.hits == hits
        assert corpus(open_artifact("rephrase:latest")) == corpus(art)


def test_openai_backend_without_embeddings_and_unfaithful_rewrites(k2, docs_file):
    with ChatServer(embeddings=False, mode="corrupt") as server:
        k2("rephrase", docs_file, *openai_args(server.url))
        m = open_artifact("rephrase:latest").metrics
        assert m["rewrites_rejected"] == m["rewrites_requested"] == 10 and m["rewrites_kept"] == 0
        assert m["chunk_failed_missing_fact"] > 0 and m["similarity_mean"] is None
        assert m["rejected_missing_fact"] + m["rejected_unchanged"] == 10
        assert m["chunk_retries"] == 10 * 2  # every failing chunk was retried fidelity.retries times
        assert server.hits["embeddings"] == 1  # asked once, then not again
        assert m["corpus_documents"] == 5  # the originals only
        result = k2("rephrase", docs_file, *openai_args(server.url), "--drop-original", ok=False)
        assert_clean_error(result, "no rewrite", "passed fidelity verification")


def test_openai_backend_failures_are_clear_and_bounded(k2, docs_file):
    with ChatServer(script=["500"] * 1000) as server:
        result = k2("rephrase", docs_file, *openai_args(server.url, "--concurrency", 2), ok=False)
        assert_clean_error(result, "failed after 4 attempts", "HTTP 500")
        assert 4 <= server.hits["chat"] <= 2 * 4
    with ChatServer(script=["401"]) as server:
        result = k2("rephrase", docs_file, *openai_args(server.url, "--concurrency", 1), ok=False)
        assert_clean_error(result, "HTTP 401", "OPENAI_API_KEY")
        assert server.hits["chat"] == 1  # not retried
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = k2("rephrase", docs_file, *openai_args(f"http://127.0.0.1:{port}/v1", "--set", "backend.max_retries=1"), ok=False)
    assert_clean_error(result, "failed after 2 attempts", "server is up")


# ----------------------------------------------------------------------------- the k2 backend


def model_artifact(texts, stage="pretrain", with_tokenizer=True):
    from k2cli.data.tokenizer import train_tokenizer
    from k2cli.model.config import ModelConfig
    from k2cli.model.io import save_model_files
    from k2cli.model.transformer import build_model

    tok = train_tokenizer(texts, vocab_size=400)
    cfg = ModelConfig(name="micro", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, q_lora_rank=16,
                      kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, intermediate_size=64,
                      moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
                      vocab_size=tok.vocab_size, eos_token_id=tok.eot_id)
    with ArtifactWriter(stage=stage, kind="model") as w:
        save_model_files(build_model(cfg, seed=0), w.dir)
        if with_tokenizer:
            tok.save(w.dir)
        return w.commit()


def test_k2_backend_generates_in_process_and_is_verified(k2, synth_art, docs_file):
    model = model_artifact([d["text"] for d in corpus(synth_art)])
    args = ("--preset", "micro", "--backend", f"k2:{model.path}", "--rewrites", 1, "--set", "backend.max_new_tokens=12",
            "--set", "fidelity.retries=0", "--set", "backend.temperature=0")
    k2("rephrase", docs_file, *args)
    art = open_artifact("rephrase:latest")
    m = art.metrics
    # an untrained model cannot keep every fact: it writes, and verification rejects, every rewrite
    assert m["rewrites_requested"] == 5 == m["rewrites_rejected"] and m["chunk_attempts"] == 5
    assert model.id in [i["id"] for i in art.manifest["inputs"]]  # the writer is part of the lineage
    assert_clean_error(k2("rephrase", docs_file, *args, "--drop-original", ok=False), "no rewrite")


def test_k2_backend_needs_a_model_with_a_tokenizer(k2, synth_art, docs_file):
    model_artifact(["a b c"] * 20, stage="bare", with_tokenizer=False)
    assert_clean_error(k2("rephrase", docs_file, "--backend", "k2:bare:latest", ok=False), "no tokenizer.json")
    assert_clean_error(k2("rephrase", docs_file, "--backend", "k2:synth:latest", ok=False), "dataset artifact, expected model")
    assert_clean_error(k2("rephrase", docs_file, "--backend", "k2:nothing:v3", ok=False), "not found")


# ----------------------------------------------------------------------------- inputs


def test_local_files_become_an_artifact_with_just_a_corpus(k2, synth_art, tmp_path):
    bio = next(d["text"] for d in corpus(synth_art) if d["source"] == "bio")
    (tmp_path / "bio.txt").write_text(bio + "\n")
    k2("rephrase", tmp_path / "bio.txt", "--preset", "micro", "--rewrites", 3)
    art = open_artifact("rephrase:latest")
    assert sorted(p.name for p in art.path.iterdir()) == ["corpus", "manifest.json", "summary.md"]
    rows = corpus(art)
    assert len(rows) == 4 and {r["source"] for r in rows} == {"file"} and art.manifest["inputs"] == []
    assert len({r["style"] for r in rows}) == 4  # the original and three different styles


def test_bad_input(k2, synth_art, tmp_path):
    def bad(*args, words):
        assert_clean_error(k2("rephrase", *args, ok=False), *words)

    bad(tmp_path / "missing.jsonl", words=["not found"])
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": "  "}) + "\n")
    bad(tmp_path / "empty.jsonl", words=["empty"])
    (tmp_path / "latin1.txt").write_bytes("Ana Belén nació en Córdoba.".encode("latin-1"))
    bad(tmp_path / "latin1.txt", words=["not UTF-8"])
    (tmp_path / "notext.jsonl").write_text(json.dumps({"body": "Anna was born in Oslo."}) + "\n")
    bad(tmp_path / "notext.jsonl", words=["no string 'text' field"])
    (tmp_path / "dupes.jsonl").write_text((json.dumps({"text": "Anna Avery Berg was born in Oslo.", "doc_id": "x"}) + "\n") * 2)
    bad(tmp_path / "dupes.jsonl", words=["doc_id 'x'"])
    (tmp_path / "prose.txt").write_text("The weather in Oslo was mild all week.")
    bad(tmp_path / "prose.txt", words=["cannot rewrite", "--backend k2:"])
    for n in (0, -2):
        bad("synth:latest", "--rewrites", n, words=["at least one rewrite"])
    bad("synth:latest", "--set", 'rewrite.styles=["poem"]', words=["unknown rephrasing style"])
    bad("synth:latest", "--set", 'rewrite.styles=["tutor"]', words=["is a math style"])
    bad("synth:latest", "--backend", "gpt", words=["unknown rephrasing backend"])
    bad("synth:latest", "--backend", "openai", words=["needs a model name", "--model"])
    bad("rephrase:latest", words=["no versions"])
    bad(synth_art.path / "qa_train", words=["no 'text' column"])
