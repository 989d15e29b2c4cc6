"""The `k2:<model ref>` backend: a k2 model artifact rewrites in process, with its latent KV cache.

The requests of one round are generated as batches of `backend.concurrency` left-padded rows
(`k2cli.model.generate`). A base model is prompted with plain text; `format_prompt` is the one
place that turns chat messages into that text, so moving to the chat template later is a change
of one function.

A prompt longer than the model's context keeps its end — the chunk to rewrite and the cue to
answer — and loses the start of the instruction: a small model's rewrite will then mostly fail
fidelity verification, which is counted, not hidden.
"""

from __future__ import annotations

from k2cli.data.rephrase.backends import BackendConfig, RewriteRequest
from k2cli.errors import K2Error

STOP_TOKENS = ("<|endoftext|>", "<|im_end|>")
ANSWER_CUE = "### Assistant\n"


def format_prompt(messages: list[dict]) -> str:
    """Chat messages as plain text for a base model, ending with the cue to answer."""
    parts = [f"### {m['role'].capitalize()}\n{m['content'].strip()}" for m in messages]
    return "\n\n".join(parts) + "\n\n" + ANSWER_CUE


def clean_output(text: str) -> str:
    """The answer only: a base model that starts a new '### ' section has finished."""
    return text.split("\n### ", 1)[0].strip()


class K2Backend:
    name = "k2"

    def __init__(self, ref: str, cfg: BackendConfig):
        from tokenizers import Tokenizer

        from k2cli.artifacts import sha256_file
        from k2cli.model.io import load_model

        self.model, self.artifact = load_model(ref)  # a K2Error if `ref` is not a model artifact
        path = self.artifact.file("tokenizer.json")
        if not path.is_file():
            raise K2Error(f"model artifact {self.artifact.id} has no tokenizer.json",
                          "use a model made by 'k2 pretrain' (it saves its tokenizer), not a bare 'k2 model init'")
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exceptions on bad files
            raise K2Error(f"cannot read {path}: {e}", "the model artifact is damaged; re-create it")
        self.stop_ids = tuple(i for t in STOP_TOKENS if (i := self.tokenizer.token_to_id(t)) is not None)
        self.cfg = cfg
        self.context = self.model.config.max_position_embeddings
        # leave room for the answer: at most half the context is generated
        self.max_new = max(1, min(cfg.max_new_tokens, self.context // 2))
        self.identity = (f"k2:{sha256_file(self.artifact.path / 'manifest.json')[:16]}:"
                         f"t={cfg.temperature}:n={self.max_new}")

    def encode(self, messages: list[dict]) -> list[int]:
        ids = self.tokenizer.encode(format_prompt(messages), add_special_tokens=False).ids
        return ids[-(self.context - self.max_new):]

    def rewrite(self, requests: list[RewriteRequest]) -> list[str]:
        from k2cli.model.generate import generate

        out = []
        for i in range(0, len(requests), self.cfg.concurrency):
            batch = requests[i:i + self.cfg.concurrency]
            new = generate(self.model, [self.encode(r.messages) for r in batch], max_new_tokens=self.max_new,
                           temperature=self.cfg.temperature, stop_ids=self.stop_ids, seed=batch[0].seed % (2**31))
            out += [clean_output(self.tokenizer.decode(ids, skip_special_tokens=True)) for ids in new]
        return out

    def embed(self, texts: list[str]) -> None:
        return None
