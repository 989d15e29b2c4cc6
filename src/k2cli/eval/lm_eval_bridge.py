"""EleutherAI's lm-evaluation-harness on a k2 model, in-process: `k2 eval MODEL --suite lm-eval:TASK[,TASK]`.

The harness asks a model three things (lm_eval.api.model.LM); `K2LM` answers them with the k2 model
and the model's own tokenizer:

    loglikelihood       (context, continuation) -> (log P(continuation | context), greedy?)
                        multiple choice: hellaswag, arc_easy, mmlu, ...
    loglikelihood_rolling   text -> log P(text), in windows of the model's context (perplexity tasks)
    generate_until      (context, {until, max_gen_toks, do_sample, ...}) -> text, cut before the first
                        `until` string; a stop id of the tokenizer (end of turn, end of text) ends it too
                        (gsm8k, ...)

An input longer than the model's context keeps its last tokens (left truncation: the continuation, and
the context nearest to it). Requests run in batches of `eval.batch_size`, longest first.

The harness is an optional extra (`pip install 'k2cli[lmeval]'`, about 350 MB with scipy and
scikit-learn); without it the suite family is still listed, and using it says how to install it.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from functools import lru_cache
from pathlib import Path

import torch

from k2cli.errors import K2Error, closest
from k2cli.eval.suite import SuiteResult, register_family
from k2cli.model.generate import generate
from k2cli.model.precision import compute_dtype, inference_dtype

try:
    from lm_eval.api.model import TemplateLM  # LM plus the harness's (context, continuation) tokenisation
except ImportError:  # the extra is missing: LMEval.__init__ says how to install it before K2LM is built
    TemplateLM = object

INSTALL = "pip install 'k2cli[lmeval]' (or pip install 'lm-eval>=0.4'); make test-lmeval installs it"


@torch.inference_mode()
def score(model, pairs: list[tuple[list[int], list[int]]], max_len: int, batch_size: int, pad_id: int) -> list[tuple[float, bool]]:
    """(context ids, continuation ids) -> (sum of log P(continuation token | everything before it),
    whether greedy decoding would produce the continuation), per pair.

    Each row is the last max_len + 1 tokens of context + continuation, fed without its last token, so
    logits[t] predicts token t + 1. Rows of a batch are right-padded: attention is causal, so padding
    after a row's last token changes nothing before it (and the MoE routes each token on its own, with
    no capacity limit that padding could use up).
    """
    device = next(model.parameters()).device
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))  # longest first
    out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)  # an empty continuation: log 1, greedy
    with compute_dtype(model, inference_dtype(model, device, "auto")):
        for start in range(0, len(order), batch_size):
            idx = [i for i in order[start : start + batch_size] if pairs[i][1]]
            if not idx:
                continue
            rows = [(pairs[i][0] + pairs[i][1])[-(max_len + 1) :] for i in idx]
            ids = torch.full((len(rows), max(len(r) for r in rows) - 1), pad_id, dtype=torch.long)
            for b, r in enumerate(rows):
                ids[b, : len(r) - 1] = torch.tensor(r[:-1])
            logits = model(ids.to(device))  # [B, T, V]
            for b, (i, r) in enumerate(zip(idx, rows)):
                n, T = min(len(pairs[i][1]), len(r) - 1), len(r) - 1
                target = torch.tensor(r[-n:], device=device)  # [n]
                logp = torch.log_softmax(logits[b, T - n : T].float(), dim=-1)  # [n, V]: the positions predicting it
                out[i] = (float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all()))
    return out


def cut_at(text: str, until: list[str]) -> str:
    """`text` up to the earliest occurrence of any stop string."""
    return text[: min([text.find(u) for u in until if u and u in text] or [len(text)])]


class K2LM(TemplateLM):
    """A k2 model + tokenizer as an lm-evaluation-harness model (one process, the model's device)."""

    def __init__(self, model, tokenizer, batch_size: int = 16, max_gen_toks: int = 256, seed: int = 0):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_gen_toks, self.seed = batch_size, max_gen_toks, seed
        self._device = next(model.parameters()).device

    @property
    def max_length(self) -> int:
        return self.model.config.max_position_embeddings

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eot_id  # also the prefix an empty context is scored after (TemplateLM)

    @property
    def tokenizer_name(self) -> str:
        return f"k2-{self.tokenizer.kind}-{self.tokenizer.fingerprint()}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def _score(self, pairs):
        return score(self.model, pairs, self.max_length, self.batch_size, self.eot_token_id)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context ids, continuation ids), as TemplateLM.loglikelihood makes them."""
        results = self._score([(ctx, cont) for _, ctx, cont in requests])
        for (strings, _, _), r in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", strings, r)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log P(text): the text's tokens in disjoint windows of the model's context, the first one after the
        end-of-text token (the harness's own windowing, as its HF model does)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for i, req in enumerate(requests):
            for w in get_rolling_token_windows(self.tok_encode(req.args[0]), self.eot_token_id, self.max_length, context_len=1):
                windows.append(make_disjoint_window(w))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, self._score(windows)):
            totals[i] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests sharing generation settings run together in batches, longest prompt first."""
        groups = defaultdict(list)
        for i, req in enumerate(requests):
            groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
        out: list[str] = [""] * len(requests)
        for idx in groups.values():
            kw = dict(requests[idx[0]].args[1])
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = max(1, min(int(kw.get("max_gen_toks", self.max_gen_toks)), self.max_length - 1))
            sample = bool(kw.get("do_sample", False))  # greedy unless asked, whatever the temperature (as HF)
            temperature = float(kw.get("temperature", 1.0)) if sample else 0.0
            # the prompt keeps its last tokens so that prompt + answer fit the context (an empty one: end of text)
            prompts = {i: (self.tok_encode(requests[i].args[0]) or [self.eot_token_id])[-(self.max_length - max_new) :]
                       for i in idx}
            order = sorted(idx, key=lambda i: -len(prompts[i]))
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                gens = generate(self.model, [prompts[i] for i in batch], max_new_tokens=max_new, temperature=temperature,
                                top_p=float(kw.get("top_p", 1.0)), stop_ids=self.tokenizer.stop_ids, seed=self.seed + start)
                for i, g in zip(batch, gens):
                    if g and g[-1] in self.tokenizer.stop_ids:
                        g = g[:-1]  # the stop token ends the answer and is not part of it
                    out[i] = cut_at(self.tokenizer.decode(g), until)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out


@lru_cache(maxsize=4)
def task_manager(include: str = ""):
    """The harness's task index (its own ~15k tasks, plus the YAMLs under `include`): built once (seconds)."""
    from lm_eval.tasks import TaskManager

    if include and not Path(include).is_dir():
        raise K2Error(f"eval.lm_eval_include {include!r} is not a folder", "point it at a folder of lm-eval task YAMLs")
    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its INFO lines would drown k2's progress
    return TaskManager(include_path=include or None)


@register_family
class LMEval:
    family = "lm-eval"
    param = "TASK[,TASK]"
    description = ("EleutherAI lm-evaluation-harness tasks (hellaswag, arc_easy, gsm8k, ... or your own YAMLs with "
                   "eval.lm_eval_include), in-process with the model's tokenizer; needs the lmeval extra")

    def __init__(self, arg: str, cfg):
        self.tasks = [t.strip() for t in arg.split(",") if t.strip()]
        self.name = f"{self.family}:{','.join(self.tasks)}"
        if not self.tasks:
            raise K2Error("--suite lm-eval: names no task", "name harness tasks, e.g. --suite lm-eval:hellaswag,arc_easy")
        if TemplateLM is object:
            raise K2Error("--suite lm-eval needs EleutherAI's lm-evaluation-harness, which is not installed", INSTALL)
        self.include = cfg.lm_eval_include
        known = set(task_manager(self.include).all_tasks)  # tasks, groups and tags
        for t in self.tasks:
            if t not in known:
                near = closest(t, known)
                raise K2Error(f"unknown lm-eval task '{t}'", (f"did you mean '{near}'? " if near else "")
                              + "list them with `lm-eval ls tasks`; your own YAMLs: --set eval.lm_eval_include=DIR")

    def applies(self, ctx):
        return None

    def _load(self, name: str) -> list:
        """The harness's Task (or Group) objects for one name; loading one reads its dataset."""
        try:
            loaded = task_manager(self.include).load(name)
        except Exception as e:  # datasets / the Hub raise many kinds (offline, not found, gated, ...)
            raise K2Error(f"lm-eval task '{name}' could not load its data: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
                          "run where the Hugging Face Hub is reachable, or offline with HF_DATASETS_OFFLINE=1 once the "
                          "dataset is cached, or write a task YAML over local files (docs/eval.md)")
        top = loaded["groups"].get(name) or loaded["tasks"].get(name)
        return [top] if top is not None else list(loaded["tasks"].values())  # a tag: its tasks

    def run(self, ctx) -> SuiteResult:
        from lm_eval import simple_evaluate

        tasks = [obj for name in self.tasks for obj in self._load(name)]
        lm = K2LM(ctx.model, ctx.tokenizer, batch_size=ctx.cfg.batch_size, seed=ctx.cfg.seed)
        res = simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager(self.include),
                              limit=ctx.cfg.max_examples or None, bootstrap_iters=1000, log_samples=True,
                              random_seed=ctx.cfg.seed, numpy_random_seed=ctx.cfg.seed, torch_random_seed=ctx.cfg.seed,
                              fewshot_random_seed=ctx.cfg.seed)
        return SuiteResult(metrics=flat_metrics(res["results"]), rows=sample_rows(res.get("samples", {})),
                           notes=[f"{t}: {n['effective']} of {n['original']} examples, {res.get('n-shot', {}).get(t, 0)}-shot "
                                  f"(lm-evaluation-harness)" for t, n in res.get("n-samples", {}).items()])


def flat_metrics(results: dict) -> dict:
    """{"hellaswag": {"acc,none": 0.26, "acc_stderr,none": 0.04, "alias": ...}} ->
    {"hellaswag/acc": 0.26, "hellaswag/acc_stderr": 0.04}; a filter other than "none" is kept:
    "gsm8k/exact_match/strict-match"."""
    flat = {}
    for task, values in results.items():
        for key, v in values.items():
            metric, _, filt = key.partition(",")
            if isinstance(v, (int, float)) and not isinstance(v, bool) and metric != "sample_len":
                flat[f"{task}/{metric}" + ("" if filt in ("", "none") else f"/{filt}")] = float(v)
    return flat


def sample_rows(samples: dict, per_task: int = 10) -> list[dict]:
    """The first examples of each task: target, the model's (filtered) answer and its per-example metrics."""
    rows = []
    for task, items in samples.items():
        for s in items[:per_task]:
            rows.append({"task": task, "doc_id": s.get("doc_id"), "target": str(s.get("target"))[:200],
                         "response": str(s.get("filtered_resps"))[:200],
                         **{k: v for k, v in s.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "doc_id"}})
    return rows
