"""Data out: our records as Alpaca, ShareGPT, TRL JSON(L) or a parquet dataset folder.

Each format is what its tool reads without options:

- `alpaca`: `{"instruction", "input", "output"}` (+ `"system"` when the record has one, as
  LLaMA-Factory and axolotl's `alpaca` reader take it); preference records as
  `{"instruction", "input", "chosen", "rejected"}` (the LLMs-from-scratch layout). One turn
  only: a multi-turn record cannot be Alpaca and is an error naming it, never truncated.
- `sharegpt`: `{"conversations": [{"from", "value"}]}`; preference records add `"chosen"`
  and `"rejected"` as `{"from": "gpt", "value"}` (LLaMA-Factory's ranking layout).
- `trl`: TRL's conversational formats: preference → `{"prompt", "chosen", "rejected"}` as
  message lists; SFT data → `{"prompt", "completion"}` when every record is one exchange
  ending in the answer (TRL then trains on the completion, as `train sft` does), otherwise
  `{"messages"}` for the whole file (use TRL's `assistant_only_loss=True` to match us);
  prompt-only records → `{"prompt"}`.
- `parquet`: a folder a hub dataset repo would hold: `data/train-00000-of-00001.parquet`
  (the `trl` rows) and a dataset card `README.md` whose YAML header names the split files,
  so `load_dataset(FOLDER)` and `hf upload` take it as is.

Every row keeps its `id`; `meta` (our provenance, scores) is left out because its keys differ
from row to row, which columnar readers cannot hold. `.json` outputs are one JSON array (the
Alpaca convention), anything else JSON lines; both load with `load_dataset("json", ...)`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exnihilo import outputs
from exnihilo.errors import ExnihiloError
from exnihilo.records import Record, file_sha256, read_any

FORMATS = ("alpaca", "sharegpt", "trl", "parquet")
CARD_MARKER = "<!-- written by exnihilo export data -->"
PARQUET_FILE = "data/train-00000-of-00001.parquet"

_SHAREGPT_FROM = {"system": "system", "user": "human", "assistant": "gpt"}


@dataclass
class DataExport:
    path: Path
    format: str
    rows: int
    layout: str  # e.g. "prompt-completion", "messages", "preference"


# ------------------------------------------------------------------------- one record each

def _where(record: Record, index: int) -> str:
    return f"record {index + 1} (id {record.get('id', '?')})"


def _is_preference(record: Record) -> bool:
    return "chosen" in record and "rejected" in record


def _single_turn(record: Record, where: str, fmt: str) -> tuple[str | None, str, str | None]:
    """(system, user, answer) of a one-exchange record; anything longer is an error."""
    msgs = record["messages"]
    system = msgs[0]["content"] if msgs[0]["role"] == "system" else None
    rest = msgs[1:] if system is not None else msgs
    roles = [m["role"] for m in rest]
    if roles not in (["user"], ["user", "assistant"]):
        raise ExnihiloError(f"{where}: {fmt} holds one user turn and its answer; this record "
                            f"has turns {'/'.join(m['role'] for m in msgs)} (use --format "
                            f"sharegpt or trl)")
    return system, rest[0]["content"], rest[1]["content"] if len(rest) == 2 else None


def to_alpaca_row(record: Record, where: str) -> dict[str, Any]:
    system, user, answer = _single_turn(record, where, "alpaca")
    alpaca = (record.get("meta") or {}).get("alpaca") or {}
    if alpaca.get("instruction") and user == (alpaca["instruction"] if not alpaca.get("input")
                                              else f"{alpaca['instruction']}\n\n"
                                                   f"{alpaca['input']}"):
        row: dict[str, Any] = {"instruction": alpaca["instruction"],
                               "input": alpaca.get("input") or ""}
    else:
        row = {"instruction": user, "input": ""}
    if _is_preference(record):
        row["chosen"] = record["chosen"]["content"]
        row["rejected"] = record["rejected"]["content"]
    elif answer is None:
        raise ExnihiloError(f"{where}: has no answer; Alpaca needs an 'output' (use --format "
                            f"trl for prompts)")
    else:
        row["output"] = answer
    if system is not None:
        row["system"] = system
    return {"id": record["id"], **row}


def to_sharegpt_row(record: Record, where: str) -> dict[str, Any]:
    row: dict[str, Any] = {"id": record["id"], "conversations": [
        {"from": _SHAREGPT_FROM[m["role"]], "value": m["content"]} for m in record["messages"]]}
    if _is_preference(record):
        row["chosen"] = {"from": "gpt", "value": record["chosen"]["content"]}
        row["rejected"] = {"from": "gpt", "value": record["rejected"]["content"]}
    return row


def _messages(msgs: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def is_prompt_completion(record: Record) -> bool:
    """One answer, last: the record splits into TRL prompt + completion without loss."""
    roles = [m["role"] for m in record["messages"]]
    return roles[-1] == "assistant" and roles.count("assistant") == 1


def trl_layout(records: list[Record]) -> str:
    """One TRL layout for the whole file (a column set that changes row by row is not a
    dataset): preference, prompt-completion, messages or prompt-only."""
    kinds = {"preference" if _is_preference(r)
             else "prompt" if all(m["role"] != "assistant" for m in r["messages"])
             else "answered" for r in records}
    if len(kinds) > 1:
        raise ExnihiloError(f"the input mixes {' and '.join(sorted(kinds))} records; export "
                            f"them to separate files (TRL reads one layout per dataset)")
    kind = kinds.pop() if kinds else "answered"
    if kind == "answered":
        return "prompt-completion" if all(map(is_prompt_completion, records)) else "messages"
    return kind


def to_trl_row(record: Record, layout: str) -> dict[str, Any]:
    msgs = _messages(record["messages"])
    if layout == "preference":
        row = {"prompt": msgs, "chosen": _messages([record["chosen"]]),
               "rejected": _messages([record["rejected"]])}
    elif layout == "prompt-completion":
        row = {"prompt": msgs[:-1], "completion": msgs[-1:]}
    elif layout == "messages":
        row = {"messages": msgs}
    else:
        row = {"prompt": msgs}
    return {"id": record["id"], **row}


def convert(records: list[Record], fmt: str) -> tuple[list[dict[str, Any]], str]:
    """Records → rows of `fmt` (parquet uses the trl rows), and the layout's name."""
    if fmt not in FORMATS:
        raise ExnihiloError(f"unknown --format {fmt!r} (known: {', '.join(FORMATS)})")
    if fmt == "alpaca":
        return [to_alpaca_row(r, _where(r, i)) for i, r in enumerate(records)], "alpaca"
    if fmt == "sharegpt":
        return [to_sharegpt_row(r, _where(r, i)) for i, r in enumerate(records)], "sharegpt"
    layout = trl_layout(records)
    return [to_trl_row(r, layout) for r in records], layout


# ---------------------------------------------------------------------------------- writing

def write_json_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """A `.json` path gets one JSON array (Alpaca's own files are arrays), others JSON lines."""
    if path.suffix == ".json":
        outputs.write_text_atomic(path, json.dumps(rows, ensure_ascii=False, indent=1) + "\n")
    else:
        outputs.write_jsonl_atomic(path, rows)


def dataset_card(rows: int, layout: str, source: str, source_sha256: str) -> str:
    """A hub dataset card: YAML header (the split's files) and what the rows hold."""
    columns = {"preference": "`prompt`, `chosen`, `rejected` (lists of messages)",
               "prompt-completion": "`prompt`, `completion` (lists of messages)",
               "messages": "`messages` (a list of {role, content})",
               "prompt": "`prompt` (a list of messages)"}[layout]
    return (f"---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
            f"    path: {PARQUET_FILE}\ntask_categories:\n- text-generation\ntags:\n- exnihilo\n"
            f"- trl\n---\n{CARD_MARKER}\n\n# Dataset\n\n{rows} rows in TRL's conversational "
            f"{layout} format: columns `id`, {columns}.\n\nExported by `exnihilo export data "
            f"--format parquet` from `{source}` (sha256 {source_sha256}).\n\n```python\n"
            f"from datasets import load_dataset\nds = load_dataset(\"path/to/this/folder\", "
            f"split=\"train\")\n```\n")


def _check_folder_output(out: Path) -> None:
    """A folder output may be new, empty or an earlier export; anything else is the user's."""
    if out.exists() and not out.is_dir():
        raise ExnihiloError(f"{out}: exists and is not a folder; parquet export writes a "
                            f"dataset folder")
    if out.is_dir() and any(out.iterdir()):
        card = out / "README.md"
        if not (card.is_file() and CARD_MARKER in card.read_text(encoding="utf-8",
                                                                 errors="replace")):
            raise ExnihiloError(f"{out}: folder is not empty and not an earlier export; "
                                f"choose another -o (nothing was changed)")


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ExnihiloError("--format parquet needs pyarrow: pip install "
                            "'exnihilo[parquet]'") from None
    return pa, pq


def write_parquet_folder(out: Path, rows: list[dict[str, Any]], card: str) -> None:
    """Build the folder beside `out` and swap it in, so a failure leaves no half folder."""
    pa, pq = _pyarrow()
    _check_folder_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    old = None
    try:
        (tmp / PARQUET_FILE).parent.mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows), tmp / PARQUET_FILE)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / "x")
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def export_data(input_path: str | Path, out: str | Path, fmt: str) -> DataExport:
    """Read any supported input (`records.read_any`) and write it in `fmt` at `out`."""
    out = Path(out)
    if fmt not in FORMATS:
        raise ExnihiloError(f"unknown --format {fmt!r} (known: {', '.join(FORMATS)})")
    if fmt == "parquet":
        _pyarrow()  # a missing dependency fails before the input is read
        _check_folder_output(out)
    else:
        outputs.check_output(out, [input_path] if not str(input_path).startswith("hf:")
                             else [])
    records = read_any(input_path)
    if not records:
        raise ExnihiloError(f"{input_path}: no records (the file is empty)")
    rows, layout = convert(records, fmt)
    if fmt == "parquet":
        source_hash = ("" if str(input_path).startswith("hf:") else file_sha256(input_path))
        write_parquet_folder(out, rows, dataset_card(len(rows), layout, str(input_path),
                                                     source_hash or "n/a"))
    else:
        write_json_rows(out, rows)
    return DataExport(out, fmt, len(rows), layout)
