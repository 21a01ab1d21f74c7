"""Moved to `exnihilo.fields` (shared by curation, reports and synthesis); kept importable."""

from exnihilo.fields import instruction_of, response_of, set_tags, tags_of  # noqa: F401
