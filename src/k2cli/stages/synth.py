"""`k2 data synth`: a seeded synthetic world and the documents, QA pairs and math problems about it.

    world (people, organisations, cities)  ->  world.json
      -> biographies of ALL people + math documents      ->  corpus/   (text, doc_id, source, person_id)
      -> QA pairs, split by person                        ->  qa_train/ qa_test/
      -> word problems with structured solutions          ->  math/
      -> summary.md, metrics (counts, token estimate)

Protocol of Physics of Language Models 3.1: pre-train on every biography, fine-tune QA on the
QA-train people, test on the QA-test people, whose facts the model has only seen in biographies.
Math problems marked `split = "test"` are kept out of the corpus, so they stay unseen too.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import rich_click as click

from k2cli.commands.common import recipe_options, run_options
from k2cli.console import info
from k2cli.data.synth import (
    biographies,
    estimate_tokens,
    math_document,
    math_problems,
    qa_pairs,
    qa_split,
    save_dataset,
)
from k2cli.data.world import WORLD_FILE, build_world, save_world
from k2cli.errors import K2Error
from k2cli.stages.runner import RunOptions, Stage


@dataclass
class WorldConfig:
    size: int = 400  # people


@dataclass
class BioConfig:
    per_person: int = 1  # PLM "multiM": biographies per person, templates drawn independently
    permute: bool = True  # PLM "permute": shuffle the sentence order of each biography
    fullname: bool = False  # PLM "fullname": the full name in every sentence instead of pronouns


@dataclass
class QAConfig:
    test_fraction: float = 0.5  # people whose QA pairs are held out


@dataclass
class MathConfig:
    count: int = 200  # word problems
    test_fraction: float = 0.2  # problems kept out of the corpus (math/ marks them split="test")


@dataclass
class SynthRecipe:
    seed: int = 0
    world: WorldConfig = field(default_factory=WorldConfig)
    bios: BioConfig = field(default_factory=BioConfig)
    qa: QAConfig = field(default_factory=QAConfig)
    math: MathConfig = field(default_factory=MathConfig)

    def validate(self) -> "SynthRecipe":
        if self.bios.per_person < 1:
            raise K2Error(f"bios.per_person={self.bios.per_person} must be at least 1", "write one or more biographies per person")
        if not 0 < self.qa.test_fraction < 1:
            raise K2Error(f"qa.test_fraction={self.qa.test_fraction} must be between 0 and 1", "e.g. 0.5 (PLM 3.1 holds out half)")
        if self.math.count < 0 or not 0 <= self.math.test_fraction < 1:
            raise K2Error("math.count must be >= 0 and math.test_fraction in [0, 1)", "e.g. math.count=200, math.test_fraction=0.2")
        return self


def _summary(recipe: SynthRecipe, m: dict) -> str:
    return "\n".join([
        "# synthetic world",
        "",
        f"- seed {recipe.seed}: {m['people']} people, {m['organisations']} organisations, {m['cities']} cities (world.json)",
        f"- corpus: {m['corpus_documents']} documents ({m['biographies']} biographies of all people, "
        f"{m['math_documents']} math documents), about {m['tokens_estimate']:,} tokens",
        f"- biographies: {recipe.bios.per_person} per person, permute={recipe.bios.permute}, fullname={recipe.bios.fullname}",
        f"- QA: {m['qa_train']} pairs about {m['qa_train_people']} QA-train people, "
        f"{m['qa_test']} pairs about {m['qa_test_people']} held-out QA-test people",
        f"- math: {m['math_problems']} word problems ({m['math_test']} held out of the corpus)",
        "",
    ])


def run(recipe: SynthRecipe, opts: RunOptions = RunOptions()):
    """Build the world and its datasets; returns the dataset Artifact."""
    with Stage("synth", "dataset", recipe, opts) as st:
        if done := st.up_to_date([]):
            return done
        t0 = time.time()
        world = build_world(recipe.world.size, recipe.seed)
        bios = biographies(world, recipe.bios.per_person, recipe.bios.permute, recipe.bios.fullname, recipe.seed)
        train_ids, test_ids = qa_split(world, recipe.qa.test_fraction, recipe.seed)
        problems = math_problems(world, recipe.math.count, recipe.seed, recipe.math.test_fraction)
        math_docs = [{"text": math_document(r), "doc_id": r["math_id"], "source": "math", "person_id": ""}
                     for r in problems if r["split"] == "train"]
        corpus = bios + math_docs
        qa_train, qa_test = qa_pairs(world, train_ids), qa_pairs(world, test_ids)
        with st.writer() as w:
            save_world(world, w.dir / WORLD_FILE)
            save_dataset(corpus, w.dir / "corpus")
            save_dataset(qa_train, w.dir / "qa_train")
            save_dataset(qa_test, w.dir / "qa_test")
            if problems:
                save_dataset(problems, w.dir / "math")
            w.metrics = {
                "people": len(world.people),
                "organisations": len(world.organisations),
                "cities": len(world.cities),
                "biographies": len(bios),
                "math_documents": len(math_docs),
                "corpus_documents": len(corpus),
                "tokens_estimate": estimate_tokens(d["text"] for d in corpus),
                "qa_train": len(qa_train),
                "qa_test": len(qa_test),
                "qa_train_people": len(train_ids),
                "qa_test_people": len(test_ids),
                "math_problems": len(problems),
                "math_test": sum(r["split"] == "test" for r in problems),
            }
            (w.dir / "summary.md").write_text(_summary(recipe, w.metrics))
            m = w.metrics
            art = w.commit(summary=f"{m['people']} people, {m['corpus_documents']} documents, ~{m['tokens_estimate']:,} tokens")
        info(f"[green]wrote[/] {art.path} ({art.id}): {m['people']} people, {m['corpus_documents']} documents "
             f"(~{m['tokens_estimate']:,} tokens), {m['qa_train']}/{m['qa_test']} QA train/test, "
             f"{m['math_problems']} math problems, {time.time() - t0:.1f} s")
        return art


@click.group("data", cls=click.RichGroup)
def data_group():
    """Make pre-training data."""


@data_group.command("synth")
@recipe_options("synth", SynthRecipe)
@click.option("--size", type=int, default=None, help="People in the world (overrides world.size).")
@click.option("--seed", type=int, default=None, help="Seed of everything drawn (overrides seed).")
@run_options()
def synth_cmd(recipe, recipe_source, size, seed, opts):
    """Generate a synthetic world and its corpus: biographies (PLM 3.1 bioS), QA pairs split by
    person, and math word problems, as one dataset artifact.

    The same seed gives the same files, byte for byte.
    """
    if size is not None:
        recipe = dataclasses.replace(recipe, world=dataclasses.replace(recipe.world, size=size))
    if seed is not None:
        recipe = dataclasses.replace(recipe, seed=seed)
    run(recipe, opts)


COMMANDS = [data_group]
