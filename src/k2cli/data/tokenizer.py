"""Byte-level BPE tokenizer (Hugging Face `tokenizers`) with K2's special tokens reserved up front.

The special tokens are reserved at training time so that SFT and RL never resize the
vocabulary. Their names follow Kimi K2's chat template: roles are opened with
`<|im_user|>` etc., a role name and `<|im_middle|>` separate header from content,
`<|im_end|>` closes a message, and tool calls sit in a tool-calls section.

Saved as `tokenizer.json` plus `tokenizer_config.json` / `special_tokens_map.json`, which is
what `transformers.AutoTokenizer.from_pretrained(dir)` (PreTrainedTokenizerFast) loads.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from k2cli.errors import K2Error

EOT = "<|endoftext|>"  # document separator; end of plain text; padding
SPECIAL_TOKENS = [
    EOT,
    "<|im_system|>",
    "<|im_user|>",
    "<|im_assistant|>",
    "<|im_tool|>",
    "<|im_middle|>",
    "<|im_end|>",
    "<|tool_calls_section_begin|>",
    "<|tool_calls_section_end|>",
    "<|tool_call_begin|>",
    "<|tool_call_argument_begin|>",
    "<|tool_call_end|>",
] + [f"<|reserved_{i}|>" for i in range(8)]

# Headroom the byte alphabet needs on top of the special tokens for any BPE merges at all.
BYTE_ALPHABET = 256


class Tokenizer:
    """A thin wrapper: encode/decode plus the ids of the special tokens."""

    def __init__(self, tok):
        self.tok = tok
        self.eot_id = self.token_id(EOT)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def token_id(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise K2Error(f"the tokenizer has no token {token!r}", "train a k2 tokenizer (it reserves k2's special tokens)")
        return i

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def fingerprint(self) -> str:
        return hashlib.sha256(self.tok.to_str().encode()).hexdigest()[:16]

    def save(self, directory: Path, model_max_length: int = 4096, chat_template: str | None = None) -> None:
        """Write tokenizer.json + the transformers config files, chat template included."""
        from k2cli.data.chat import CHAT_TEMPLATE

        chat_template = chat_template or CHAT_TEMPLATE
        directory = Path(directory)
        self.tok.save(str(directory / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None,
            "eos_token": EOT,
            "pad_token": EOT,
            "unk_token": None,
            "model_max_length": model_max_length,
            "clean_up_tokenization_spaces": False,
            "added_tokens_decoder": {
                str(self.token_id(t)): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                        "normalized": False, "single_word": False}
                for t in SPECIAL_TOKENS
            },
        }
        config["chat_template"] = chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        specials = {"eos_token": EOT, "pad_token": EOT, "additional_special_tokens": SPECIAL_TOKENS[1:]}
        (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2, split_digits: bool = True) -> Tokenizer:
    """Train byte-level BPE on `texts`; the special tokens take the first ids.

    `split_digits` makes every digit its own token (" 48213" -> " ", "4", "8", "2", "1", "3"), as
    Llama's tokenizer does (DeepSeek-V3 and K2 cut numbers into groups of at most three). Plain
    BPE on a small corpus merges digits by frequency instead — " 48", "2", "1", "3" but " 7",
    "7", "1", "20" — so one number is spelt in many ways and a model must learn each spelling.
    With single digits, ten well-trained embeddings spell every number, and reading a number
    back from the context (a pass key, a tool's result) is one copy per digit. Measured on the
    tiny model (docs/extend-context.md): with merged digits, 1,200 steps of retrieval training
    left every digit after the first at chance; with single digits, 600 steps copy them."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    floor = len(SPECIAL_TOKENS) + BYTE_ALPHABET
    if vocab_size < floor:
        raise K2Error(
            f"vocabulary size {vocab_size} is smaller than k2's {len(SPECIAL_TOKENS)} special tokens "
            f"plus the {BYTE_ALPHABET} byte symbols",
            f"use a vocab_size of at least {floor}",
        )
    tok = HFTokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]) if split_digits else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok)


def load_tokenizer(directory: str | Path) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        raise K2Error(f"{directory} has no tokenizer.json", "use an artifact made by 'k2 tokenizer train' or 'k2 pretrain'")
    try:
        return Tokenizer(HFTokenizer.from_file(str(path)))
    except Exception as e:  # tokenizers raises plain Exceptions on bad files
        raise K2Error(f"cannot read {path}: {e}", "the tokenizer file is damaged")
