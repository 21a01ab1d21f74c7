"""A small declarative filter language over tags and lengths.

One rule is `FIELD OP VALUE[ | VALUE ...]`; a record is kept when it passes every rule.

    quality>=good                 difficulty>=medium       category==coding | math
    category!=math                score>=50                turns==1
    min_neighbor_distance>0.05    instruction_words>=5     response_chars<2000
    response ends_with "." | "!" | "?"       instruction !contains "as an AI"
    language==en

Fields and the operators each takes:
  quality, difficulty      ordered levels (very poor < poor < average < good < excellent;
                           very easy < … < very hard): == != < <= > >=
  category                 one of the tag categories: == !=
  score, min_neighbor_distance, instruction_words, instruction_chars, response_words,
  response_chars, turns    numbers: == != < <= > >=
  instruction, response    text: ends_with starts_with contains, negated with a leading "!"
                           (ends_with ignores trailing whitespace)
  language                 the instruction's ISO 639-1 code (py3langid): == !=

Several values joined by `|` mean "any of" (for `!=` and negated text operators: "none of").
A tag that is present but null (the judge's answer was unreadable) fails the rule. A record
that lacks the field altogether (not tagged at all, or no response) is an error by default,
naming the rule and how many records lack it; `on_missing="drop"` / `"keep"` decides instead.

Hand-written rather than a general expression library: the language is a handful of
comparisons, and the errors we want (unknown level name, a caret under the bad token, which
rule lacks which field) are specific to it.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from exnihilo.curate.fields import instruction_of, response_of, tags_of
from exnihilo.curate.tags import (
    CATEGORIES,
    CATEGORY_ALIASES,
    DIFFICULTY_LEVELS,
    QUALITY_LEVELS,
    normalise_label,
)
from exnihilo.errors import ExnihiloError
from exnihilo.records import Record

MISSING = object()  # a record lacks the field a rule names

LEVEL_FIELDS = {"quality": QUALITY_LEVELS, "difficulty": DIFFICULTY_LEVELS}
TAG_NUMBER_FIELDS = ("score", "min_neighbor_distance")
LENGTH_FIELDS = ("instruction_words", "instruction_chars", "response_words", "response_chars",
                 "turns")
TEXT_FIELDS = ("instruction", "response")
FIELDS = (*LEVEL_FIELDS, "category", *TAG_NUMBER_FIELDS, *LENGTH_FIELDS, *TEXT_FIELDS,
          "language")

COMPARISONS: dict[str, Callable[[Any, Any], bool]] = {
    ">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne,
    ">": operator.gt, "<": operator.lt,
}
TEXT_OPS = ("ends_with", "starts_with", "contains")
EQUALITY = ("==", "!=")


# ----------------------------------------------------------------------------------- parsing

class FilterSyntaxError(ExnihiloError):
    """A rule that does not parse; the message shows the rule with a caret under the token."""

    def __init__(self, rule: str, position: int, problem: str):
        self.rule, self.position, self.problem = rule, position, problem
        super().__init__(f"filter {rule!r}: {problem} at column {position + 1}\n"
                         f"    {rule}\n    {' ' * position}^")


@dataclass
class Rule:
    text: str
    field: str
    op: str
    values: list[Any]

    def test(self, record: Record) -> bool | None | object:
        """True/False, None for a null tag, MISSING when the record lacks the field."""
        value = field_value(record, self.field)
        if value is MISSING or value is None:
            return value
        if self.op in COMPARISONS:
            if self.field in LEVEL_FIELDS:
                levels = LEVEL_FIELDS[self.field]
                if value not in levels:
                    return None  # a stored tag that is not a level name reads as unparseable
                value = levels.index(value)
            elif self.field in TAG_NUMBER_FIELDS and (
                    isinstance(value, bool) or not isinstance(value, int | float)):
                return None  # a stored "high" where a number belongs reads as unparseable
            if self.op == "!=":
                return all(value != v for v in self.values)
            if self.op == "==":
                return any(value == v for v in self.values)
            return COMPARISONS[self.op](value, self.values[0])
        if not isinstance(value, str):
            return None  # a text test on a stored non-text tag: unreadable, not a crash
        negate = self.op.startswith("!")
        name = self.op.lstrip("!")
        text = value.rstrip() if name == "ends_with" else value
        method = {"ends_with": str.endswith, "starts_with": str.startswith,
                  "contains": str.__contains__}[name]
        hit = any(method(text, v) for v in self.values)
        return not hit if negate else hit


_TOKEN_OPS = ("!ends_with", "!starts_with", "!contains", *TEXT_OPS, ">=", "<=", "==", "!=",
              "=", ">", "<")
_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BARE_VALUE = re.compile(r"[A-Za-z0-9_.+\-&]+(?: +[A-Za-z0-9_.+\-&]+)*")


def _skip_spaces(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def _read_quoted(text: str, i: int) -> tuple[str, int]:
    quote, i, out = text[i], i + 1, []
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            out.append({"n": "\n", "t": "\t"}.get(text[i + 1], text[i + 1]))
            i += 2
            continue
        if ch == quote:
            return "".join(out), i + 1
        out.append(ch)
        i += 1
    raise FilterSyntaxError(text, i, f"unterminated {quote} string")


def _read_values(text: str, i: int) -> list[tuple[str, int]]:
    """VALUE (| VALUE)* up to the end of the rule; each with its start column."""
    values = []
    while True:
        i = _skip_spaces(text, i)
        if i >= len(text):
            raise FilterSyntaxError(text, i, "expected a value")
        start = i
        if text[i] in "\"'":
            value, i = _read_quoted(text, i)
        else:
            match = _BARE_VALUE.match(text, i)
            if not match:
                raise FilterSyntaxError(text, i, f"expected a value, got {text[i]!r}")
            value, i = match.group(0), match.end()
        values.append((value, start))
        i = _skip_spaces(text, i)
        if i >= len(text):
            return values
        if text[i] != "|":
            raise FilterSyntaxError(text, i, f"unexpected {text[i:]!r} (join values with |)")
        i += 1


def parse_rule(text: str) -> Rule:
    """Parse one rule, checking field names, operators and values against the field's kind."""
    i = _skip_spaces(text, 0)
    match = _FIELD.match(text, i)
    if not match:
        raise FilterSyntaxError(text, i, "expected a field name")
    name, field_at = match.group(0), i
    if name not in FIELDS:
        raise FilterSyntaxError(text, field_at, f"unknown field {name!r} (known: "
                                f"{', '.join(FIELDS)})")
    i = _skip_spaces(text, match.end())
    op = next((o for o in _TOKEN_OPS if text.startswith(o, i)), None)
    if op is None or (op[-1].isalpha() and i + len(op) < len(text)
                      and (text[i + len(op)].isalnum() or text[i + len(op)] == "_")):
        raise FilterSyntaxError(text, i, "expected an operator (>= <= == != > < ends_with "
                                         "starts_with contains)")
    raw_values = _read_values(text, i + len(op))
    op_at, op = i, ("==" if op == "=" else op)
    return Rule(text.strip(), name, op, _check_values(text, name, op, op_at, raw_values))


def _check_values(text: str, name: str, op: str, op_at: int,
                  raw_values: list[tuple[str, int]]) -> list[Any]:
    text_op = op.lstrip("!") in TEXT_OPS
    if name in TEXT_FIELDS:
        if not text_op:
            raise FilterSyntaxError(text, op_at, f"{name} takes ends_with, starts_with or "
                                                 f"contains (or !ends_with …), not {op}")
        return [v for v, _ in raw_values]
    if text_op:
        raise FilterSyntaxError(text, op_at, f"{op} applies to instruction or response, "
                                             f"not {name}")
    if len(raw_values) > 1 and op not in EQUALITY:
        raise FilterSyntaxError(text, raw_values[1][1], f"several values need == or !=, not {op}")
    if name in ("category", "language") and op not in EQUALITY:
        raise FilterSyntaxError(text, op_at, f"{name} takes == or !=, not {op}")
    values: list[Any] = []
    for value, at in raw_values:
        if name in LEVEL_FIELDS:
            levels = LEVEL_FIELDS[name]
            key = normalise_label(value)
            if key not in levels:
                raise FilterSyntaxError(text, at, f"unknown {name} level {value!r} (levels: "
                                                  f"{' < '.join(levels)})")
            values.append(levels.index(key))
        elif name == "category":
            key = normalise_label(value)
            key = CATEGORY_ALIASES.get(key, key)
            if key not in CATEGORIES:
                raise FilterSyntaxError(text, at, f"unknown category {value!r} (known: "
                                                  f"{', '.join(CATEGORIES)})")
            values.append(key)
        elif name == "language":
            if not re.fullmatch(r"[A-Za-z]{2,3}", value):
                raise FilterSyntaxError(text, at, f"language takes an ISO 639-1 code like "
                                                  f"en, got {value!r}")
            values.append(value.lower())
        else:
            try:
                values.append(float(value))
            except ValueError:
                raise FilterSyntaxError(text, at, f"{name} takes a number, got "
                                                  f"{value!r}") from None
    return values


# ----------------------------------------------------------------------------------- fields

def field_value(record: Record, name: str) -> Any:
    if name in LEVEL_FIELDS or name == "category" or name in TAG_NUMBER_FIELDS:
        tags = tags_of(record)
        return tags.get(name, MISSING)
    if name == "turns":
        return sum(1 for m in record.get("messages") or [] if m.get("role") == "user")
    if name == "language":
        text = instruction_of(record)
        return MISSING if text is None else detect_language(text)
    side, _, unit = name.partition("_")
    text = instruction_of(record) if side == "instruction" else response_of(record)
    if text is None:
        return MISSING
    if unit == "words":
        return len(text.split())
    if unit == "chars":
        return len(text)
    return text


_LANGUAGE_CACHE: dict[str, str] = {}


def detect_language(text: str) -> str:
    """ISO 639-1 code of `text` by py3langid (offline, ~0.3 ms per text here)."""
    try:
        import py3langid
    except ImportError:
        raise ExnihiloError("language filters need py3langid: pip install py3langid") from None
    if text not in _LANGUAGE_CACHE:
        _LANGUAGE_CACHE[text] = py3langid.classify(text)[0]
    return _LANGUAGE_CACHE[text]


# ----------------------------------------------------------------------------------- apply

@dataclass
class RuleReport:
    rule: str
    failed: int = 0    # records failing this rule on their own (null tags included)
    removed: int = 0   # records this rule removed, applying rules in the given order
    null: int = 0      # records whose tag is null (an unreadable judge answer)
    missing: int = 0   # records without the field


@dataclass
class FilterReport:
    input_records: int = 0
    output_records: int = 0
    rules: list[RuleReport] = field(default_factory=list)


def apply_filters(records: Sequence[Record], rules: Sequence[str | Rule],
                  on_missing: str = "error") -> tuple[list[Record], FilterReport]:
    """Keep the records passing every rule; report what each rule removed."""
    if on_missing not in ("error", "drop", "keep"):
        raise ExnihiloError(f"on_missing {on_missing!r}: expected error, drop or keep")
    parsed = [r if isinstance(r, Rule) else parse_rule(r) for r in rules]
    report = FilterReport(input_records=len(records),
                          rules=[RuleReport(rule.text) for rule in parsed])
    outcomes = [[rule.test(record) for rule in parsed] for record in records]
    for j, rule_report in enumerate(report.rules):
        column = [row[j] for row in outcomes]
        rule_report.missing = sum(1 for o in column if o is MISSING)
        rule_report.null = sum(1 for o in column if o is None)
        rule_report.failed = sum(1 for o in column if o is not True and o is not MISSING)
        if rule_report.missing and on_missing == "error":
            raise ExnihiloError(
                f"filter {rule_report.rule!r}: {rule_report.missing} of {len(records)} records "
                f"have no {parsed[j].field!r} {_what_is_missing(parsed[j].field)}; "
                f"use --missing drop or --missing keep to decide for them")
    kept = []
    for record, row in zip(records, outcomes, strict=True):
        for j, outcome in enumerate(row):
            passes = outcome is True or (outcome is MISSING and on_missing == "keep")
            if not passes:
                report.rules[j].removed += 1
                break
        else:
            kept.append(record)
    report.output_records = len(kept)
    return kept, report


def _what_is_missing(name: str) -> str:
    if name in LEVEL_FIELDS or name == "category" or name == "score":
        return "tag (run `exnihilo curate tag` first)"
    if name == "min_neighbor_distance":
        return "tag (run `exnihilo curate dedup` first)"
    return "text (no response in the record)" if name.startswith("response") else "value"
