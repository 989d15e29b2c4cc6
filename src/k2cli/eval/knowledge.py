"""Suites that ask the model questions with exact answers: held-out knowledge QA and math.

Chat models (SFT, RL) get the question as a user turn and answer in the chat format; base
models (pretrain, extend-context) get a cloze prompt in the style of the corpus ("X was born
in") or the problem followed by "Solution:", and their continuation is checked. Either way
the answer is compared exactly (after trimming), so the numbers mean what they say.
"""

from __future__ import annotations

import numpy as np
import torch

from k2cli.data.chat import parse_assistant, render
from k2cli.data.synth import extract_answer
from k2cli.eval.suite import SuiteResult, register
from k2cli.model.generate import generate


def load_split(ctx, name: str):
    from k2cli.data.loading import load_part

    return None if ctx.data_art is None else load_part(ctx.data_art, name)  # verified against the manifest first


def sample_rows(ds, n: int, seed: int) -> list[dict]:
    idx = np.sort(np.random.default_rng(seed).permutation(len(ds))[:n])
    return [ds[int(i)] for i in idx]


def chat_prompt(ctx, question: str) -> list[int]:
    return render(ctx.tokenizer, [{"role": "user", "content": question}], add_generation_prompt=True).ids


@torch.no_grad()
def complete(ctx, prompts: list[list[int]], max_new_tokens: int, samples: int = 1) -> list[list[str]]:
    """Texts generated for each prompt (`samples` of them: greedy when 1, sampled otherwise)."""
    stop = ctx.tokenizer.stop_ids  # the template's end-of-turn token(s), then end-of-sequence
    out: list[list[str]] = [[] for _ in prompts]
    for k in range(samples):
        temperature = 0.0 if samples == 1 else ctx.cfg.temperature
        for start in range(0, len(prompts), ctx.cfg.batch_size):
            batch = prompts[start : start + ctx.cfg.batch_size]
            gens = generate(ctx.model, batch, max_new_tokens=max_new_tokens, temperature=temperature,
                            stop_ids=stop, seed=ctx.cfg.seed + 1000 * k + start)
            for i, g in enumerate(gens):
                out[start + i].append(ctx.tokenizer.decode(g))
    return out


def _clean(text: str) -> str:
    text = text.split("<|im_end|>")[0].split("<|endoftext|>")[0]
    return text.strip().rstrip(".").strip()


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Codex paper)."""
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


@register
class Knowledge:
    name = "knowledge"
    description = "QA on held-out individuals (PLM 3.1 protocol): exact attribute match; QA-train people for reference"

    def applies(self, ctx):
        return None if load_split(ctx, "qa_test") is not None else "no qa_test/ in the dataset (use a 'k2 data synth' lineage or --data)"

    def _accuracy(self, ctx, rows):
        if ctx.is_chat_model:
            prompts = [chat_prompt(ctx, r["question"]) for r in rows]
        else:
            prompts = [ctx.tokenizer.encode(r["cloze"]) for r in rows]
        answers = complete(ctx, prompts, max_new_tokens=ctx.cfg.max_new_tokens)
        correct = []
        for r, (a,) in zip(rows, answers):
            got = _clean(parse_assistant(a).content if ctx.is_chat_model else a)
            # a base model continues the sentence: the answer must be what comes next
            ok = got == r["answer"] if ctx.is_chat_model else got.startswith(r["answer"])
            correct.append(ok)
        return correct, answers

    def run(self, ctx) -> SuiteResult:
        test = sample_rows(load_split(ctx, "qa_test"), ctx.cfg.max_examples, ctx.cfg.seed)
        ok, answers = self._accuracy(ctx, test)
        metrics = {"accuracy": float(np.mean(ok))}
        by_attr: dict[str, list[bool]] = {}
        for r, c in zip(test, ok):
            by_attr.setdefault(r["attribute"], []).append(c)
        metrics.update({f"accuracy_{a}": float(np.mean(v)) for a, v in sorted(by_attr.items())})
        train = load_split(ctx, "qa_train")
        if train is not None:
            ok_train, _ = self._accuracy(ctx, sample_rows(train, ctx.cfg.max_examples, ctx.cfg.seed))
            metrics["accuracy_qa_train_people"] = float(np.mean(ok_train))
        rows = [{"question": r["question"], "answer": r["answer"], "model": a[0][:80], "correct": c}
                for r, a, c in zip(test[:20], answers[:20], ok[:20])]
        mode = "chat" if ctx.is_chat_model else "cloze"
        return SuiteResult(metrics=metrics, rows=rows,
                           notes=[f"{len(test)} held-out questions ({mode} prompts, greedy); exact match"])


@register
class Math:
    name = "math"
    description = "held-out math word problems: exact integer answer (pass@k when eval.samples > 1)"

    def applies(self, ctx):
        ds = load_split(ctx, "math")
        if ds is None:
            return "no math/ in the dataset"
        if "split" in ds.column_names and "test" not in set(ds["split"]):
            return "the math/ split has no held-out (split == 'test') problems"
        return None

    def run(self, ctx) -> SuiteResult:
        ds = load_split(ctx, "math")
        if "split" in ds.column_names:
            ds = ds.filter(lambda r: r["split"] == "test")
        rows = sample_rows(ds, ctx.cfg.max_examples, ctx.cfg.seed)
        if ctx.is_chat_model:
            prompts = [chat_prompt(ctx, r["problem"]) for r in rows]
        else:
            prompts = [ctx.tokenizer.encode(r["problem"] + "\nSolution:") for r in rows]
        n = max(1, ctx.cfg.samples)
        outs = complete(ctx, prompts, max_new_tokens=max(ctx.cfg.max_new_tokens, 96), samples=n)
        correct = [[extract_answer(_clean(o)) == str(r["answer"]) for o in samples] for r, samples in zip(rows, outs)]
        metrics = {"accuracy": float(np.mean([c[0] for c in correct]))}
        if n > 1:
            for k in sorted({1, n}):
                metrics[f"pass@{k}"] = float(np.mean([pass_at_k(n, sum(c), k) for c in correct]))
        detail = [{"problem": r["problem"][:80], "answer": r["answer"], "model": o[0][-60:], "correct": c[0]}
                  for r, o, c in zip(rows[:20], outs[:20], correct[:20])]
        return SuiteResult(metrics=metrics, rows=detail,
                           notes=[f"{len(rows)} held-out problems, {n} sample(s) each; answer = 'The answer is N' or the last integer"])
