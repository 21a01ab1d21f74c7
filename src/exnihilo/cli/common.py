"""Shared CLI pieces: error handling, engine options, the `models` command."""

from __future__ import annotations

import sys
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


def dtype_option() -> Any:
    return typer.Option("auto", "--dtype", help="auto (bfloat16 on a GPU that supports it, else "
                                                "float32), float32 or bfloat16 (local).")


def report_to_option() -> Any:
    return typer.Option(
        [], "--report-to", metavar="TRACKER",
        help="Send each step's metrics to an experiment tracker: tensorboard, trackio or "
        "wandb (repeatable or comma list; the package must be installed; wandb runs offline "
        "unless WANDB_MODE is set). Default: none (metrics.jsonl and `exnihilo report OUT` "
        "always work).")


def models_command() -> None:
    """List the models exnihilo can use right now, and where each comes from."""
    from exnihilo.models import cache_dir, list_models

    table = Table(title="models", show_lines=False)
    table.add_column("name", no_wrap=True)
    table.add_column("status", no_wrap=True)
    for col in ("where", "description"):
        table.add_column(col, overflow="fold")
    for row in list_models():
        table.add_row(row["name"], row["status"], row["where"], row["description"])
    console.print(table)
    console.print(f"cache: {cache_dir()}  ·  also accepted: any Hugging Face model folder or "
                  f".gguf file path")
