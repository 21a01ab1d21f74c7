"""The tag vocabulary: the labels judges choose from and reports and filters read. Shared by
curation, the report and likelihood judging, so none of them imports another to get it."""

from __future__ import annotations

QUALITY_LEVELS = ("very poor", "poor", "average", "good", "excellent")
DIFFICULTY_LEVELS = ("very easy", "easy", "medium", "hard", "very hard")
# Magpie's taxonomy (arXiv 2406.08464), with short names.
CATEGORIES = ("coding", "math", "reasoning", "information seeking", "creative writing", "advice",
              "editing", "brainstorming", "role playing", "data analysis", "planning", "others")
# Spellings judges use for the same category; keys are already normalised.
CATEGORY_ALIASES = {
    "coding & debugging": "coding", "coding and debugging": "coding", "code": "coding",
    "programming": "coding", "debugging": "coding", "maths": "math", "mathematics": "math",
    "advice seeking": "advice", "roleplay": "role playing", "role play": "role playing",
    "roleplaying": "role playing", "information": "information seeking",
    "info seeking": "information seeking", "other": "others", "data": "data analysis",
    "creative": "creative writing", "plan": "planning",
}
INPUT_TAGS = ("quality", "difficulty", "category")
