"""k2 data synth: a seeded world, biographies, QA split by person, exact math problems."""

import dataclasses
import json
import re
from pathlib import Path

import datasets
import pytest

from conftest import assert_clean_error
from k2cli.data.synth import (
    BIO_TEMPLATES,
    OPS,
    Subject,
    biographies,
    fill,
    math_problems,
    template_regex,
    template_slots,
)
from k2cli.data.world import ATTRIBUTES, build_world, load_world
from k2cli.recipes import resolve_recipe
from k2cli.stages import synth
from k2cli.stages.runner import RunOptions


def micro(seed=None, **sections):
    """The micro recipe, with e.g. bios={"per_person": 2} changed."""
    recipe, _ = resolve_recipe(synth.SynthRecipe, "synth", "micro")
    for name, values in sections.items():
        recipe = dataclasses.replace(recipe, **{name: dataclasses.replace(getattr(recipe, name), **values)})
    return recipe if seed is None else dataclasses.replace(recipe, seed=seed)


def load(art, part):
    return datasets.load_from_disk(str(art.path / part))


def test_same_seed_same_bytes(tmp_path):
    a = synth.run(micro(), RunOptions(out=str(tmp_path / "a")))
    b = synth.run(micro(), RunOptions(out=str(tmp_path / "b")))
    files = sorted(p.relative_to(a.path) for p in a.path.rglob("*") if p.is_file())
    assert Path("corpus/state.json") in files and Path("world.json") in files
    for rel in files:
        if rel.name != "manifest.json":
            assert (a.path / rel).read_bytes() == (b.path / rel).read_bytes(), rel
    ma, mb = (json.loads((x.path / "manifest.json").read_text()) for x in (a, b))
    for key in ("created", "uid", "id", "self_sha256"):  # a path output's id carries the uid (and the self-hash covers them)
        ma.pop(key), mb.pop(key)
    assert ma == mb
    other = synth.run(micro(seed=1), RunOptions(out=str(tmp_path / "c")))
    assert (other.path / "world.json").read_bytes() != (a.path / "world.json").read_bytes()


def test_qa_answers_come_from_the_biographies_and_test_people_are_held_out():
    art = synth.run(micro(bios={"per_person": 2}))
    world = load_world(art.path)
    bios: dict[str, list[str]] = {}
    for row in load(art, "corpus"):
        if row["source"] == "bio":
            bios.setdefault(row["person_id"], []).append(row["text"])
    assert set(bios) == {p.id for p in world.people}  # the corpus has every person's biographies
    assert all(len(v) == 2 for v in bios.values())
    train, test = load(art, "qa_train"), load(art, "qa_test")
    for row in list(train) + list(test):
        for text in bios[row["person_id"]]:
            assert row["answer"] in text, (row, text)
        assert world.person(row["person_id"]).name in row["question"]
        assert row["cloze"].startswith(world.person(row["person_id"]).name)
    train_people, test_people = set(train["person_id"]), set(test["person_id"])
    assert not train_people & test_people
    assert train_people | test_people == set(bios)
    assert abs(len(test_people) - len(bios) / 2) <= 1
    for people, qa in ((train_people, train), (test_people, test)):  # every attribute of every person
        assert len(qa) == len(people) * len(ATTRIBUTES)
        assert set(zip(qa["person_id"], qa["attribute"])) == {(p, a) for p in people for a in ATTRIBUTES}


def test_world_database_is_consistent_and_stable():
    world = build_world(60, seed=3)
    assert world.to_dict() == build_world(60, seed=3).to_dict()
    assert build_world(40, seed=3).to_dict()["people"] == world.to_dict()["people"][:40]  # ids and people are stable
    assert len({p.id for p in world.people}) == 60 and len({p.name for p in world.people}) == 60
    assert len({p.email for p in world.people}) == 60
    for p in world.people:
        employer, uni = world.org(p.employer_id), world.org(p.university_id)
        assert employer.kind == "company" and uni.kind == "university"
        assert p.employer_city_id in employer.office_city_ids
        assert p.email.endswith("@" + employer.domain)
        assert p.phone.startswith(world.city(p.employer_city_id).calling_code + " ")
        assert p.account_balance > 0 and p.monthly_salary > 0
        assert p.major in world.majors and world.city(p.birth_city_id)
    assert sum(o.headcount for o in world.companies) == 60 == sum(o.headcount for o in world.universities)
    for o in world.organisations:
        assert o.office_city_ids[0] == o.hq_city_id and o.industry and o.founded
    assert {"country", "population", "utc_offset"} <= set(world.to_dict()["cities"][0])
    assert world.people[0].name in world.lexicon() and "Computer Science" in world.lexicon()
    assert build_world(60, seed=4).to_dict() != world.to_dict()


def test_world_round_trips_through_the_artifact():
    art = synth.run(micro())
    world = load_world("synth:latest")
    assert world.to_dict() == build_world(micro().world.size, micro().seed).to_dict()
    assert load_world(art.path / "world.json").to_dict() == world.to_dict()


def test_math_problems_have_exact_checkable_solutions():
    world = build_world(30, seed=0)
    rows = math_problems(world, 70, seed=0, test_fraction=0.2)
    assert {r["kind"] for r in rows} == {"savings", "salary", "order", "headcount", "time_zones", "ages", "population"}
    assert sum(r["split"] == "test" for r in rows) == 14
    for r in rows:
        known = {int(x) for x in re.findall(r"\d+", r["problem"])}
        for step in r["steps"]:
            m = re.fullmatch(r"[^:]+: (\d+) ([-+*/]) (\d+) = (\d+)", step)
            assert m, step
            a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
            assert OPS[op](a, b) == c and a in known and b in known, (step, r["problem"])
            known.add(c)  # later steps may use this result
        assert r["answer_value"] == int(r["answer"]) == c
        assert r["solution"].endswith(f"The answer is {r['answer']}.")
        names = [world.person(e).name if e.startswith("P") else world.org(e).name if e.startswith("O") else world.city(e).name
                 for e in r["entity_ids"]]
        assert any(n in r["problem"] for n in names)  # grounded in the world


def test_corpus_holds_bios_and_training_math_only():
    art = synth.run(micro())
    corpus, math = load(art, "corpus"), load(art, "math")
    docs = {r["doc_id"]: r for r in corpus}
    for r in math:
        if r["split"] == "train":
            assert docs[r["math_id"]]["text"] == f"{r['problem']}\n{r['solution']}"
            assert docs[r["math_id"]]["source"] == "math"
        else:
            assert r["math_id"] not in docs
    assert art.metrics["corpus_documents"] == len(corpus) and art.metrics["tokens_estimate"] > 1000


def _attribute_of(sentence):
    hits = {a for a in ATTRIBUTES for t in BIO_TEMPLATES[a] if template_regex(t).match(sentence)}
    assert len(hits) == 1, (sentence, hits)
    return hits.pop()


def test_every_template_parses_back_to_its_own_attribute():
    world = build_world(4, seed=0)
    for p in world.people:
        values = world.attributes(p)
        for attr, templates in BIO_TEMPLATES.items():
            for t in templates:
                assert template_slots(t) == {attr}
                for use_name in (True, False):
                    sentence = fill(t, values, Subject(p.name, p.gender), use_name)
                    assert _attribute_of(sentence) == attr
                    assert template_regex(t).match(sentence).group(attr) == values[attr]


def test_plm_augmentations():
    world = build_world(12, seed=0)
    plain = biographies(world, per_person=1, permute=False, fullname=False)
    for doc in plain:  # bioS order; the name once, then pronouns
        sentences = re.split(r"(?<=\.) ", doc["text"])
        assert [_attribute_of(s) for s in sentences] == list(ATTRIBUTES)
        name = world.person(doc["person_id"]).name
        assert name in sentences[0] and not any(name in s for s in sentences[1:])
    full = biographies(world, per_person=3, permute=True, fullname=True)
    assert len(full) == 36 and len({d["doc_id"] for d in full}) == 36
    for doc in full:
        sentences = re.split(r"(?<=\.) ", doc["text"])
        assert all(world.person(doc["person_id"]).name in s for s in sentences)
    orders = {tuple(_attribute_of(s) for s in re.split(r"(?<=\.) ", d["text"])) for d in full}
    assert len(orders) > 5  # permuted
    per_person = {}
    for d in full:
        per_person.setdefault(d["person_id"], set()).add(d["text"])
    assert all(len(texts) == 3 for texts in per_person.values())  # multiM: different biographies


def test_synth_cli(k2, artifacts_root):
    k2("data", "synth", "--preset", "micro", "--size", 30, "--seed", 5)
    art = json.loads((artifacts_root / "synth" / "v1" / "manifest.json").read_text())
    assert art["metrics"]["people"] == 30 and art["recipe"]["seed"] == 5 and art["recipe"]["world"]["size"] == 30
    assert (artifacts_root / "synth" / "v1" / "summary.md").read_text().startswith("# synthetic world")
    assert "synth/v1" in k2("artifacts", "show", "synth:latest").output
    k2("artifacts", "verify", "synth:latest")


@pytest.mark.parametrize("args, words", [
    (["--size", 1], ["too small"]),
    (["--size", 10_000_000], ["distinct names"]),
    (["--set", "qa.test_fraction=1.5"], ["qa.test_fraction"]),
    (["--set", "bios.per_person=0"], ["per_person"]),
    (["--set", "world.sise=3"], ["unknown recipe key", "world.size"]),
    (["--preset", "huge"], ["unknown preset"]),
])
def test_synth_bad_input(k2, args, words):
    assert_clean_error(k2("data", "synth", *args, ok=False), *words)
