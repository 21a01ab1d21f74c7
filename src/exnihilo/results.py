"""One machine-readable results file per eval and curate run, in the spirit of lm-eval's.

Every `exnihilo eval …` and `exnihilo curate …` run that writes an output also writes
`.exnihilo/<OUT>.results.json` beside it:

    {"schema": "exnihilo.results/1", "command": "eval judge", "created": "2026-…Z",
     "config": {every option as given}, "inputs": [{"path", "sha256", "bytes"}],
     "output": "…", "templates": {"judge_prompt": "<sha256[:16]>", "chat_template": …},
     "versions": {"exnihilo", "python", "torch", "transformers", …}, "metrics": {…}}

`templates` holds hashes of the prompt texts the numbers depend on (lm-eval records its
chat template's hash for the same reason: a changed template is a different benchmark).
Metrics are the command's own summary made JSON-safe: dataclasses become objects, tuples
lists, NaN and infinities null (strict JSON readers reject them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from exnihilo import outputs
from exnihilo.records import file_sha256

SCHEMA = "exnihilo.results/1"
REQUIRED_KEYS = ("schema", "command", "created", "config", "inputs", "output", "templates",
                 "versions", "metrics")
VERSIONED = ("exnihilo", "torch", "transformers", "peft", "huggingface-hub")


def results_path(out: str | Path) -> Path:
    """`<dir>/.exnihilo/<OUT name>.results.json`, in the output's side-file folder."""
    return outputs.side_file(out, "results.json")


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def versions() -> dict[str, str | None]:
    """Installed versions of what the numbers depend on (None when not installed)."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def model_template_hash(model: str | None) -> str | None:
    """Hash of a local model's chat template, read from its folder without loading it;
    None for a model that is not a local folder (a server's, or an unresolvable name)."""
    if not model:
        return None
    try:
        from exnihilo.models import resolve_model

        folder = resolve_model(model)
    except Exception:  # a server-side model name or a missing model: nothing to hash
        return None
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return text_hash(jinja.read_text(encoding="utf-8"))
    config = folder / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, str):
            return text_hash(template)
    return None


def json_safe(value: Any) -> Any:
    """A summary (dicts, dataclasses, tuples, paths, floats) → strict-JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return json_safe(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [json_safe(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if hasattr(value, "item"):  # numpy / torch scalars
        return json_safe(value.item())
    return str(value)


def current_cli_config() -> dict[str, Any]:
    """The options of the running CLI command as parsed (empty outside the CLI)."""
    try:
        from typer._click.globals import get_current_context
    except ImportError:  # typer without its vendored click: plain click
        from click import get_current_context
    ctx = get_current_context(silent=True)
    return dict(ctx.params) if ctx is not None else {}


def build_results(command: str, metrics: Any, *, output: str | Path | None,
                  inputs: list[str | Path] | tuple = (), config: dict[str, Any] | None = None,
                  templates: dict[str, str | None] | None = None) -> dict[str, Any]:
    """The results object (see the module docstring); `templates` maps names to hashes."""
    described = []
    for path in inputs:
        if path is None:
            continue
        p = Path(path)
        entry: dict[str, Any] = {"path": str(p)}
        if p.is_file():
            entry.update(sha256=file_sha256(p), bytes=p.stat().st_size)
        described.append(entry)
    return {
        "schema": SCHEMA,
        "command": command,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "config": json_safe(config if config is not None else current_cli_config()),
        "inputs": described,
        "output": str(output) if output is not None else None,
        "templates": json_safe(templates or {}),
        "versions": versions(),
        "metrics": json_safe(metrics),
    }


def write_results(out: str | Path, command: str, metrics: Any, *,
                  inputs: list[str | Path] | tuple = (), config: dict[str, Any] | None = None,
                  templates: dict[str, str | None] | None = None) -> Path:
    """Write `.exnihilo/<OUT>.results.json` atomically beside the output `out`; returns its path."""
    path = results_path(out)
    results = build_results(command, metrics, output=out, inputs=inputs, config=config,
                            templates=templates)
    outputs.write_text_atomic(path, json.dumps(results, ensure_ascii=False, indent=1,
                                               allow_nan=False) + "\n")
    return path


PROBE = [{"role": "user", "content": "{question}"}]


def prompt_hash(kind: str) -> str:
    """Hash of a judge prompt, rendered on placeholder texts so any change to its wording
    changes the hash: kind is judge, pairwise or tag."""
    if kind == "judge":
        from exnihilo.evaluate.judging import judge_prompt

        return text_hash(judge_prompt(PROBE, "{answer}", "{reference}"))
    if kind == "pairwise":
        from exnihilo.evaluate.judging import pairwise_prompt

        return text_hash(pairwise_prompt(PROBE, "{first}", "{second}", "{reference}"))
    if kind == "tag":
        from exnihilo.curate.tags import input_prompt, response_prompt

        return text_hash(json.dumps([input_prompt("{question}"),
                                     response_prompt("{question}", "{answer}")]))
    raise ValueError(f"unknown prompt kind {kind!r}")
