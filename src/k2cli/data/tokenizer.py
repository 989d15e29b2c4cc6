"""Tokenizers: k2's own byte-level BPE, and any tokenizer a model brings.

Every consumer (packing, SFT, RL, eval, serve) talks to one interface, `Tokenizer`:

    encode(text) / encode_batch(texts) / decode(ids)   text <-> ids; special tokens written in the text
                                                      (`<|im_end|>`) become their one id
    token_id(t) / has_token(t)                         ids of special tokens
    eot_id                                             the document separator / padding id (packing)
    stop_ids, end_of_turn                              what ends an assistant turn (generation stops there)
    vocab_size, fingerprint(), chat_template, save(dir)

Three kinds load behind it (`load_tokenizer(dir)` detects which):

  * "k2"       k2's BPE (`k2 tokenizer train`, `k2 pretrain`): tokenizer.json with K2's chat and tool-call
               tokens reserved up front (so SFT and RL never resize the vocabulary) and K2's chat template;
  * "hf"       any Hugging Face fast tokenizer directory: tokenizer.json + tokenizer_config.json with its
               own special-token names (`<s>`, `</s>`, `<|start|>` ...) and its own chat template;
  * "tiktoken" Kimi K2's tokenizer: tiktoken.model (base64 BPE ranks) + tokenizer_config.json, whose
               `added_tokens_decoder` names the special ids above the ranks (needs `pip install tiktoken`,
               the `kimi` extra).

Chat rendering (conversation -> ids + assistant mask) and tool-call parsing follow the tokenizer's chat
template and live in `k2cli.data.chat` (`render`, `parse_turn`).

Saved (k2 kind) as `tokenizer.json` plus `tokenizer_config.json` / `special_tokens_map.json`, which is what
`transformers.AutoTokenizer.from_pretrained(dir)` (PreTrainedTokenizerFast) loads; other kinds are saved
by copying the files they were loaded from. A tiktoken tokenizer also converts to the equivalent
tokenizer.json (`TiktokenTokenizer.save_hf`), which `k2 export` writes so that transformers loads Kimi's
tokenizer without its remote code.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from pathlib import Path
from typing import Iterable

from k2cli.errors import K2Error
from k2cli.jsonfile import read_object

EOT = "<|endoftext|>"  # document separator; end of plain text; padding
# K2's chat tokens (its template: k2cli.data.chat). Tool results go under <|im_system|> with the role
# name `tool`, as in Kimi K2; there is no tool role token.
SPECIAL_TOKENS = [
    EOT,
    "<|im_system|>",
    "<|im_user|>",
    "<|im_assistant|>",
    "<|im_middle|>",
    "<|im_end|>",
    "<|tool_calls_section_begin|>",
    "<|tool_calls_section_end|>",
    "<|tool_call_begin|>",
    "<|tool_call_argument_begin|>",
    "<|tool_call_end|>",
] + [f"<|reserved_{i}|>" for i in range(9)]

# End-of-sequence tokens tried, in order, for a tokenizer whose config names none.
COMMON_EOS = (EOT, "</s>", "<|end_of_text|>", "<eos>", "[EOS]", "<|eos|>")

# Every file a tokenizer directory may consist of (copied verbatim into model artifacts and exports).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tiktoken.model", "tokenization_kimi.py")

# Headroom the byte alphabet needs on top of the special tokens for any BPE merges at all.
BYTE_ALPHABET = 256

# Kimi K2's pre-tokenisation regex (tokenization_kimi.py): Han runs, cased words, digits in threes, ...
KIMI_PAT_STR = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
KIMI_RESERVED = 256  # Kimi reserves this many special ids (+2) above the BPE ranks


def _token_text(v) -> str | None:
    """A special token in tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


class Tokenizer:
    """The interface every consumer uses; subclasses hold a concrete backend.

    `config` is the tokenizer_config.json content (special-token names, chat template); `files` the
    directory the tokenizer came from (copied by `save`)."""

    kind = "base"

    def __init__(self, config: dict | None = None, source: Path | None = None):
        self.config = dict(config or {})
        self.source = Path(source) if source else None
        self.specials: dict[str, int] = {}  # subclasses fill: every special / added token
        self._eot_id: int | None = None
        self._turn: tuple[str, ...] | None = None

    # --- special tokens -------------------------------------------------------------------
    def has_token(self, token: str) -> bool:
        return token in self.specials

    def token_id(self, token: str) -> int:
        i = self.specials.get(token)
        if i is None:
            raise K2Error(f"the {self.kind} tokenizer{self.where} has no special token {token!r}",
                          "this token belongs to another chat format; use the tokenizer's own (tokenizer.stop_ids, "
                          "k2cli.data.chat.render / parse_turn)")
        return i

    @property
    def where(self) -> str:
        """' in DIR' for messages, when the tokenizer came from files."""
        return f" in {self.source}" if self.source else ""

    def config_token(self, name: str) -> str | None:
        """A named special token of the config (bos_token, eos_token, pad_token, unk_token)."""
        return _token_text(self.config.get(name))

    @property
    def eot_id(self) -> int:
        """Document separator and padding: k2's <|endoftext|>, else the tokenizer's eos (or pad) token."""
        if self._eot_id is None:
            # without a config naming it (a bare tokenizer.json), the usual end-of-sequence names
            for t in (EOT if self.kind == "k2" else None, self.config_token("eos_token"), self.config_token("pad_token"), *COMMON_EOS):
                if t and t in self.specials:
                    self._eot_id = self.specials[t]
                    break
            else:
                raise K2Error(f"the {self.kind} tokenizer{self.where} names no end-of-sequence token",
                              "set eos_token in its tokenizer_config.json")
        return self._eot_id

    @property
    def chat_template(self) -> str | None:
        t = self.config.get("chat_template")
        if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
            t = next((x.get("template") for x in t if x.get("name") == "default"), None)
        if t is None and self.source and (self.source / "chat_template.jinja").is_file():
            t = (self.source / "chat_template.jinja").read_text()
        return t

    @property
    def end_of_turn(self) -> tuple[str, ...]:
        """Special token(s) that close an assistant turn in this tokenizer's chat template."""
        if self._turn is None:
            from k2cli.data.chat import end_of_turn_tokens

            self._turn = end_of_turn_tokens(self)
        return self._turn

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids generation stops at: the end-of-turn token(s), then the end-of-sequence id."""
        ids = [self.specials[t] for t in self.end_of_turn if t in self.specials]
        return tuple(dict.fromkeys(ids + [self.eot_id]))

    # --- backend ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """Ids and the character offset where each token starts (for assistant masks)."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        raise NotImplementedError

    def fingerprint(self) -> str:
        raise NotImplementedError

    def save(self, directory: Path) -> None:
        """Copy the files this tokenizer was loaded from."""
        if self.source is None:
            raise K2Error("this tokenizer was not loaded from files", "save a k2 tokenizer or load one from a directory")
        for name in TOKENIZER_FILES:
            if (self.source / name).is_file() and (Path(directory) / name).resolve() != (self.source / name).resolve():
                shutil.copy2(self.source / name, Path(directory) / name)


class BPETokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer.json: k2's own BPE (kind "k2") or any model's ("hf")."""

    def __init__(self, tok, config: dict | None = None, source: Path | None = None, kind: str | None = None):
        super().__init__(config, source)
        self.tok = tok
        self.specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items()}
        from k2cli.data.chat import CHAT_TEMPLATE

        # k2's own: every reserved token, and K2's template (or none: a bare tokenizer.json of k2's).
        # An older k2 tokenizer (other reserved list, its template in the config) loads as "hf" and keeps
        # rendering its own template.
        k2_native = all(t in self.specials for t in SPECIAL_TOKENS) and self.config.get("chat_template") in (None, CHAT_TEMPLATE)
        self.kind = kind or ("k2" if k2_native else "hf")
        if self.kind == "k2":
            self.config.setdefault("chat_template", CHAT_TEMPLATE)
        if self.kind == "k2":
            self.eot_id  # noqa: B018  (fails early when <|endoftext|> is missing)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def encode_offsets(self, text: str) -> tuple[list[int], list[int]]:
        e = self.tok.encode(text, add_special_tokens=False)
        return e.ids, [a for a, _ in e.offsets]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def fingerprint(self) -> str:
        return hashlib.sha256(self.tok.to_str().encode()).hexdigest()[:16]

    def save(self, directory: Path, model_max_length: int = 4096, chat_template: str | None = None) -> None:
        """k2 kind: write tokenizer.json + the transformers config files, chat template included.
        Other kinds: copy the source files."""
        if self.kind != "k2":
            return super().save(directory)
        from k2cli.data.chat import CHAT_TEMPLATE

        directory = Path(directory)
        try:
            self.tok.save(str(directory / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a plain Exception, a full disk included
            raise K2Error(f"cannot write {directory / 'tokenizer.json'}: {str(e)[:200]}",
                          "free disk space, or choose another artifacts root (k2 --root DIR)") from None
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
            "chat_template": chat_template or CHAT_TEMPLATE,
        }
        specials = {"eos_token": EOT, "pad_token": EOT, "additional_special_tokens": SPECIAL_TOKENS[1:]}
        try:
            (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
            (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
        except OSError as e:  # a failed write (not open) names no file: name the directory
            raise K2Error(f"cannot write the tokenizer files in {directory}: {e.strerror}",
                          "free disk space, or choose another artifacts root (k2 --root DIR)") from None


class TiktokenTokenizer(Tokenizer):
    """Kimi K2's tokenizer: tiktoken BPE ranks + special tokens from tokenizer_config.json.

    As Kimi's tokenization_kimi.py: ids [n_ranks, n_ranks + 258) are special; those named in
    `added_tokens_decoder` keep their names, the others are `<|reserved_token_{id}|>`; special tokens
    written in the text are encoded as their ids."""

    kind = "tiktoken"

    def __init__(self, model_file: Path, config: dict, source: Path | None = None):
        super().__init__(config, source)
        try:
            import tiktoken
            from tiktoken.load import load_tiktoken_bpe
        except ImportError:
            raise K2Error(f"{model_file} is a tiktoken tokenizer and the tiktoken package is not installed",
                          "pip install tiktoken (or k2cli[kimi])")
        try:
            ranks = load_tiktoken_bpe(str(model_file))
        except Exception as e:  # tiktoken raises plain Exceptions on bad files
            raise K2Error(f"cannot read {model_file}: {e}", "it must hold one 'base64-token rank' pair per line, as Kimi K2's tiktoken.model")
        n = len(ranks)
        named = {int(i): _token_text(v) for i, v in (config.get("added_tokens_decoder") or {}).items()}
        self.specials = {named.get(i) or f"<|reserved_token_{i}|>": i for i in range(n, n + KIMI_RESERVED + 2)}
        self.ranks, self.pat_str = ranks, config.get("pat_str") or KIMI_PAT_STR
        self.model = tiktoken.Encoding(name=Path(model_file).name, pat_str=self.pat_str,
                                       mergeable_ranks=ranks, special_tokens=self.specials)
        self._digest = hashlib.sha256(Path(model_file).read_bytes() + json.dumps(self.specials, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def vocab_size(self) -> int:
        return self.model.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.model.encode(text, allowed_special="all")

    def encode_offsets(self, text: str) -> tuple[list[int], list[int]]:
        ids = self.encode(text)
        _, offsets = self.model.decode_with_offsets(ids)
        return ids, offsets

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        ids = list(ids)
        if skip_special:
            special = set(self.specials.values())
            ids = [i for i in ids if i not in special]
        return self.model.decode(ids)

    def fingerprint(self) -> str:
        return self._digest

    def to_tokenizers(self):
        """The same tokenizer as a Hugging Face `tokenizers` byte-level BPE (what transformers'
        TikTokenConverter builds, without needing transformers): ids equal `encode`'s for every text.

        tiktoken splits the text with `pat_str`, then inside each piece merges the adjacent pair whose
        concatenation has the lowest rank, until none is a token. The BPE model does the same when
        every split (left, right) of a token into two tokens is a merge whose priority is the token's
        rank; `ignore_merges` takes a whole piece that is a token at once, as tiktoken does. Tokens are
        spelt in the byte-to-unicode alphabet of byte-level BPE (GPT-2's), specials keep their ids."""
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        if sorted(self.ranks.values()) != list(range(len(self.ranks))):
            raise K2Error(f"the tiktoken ranks{self.where} are not the ids 0..{len(self.ranks) - 1}",
                          "k2 converts only dense tiktoken files, as Kimi K2's tiktoken.model")
        alphabet = _byte_alphabet()

        def spell(b: bytes) -> str:
            return "".join(alphabet[x] for x in b)

        merges = []  # (rank of the merged token, left, right)
        for token, rank in self.ranks.items():
            merges += [(rank, token[:i], token[i:]) for i in range(1, len(token))
                       if token[:i] in self.ranks and token[i:] in self.ranks]
        merges.sort(key=lambda m: (m[0], self.ranks[m[1]], self.ranks[m[2]]))
        bpe = models.BPE({spell(t): r for t, r in self.ranks.items()}, [(spell(a), spell(b)) for _, a, b in merges],
                         fuse_unk=False, ignore_merges=True)
        tok = HFTokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(self.pat_str), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        specials = sorted(self.specials.items(), key=lambda x: x[1])  # added in id order: they get ids n, n+1 ...
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, _ in specials])
        wrong = [(t, i) for t, i in specials if tok.token_to_id(t) != i]
        if wrong:
            raise K2Error(f"cannot convert the tiktoken tokenizer{self.where}: special token {wrong[0][0]!r} would not keep id {wrong[0][1]}",
                          "its tiktoken.model must not hold the special tokens' text as ordinary tokens")
        return tok

    def save_hf(self, directory: Path) -> None:
        """Write tokenizer.json + tokenizer_config.json, which transformers' AutoTokenizer loads without
        Kimi's remote code (PreTrainedTokenizerFast): the same ids, special tokens and chat template.
        The tokenizer_config.json this one came with (auto_map -> tokenization_kimi.py) is replaced."""
        directory = Path(directory)
        self.to_tokenizers().save(str(directory / "tokenizer.json"))
        keep = ("bos_token", "eos_token", "pad_token", "unk_token", "model_max_length", "clean_up_tokenization_spaces")
        config = {"tokenizer_class": "PreTrainedTokenizerFast"}
        config |= {k: self.config_token(k) if k.endswith("_token") else self.config[k] for k in keep if k in self.config}
        config["added_tokens_decoder"] = {str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                                   "normalized": False, "single_word": False}
                                          for t, i in sorted(self.specials.items(), key=lambda x: x[1])}
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _byte_alphabet() -> list[str]:
    """Byte-level BPE's spelling of each byte (GPT-2's bytes_to_unicode): printable bytes are themselves,
    the others are shifted to U+0100 onwards, so every token is a printable string."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]  # '!'..'~', '¡'..'¬', '®'..'ÿ'
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def write_tiktoken_model(ranks: dict[bytes, int], path: Path) -> None:
    """Write BPE ranks in tiktoken's file format ("base64(token) rank" per line), as Kimi's tiktoken.model."""
    Path(path).write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(ranks.items(), key=lambda x: x[1])))


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2, split_digits: bool = True) -> BPETokenizer:
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
    return BPETokenizer(tok, kind="k2")


def _read_config(directory: Path) -> dict:
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return {}
    return read_object(path, "it must be the JSON file transformers writes (tokenizer.save_pretrained)")


def has_tokenizer(directory: str | Path) -> bool:
    """Whether a directory (a model artifact, say) carries a tokenizer `load_tokenizer` can read."""
    return any((Path(directory) / name).is_file() for name in ("tokenizer.json", "tiktoken.model"))


def _check_artifact(directory: Path) -> None:
    """In an artifact, the tokenizer's files (its top-level files but the weights) match the manifest before
    they are read (cached hashes: cheap)."""
    from k2cli.artifacts import MANIFEST, open_artifact

    if (directory / MANIFEST).is_file():
        art = open_artifact(directory)
        names = [n for n in art.manifest["files"] if "/" not in n and not n.endswith((".safetensors", ".pt", ".bin"))]
        if names:
            art.check(*names)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer stored in a directory (a model or tokenizer artifact, an HF tokenizer directory) or a
    tokenizer.json file. Detects k2's BPE / an HF tokenizer.json (+ tokenizer_config.json) / Kimi's
    tiktoken.model (+ tokenizer_config.json)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".json":
        directory, file = path.parent, path
    elif path.is_file() and path.name.endswith(".model"):
        return TiktokenTokenizer(path, _read_config(path.parent), path.parent)
    else:
        directory, file = path, path / "tokenizer.json"
    if not directory.is_dir():
        raise K2Error(f"tokenizer {path} does not exist", "pass a tokenizer artifact, a model artifact, an HF tokenizer directory or a tokenizer.json")
    _check_artifact(directory)
    config = _read_config(directory)
    if file.is_file():
        from tokenizers import Tokenizer as HFTokenizer

        try:
            tok = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises plain Exceptions on bad files
            raise K2Error(f"cannot read {file}: {str(e)[:200]}", "it must be a Hugging Face tokenizers file (tokenizer.json); "
                          "re-save it with transformers' save_pretrained")
        return BPETokenizer(tok, config, directory)
    if (directory / "tiktoken.model").is_file():
        return TiktokenTokenizer(directory / "tiktoken.model", config, directory)
    found = sorted(p.name for p in directory.iterdir())[:8]
    other = [n for n in found if n in ("tokenizer.model", "vocab.json", "spiece.model")]
    raise K2Error(f"{directory} has no tokenizer k2 can read" + (f" (found {', '.join(other)}: a slow/SentencePiece tokenizer)" if other else ""),
                  "k2 reads tokenizer.json (Hugging Face fast tokenizers; convert with AutoTokenizer.from_pretrained(dir).save_pretrained(dir)) "
                  "or Kimi's tiktoken.model + tokenizer_config.json")


def resolve_tokenizer(ref: str) -> tuple[Tokenizer, object | None]:
    """What `tokenizer.ref` names: a tokenizer or model artifact (returned too, for the lineage), an HF
    tokenizer directory, a tokenizer.json or a tiktoken.model. Returns (tokenizer, artifact or None)."""
    from k2cli.artifacts import open_artifact

    p = Path(ref).expanduser()
    if p.exists() and not (p / "manifest.json").is_file():
        return load_tokenizer(p), None
    try:
        art = open_artifact(ref, kind=("tokenizer", "model"))
    except K2Error as e:
        raise K2Error(f"tokenizer.ref {ref!r} is neither a file or directory nor a tokenizer/model artifact ({e.args[0]})",
                      "pass a tokenizer artifact (k2 tokenizer train), a model artifact, an HF tokenizer directory or a tokenizer.json")
    return load_tokenizer(art.path), art
