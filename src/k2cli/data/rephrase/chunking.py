"""Sentence-aware chunking under a token budget, for chunk-wise autoregressive rewriting.

A long document is cut into chunks of whole sentences, each about `max_tokens` long, so that a
rewriter never sees a sentence cut in half and never has to hold a whole long document at once
(K2 section 2.2: rewriting long documents in one go loses information). A sentence longer than
the budget becomes a chunk of its own.

Sizes are estimated without a tokenizer (about 4 characters per token), so the chunks of a
document are the same whichever backend rewrites them.
"""

from __future__ import annotations

import re

# A sentence ends at whitespace that follows . ! or ? (and maybe a closing quote or bracket), or at
# a line break. Not after a common abbreviation or a single capital initial ("J. Smith").
_END = re.compile(r"[.!?][\"')\]]*$")
_ABBREV = re.compile(r"(?:\b(?:Mr|Mrs|Ms|Dr|Prof|St|Inc|Ltd|Co|vs|etc|e\.g|i\.e|No|Fig)|(?:^|\s)[A-Z])\.$")


def approx_tokens(text: str) -> int:
    return max(1, (len(text) + 3) // 4)


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the sentences of `text`, surrounding whitespace excluded."""
    spans, start = [], 0
    for gap in re.finditer(r"\s+", text):
        before = text[start:gap.start()]
        if "\n" in gap.group(0) or (_END.search(before) and not _ABBREV.search(before)):
            if before.strip():
                spans.append(_strip(text, start, gap.start()))
            start = gap.end()
    if text[start:].strip():
        spans.append(_strip(text, start, len(text)))
    return spans


def _strip(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def split_sentences(text: str) -> list[str]:
    return [text[a:b] for a, b in sentence_spans(text)]


def chunk_text(text: str, max_tokens: int) -> list[str]:
    """Whole sentences packed greedily into chunks of at most `max_tokens` (estimated) each.

    A chunk is a verbatim slice of the document (line breaks inside it are kept), so joining the
    chunks with a space or newline loses no text."""
    spans = sentence_spans(text)
    if not spans:
        return []
    chunks, first, last = [], spans[0][0], spans[0][1]
    for a, b in spans[1:]:
        if approx_tokens(text[first:b]) > max_tokens:
            chunks.append(text[first:last])
            first = a
        last = b
    chunks.append(text[first:last])
    return chunks


def tail(text: str, max_tokens: int) -> str:
    """The last whole sentences of `text` that fit `max_tokens`: the context a rewriter is given."""
    if approx_tokens(text) <= max_tokens:
        return text
    spans = sentence_spans(text)
    start = spans[-1][0]
    for a, _ in reversed(spans):
        if approx_tokens(text[a:]) > max_tokens:
            break
        start = a
    return text[start:]
