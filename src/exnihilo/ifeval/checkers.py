"""The 25 IFEval instruction checkers (Zhou et al. 2023, arXiv 2311.07911), and a registry.

Each checker is a plain function `check(response, **kwargs) -> bool` whose keyword names are
the benchmark's kwargs names, so a row of `input_data.jsonl` calls it directly. Semantics
follow the reference implementation (google-research `instruction_following_eval/
instructions.py`), including its quirks, because figures are only comparable when every
checker counts the same way:

- keyword checks are case-insensitive substring matches ("cat" is found in "Category");
  forbidden words alone use word boundaries;
- "less than" is strict (<), "at least" is >=;
- paragraphs (`***` dividers) are counted exactly; an empty paragraph between dividers fails;
- a JSON answer may sit in a ``` or ```json code fence.

Two deliberate differences, identical on all 541 prompts of the benchmark: keywords, section
splitters and custom postscript markers are matched literally (`re.escape`), where the
reference pastes them into a regex unescaped; and word/sentence/language counting goes
through `exnihilo.ifeval.text` (see its docstring for where that differs from NLTK).

Public API: `check_instruction(instruction_id, kwargs, response, prompt=None)` and
`validate_kwargs(instruction_id, kwargs, where)`; `INSTRUCTIONS` maps every id to its
checker and the kwargs it needs.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from exnihilo.errors import ExnihiloError
from exnihilo.ifeval.text import (
    count_capital_words,
    count_sentences,
    count_words,
    detect_language,
)

RELATIONS = ("less than", "at least")

# The languages the benchmark asks for (the reference's LANGUAGE_CODES, ISO 639-1).
LANGUAGES = {
    "en": "English", "es": "Spanish", "pt": "Portuguese", "ar": "Arabic", "hi": "Hindi",
    "fr": "French", "ru": "Russian", "de": "German", "ja": "Japanese", "it": "Italian",
    "bn": "Bengali", "uk": "Ukrainian", "th": "Thai", "ur": "Urdu", "ta": "Tamil",
    "te": "Telugu", "bg": "Bulgarian", "ko": "Korean", "pl": "Polish", "he": "Hebrew",
    "fa": "Persian", "vi": "Vietnamese", "ne": "Nepali", "sw": "Swahili", "kn": "Kannada",
    "mr": "Marathi", "gu": "Gujarati", "pa": "Punjabi", "ml": "Malayalam", "fi": "Finnish",
}

CONSTRAINED_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


def compare(count: int, relation: str, threshold: int) -> bool:
    """"less than" -> count < threshold; "at least" -> count >= threshold."""
    if relation == "less than":
        return count < threshold
    if relation == "at least":
        return count >= threshold
    raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")


# ------------------------------------------------------------------------------ keywords

def keywords_existence(response: str, *, keywords: list[str]) -> bool:
    """Every keyword appears, case-insensitive, anywhere (substrings count)."""
    return all(re.search(re.escape(k), response, flags=re.IGNORECASE) for k in keywords)


def keyword_frequency(response: str, *, keyword: str, frequency: int, relation: str) -> bool:
    """Case-insensitive, non-overlapping substring occurrences of `keyword` vs `frequency`."""
    found = re.findall(re.escape(keyword.strip()), response, flags=re.IGNORECASE)
    return compare(len(found), relation, frequency)


def forbidden_words(response: str, *, forbidden_words: list[str]) -> bool:
    """None of the words appears as a whole word (case-insensitive)."""
    return not any(re.search(r"\b" + re.escape(w) + r"\b", response, flags=re.IGNORECASE)
                   for w in forbidden_words)


def letter_frequency(response: str, *, letter: str, let_frequency: int,
                     let_relation: str) -> bool:
    """Occurrences of one character, case-insensitive, vs `let_frequency`."""
    count = Counter(response.lower())[letter.strip().lower()]
    return compare(count, let_relation, let_frequency)


# ------------------------------------------------------------------------------ language

def response_language(response: str, *, language: str) -> bool:
    """The detected language is `language`; text with no letters counts as followed."""
    detected = detect_language(response)
    return detected is None or detected == language


# ------------------------------------------------------------------------------ length

def number_sentences(response: str, *, num_sentences: int, relation: str) -> bool:
    return compare(count_sentences(response), relation, num_sentences)


def split_paragraphs_stars(response: str) -> list[str]:
    """Pieces between `***` dividers (one optional whitespace char each side is eaten)."""
    return re.split(r"\s?\*\*\*\s?", response)


def number_paragraphs(response: str, *, num_paragraphs: int) -> bool:
    """Exactly `num_paragraphs` paragraphs divided by `***`. Blank first/last pieces (a
    divider at the very start or end) do not count; a blank piece in between fails."""
    pieces = split_paragraphs_stars(response)
    count = len(pieces)
    for index, piece in enumerate(pieces):
        if not piece.strip():
            if index in (0, len(pieces) - 1):
                count -= 1
            else:
                return False
    return count == num_paragraphs


def number_words(response: str, *, num_words: int, relation: str) -> bool:
    return compare(count_words(response), relation, num_words)


def paragraph_first_word(paragraph: str) -> str:
    """Lower-cased first word, leading quotes dropped, cut at the first . , ? ! ' or "."""
    word = paragraph.split()[0].strip().lstrip("'").lstrip('"')
    cut = re.search(r"[.,?!'\"]", word)
    return (word[:cut.start()] if cut else word).lower()


def nth_paragraph_first_word(response: str, *, num_paragraphs: int, nth_paragraph: int,
                             first_word: str) -> bool:
    """Exactly `num_paragraphs` non-blank paragraphs split on "\\n\\n", and paragraph
    `nth_paragraph` (1-based, counted in the raw split, as the reference does) starts with
    `first_word`."""
    pieces = response.split("\n\n")
    count = sum(1 for piece in pieces if piece.strip())
    if nth_paragraph > count:
        return False
    paragraph = pieces[nth_paragraph - 1].strip()
    if not paragraph:
        return False
    return count == num_paragraphs and paragraph_first_word(paragraph) == first_word.lower()


# ------------------------------------------------------------------------------ content

def number_placeholders(response: str, *, num_placeholders: int) -> bool:
    """At least `num_placeholders` square-bracket placeholders such as [name]."""
    return len(re.findall(r"\[.*?\]", response)) >= num_placeholders


def postscript(response: str, *, postscript_marker: str) -> bool:
    """Some line holds the marker ("P.S.", "P.P.S", or any text), case-insensitive. Like
    the reference, the marker may be anywhere on the line and "P. S." also counts."""
    marker = postscript_marker.strip()
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + re.escape(marker.lower()) + r".*$"
    return bool(re.findall(pattern, response.lower(), flags=re.MULTILINE))


# ------------------------------------------------------------------------------ format

def count_bullets(response: str) -> int:
    """Lines starting with "* " style or "-" bullets (a "**bold**" line is not one)."""
    stars = re.findall(r"^\s*\*[^\*].*$", response, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", response, flags=re.MULTILINE)
    return len(stars) + len(dashes)


def number_bullet_lists(response: str, *, num_bullets: int) -> bool:
    """Exactly `num_bullets` markdown bullet points."""
    return count_bullets(response) == num_bullets


def constrained_response(response: str) -> bool:
    """Contains one of "My answer is yes." / "... no." / "... maybe." (case-sensitive)."""
    text = response.strip()
    return any(option in text for option in CONSTRAINED_OPTIONS)


def count_highlights(response: str) -> int:
    """Non-blank *single* and **double** highlighted spans within one line, each counted
    once ("**a** *b*" has 2; in "**a**" the single pattern only finds two empty "**")."""
    single = re.findall(r"\*[^\n\*]*\*", response)
    double = re.findall(r"\*\*[^\n\*]*\*\*", response)
    return (sum(1 for h in single if h.strip("*").strip())
            + sum(1 for h in double if h.removeprefix("**").removesuffix("**").strip()))


def number_highlighted_sections(response: str, *, num_highlights: int) -> bool:
    return count_highlights(response) >= num_highlights


def multiple_sections(response: str, *, section_spliter: str, num_sections: int) -> bool:
    """At least `num_sections` markers "<spliter> <number>" (e.g. "SECTION 1"),
    case-sensitive; the text before the first marker is not a section."""
    pattern = r"\s?" + re.escape(section_spliter.strip()) + r"\s?\d+\s?"
    return len(re.split(pattern, response)) - 1 >= num_sections


def json_format(response: str) -> bool:
    """The whole answer parses as JSON, after removing a ```/```json code fence."""
    text = response.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):
        text = text.removeprefix(fence)
    text = text.removesuffix("```").strip()
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def title(response: str) -> bool:
    """A non-blank title in double angular brackets, <<like this>>, on one line."""
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", response))


# ------------------------------------------------------------------------------ combination

def two_responses(response: str) -> bool:
    """Exactly two different non-blank answers separated by "******"."""
    pieces = response.split("******")
    answers = []
    for index, piece in enumerate(pieces):
        if piece.strip():
            answers.append(piece.strip())
        elif index not in (0, len(pieces) - 1):
            return False
    return len(answers) == 2 and answers[0] != answers[1]


def repeat_prompt(response: str, *, prompt_to_repeat: str) -> bool:
    """The answer starts with the request, repeated word for word (case-insensitive)."""
    return response.strip().lower().startswith(prompt_to_repeat.strip().lower())


# ------------------------------------------------------------------------------ start / end

def end_checker(response: str, *, end_phrase: str) -> bool:
    """The answer (outer quotes removed) ends with `end_phrase`, case-insensitive."""
    return response.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def quotation(response: str) -> bool:
    """The whole answer is wrapped in double quotation marks."""
    text = response.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


# ------------------------------------------------------------------------------ case

def capital_word_frequency(response: str, *, capital_frequency: int,
                           capital_relation: str) -> bool:
    """All-capital word tokens ("I", "NASA") vs `capital_frequency`."""
    return compare(count_capital_words(response), capital_relation, capital_frequency)


def english_capital(response: str) -> bool:
    """All cased characters are upper case (so there is at least one), and the text is
    English. Case is tested first, as in the reference, so text without letters fails."""
    return response.isupper() and detect_language(response) == "en"


def english_lowercase(response: str) -> bool:
    """All cased characters are lower case (at least one), and the text is English."""
    return response.islower() and detect_language(response) == "en"


def no_comma(response: str) -> bool:
    return "," not in response


# ------------------------------------------------------------------------------ registry

# Kinds of kwargs values, each with its validator.
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_text(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())


KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "int": (_is_int, "a non-negative integer"),
    "position": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "text": (_is_text, "a non-empty string"),
    "texts": (lambda v: isinstance(v, list) and bool(v) and all(_is_text(x) for x in v),
              "a non-empty list of non-empty strings"),
    "relation": (lambda v: v in RELATIONS, "'less than' or 'at least'"),
    "letter": (lambda v: isinstance(v, str) and len(v.strip()) == 1, "a single character"),
    "language": (lambda v: v in LANGUAGES, f"an ISO 639-1 code among {sorted(LANGUAGES)}"),
}


@dataclass(frozen=True)
class Instruction:
    """One instruction id: its checker and the kwargs (name -> kind) it requires."""

    id: str
    check: Callable[..., bool]
    params: dict[str, str]


def _registry() -> dict[str, Instruction]:
    specs: list[tuple[str, Callable[..., bool], dict[str, str]]] = [
        ("keywords:existence", keywords_existence, {"keywords": "texts"}),
        ("keywords:frequency", keyword_frequency,
         {"keyword": "text", "frequency": "int", "relation": "relation"}),
        ("keywords:forbidden_words", forbidden_words, {"forbidden_words": "texts"}),
        ("keywords:letter_frequency", letter_frequency,
         {"letter": "letter", "let_frequency": "int", "let_relation": "relation"}),
        ("language:response_language", response_language, {"language": "language"}),
        ("length_constraints:number_sentences", number_sentences,
         {"num_sentences": "int", "relation": "relation"}),
        ("length_constraints:number_paragraphs", number_paragraphs, {"num_paragraphs": "int"}),
        ("length_constraints:number_words", number_words,
         {"num_words": "int", "relation": "relation"}),
        ("length_constraints:nth_paragraph_first_word", nth_paragraph_first_word,
         {"num_paragraphs": "int", "nth_paragraph": "position", "first_word": "text"}),
        ("detectable_content:number_placeholders", number_placeholders,
         {"num_placeholders": "int"}),
        ("detectable_content:postscript", postscript, {"postscript_marker": "text"}),
        ("detectable_format:number_bullet_lists", number_bullet_lists, {"num_bullets": "int"}),
        ("detectable_format:constrained_response", constrained_response, {}),
        ("detectable_format:number_highlighted_sections", number_highlighted_sections,
         {"num_highlights": "int"}),
        ("detectable_format:multiple_sections", multiple_sections,
         {"section_spliter": "text", "num_sections": "int"}),
        ("detectable_format:json_format", json_format, {}),
        ("detectable_format:title", title, {}),
        ("combination:two_responses", two_responses, {}),
        ("combination:repeat_prompt", repeat_prompt, {"prompt_to_repeat": "text"}),
        ("startend:end_checker", end_checker, {"end_phrase": "text"}),
        ("startend:quotation", quotation, {}),
        ("change_case:capital_word_frequency", capital_word_frequency,
         {"capital_frequency": "int", "capital_relation": "relation"}),
        ("change_case:english_capital", english_capital, {}),
        ("change_case:english_lowercase", english_lowercase, {}),
        ("punctuation:no_comma", no_comma, {}),
    ]
    return {i: Instruction(i, check, params) for i, check, params in specs}


INSTRUCTIONS: dict[str, Instruction] = _registry()


def validate_kwargs(instruction_id: str, kwargs: Any, where: str = "kwargs") -> dict[str, Any]:
    """The kwargs `instruction_id` needs, checked; None-valued keys are dropped first (the
    Hugging Face copy of IFEval lists every key with null for the unused ones).
    Unknown id, missing, unexpected or ill-typed kwargs -> ExnihiloError naming `where`."""
    spec = INSTRUCTIONS.get(instruction_id)
    if spec is None:
        raise ExnihiloError(f"{where}: unknown instruction id {instruction_id!r}")
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise ExnihiloError(f"{where}: {instruction_id}: kwargs must be an object, "
                            f"got {type(kwargs).__name__}")
    given = {k: v for k, v in kwargs.items() if v is not None}
    missing = [name for name in spec.params if name not in given]
    if missing:
        raise ExnihiloError(f"{where}: {instruction_id}: missing kwargs {', '.join(missing)}")
    extra = [name for name in given if name not in spec.params]
    if extra:
        raise ExnihiloError(f"{where}: {instruction_id}: unexpected kwargs {', '.join(extra)} "
                            f"(it takes: {', '.join(spec.params) or 'none'})")
    for name, kind in spec.params.items():
        ok, wanted = KINDS[kind]
        if not ok(given[name]):
            raise ExnihiloError(f"{where}: {instruction_id}: kwarg {name} must be {wanted}, "
                                f"got {given[name]!r}")
    return given


def check_instruction(instruction_id: str, kwargs: dict[str, Any] | None, response: str,
                      prompt: str | None = None) -> bool:
    """Whether `response` follows one instruction (strict: the response as given).

    A blank response follows nothing, as in the benchmark. `prompt` is accepted for
    instructions that would need it; none of the 25 does (repeat_prompt carries its text in
    kwargs["prompt_to_repeat"]). Bad id or kwargs -> ExnihiloError.
    """
    del prompt  # part of the signature so callers need not know which checks use it
    given = validate_kwargs(instruction_id, kwargs)
    if not response.strip():
        return False
    return bool(INSTRUCTIONS[instruction_id].check(response, **given))
