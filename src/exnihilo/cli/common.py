"""Shared CLI pieces: error handling, engine options, the `models` command."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from exnihilo.assemble import build_engine, check_engine  # noqa: F401  (re-exported)
from exnihilo.errors import ExnihiloError

# markup=False: file names, rules and generated text are data, never terminal markup
# (a "[/x]" in a record must not crash the print, a "[link=…]" must not vanish).
console = Console(markup=False)
err_console = Console(stderr=True, markup=False)

# Set by the root `--json` option: each command's summary goes to stdout as one JSON object
# and the human-readable tables and lines are off (warnings and progress stay on stderr).
JSON_OUTPUT = False


def set_json_output(on: bool) -> None:
    """`exnihilo --json …`: summaries as JSON on stdout, nothing else there."""
    global JSON_OUTPUT
    JSON_OUTPUT = on
    if on:
        console.quiet = True


def emit(summary: Any, show: Callable[[], None] | None = None) -> None:
    """A command's final summary: `show()` prints it for people; under `--json` it is one
    JSON object on stdout instead (dataclasses, paths and NaN made JSON-safe, as in
    results.json). Without `show`, the summary is printed as a two-column table."""
    if JSON_OUTPUT:
        import json

        from exnihilo.results import json_safe

        sys.stdout.write(json.dumps(json_safe(summary), ensure_ascii=False) + "\n")
        sys.stdout.flush()
        return
    if show is not None:
        show()
        return
    table = Table(show_header=False)
    for key, value in (summary.items() if isinstance(summary, dict) else []):
        table.add_row(str(key), "-" if value is None else str(value))
    console.print(table)


def run_app(app: typer.Typer, args: list[str] | None = None) -> None:
    """Run the typer app and turn every way it can end into an exit status:

    0 done · 2 a user error (`error:` line: bad option, bad input, unwritable output) ·
    130 interrupted (Ctrl-C; what was written is kept) · 1 a bug (one summary line and the
    path of a file holding the full traceback; EXNIHILO_DEBUG=1 shows it instead).
    """
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError

    try:
        rv = app(args=args, standalone_mode=False)
    except KeyboardInterrupt:
        rv = 130
    except ExnihiloError as e:
        fail(str(e))
    except NoArgsIsHelpError as e:
        e.show()
        sys.exit(2)
    except UsageError as e:
        where = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
        fail(f"{e.format_message()}{where}")
    except ClickException as e:
        fail(e.format_message())
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        rv = 130
    except OSError as e:  # full disk, permissions, a file vanishing: the user's to fix
        name = f"{e.filename}: " if e.filename else ""
        fail(f"{name}{e.strerror or e}")
    except Exception as e:
        from pydantic import ValidationError

        if isinstance(e, ValidationError):
            first = e.errors()[0]
            field = ".".join(str(p) for p in first["loc"]).replace("_", "-")
            fail(f"invalid setting {field}: {first['msg']}")
        crash(e)
    if rv == 130:  # typer turns KeyboardInterrupt into a returned 130 (standalone_mode=False)
        err_console.print("interrupted: what was written so far is kept; rerun the same "
                          "command to resume (`train` runs: add --resume)", markup=False,
                          highlight=False)
        sys.exit(130)
    if isinstance(rv, int) and rv != 0:
        sys.exit(rv)
    # Success returns normally: a notebook or a test calling run_app keeps running.


def fail(message: str) -> NoReturn:
    """Print `error: message` (never parsed as markup) and exit with status 2."""
    err_console.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False,
                      soft_wrap=True)
    sys.exit(2)


def crash(e: BaseException) -> NoReturn:
    """An unexpected exception: one line, the full traceback in a file; exit status 1."""
    import os
    import tempfile
    import traceback

    if os.environ.get("EXNIHILO_DEBUG"):
        raise e
    text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    try:
        fd, path = tempfile.mkstemp(prefix="exnihilo-traceback-", suffix=".txt")
        with open(fd, "w", encoding="utf-8") as f:
            f.write(text)
        where = f"full traceback in {path}"
    except OSError:
        where = "no traceback file could be written; rerun with EXNIHILO_DEBUG=1"
    summary = f"{type(e).__name__}: {e}".splitlines()[0][:300] if str(e) else type(e).__name__
    err_console.print(Text.assemble(("internal error:", "bold red"), f" {summary} ({where}; "
                                    f"please report it)"), highlight=False, soft_wrap=True)
    sys.exit(1)


# Options shared by every command that generates or judges text.
ENGINE_HELP = ("Engine: 'transformers' (local, default), 'llamacpp' (local, llama.cpp "
               "in-process; pip install 'exnihilo[llamacpp]') or 'openai' (any "
               "OpenAI-compatible server).")
MODEL_HELP = ("Model: an embedded name (see `exnihilo models`), a Hugging Face folder, or a "
              ".gguf file; with --engine openai, the server's model name.")


def engine_option() -> Any:
    return typer.Option("transformers", "--engine", help=ENGINE_HELP)


def base_url_option() -> Any:
    return typer.Option([], "--base-url", help="OpenAI-compatible server URL (repeatable).")


def concurrency_option() -> Any:
    return typer.Option(8, "--concurrency", help="Requests in flight (openai).")


def train_dtype_option(frozen_bf16: bool = True) -> Any:
    """`--dtype` of a training command; `frozen_bf16` False for DPO, which keeps float32."""
    cpu = ("and, on a CPU with native bf16 (AVX512-BF16/AMX), the frozen weights (LoRA's "
           "base model) multiplied in bfloat16, about 1.5x faster per LoRA step; float32: "
           "every product in float32." if frozen_bf16 else
           "float32 on the CPU (bf16 base products would put rounding into the policy vs "
           "reference margin).")
    return typer.Option("auto", "--dtype", help=(
        "auto, float32 or bfloat16 (the weights'). auto: float32 weights, with bfloat16 "
        "autocast on a GPU that supports it " + cpu))


def dtype_option() -> Any:
    return typer.Option("auto", "--dtype", help=(
        "auto, float32 or bfloat16 (local engine). auto: bfloat16 on a GPU that supports it; "
        "on a CPU with native bf16 (AVX512-BF16/AMX) float32 weights, with sampled decoding "
        "in a bfloat16 copy (about 2x faster; greedy and log-probs stay float32); else "
        "float32."))


def decode_rows_option() -> Any:
    return typer.Option(None, "--batch-size", min=1,
                        help="Rows decoded together (local engine). Default: as many as a "
                             "quarter of the free memory holds for the KV cache, up to 128; "
                             "llama.cpp: 32.")


def report_to_option() -> Any:
    return typer.Option(
        [], "--report-to", metavar="TRACKER",
        help="Send each step's metrics to an experiment tracker: tensorboard, trackio or "
        "wandb (repeatable or comma list; the package must be installed; wandb runs offline "
        "unless WANDB_MODE is set). Default: none (metrics.jsonl and `exnihilo report OUT` "
        "always work).")


# One spelling per concept (checked over the whole command tree by a test):
# the data a command reads is its first positional argument; -o/--out names its output;
# -m/--model the model it runs or trains; -j/--judge the model that judges. Old spellings
# stay working as hidden options (`deprecated_option`), so existing scripts keep running.


def input_argument(help: str, metavar: str = "DATA") -> Any:
    """The data a command reads, given positionally (optional here so that the deprecated
    option spelling can stand in; `pick_input` makes exactly one of them required)."""
    return typer.Argument(None, help=help, metavar=metavar, show_default=False)


def deprecated_option(*names: str) -> Any:
    """An old spelling of an option or argument, still accepted, hidden from --help."""
    return typer.Option(None, *names, hidden=True)


def pick_input(value: Any, old: Any, name: str, old_name: str) -> Any:
    """The positional `value` or its deprecated spelling `old`: exactly one must be given;
    the old one works (and raises a hidden DeprecationWarning)."""
    if value is not None and old is not None:
        raise ExnihiloError(f"{name} given twice: positionally and as {old_name}; give it once")
    if value is None and old is None:
        raise ExnihiloError(f"missing argument {name} (see --help)")
    if old is not None:
        deprecated(old_name, f"give {name} as the first argument")
        return old
    return value


def deprecated(old_name: str, instead: str) -> None:
    """Flag an old spelling as a DeprecationWarning: hidden by default (existing scripts,
    their logs and their one-line errors stay as they were), shown with
    PYTHONWARNINGS=default."""
    import warnings

    warnings.warn(f"{old_name} is deprecated: {instead}", DeprecationWarning, stacklevel=3)


def models_command() -> None:
    """List the models exnihilo can use right now, and where each comes from."""
    from exnihilo.models import cache_dir, list_models

    rows = list_models()

    def show() -> None:
        table = Table(title="models", show_lines=False)
        table.add_column("name", no_wrap=True)
        table.add_column("status", no_wrap=True)
        for col in ("where", "description"):
            table.add_column(col, overflow="fold")
        for row in rows:
            table.add_row(row["name"], row["status"], row["where"], row["description"])
        console.print(table)
        console.print(f"cache: {cache_dir()}  ·  also accepted: any Hugging Face model folder "
                      f"or .gguf file path")
    emit({"models": rows, "cache": str(cache_dir())}, show)
