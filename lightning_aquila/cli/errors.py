"""User errors as one line: which file or field, and what is wrong with it.

A newcomer's typo should not arrive as an 86-line parser dump or a 40-line traceback. The CLI
prints :func:`one_line` of an error that :func:`is_user_error` accepts and keeps the full text
and traceback for ``--verbose`` (:data:`VERBOSE`). Light on purpose: imported by the
dispatcher before anything heavy.
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

from lightning_aquila.cli.commands import TRAINER_COMMANDS

#: Set by ``lightning-aquila --verbose``: print errors in full.
VERBOSE = False
#: The command's words (set by the dispatcher): where a typo's ``--config`` files are.
WORDS: list[str] = []

#: Exceptions that report bad input (a config, a path, data), not a bug: shown as one line.
#: ``DataError`` is a ``ValueError``; the names are for classes we do not import here.
_USER_ERROR_NAMES = frozenset({"ArgumentError", "MisconfigurationException", "YAMLError",
                               "DataError", "EngineOrderError"})

#: The two facts a jsonargparse report states only in its text: the field it was parsing
#: and the class it tried. Each is the first line of one link of the exception chain.
_FIELD = re.compile(r'^Parser key "([^"]+)"')
_CLASS = re.compile(r"^Problem with given class_path '([^']+)'")
#: The option a parser refused: from a config (a subcommand's or a group's), or on the
#: command line.
_REFUSED_KEY = re.compile(r"(?:Subcommand '[\w-]+'|Group '([\w.-]+)') does not accept option "
                          r"'([^']+)'")
_REFUSED_FLAG = re.compile(r"[Uu]nrecognized arguments: --([^\s=]+)")
_SUBCOMMAND = re.compile(r"Subcommand '([\w-]+)'")
#: How a DataLoader worker's exception reaches the main process: the same class, rebuilt with
#: the worker's whole traceback as its message (``torch.utils.data``'s ``ExceptionWrapper``),
#: whose end is ``<module>.<class>: <the worker's message>``.
_WORKER = re.compile(r"\ACaught (\w+) in DataLoader worker process \d+\.\nOriginal Traceback")


class ConfigFileError(ValueError):
    """A config file that does not exist or is not valid YAML."""


class OneLineErrors:
    """Mixin for a jsonargparse ``ArgumentParser``: a parse error is printed as one line
    (:func:`one_line`; an unknown option as :func:`unknown_option`, as the dispatcher's check
    before the parser prints it) with a hint, and the full report only with ``--verbose``."""

    def error(self, message: str, ex: Exception | None = None) -> None:
        if not self.exit_on_error or VERBOSE:  # type: ignore[attr-defined]
            super().error(message, ex)  # type: ignore[misc]
        prog = self.prog.replace(" [options]", "")  # type: ignore[attr-defined]
        text = one_line(ex if ex is not None else ValueError(message))
        sub = _SUBCOMMAND.search(text)
        command = sub.group(1) if sub else WORDS[0] if WORDS else None
        if " " not in prog and command in TRAINER_COMMANDS:  # LightningCLI's root parser
            prog = f"{prog} {command}"
        text = refused_option_text(text, self) or text
        print(usage_error(prog, text), file=sys.stderr)
        self.exit(2)  # type: ignore[attr-defined]


def usage_error(prog: str, text: str) -> str:
    """The two lines of a command-line error: what is wrong, and where to look."""
    return (f"{prog}: error: {text}\n"
            f"(`{prog} --help` lists the flags; --verbose shows the full message)")


def unknown_option(name: str, close: str | None, file: str | None = None, *,
                   flag: bool | None = None) -> str:
    """``unknown option --trainer.max_step; did you mean --trainer.max_steps?`` for a flag,
    ``unknown option 'trainer.max_step' (set in x.yaml); did you mean 'trainer.max_steps'?``
    for a config key (``flag`` defaults to "no file given")."""
    flag = file is None if flag is None else flag
    show = (lambda n: f"--{n}") if flag else repr
    where = f" (set in {file})" if file else ""
    fix = f"; did you mean {show(close)}?" if close and close != name else ""
    return f"unknown option {show(name)}{where}{fix}"


def closest(name: str, names: Sequence[str]) -> str | None:
    """The option of ``names`` closest to ``name``, if one is close (not the forms that only
    jsonargparse's machinery uses: ``--a+`` appends, ``--a.help`` prints a class's help)."""
    names = [n for n in names if not n.endswith(("+", ".help"))]
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.7)
    return close[0] if close else None


def option_names(parser: Any) -> list[str]:
    """Every ``--a.b`` option of ``parser`` and of its subcommands' parsers, as ``a.b``."""
    names = [o[2:] for o in getattr(parser, "_option_string_actions", {}) if o.startswith("--")]
    subcommands = getattr(parser, "_subcommands_action", None)
    for sub in getattr(subcommands, "_name_parser_map", {}).values():
        names += option_names(sub)
    return names


def refused_option_text(message: str, parser: Any) -> str | None:
    """:func:`unknown_option` of the option a parser's ``message`` says it refused: the
    closest option it knows, and the ``--config`` file that set a refused key (the parser's
    own message names neither); ``None`` for another message."""
    key, flag = _REFUSED_KEY.search(message), _REFUSED_FLAG.search(message)
    if key is None and flag is None:
        return None
    if key is not None:
        name = f"{key.group(1)}.{key.group(2)}" if key.group(1) else key.group(2)
        file = config_file_setting(name, config_paths(WORDS))
        return unknown_option(name, closest(name, option_names(parser)), file, flag=False)
    name = flag.group(1)  # type: ignore[union-attr]
    return unknown_option(name, closest(name, option_names(parser)), flag=True)


def config_file_setting(key: str, paths: Sequence[str]) -> str | None:
    """The last of ``paths`` (YAML files) that sets the dotted ``key``."""
    import yaml

    found = None
    for path in paths:
        try:
            node: Any = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue
        for part in key.split("."):
            node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
        if node is not _MISSING:
            found = path
    return found


_MISSING = object()


def is_user_error(error: BaseException) -> bool:
    if isinstance(error, (ValueError, FileNotFoundError, NotADirectoryError, PermissionError,
                          IsADirectoryError)):
        return True
    return any(cls.__name__ in _USER_ERROR_NAMES for cls in type(error).__mro__)


def one_line(error: BaseException) -> str:
    """The error's message on one line. A jsonargparse report (each level of the config it
    descended raised ``from`` the error below) becomes ``config field 'a.b' (class_path 'C'):
    cause``, the cause being the message of the innermost error, raised by the code that
    refused the value (a constructor, an import)."""
    chain = [error]
    while _raised_by_jsonargparse(chain[-1]) and chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    if len(chain) == 1:
        return " ".join(worker_message(str(error)).split()) or type(error).__name__
    # (a link that re-raises the one below with the same message adds nothing)
    firsts = [str(link).strip().split("\n", 1)[0] for link, below in pairwise(chain)
              if str(link) != str(below)]
    field = ".".join(m.group(1) for m in map(_FIELD.match, firsts) if m)
    classes = [m.group(1) for m in map(_CLASS.match, firsts) if m]
    where = f"config field {field!r}" if field else ""
    if classes:
        where += f"{' ' if where else ''}(class_path {classes[-1]!r})"
    cause = " ".join(str(chain[-1]).split()).rstrip(":") or type(chain[-1]).__name__
    return f"{where}: {cause}" if where else cause


def worker_message(text: str) -> str:
    """The worker's own message when ``text`` is the message of an error a DataLoader worker
    raised (a ``DataError`` naming a damaged chunk, ``StorageUnavailable``); else ``text``."""
    worker = _WORKER.match(text)
    if worker is None:
        return text
    ends = list(re.finditer(rf"^(?:[\w.]+\.)?{worker.group(1)}: ", text, re.M))
    return text[ends[-1].end():] if ends else text


def _raised_by_jsonargparse(error: BaseException) -> bool:
    """Whether the innermost frame ``error`` was raised in belongs to jsonargparse."""
    frame = error.__traceback__
    if frame is None:
        return False
    while frame.tb_next is not None:
        frame = frame.tb_next
    return str(frame.tb_frame.f_globals.get("__name__", "")).startswith("jsonargparse")


def config_paths(words: Sequence[str]) -> list[str]:
    """The files given as ``--config PATH``, ``-c PATH`` or ``--config=PATH``."""
    paths = []
    for i, word in enumerate(words):
        if word in ("-c", "--config") and i + 1 < len(words):
            paths.append(words[i + 1])
        elif word.startswith("--config="):
            paths.append(word.split("=", 1)[1])
    return paths


def check_config_files(words: Sequence[str]) -> dict[str, Any]:
    """Read every ``--config`` file as YAML first, so a missing file or a syntax error names
    the file, line and column (the parser's own message names neither the file nor, for an
    indentation error, the cause). Returns what each file holds, by path, for the typo check
    (``known_options.refusal``), which then reads no file again."""
    import yaml

    read: dict[str, Any] = {}
    for path in config_paths(words):
        file = Path(path)
        if not file.is_file():
            raise ConfigFileError(f"config file {path} does not exist")
        try:
            read[path] = yaml.safe_load(file.read_text(encoding="utf-8"))
        except yaml.MarkedYAMLError as error:
            mark = error.problem_mark or error.context_mark
            at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            problem = error.problem or error.context or "not valid YAML"
            raise ConfigFileError(f"config file {path}: {at}{problem} (check the indentation "
                                  "of that line and the one above)") from error
        except yaml.YAMLError as error:
            raise ConfigFileError(f"config file {path}: not valid YAML: {error}") from error
    return read
