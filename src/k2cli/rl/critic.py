"""The self-critique rubric reward (K2 section 3.2.2): a critic compares two replies against rubrics.

The critic is a chat model, by default the policy itself. It reads

    system  You compare two replies against the rubrics. Answer A or B.
    user    Rubrics: Core: clear and relevant; fluent and engaging; objective and grounded.
            Prescriptive: no initial praise; no self-justification. Task: <the per-task rubric>
            Request: <the prompt>
            Reply A: <one reply>
            Reply B: <the other>
            Which reply is better?
    assistant  ->  the next token: "A" or "B"

and its verdict is read off the logits, no sampling: p(A) = softmax(logit_A, logit_B)[0]. Every
pair is judged in both orders and averaged, so a critic that always says "A" judges 0.5, not a
win: P(x beats y) = (p_A(x, y) + 1 - p_A(y, x)) / 2.

Reward of a reply on a prompt without a verifier = its win rate against the other K - 1 samples
(soft: the mean of P(x beats y) over its opponents). K2 leaves the pairwise -> scalar map open;
a win rate needs no extra model and is in [0, 1] like the verifiable rewards.

Closed loop: on prompts WITH a verifier, the K samples contain right and wrong replies; each
(correct, wrong) pair (for partial credit: clearly better, clearly worse) becomes a training
example for the critic ("A" when the better reply is A) in both orders. The first pairs come from
the starting model's samples of the prompt selection; every step adds the rollouts' new pairs and
replays `replay` earlier ones (a buffer of `replay_size`), so the few pairs a small policy yields
are learned more than once. The policy-critic learns them in the same optimizer step as its RL
loss (rows of kind CRITIC in the batch); a separate critic model takes its own Muon step.

Accuracy: the fraction of pairs where the critic prefers the better reply (a tie counts half;
chance is 0.5), on held-out pairs (the starting model's replies to held-out prompts, made once)
and, prequentially, on each step's new pairs before it learns from them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from k2cli.data.chat import render
from k2cli.errors import K2Error

CORE = "Core: clear and relevant; fluent and engaging; objective and grounded."
PRESCRIPTIVE = "Prescriptive: no initial praise; no self-justification."
SYSTEM = "You compare two replies against the rubrics. Answer A or B."


@dataclass
class CriticConfig:
    """Recipe section `critic`."""

    model: str = ""  # "" = the policy judges itself; else a model artifact (a chat model with its own tokenizer)
    weight: float = 0.5  # policy-critic: weight of its pairwise loss next to the RL loss
    lr: float = 1e-3  # separate critic: its learning rate (Muon)
    pairs_per_group: int = 1  # (correct, wrong) training pairs per verifiable prompt and step
    opponents: int = 0  # rubric reward: opponents per reply (0 = all K - 1)
    heldout_prompts: int = 24  # held-out prompts per verifiable environment sampled for the held-out pairs
    heldout_samples: int = 4  # samples per held-out prompt
    heldout_pairs: int = 64  # at most this many held-out pairs
    replay: int = 16  # earlier pairs the critic learns again each step, next to the step's new ones
    replay_size: int = 512  # pairs kept for replay (the oldest go first)
    max_reply_tokens: int = 64  # replies are cut to this many tokens inside the judge prompt

    def validate(self):
        if min(self.weight, self.pairs_per_group, self.opponents, self.replay, self.replay_size) < 0 or self.lr <= 0:
            raise K2Error("critic.weight, pairs_per_group, opponents, replay and replay_size must be >= 0 and critic.lr > 0",
                          "e.g. weight = 0.5, lr = 1e-3")
        if self.max_reply_tokens < 1:
            raise K2Error("critic.max_reply_tokens must be >= 1", "e.g. max_reply_tokens = 64")


@dataclass
class Pair:
    """Two replies to one request; `better` is 0 when `a` is the better one (training and held-out pairs)."""

    request: str
    rubric: str
    a: str
    b: str
    better: int = 0


def judge_messages(request: str, rubric: str, a: str, b: str) -> list[dict]:
    task = f" Task: {rubric}" if rubric else ""
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Rubrics: {CORE} {PRESCRIPTIVE}{task}\nRequest: {request}\nReply A: {a}\n"
                                        f"Reply B: {b}\nWhich reply is better?"}]


class Critic:
    def __init__(self, model, tokenizer, context: int, cfg: CriticConfig, separate: bool = False):
        self.model, self.tok, self.context, self.cfg = model, tokenizer, context, cfg
        self.separate = separate
        self.verdict_ids = [self._single_token(c) for c in "AB"]
        self.optimizer = None
        if separate:
            from k2cli.optim.muon import OptimConfig, build_optimizer

            self.optimizer = build_optimizer(model, OptimConfig(name="muon", lr=cfg.lr))

    def _single_token(self, text: str) -> int:
        ids = self.tok.encode(text)
        if len(ids) != 1:
            raise K2Error(f"the critic's tokenizer splits {text!r} into {len(ids)} tokens", "use a k2 tokenizer (byte-level BPE)")
        return ids[0]

    def _cut(self, text: str) -> str:
        ids = self.tok.encode(text)
        return text if len(ids) <= self.cfg.max_reply_tokens else self.tok.decode(ids[: self.cfg.max_reply_tokens])

    def prompt_ids(self, pair: Pair) -> list[int]:
        ids = render(self.tok, judge_messages(pair.request, pair.rubric, self._cut(pair.a), self._cut(pair.b)),
                     add_generation_prompt=True).ids
        return ids[-(self.context - 1):]  # the end (the replies and the question) matters most

    def rows(self, pairs: list[Pair]) -> list[tuple[list[int], list[bool]]]:
        """Training rows (ids, mask): each pair in both orders, the verdict token the only target."""
        out = []
        for p in pairs:
            for flip in (False, True):
                q = Pair(p.request, p.rubric, p.b, p.a, 1 - p.better) if flip else p
                ids = self.prompt_ids(q) + [self.verdict_ids[q.better]]
                out.append((ids, [False] * (len(ids) - 1) + [True]))
        return out

    @torch.no_grad()
    def p_first(self, prompts: list[list[int]], batch_size: int = 16) -> list[float]:
        """p(verdict = A) for each judge prompt: right-padded batches, logits at each prompt's last token."""
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        out: list[float] = []
        try:
            for s in range(0, len(prompts), batch_size):
                chunk = prompts[s: s + batch_size]
                width = max(len(p) for p in chunk)
                ids = torch.full((len(chunk), width), self.tok.eot_id, dtype=torch.long)
                for i, p in enumerate(chunk):
                    ids[i, : len(p)] = torch.tensor(p)
                logits = self.model(ids.to(device))  # [B, T, V]; causal: right padding never reaches a prompt's tokens
                last = torch.tensor([len(p) - 1 for p in chunk], device=device)
                two = logits[torch.arange(len(chunk), device=device), last][:, self.verdict_ids].float()  # [B, 2]
                out += torch.softmax(two, dim=-1)[:, 0].tolist()
        finally:
            self.model.train(was_training)
        return out

    def prefer(self, pairs: list[Pair]) -> list[float]:
        """P(a beats b) per pair, both orders averaged."""
        prompts = []
        for p in pairs:
            prompts += [self.prompt_ids(p), self.prompt_ids(Pair(p.request, p.rubric, p.b, p.a))]
        probs = self.p_first(prompts)
        return [(probs[2 * i] + 1 - probs[2 * i + 1]) / 2 for i in range(len(pairs))]

    def win_rates(self, groups: list[tuple[str, str, list[str]]]) -> list[list[float]]:
        """For each (request, rubric, replies): each reply's soft win rate against the others."""
        pairs, where = [], []
        for g, (request, rubric, replies) in enumerate(groups):
            n = len(replies)
            for i in range(n):
                opponents = [j for j in range(n) if j != i]
                if self.cfg.opponents:
                    opponents = [(i + d) % n for d in range(1, min(self.cfg.opponents, n - 1) + 1)]
                for j in opponents:
                    if self.cfg.opponents or i < j:  # all pairs: judge each unordered pair once
                        pairs.append(Pair(request, rubric, replies[i], replies[j]))
                        where.append((g, i, j))
        wins = [[[] for _ in replies] for _, _, replies in groups]
        for (g, i, j), p in zip(where, self.prefer(pairs) if pairs else []):
            wins[g][i].append(p)
            if not self.cfg.opponents:
                wins[g][j].append(1 - p)
        return [[sum(w) / len(w) if w else 0.5 for w in ws] for ws in wins]

    def accuracy(self, pairs: list[Pair]) -> float | None:
        """Fraction of pairs where the better reply is preferred (ties count half); None without pairs."""
        if not pairs:
            return None
        probs = self.prefer(pairs)
        score = 0.0
        for p, q in zip(pairs, probs):
            good = q if p.better == 0 else 1 - q
            score += 1.0 if good > 0.5 else 0.5 if good == 0.5 else 0.0
        return score / len(pairs)

    # ---- a separate critic trains itself; the policy-critic's rows go into the policy's batch instead
    def train_step(self, pairs: list[Pair]) -> float | None:
        if not self.separate or not pairs:
            return None
        from k2cli.rl.batch import rows_to_tensors
        from k2cli.rl.objective import sequence_logprobs

        device = next(self.model.parameters()).device
        t = rows_to_tensors(self.rows(pairs), self.tok.eot_id)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        logp, _ = sequence_logprobs(self.model(t["input_ids"].to(device)), t["targets"].to(device))
        loss = -logp.sum() / (t["targets"] != -100).sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.model.eval()
        return float(loss.detach())

    def state_dict(self) -> dict | None:
        if not self.separate:
            return None
        return {"model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
                "optimizer": self.optimizer.canonical_state_dict()}

    def load_state_dict(self, state: dict | None) -> None:
        if self.separate and state:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_canonical_state_dict(state["optimizer"])


def correct_wrong_pairs(groups, limit_per_group: int, rubric_of, margin: float = 0.5) -> list[Pair]:
    """(better, worse) pairs from groups of trajectories of verifiable prompts: a prompt's best-rewarded
    reply against its worst, second best against second worst, ... while their rewards differ by at
    least `margin` — for 0/1 rewards exactly (correct, wrong); for partial credit (instruct, code) the
    reply that meets clearly more of the checks. At most `limit_per_group` per group. Alternating which
    one is `a` keeps the labels balanced."""
    pairs = []
    for ts in groups:
        ranked = sorted(ts, key=lambda t: -t.reward)
        for i in range(min(limit_per_group, len(ranked) // 2)):
            good, bad = ranked[i], ranked[-1 - i]
            if good.reward - bad.reward < margin:
                break
            request, rubric = good.prompt, rubric_of(good)
            if len(pairs) % 2 == 0:
                pairs.append(Pair(request, rubric, good.response, bad.response, 0))
            else:
                pairs.append(Pair(request, rubric, bad.response, good.response, 1))
    return pairs
