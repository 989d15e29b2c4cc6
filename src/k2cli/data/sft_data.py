"""SFT data: conversations from several sources, rendered to ids + assistant masks, mixed, packed.

Sources (all optional, weighted by the recipe's mix):
  * agentic  — a dataset artifact with `chat/`: tool-use trajectories (`messages`, `tools` as
               JSON strings), made by `k2 agentic`;
  * qa       — `qa_train/` of a synthetic-world dataset: one question, one short answer
               (Physics of Language Models 3.1: QA fine-tuning on half the people);
  * math     — `math/`: word problems answered with step-by-step solutions;
  * chat     — your own chat data: OpenAI/TRL `messages` (+ `tools`) JSONL files or directories
               (data.chat; `k2cli.data.chat_jsonl`), already rendered with the model's own template;
               bad rows are skipped and reported (docs/sft.md);
  * corpus   — plain documents of the model's pre-training corpus (its training split, found in the
               lineage), loss on every token: replay, so that fine-tuning a small model on more
               tokens than it was pre-trained on does not erase its language model (the tiny demo's
               SFT, without it, takes held-out text loss from 0.87 to 5.8 nats, about the unigram
               entropy). Replayed documents never enter the validation split.

Every conversation is checked for role order, rendered with the model's chat template (loss on the
assistant's tokens only), and dropped or truncated when it does not fit the context — both
counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from k2cli.data.chat import render, validate_conversation
from k2cli.data.packing import PackedData, PackedStream, pack
from k2cli.data.token_cache import TokenFile
from k2cli.errors import K2Error

SOURCES = ("agentic", "qa", "math", "chat", "corpus")


@dataclass
class SFTDataConfig:
    agentic: str = "agentic:latest"  # dataset artifact with chat/ ("" to skip)
    knowledge: str = ""  # dataset artifact with qa_train/ and math/; "" = the nearest one in the model's lineage
    corpus: str = ""  # replayed documents (mix.corpus > 0); "" = the model's pre-training corpus, from its lineage
    chat: list[str] = field(default_factory=list)  # OpenAI/TRL chat JSONL files or directories (weight: mix.chat, default 1)
    max_bad_fraction: float = 0.05  # chat rows that cannot be rendered are skipped; more than this fraction fails
    mix: dict[str, float] = field(default_factory=lambda: {"agentic": 1.0, "qa": 1.0, "math": 1.0})
    max_per_source: int = 0  # cap per source before mixing; 0 = no cap
    val_fraction: float = 0.05
    overlong: str = "drop"  # drop | truncate: conversations longer than train.seq_len + 1 tokens

    def validate(self):
        if self.overlong not in ("drop", "truncate"):
            raise K2Error(f"unknown data.overlong '{self.overlong}'", "use drop or truncate")
        for k, v in self.mix.items():
            if k not in SOURCES:
                raise K2Error(f"unknown SFT source '{k}' in data.mix", f"valid: {', '.join(SOURCES)}")
            if v < 0:
                raise K2Error(f"data.mix.{k} must be >= 0", "use a non-negative weight")
        if not 0 <= self.max_bad_fraction <= 1:
            raise K2Error(f"data.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}", "e.g. 0.05")


def qa_conversation(row: dict) -> dict:
    return {"messages": [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]}


def math_conversation(row: dict) -> dict:
    solution = row.get("solution") or ""
    answer = f"{solution}\nFinal answer: {row['answer']}" if str(row["answer"]) not in solution[-40:] else solution
    return {"messages": [{"role": "user", "content": row["problem"]}, {"role": "assistant", "content": answer.strip()}]}


def _load_subset(art, name: str):
    from k2cli.data.loading import load_part

    return load_part(art, name)  # verified against the manifest first


def load_chat(cfg: SFTDataConfig, tokenizer):
    """The chat source: data.chat's JSONL rows, rendered with `tokenizer` -> (conversations, ChatReport).
    Conversations carry their ids + mask, so build_sft_data does not render them again."""
    from k2cli.data.chat_jsonl import read_chat_jsonl

    return read_chat_jsonl(cfg.chat, tokenizer, cfg.max_bad_fraction)


def load_conversations(source: str, art) -> list[dict]:
    """Conversations {messages, tools} of one source from a dataset artifact."""
    if source == "agentic":
        ds = _load_subset(art, "chat")
        if ds is None:
            raise K2Error(f"{art.id} has no chat/ subset", "pass an artifact made by 'k2 agentic' as data.agentic")
        out = []
        for i, row in enumerate(ds):
            try:
                out.append({"messages": json.loads(row["messages"]), "tools": json.loads(row["tools"]) if row.get("tools") else None})
            except (json.JSONDecodeError, TypeError, KeyError) as e:
                raise K2Error(f"{art.id} chat row {i} is malformed: {e}", "re-create the agentic dataset")
        return out
    if source == "qa":
        ds = _load_subset(art, "qa_train")
        return [qa_conversation(r) for r in ds] if ds is not None else []
    if source == "math":
        ds = _load_subset(art, "math")
        # held-out problems (split == "test") are for evaluation and RL, never for SFT
        return [math_conversation(r) for r in ds if r.get("split", "train") != "test"] if ds is not None else []
    raise K2Error(f"unknown SFT source '{source}'", f"valid: {', '.join(SOURCES)}")


@dataclass
class SFTData:
    train: PackedStream  # re-packed every epoch
    val: PackedData
    counts: dict  # per source: conversations, kept, dropped/truncated, tokens


def mix_sources(convs: dict[str, list[dict]], mix: dict[str, float], cap: int, seed: int) -> list[tuple[str, dict]]:
    """Weighted mixture: source s contributes round(weight_s * n_s) conversations (with repeats
    when the weight is above 1), sampled deterministically."""
    rng = np.random.default_rng(seed)
    out = []
    for name, items in convs.items():
        if cap:
            items = items[:cap]
        w = mix.get(name, 1.0 if name == "chat" else 0.0)  # given chat files train unless mix.chat says otherwise
        n = int(round(w * len(items)))
        if not items or n == 0:
            continue
        idx = np.concatenate([rng.permutation(len(items)) for _ in range(-(-n // len(items)))])[:n]
        out += [(name, items[i]) for i in idx]
    return out


def build_sft_data(tokenizer, convs: dict[str, list[dict]], cfg: SFTDataConfig, seq_len: int, seed: int) -> SFTData:
    if cfg.chat and "chat" not in convs and cfg.mix.get("chat", 1.0) > 0:  # never drop the user's data silently
        raise K2Error(f"data.chat names {', '.join(cfg.chat)} but the chat source was not loaded", "load it with sft_data.load_chat")
    counts = {name: {"conversations": len(items), "used": 0, "dropped_overlong": 0, "truncated": 0, "tokens": 0,
                     "trained_tokens": 0} for name, items in convs.items()}
    examples: list[tuple[list[int], list[bool]]] = []
    replay: list[tuple[list[int], list[bool]]] = []  # corpus documents: training only
    for name, conv in mix_sources(convs, cfg.mix, cfg.max_per_source, seed):
        if name == "corpus":  # a document: every token is a target; a long one is cut to the row
            ids = list(conv["ids"][:seq_len])
            counts[name]["truncated"] += len(conv["ids"]) > seq_len
            counts[name]["used"] += 1
            counts[name]["tokens"] += len(ids)
            counts[name]["trained_tokens"] += len(ids)
            replay.append((ids, [True] * len(ids)))
            continue
        if "ids" in conv:  # the chat source comes rendered (and checked) by chat_jsonl
            ids, mask = conv["ids"], conv["mask"]
        else:
            validate_conversation(conv["messages"])
            r = render(tokenizer, conv["messages"], conv.get("tools"))
            ids, mask = r.ids, r.mask
        if len(ids) + 1 > seq_len + 1:
            if cfg.overlong == "drop":
                counts[name]["dropped_overlong"] += 1
                continue
            ids, mask = ids[:seq_len], mask[:seq_len]
            counts[name]["truncated"] += 1
        counts[name]["used"] += 1
        counts[name]["tokens"] += len(ids)
        counts[name]["trained_tokens"] += sum(mask)
        examples.append((ids, mask))
    if len(examples) < 2:
        raise K2Error("fewer than 2 SFT conversations fit the context", "check the data sources, data.mix and train.seq_len")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(examples))
    n_val = max(1, int(round(len(examples) * cfg.val_fraction)))
    val_ex = [examples[i] for i in order[:n_val]]
    train_ex = [examples[i] for i in order[n_val:]] + replay
    # re-packed every epoch (new cuts), like pre-training data; validation is one fixed packing
    train = PackedStream(TokenFile.in_memory([e[0] for e in train_ex], [e[1] for e in train_ex]), np.arange(len(train_ex)),
                         tokenizer.eot_id, seq_len, seed, train_separator=False)
    val = pack([e[0] for e in val_ex], tokenizer.eot_id, seq_len, seed + 1, masks=[e[1] for e in val_ex], train_separator=False) \
        if sum(len(e[0]) + 1 for e in val_ex) > seq_len + 1 else PackedData(np.zeros((0, seq_len + 1), np.int32))
    return SFTData(train, val, counts)
