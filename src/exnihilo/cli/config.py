"""`exnihilo --config FILE.yaml …` and `exnihilo --print-config …`: options from a file.

The file mirrors the command tree; keys are option names (dashes or underscores):

    train:
      sft:
        data: data/kept.jsonl
        out: runs/sft
        epochs: 2
        lr: 1.0e-4
    curate:
      filter:
        where: ["quality>=good"]

It becomes click's `default_map`, so each value is the option's default for that run:
flags given on the command line override the file, and the file overrides the built-in
defaults, which therefore still live in one place (the command's signature). Keys are
checked against the command tree first, so a misspelt option is an error naming the file
and the key, never silently ignored. `--print-config` prints the merged options of the
command instead of running it, in the same layout, so its output is a valid `--config` file.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from exnihilo.errors import ExnihiloError


def load_config(path: str | Path) -> dict[str, Any]:
    """The YAML file as a dict; a missing file or bad YAML is a one-line error."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ExnihiloError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ExnihiloError(f"--config {where}: not valid YAML "
                            f"({getattr(e, 'problem', None) or e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ExnihiloError(f"--config {path}: expected a mapping of commands to options, got "
                            f"{type(data).__name__}")
    return data


def _key(name: Any) -> str:
    return str(name).replace("-", "_")


def to_default_map(tree: dict[str, Any], command: Any, file: str, where: str = ""
                   ) -> dict[str, Any]:
    """Check `tree` against the click command tree and normalise its keys (dashes →
    underscores for options); an unknown command or option is an error."""
    out: dict[str, Any] = {}
    subcommands = getattr(command, "commands", None)
    if subcommands is not None:
        for name, value in tree.items():
            if str(name) not in subcommands:
                raise ExnihiloError(f"--config {file}: unknown command '{where}{name}' "
                                    f"(known: {', '.join(sorted(subcommands))})")
            if not isinstance(value, dict):
                kind = "commands" if hasattr(subcommands[name], "commands") else "options"
                raise ExnihiloError(f"--config {file}: '{where}{name}' must be a mapping of "
                                    f"{kind}")
            out[str(name)] = to_default_map(value, subcommands[name], file, f"{where}{name}.")
        return out
    params = {p.name: p for p in command.params if p.name and not p.hidden}
    for name, value in tree.items():
        key = _key(name)
        if key not in params:
            raise ExnihiloError(f"--config {file}: '{where[:-1]}' has no option '{name}' "
                                f"(known: {', '.join(sorted(params))})")
        out[key] = value
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _printer(path: list[str], order: list[str]) -> Any:
    """A leaf command's replacement callback: print its merged options as a config file,
    in the command's own option order. A value given by a deprecated spelling (a hidden
    `<name>_option`, e.g. `--data` for the positional DATA) is printed under `<name>`."""
    def print_config(**params: Any) -> None:
        import yaml

        for name, value in list(params.items()):
            base = name.removesuffix("_option")
            if base != name and base in params and value is not None:
                params[base] = value

        tree: dict[str, Any] = {k: _plain(params[k]) for k in order if k in params}
        for name in reversed(path):
            tree = {name: tree}
        sys.stdout.write(yaml.safe_dump(tree, sort_keys=False, allow_unicode=True))
    return print_config


def print_instead(command: Any, path: list[str]) -> None:
    """Make every leaf under `command` print its options instead of running. The click
    objects are built afresh for each invocation by typer, so this changes only this run."""
    subcommands = getattr(command, "commands", None)
    if subcommands is None:
        command.callback = _printer(path, [p.name for p in command.params
                                           if p.name and not getattr(p, "hidden", False)])
        return
    for name, sub in subcommands.items():
        print_instead(sub, [*path, name])


def apply(ctx: Any, config: Path | None, print_config: bool) -> None:
    """The root callback's part: install the file as defaults; arm --print-config."""
    if config is not None:
        tree = load_config(config)
        ctx.default_map = to_default_map(tree, ctx.command, str(config))
    if print_config and ctx.invoked_subcommand:
        name = ctx.invoked_subcommand
        print_instead(ctx.command.commands[name], [name])
