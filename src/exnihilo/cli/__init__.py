"""The command line. Only this package knows about flags, exit codes and terminal output;
every command is a thin shell over a library function.

Each verb group lives in its own module (synth, train, evaluate, curate, report) and is
registered here.
"""

from __future__ import annotations

from pathlib import Path

import typer

from exnihilo.cli import common, synth

app = typer.Typer(
    name="exnihilo",
    help="Make small language models better starting from nothing: synthesize instruction "
         "data (Magpie, documents), curate it, train (SFT, DPO, …), evaluate and report.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish)
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"exnihilo {version('exnihilo')}")
        raise typer.Exit()


@app.callback()
def root(ctx: typer.Context,
         threads: int = typer.Option(
        None, "--threads", envvar="EXNIHILO_THREADS", show_envvar=True,
        help="CPU threads for torch (every command). On a loaded machine 1 can be several "
             "times faster than the default of one per core."),
         device: str = typer.Option(
        None, "--device", envvar="EXNIHILO_DEVICE", show_envvar=True,
        help="Where local models run (every command): auto (CUDA, else MPS, else CPU), cpu, "
             "cuda[:N] or mps. [default: auto]"),
         version: bool = typer.Option(False, "--version", is_eager=True,
                                      callback=_print_version,
                                      help="Print the version and exit."),
         config: Path = typer.Option(None, "--config", envvar="EXNIHILO_CONFIG",
                                     help="YAML file of options by command (train: {sft: "
                                          "{epochs: 2}}); flags given override it."),
         print_config: bool = typer.Option(False, "--print-config",
                                           help="Print the command's merged options (file + "
                                                "flags + defaults) as a --config file and "
                                                "exit without running it."),
         allow_download: bool = typer.Option(False, "--allow-download",
                                             help="Let --model org/name download from the "
                                                  "Hugging Face hub when it is not in the "
                                                  "local cache (safetensors only)."),
         quiet: bool = typer.Option(False, "--quiet", "-q",
                                    help="Print only errors (tables, notes and progress "
                                         "bars off); files are written as usual."),
         json_output: bool = typer.Option(False, "--json",
                                          help="Print the command's summary as one JSON "
                                               "object on stdout (tables and notes off; "
                                               "warnings and progress stay on stderr).")
         ) -> None:
    """Make small language models better starting from nothing."""
    import os

    from exnihilo.cli.config import apply
    from exnihilo.devices import set_default_device
    from exnihilo.models import allow_downloads
    from exnihilo.threads import apply_threads

    common.console.quiet = quiet  # (each run in one process, e.g. a notebook, sets it anew)
    if quiet:
        os.environ["EXNIHILO_QUIET"] = os.environ["EXNIHILO_NO_PROGRESS"] = "1"
    common.set_json_output(json_output)
    apply_threads(threads)
    set_default_device(device)  # an unavailable --device fails here, before any model loads
    apply(ctx, config, print_config)
    if allow_download:
        allow_downloads()


app.add_typer(synth.app, name="synth")
app.command("models")(common.models_command)


def _register_optional() -> None:
    """Verb groups that land with later work register themselves if present."""
    import importlib

    for module, name in (("train", "train"), ("evaluate", "eval"), ("curate", "curate"),
                         ("export", "export")):
        try:
            mod = importlib.import_module(f"exnihilo.cli.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"exnihilo.cli.{module}":
                raise
            continue
        app.add_typer(mod.app, name=name)
    for module, command in (("report", "report"), ("generate", "generate"),
                            ("demo", "demo"), ("merge", "merge"), ("merge", "warp")):
        try:
            mod = importlib.import_module(f"exnihilo.cli.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"exnihilo.cli.{module}":
                raise
            continue
        app.command(command)(getattr(mod, f"{command}_command"))


_register_optional()


def _register_commands() -> None:
    """Commands that live in their own modules but belong to a verb group."""
    from exnihilo.cli import evaluate, ifeval, preference, pretrain, train

    evaluate.app.command("ifeval")(ifeval.ifeval_command)
    train.app.command("dpo")(preference.dpo_command)
    train.app.command("dice")(preference.dice_command)
    train.app.command("reward")(preference.reward_command)
    synth.app.command("pairs")(preference.synth_pairs_command)
    synth.app.command("constraints")(preference.synth_constraints_command)
    train.app.command("pretrain")(pretrain.pretrain_command)
    train.app.command("distill")(pretrain.distill_command)
    app.command("prune")(pretrain.prune_command)


_register_commands()


def main() -> None:
    from exnihilo.models import offline_by_default

    offline_by_default()  # the CLI never reaches a hub unless asked; a library import never
    common.run_app(app)
