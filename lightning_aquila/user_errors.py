"""User errors as one line: which file or field, and what is wrong with it.

A newcomer's typo should not arrive as an 86-line parser dump or a 40-line traceback. The CLI
prints :func:`one_line` of an error that :func:`is_user_error` accepts and keeps the full text
and traceback for ``--verbose`` (:data:`VERBOSE`). Light on purpose: imported by the
dispatcher before anything heavy.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

#: Set by ``lightning-aquila --verbose``: print errors in full.
VERBOSE = False

#: Exceptions that report bad input (a config, a path, data), not a bug: shown as one line.
#: ``DataError`` is a ``ValueError``; the names are for classes we do not import here.
_USER_ERROR_NAMES = frozenset({"ArgumentError", "MisconfigurationException", "YAMLError",
                               "DataError", "EngineOrderError"})

#: How jsonargparse reports a value no type of a union accepted, e.g. a callback whose
#: constructor raised: the constructor's own message is one of its nested "- " lines.
_UNION = re.compile(r"\s*Does not validate against any of the Union subtypes")

#: jsonargparse's explanatory lines, which wrap the cause rather than state it.
_BOILERPLATE = re.compile(
    r"^\s*(- )?(Does not validate against any of the Union subtypes|Subtypes:|Errors:|"
    r"Given value( type)?:|Expected a <class 'NoneType'>|Not a valid subclass of|"
    r"Subclass types expect one of:|- a class path|- a dict with|- a dict without|"
    r"Problem with given class_path|Parser key)")


class ConfigFileError(ValueError):
    """A config file that does not exist or is not valid YAML."""


def is_user_error(error: BaseException) -> bool:
    if isinstance(error, (ValueError, FileNotFoundError, NotADirectoryError, PermissionError,
                          IsADirectoryError)):
        return True
    return any(cls.__name__ in _USER_ERROR_NAMES for cls in type(error).__mro__)


def one_line(error: BaseException) -> str:
    """The error's message on one line; a parser dump is reduced to its cause."""
    text = str(error).strip()
    if "\n" in text and ("Parser key" in text or "Problem with given class_path" in text
                         or _UNION.match(text)):
        return summarise_parser_message(text)
    return " ".join(text.split()) or type(error).__name__


def summarise_parser_message(message: str) -> str:
    """``field: cause`` from jsonargparse's nested report: the chain of ``Parser key`` names
    (the field), the class paths it tried, and the most deeply nested explanatory line (the
    cause, e.g. ``module 'x' has no attribute 'Y'``)."""
    keys = re.findall(r'Parser key "([^"]+)"', message)
    classes = re.findall(r"Problem with given class_path '([^']+)'", message)
    best, depth = "", -1
    for line in message.splitlines():
        stripped = line.strip()
        if not stripped or _BOILERPLATE.match(line) or stripped.startswith("- Key "):
            continue
        indent = len(line) - len(line.lstrip())
        if indent > depth:
            best, depth = stripped, indent
    first = message.splitlines()[0].strip()
    cause = best.removeprefix("- ") or first
    field = ".".join(keys)
    where = f"config field {field!r}" if field else ""
    if classes:
        where += f"{' ' if where else ''}(class_path {classes[-1]!r})"
    cause = cause.rstrip(":")
    return f"{where}: {cause}" if where else cause


def config_paths(words: Sequence[str]) -> list[str]:
    """The files given as ``--config PATH``, ``-c PATH`` or ``--config=PATH``."""
    paths = []
    for i, word in enumerate(words):
        if word in ("-c", "--config") and i + 1 < len(words):
            paths.append(words[i + 1])
        elif word.startswith("--config="):
            paths.append(word.split("=", 1)[1])
    return paths


def check_config_files(words: Sequence[str]) -> None:
    """Read every ``--config`` file as YAML first, so a missing file or a syntax error names
    the file, line and column (the parser's own message names neither the file nor, for an
    indentation error, the cause)."""
    import yaml

    for path in config_paths(words):
        file = Path(path)
        if not file.is_file():
            raise ConfigFileError(f"config file {path} does not exist")
        try:
            yaml.safe_load(file.read_text(encoding="utf-8"))
        except yaml.MarkedYAMLError as error:
            mark = error.problem_mark or error.context_mark
            at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            problem = error.problem or error.context or "not valid YAML"
            raise ConfigFileError(f"config file {path}: {at}{problem} (check the indentation "
                                  "of that line and the one above)") from error
        except yaml.YAMLError as error:
            raise ConfigFileError(f"config file {path}: not valid YAML: {error}") from error
