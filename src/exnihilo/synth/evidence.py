"""Where in a chunk an answer comes from: prose sentences, passages and evidence.

The stepwise synthesizer (`synth/stepwise.py`) asks the model for a question about one
passage of a chunk, then finds the chunk sentences that answer it (`select_evidence`, by
sentence-embedding similarity) and either quotes them or has the model answer from them.
Everything here is plain text processing, testable without a model.

Sentence splitting is a small regex rather than a library (nltk's punkt, spaCy): chunks are
documentation prose cut at token windows, where the useful rules are few (split after
. ! ? before a capital or markup; drop code blocks; drop fragments cut at chunk edges), and
a heavy NLP dependency for them would not be worth its install.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9`*(\"'])")
_CODE_LINE = ("    ", "\t", ">>>", "...", "$ ", "```")
# A sentence starts like one: a capital, a digit, markup or a quote; a lower-case start is
# the tail of a sentence cut at the chunk's left edge.
_SENTENCE_START = re.compile(r"[A-Z0-9`*\"':]")
_RST_ROLE = re.compile(r":(?:mod|class|func|meth|attr|data|exc|obj|const|term|ref):`~?([^`]+)`")
_RST_LITERAL = re.compile(r"``([^`]+)``")


def clean_markup(text: str) -> str:
    """reStructuredText inline markup as Markdown: ``x`` → `x`, :mod:`json` → `json`."""
    return _RST_LITERAL.sub(r"`\1`", _RST_ROLE.sub(r"`\1`", text))


def is_code_paragraph(paragraph: str) -> bool:
    """Most of its non-empty lines are indented code, doctest or shell lines."""
    lines = [line for line in paragraph.splitlines() if line.strip()]
    code = sum(line.startswith(_CODE_LINE) for line in lines)
    return bool(lines) and code * 2 > len(lines)


def prose_paragraphs(text: str) -> list[str]:
    """The chunk's paragraphs that are prose (code blocks and doctests left out)."""
    return [p.strip() for p in _PARAGRAPH_BREAK.split(text)
            if p.strip() and not is_code_paragraph(p)]


def split_sentences(paragraph: str) -> list[str]:
    """Whole sentences of one prose paragraph, lines joined; fragments left out: a piece
    must start like a sentence, end with . ! or ? and have at least four words."""
    flat = " ".join(line.strip() for line in paragraph.splitlines() if line.strip())
    return [s.strip() for s in _SENTENCE_END.split(flat)
            if _SENTENCE_START.match(s.strip()) and s.strip()[-1:] in ".!?"
            and len(s.split()) >= 4]


def prose_sentences(text: str) -> list[str]:
    """Every whole prose sentence of a chunk, in order, each once (API docs repeat
    paragraphs: `json.load` and `json.loads` share theirs)."""
    return list(dict.fromkeys(s for p in prose_paragraphs(text) for s in split_sentences(p)))


def passages(text: str, n: int) -> list[str]:
    """At most n passages of the chunk's prose, in order, of about equal length; each
    question is asked about one, so questions cover the chunk instead of repeating its
    most salient line. Units are whole paragraphs, or whole sentences when there are fewer
    paragraphs than n; a unit joins the group its midpoint falls in."""
    paragraphs = [p for p in prose_paragraphs(text) if split_sentences(p)]
    if len(paragraphs) >= n:
        units, joiner = paragraphs, "\n\n"
    else:
        units, joiner = [s for p in paragraphs for s in split_sentences(p)], " "
    total = sum(len(u) for u in units)
    groups: list[list[str]] = [[] for _ in range(n)]
    start = 0
    for unit in units:
        groups[min(n - 1, int(n * (start + len(unit) / 2) / total))].append(unit)
        start += len(unit)
    return [joiner.join(g) for g in groups if g]


# ----------------------------------------------------------------------------- support

_STOPWORDS = frozenset({
    "a", "an", "the", "of", "to", "in", "on", "for", "and", "or", "is", "are", "was", "were",
    "be", "been", "being", "it", "its", "this", "that", "these", "those", "with", "as", "by",
    "at", "from", "if", "then", "than", "not", "no", "can", "will", "would", "should",
    "could", "may", "might", "must", "do", "does", "did", "has", "have", "had", "which",
    "what", "who", "whom", "whose", "when", "where", "why", "how", "there", "their", "they",
    "them", "you", "your", "we", "our", "he", "she", "his", "her", "so", "such", "into",
    "over", "also", "any", "all", "each", "other", "more", "most", "only", "own", "same",
    "too", "very", "just", "but", "about", "above", "below", "up", "down", "out", "off",
    "again", "further", "once", "here", "both", "few", "some", "nor", "now", "one", "use",
    "used", "using", "i", "me", "my", "mine", "us", "answer", "question", "text", "following",
    "given",
})
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+(?:\.\d+)?")


def content_words(text: str) -> list[str]:
    """Lower-cased words and numbers that carry content (stopwords and single letters out;
    numbers always in, because an invented number is the typical unsupported claim)."""
    words = (m.group(0).lower() for m in _WORD.finditer(text))
    return [w for w in words if w not in _STOPWORDS and (len(w) > 1 or w.isdigit())]


def lexical_support(answer: str, sources: Sequence[str]) -> float:
    """The share of the answer's content words that occur in the sources (0 for an answer
    without content words). A cheap, deterministic grounding signal: it cannot tell a
    paraphrase that is wrong from one that is right, but it does catch invented names and
    numbers, which is what small synthesizers add."""
    words = content_words(answer)
    if not words:
        return 0.0
    vocabulary = {w for s in sources for w in content_words(s)}
    return sum(w in vocabulary for w in words) / len(words)


# ----------------------------------------------------------------------------- evidence

@dataclass(frozen=True)
class Evidence:
    sentences: tuple[str, ...]  # in chunk order
    best: str  # the most similar sentence
    score: float  # its cosine similarity to the question


def select_evidence(sims: np.ndarray, sentences: Sequence[str], margin: float = 0.1
                    ) -> Evidence:
    """The sentences that best answer a question, given each sentence's similarity to it:
    the most similar one, plus its more similar neighbour when that is within `margin` of
    it (a definition often runs over into the next sentence), in chunk order. Only a
    neighbour: two far-apart sentences read as one answer would not follow each other."""
    if len(sentences) == 0:
        return Evidence((), "", 0.0)
    top = int(np.argmax(sims))
    best = float(sims[top])
    neighbours = [i for i in (top - 1, top + 1) if 0 <= i < len(sentences)]
    picked = [top]
    if neighbours:
        near = max(neighbours, key=lambda i: float(sims[i]))
        if sims[near] >= best - margin:
            picked = sorted([top, near])
    return Evidence(tuple(sentences[i] for i in picked), sentences[top], round(best, 4))

