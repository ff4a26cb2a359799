"""Command-line flags kept in a YAML file: `kvloom serve --config FILE` reads one, `kvloom tune --output`
writes one.

A flag file is a YAML mapping of long flag names without their dashes to values:

    model: /models/smollm2.gguf
    page-size: 8
    chunk-size: 128
    no-prefix-cache: true

`flags_to_argv` turns such a mapping into argv: `true` gives the bare flag, `false` and `null` leave it
out, anything else gives `--name value`. `expand_config_argv` puts a `--config` file's flags in front of
the command line's own, so flags given on the command line win (argparse keeps the last value).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import yaml


class FlagFileError(ValueError):
    """A flag file that cannot be read; the message names the file and the entry."""


def flags_to_argv(flags: Mapping[str, object]) -> list[str]:
    argv: list[str] = []
    for name, value in flags.items():
        if value is None or value is False:
            continue
        flag = "--" + str(name).replace("_", "-")
        argv.extend([flag] if value is True else [flag, str(value)])
    return argv


def read_yaml(path: str):
    """The YAML document in `path`; FlagFileError naming the file when it cannot be read or parsed."""
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except OSError as exc:
        raise FlagFileError(f"{path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise FlagFileError(f"{path}: not YAML: {exc}") from None


def load_flag_file(path: str) -> dict:
    data = read_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FlagFileError(f"{path}: expected a mapping of flag names to values")
    for name, value in data.items():
        if not isinstance(name, str) or name.startswith("-"):
            raise FlagFileError(f"{path}: {name!r}: write flag names without dashes, e.g. page-size")
        if isinstance(value, (list, dict)):
            raise FlagFileError(f"{path}: {name}: expected one value, got {type(value).__name__}")
    return data


def write_flag_file(path: str, flags: Mapping[str, object], comment: str = "") -> None:
    text = "".join(f"# {line}\n" for line in comment.splitlines())
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + yaml.safe_dump(dict(flags), sort_keys=False))


def expand_config_argv(argv: Sequence[str], command: str = "serve") -> list[str]:
    """`COMMAND ... --config FILE ...` -> `COMMAND <the file's flags> ...` (the command line's flags
    follow the file's, so they override them); any other argv is returned as is."""
    argv = list(argv)
    if not argv or argv[0] != command:
        return argv
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            path, rest = argv[i + 1], argv[1:i] + argv[i + 2:]
        elif arg.startswith("--config="):
            path, rest = arg.split("=", 1)[1], argv[1:i] + argv[i + 1:]
        else:
            continue
        return [command, *flags_to_argv(load_flag_file(path)), *rest]
    return argv
