"""Option defaults from a TOML configuration file, shared by ``tpmsigner`` and ``tpmsigner-agent``.

Each program reads ``$XDG_CONFIG_HOME/PROGRAM/config.toml`` (``~/.config``
when ``XDG_CONFIG_HOME`` is unset), or the file given with ``--config``.
Top-level keys set the program's global options, and one table per
subcommand (``[serve]``, ``[run]``, ``[cert.add]`` for a nested one) sets
that subcommand's options.  A key is the option's long name without the
leading ``--`` and with ``_`` for ``-``: ``approval_timeout`` for
``--approval-timeout``.  The values become the parser's defaults, so an
option given on the command line wins over the file.

The keys are derived from the argparse parsers themselves, so an option
added later can be set in the file without changes here.  Options that
confirm one action or read a PIN (``--yes``, ``--replace``, ``--pin-file``)
are left out on purpose: they must be given on each command line.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .errors import ConfigError

CONFIG_FILE_NAME = "config.toml"

# Option destinations that a configuration file must not set.  A standing
# --yes or --replace would silently skip the confirmation or the pinning
# check they exist for, and a PIN file in a configuration would keep a PIN
# on disk next to it for every command.
NOT_CONFIGURABLE = frozenset({"help", "version", "config", "yes", "replace", "pin_file", "new_pin_file"})

# What _convert returns for a flag set to false: keep the parser's default.
_LEAVE_DEFAULT = object()


@dataclass(frozen=True)
class ConfigOption:
    """One option that a configuration file can set: its key, its action, and its parser."""

    key: str
    action: argparse.Action
    parser: argparse.ArgumentParser


def default_config_path(program: str) -> Path:
    """Return ``$XDG_CONFIG_HOME/PROGRAM/config.toml``, with ``~/.config`` when the variable is unset or empty."""
    config_home = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(config_home) / program / CONFIG_FILE_NAME


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--config PATH`` to a program's top-level parser."""
    parser.add_argument(
        "--config",
        metavar="PATH",
        help=f"read option defaults from this TOML file (default: $XDG_CONFIG_HOME/{parser.prog}/{CONFIG_FILE_NAME}, "
        f"else ~/.config/{parser.prog}/{CONFIG_FILE_NAME}; a missing default file is skipped)",
    )


def parse_args_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Add ``--config`` to ``parser``, then parse ``argv`` with the configuration file's values as defaults.

    A configuration error ends the program as an invalid option does: one
    line on stderr and exit status 2.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    add_config_option(parser)
    try:
        named = find_config_argument(parser, argv)
        path = Path(named) if named is not None else default_config_path(parser.prog)
        values = read_config(path, explicit=named is not None)
        if values is not None:
            apply_config(parser, values, path)
    except ConfigError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    return parser.parse_args(argv)


def find_config_argument(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """Return the value of ``--config`` among the global options in ``argv``, or None.

    The file must be read before argparse parses ``argv``, because its values
    become the defaults of that parse.  ``--config`` is a global option, so
    only the arguments before the subcommand are scanned.  argparse itself
    rejects a ``--config`` after the subcommand as an unknown option.
    """
    takes_value = {name for action in parser._actions if action.nargs != 0 for name in action.option_strings}
    names = set(subcommands(parser))
    index = 0
    while index < len(argv):
        argument = argv[index]
        if argument == "--" or argument in names:
            return None
        if argument.startswith("--config="):
            value = argument.removeprefix("--config=")
        elif argument == "--config" and index + 1 < len(argv):
            value = argv[index + 1]
        elif argument in takes_value:
            index += 2
            continue
        else:
            index += 1
            continue
        if not value:
            raise ConfigError("--config needs a file name")
        return value
    return None


def read_config(path: Path, explicit: bool) -> dict[str, Any] | None:
    """Return the parsed TOML file, or None when the default file does not exist."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"configuration file {path} not found") from None
        return None
    except IsADirectoryError:
        raise ConfigError(f"cannot read configuration file {path}: it is a directory") from None
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def configurable_options(parser: argparse.ArgumentParser) -> dict[str, ConfigOption]:
    """Return the options of ``parser`` itself (not its subcommands) that a file can set, by key."""
    options: dict[str, ConfigOption] = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in NOT_CONFIGURABLE or action.dest == argparse.SUPPRESS:
            continue
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
            continue
        long_names = [name for name in action.option_strings if name.startswith("--")]
        if not long_names:
            continue
        key = long_names[0][2:].replace("-", "_")
        options[key] = ConfigOption(key, action, parser)
    return options


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Return the subcommand parsers of ``parser`` by name, aliases left out."""
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen: set[int] = set()
            for name, subparser in action.choices.items():
                if id(subparser) not in seen:
                    seen.add(id(subparser))
                    found[name] = subparser
    return found


def apply_config(parser: argparse.ArgumentParser, values: dict[str, Any], path: Path) -> None:
    """Set the defaults of ``parser`` and its subcommands from ``values``, a parsed configuration file."""
    _apply_table(parser, values, path, table=())


def _apply_table(parser: argparse.ArgumentParser, values: dict[str, Any], path: Path, table: tuple[str, ...]) -> None:
    options = configurable_options(parser)
    children = subcommands(parser)
    for key, value in values.items():
        where = _where(path, table, key)
        if key in children:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: expected a table [{'.'.join((*table, key))}] of options, not {_kind(value)}")
            _apply_table(children[key], value, path, (*table, key))
        elif key in options:
            _apply_option(options[key], value, where)
        else:
            raise ConfigError(f"{where}: {_unknown_key_message(parser, key, options, children)}")


def _apply_option(option: ConfigOption, value: Any, where: str) -> None:
    action = option.action
    converted = _convert(action, value, where)
    if converted is _LEAVE_DEFAULT:
        return
    option.parser.set_defaults(**{action.dest: converted})

    # A required option is satisfied by the file: argparse checks only
    # whether a required option was seen, so it must stop being required.
    action.required = False


def _convert(action: argparse.Action, value: Any, where: str) -> Any:
    """Check ``value`` against what the option takes on the command line, and convert it."""
    if isinstance(action, argparse.BooleanOptionalAction):
        return _expect_bool(value, where)
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction)):
        # A flag: true means "as if given".  false leaves the built-in default.
        return action.const if _expect_bool(value, where) else _LEAVE_DEFAULT
    if isinstance(action, argparse._CountAction):
        if isinstance(value, bool):
            return int(value)
        if not isinstance(value, int) or value < 0:
            raise ConfigError(f"{where}: expected true, false or a count of 0 or more, not {_kind(value)}")
        return value
    if isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+") or isinstance(action.nargs, int):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, e.g. [\"...\"], not {_kind(value)}")
        return [_convert_one(action, item, where) for item in value]
    if type(action) is argparse._StoreAction:
        return _convert_one(action, value, where)
    raise ConfigError(f"{where}: this option cannot be set in a configuration file")


def _convert_one(action: argparse.Action, value: Any, where: str) -> Any:
    if action.type is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, not {_kind(value)}")
        converted: Any = value
    elif action.type is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, not {_kind(value)}")
        converted = float(value)
    else:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, not {_kind(value)}")
        # A shell expands ~ on the command line; do the same for the file.
        converted = os.path.expanduser(value) if value.startswith("~/") or value == "~" else value
        if action.type is not None and action.type is not str:
            try:
                converted = action.type(converted)
            except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
                raise ConfigError(f"{where}: invalid value {value!r}: {exc}") from None
    if action.choices is not None and converted not in action.choices:
        choices = ", ".join(repr(choice) for choice in action.choices)
        raise ConfigError(f"{where}: invalid value {value!r}; choose from {choices}")
    return converted


def _expect_bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, not {_kind(value)}")
    return value


def _unknown_key_message(
    parser: argparse.ArgumentParser,
    key: str,
    options: dict[str, ConfigOption],
    children: dict[str, argparse.ArgumentParser],
) -> str:
    normalized = key.replace("-", "_")
    if normalized in options:
        return f"unknown key {key!r}; write option names with '_', as in {normalized!r}"
    if any(normalized == action.dest for action in parser._actions if action.dest in NOT_CONFIGURABLE):
        return (
            f"{key!r} cannot be set in a configuration file: confirmations and PIN files are given "
            "on the command line each time"
        )
    known = sorted(options) + sorted(children)
    close = difflib.get_close_matches(normalized, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    choices = ", ".join(known) if known else "none"
    return f"unknown key {key!r}{hint} (keys here: {choices})"


def _where(path: Path, table: tuple[str, ...], key: str) -> str:
    return f"{path}: [{'.'.join(table)}] {key}" if table else f"{path}: {key}"


def _kind(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a table"}
    return f"{names.get(type(value), type(value).__name__)} ({value!r})"
