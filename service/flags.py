"""Command-line flags with environment twins, for the server, the command line and the HTTP shim.

A flag's default comes from its DRAGOMAN_* variable when that is set and not empty. The variable is
read by the flag's own type and checked against its choices, as a value on the command line would
be, and a value it cannot take stops the program with an error naming the variable (argparse does
not check defaults itself)."""
from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any


def env_flag(p: argparse.ArgumentParser, flag: str, var: str, *, default: Any, help: str,
             type: Callable[[str], Any] = str, choices: tuple[str, ...] | None = None,
             shown: str | None = None, env: Mapping[str, str] | None = None, **kwargs) -> None:
    """Adds `flag` to `p`, its default read from `var`; the help ends with the variable and the
    default (`shown`, else the default's value)."""
    env = os.environ if env is None else env
    text = env.get(var, "")
    if text != "":
        try:
            default = type(text)
        except (argparse.ArgumentTypeError, ValueError) as e:
            p.error(f"{var}: {e}")
        if choices is not None and default not in choices:
            p.error(f"{var}: {text!r} is not one of {', '.join(choices)}")
    if shown is None:
        shown = "off" if default is None or default == [] else (
            ",".join(default) if isinstance(default, list) else "%(default)s")
    p.add_argument(flag, type=type, choices=choices, default=default, help=f"{help} (env {var}; default {shown})",
                   **kwargs)


# ---- types: each names the value it cannot read, and what it takes ----------------------------------


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def positive_integer(text: str) -> int:
    v = integer(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return v


def number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def positive_number(text: str) -> float:
    v = number(text)
    if not 0 < v < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return v


def seconds_or_off(text: str) -> float:
    v = number(text)
    if not 0 <= v < math.inf:
        raise argparse.ArgumentTypeError(f"must be 0 (no limit) or a positive number of seconds, got {text!r}")
    return v


def size(text: str) -> int:
    """Bytes: 26214400, 25MB, 25MiB, 25M, 512k."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*", str(text).lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (give bytes, or a number with KB, MB or GB)")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2)]
    value = int(float(m.group(1)) * scale)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"the size must be positive, got {text!r}")
    return value
