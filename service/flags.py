"""Command-line flags with environment twins, for the server, the command line and the HTTP shim.

A flag's default comes from its DRAGOMAN_* variable when that is set and not empty. The variable is
read by the flag's own type and checked against its choices, as a value on the command line would
be (argparse checks neither for a default). A value the flag cannot take stops the program with an
error naming the variable, once the command line is parsed (`check_environment`), and only when
the flag belongs to the command being run and was not given on the command line.
"""
from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Unreadable:
    """The default of a flag whose variable holds a value the flag cannot take."""
    var: str
    reason: str  # the value, and what is wrong with it

    def __str__(self) -> str:
        return f"{self.reason} (from {self.var})"


def env_flag(p: argparse.ArgumentParser, flag: str, var: str, *, default: Any, help: str,
             type: Callable[[str], Any] = str, choices: tuple[str, ...] | None = None,
             shown: str | None = None, secret: bool = False, env: Mapping[str, str] | None = None,
             **kwargs) -> None:
    """Adds `flag` to `p`, its default read from `var`. The help ends with the variable and the
    default: `shown` while the variable is unset, else the value; "set" or "off" for a secret."""
    env = os.environ if env is None else env
    text = env.get(var, "")
    if text != "":
        try:
            default = type(text)
            if choices is not None and default not in choices:
                raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(choices)}")
        except (argparse.ArgumentTypeError, ValueError) as e:
            default = Unreadable(var, str(e))
        shown = None
    if secret:
        shown = "set" if text else "off"
    elif shown is None:
        if default is None or default == []:
            shown = "off"
        elif isinstance(default, list):
            shown = ",".join(default).replace("%", "%%")  # argparse formats the help with %
        else:
            shown = "%(default)s"
    p.add_argument(flag, type=type, choices=choices, default=default, help=f"{help} (env {var}; default {shown})",
                   **kwargs)


def check_environment(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Stops with an error naming each variable that gave a flag of the command run, not given
    on the command line, a value the flag cannot take."""
    bad = [v for v in vars(args).values() if isinstance(v, Unreadable)]
    if bad:
        parser.error("; ".join(f"{v.var}={v.reason}" for v in bad))


# ---- types: each says which value it cannot read, and what it takes ----------------------------------


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def positive_integer(text: str) -> int:
    v = integer(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return v


def port(text: str) -> int:
    v = integer(text)
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0 to 65535; 0 picks a free one)")
    return v


def number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def positive_number(text: str) -> float:
    v = number(text)
    if not 0 < v < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return v


def seconds(text: str) -> float:
    v = number(text)
    if not 0 <= v < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} is not 0 or a positive number of seconds")
    return v


def size(text: str) -> int:
    """Bytes: 26214400, 25MB, 25MiB, 25M, 512k."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*", str(text).lower())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (give bytes, or a number with KB, MB or GB)")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2)]
    value = int(float(m.group(1)) * scale)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive size")
    return value
