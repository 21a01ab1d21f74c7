"""IFEval: verifiable instruction following (Zhou et al. 2023, arXiv 2311.07911).

25 checkers with the benchmark's semantics (`checkers`), offline word/sentence/language
counting (`text`), and strict/loose scoring with bootstrap summaries (`score`). The
checkers are plain functions, so other code (preference pairs, rewards) can import them.
"""

from exnihilo.ifeval.checkers import INSTRUCTIONS, check_instruction, validate_kwargs
from exnihilo.ifeval.score import (
    DEFAULT_INPUT,
    Prompt,
    check_same_prompts,
    evaluate_responses,
    follow_list,
    loose_variants,
    match_responses,
    paired_difference,
    read_inputs,
    read_responses,
    read_results,
    score_response,
    summarize,
    write_results,
)

__all__ = [
    "DEFAULT_INPUT", "INSTRUCTIONS", "Prompt", "check_instruction", "check_same_prompts",
    "evaluate_responses", "follow_list", "loose_variants", "match_responses",
    "paired_difference", "read_inputs", "read_responses", "read_results", "score_response",
    "summarize", "validate_kwargs", "write_results",
]
