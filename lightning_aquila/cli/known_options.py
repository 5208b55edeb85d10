"""A flag or config-key typo of ``fit`` refused before Lightning is imported.

LightningCLI parses the trainer commands, and importing it (torch, Lightning, torchmetrics)
takes 4-6 s on a loaded 2-core machine: too long to wait for "no such option". So the first
time a trainer command's parser is built (``fit --help``, or any ``fit``), its option names
are kept beside the help text (``help_cache``: same key, so a new version of the code or of
torch, Lightning or jsonargparse forgets them), and after that the dispatcher checks the
command line's flags and the keys of its ``--config`` files against them before it imports
anything heavy.

Only what is certainly wrong is refused; the rest is left to the full parser:

- a name below an option whose value is open (``--data.init_args.*`` of the class the data
  names, ``--trainer.callbacks.init_args.*``, a ``dict`` such as ``model.config``) passes;
  only a name below a closed group (``trainer``, ``model``, the command itself) is judged;
- a config mapping that names a ``class_path`` (or ``init_args``, ``dict_kwargs``) is not
  looked into;
- a command line asking for help (``--help``, ``--data.help``) is not checked at all;
- without the cache (the first run, ``LIGHTNING_AQUILA_NO_CACHE=1``) nothing is checked.

Nothing here imports more than the standard library (the YAML is read by ``errors``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_aquila.cli import help_cache

#: Keys of a config mapping that make it a class with arguments: not looked into.
_CLASS_KEYS = frozenset({"class_path", "init_args", "dict_kwargs", "__path__"})


@dataclass(frozen=True)
class KnownOptions:
    """A trainer command's option names (``trainer.max_steps``, ``data``, ...; no dashes) and
    which of them are closed groups (``trainer``, ``model``: only their own options below)."""

    options: frozenset[str]
    groups: frozenset[str]

    def unknown(self, name: str) -> bool:
        """Whether the dotted ``name`` is certainly no option: not one, and not below one
        that takes keys of its own (the nearest option above it is a closed group, or there
        is none: the command itself is closed)."""
        if name in self.options:
            return False
        parts = name.split(".")
        for end in range(len(parts) - 1, 0, -1):
            above = ".".join(parts[:end])
            if above in self.options:
                return above in self.groups
        return True

    def closest(self, name: str) -> str | None:
        from lightning_aquila.cli.errors import closest

        return closest(name, sorted(self.options))


def of_parser(parser: Any) -> KnownOptions:
    """The options of a jsonargparse parser (a trainer command's)."""
    try:
        from jsonargparse._actions import _ActionConfigLoad as group_action
    except ImportError:  # another jsonargparse: no group is known to be closed, so no name
        group_action = None  # below one is refused
    options, groups = set(), set()
    for flag, action in parser._option_string_actions.items():
        if not flag.startswith("--"):
            continue
        options.add(flag[2:])
        if group_action is not None and isinstance(action, group_action):
            groups.add(flag[2:])
    return KnownOptions(frozenset(options), frozenset(groups))


def remember(parser: Any) -> None:
    """Keep the options of each subcommand of LightningCLI's ``parser`` unless they are kept
    already (a file per command, written whole; one that cannot be written is no error)."""
    subcommands = getattr(parser, "_subcommands_action", None)
    for command, sub in getattr(subcommands, "_name_parser_map", {}).items():
        path = help_cache.cache_path(command, "options", "json")
        if path is None or path.exists():
            continue
        known = of_parser(sub)
        help_cache.write_cache(path, json.dumps({"options": sorted(known.options),
                                                 "groups": sorted(known.groups)}))


def kept(command: str) -> KnownOptions | None:
    """The options of ``command`` as :func:`remember` kept them, or ``None``."""
    path = help_cache.cache_path(command, "options", "json")
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path is not None else None
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    return KnownOptions(frozenset(data.get("options", ())), frozenset(data.get("groups", ())))


def refusal(command: str, words: Sequence[str], known: KnownOptions | None = None,
            configs: Mapping[str, Any] | None = None) -> str | None:
    """The one-line error for the first option of ``words`` (a trainer command's arguments)
    that is certainly unknown to ``known`` (default: the options kept for ``command``);
    ``None`` when all may be right or nothing is kept. ``configs``: what each ``--config``
    file holds, as ``errors.check_config_files`` read it (read here when not given)."""
    from lightning_aquila.cli import errors

    if any(w in ("-h", "--help") or (w.startswith("--") and w.split("=")[0].endswith(".help"))
           for w in words):
        return None
    known = known or kept(command)
    if known is None:
        return None
    if configs is None:
        configs = errors.check_config_files(words)
    for name, file in _named(words, configs):
        if known.unknown(name):
            return errors.unknown_option(name, known.closest(name), file)
    return None


def _named(words: Sequence[str], configs: Mapping[str, Any]
           ) -> Iterator[tuple[str, str | None]]:
    """Each option the command line names, in order: a flag's name with ``None``, and each key
    path a ``--config`` file sets (down to its leaves or to a mapping that names a class),
    with the file."""
    config_next = False
    for word in words:
        if word == "--":
            return
        path = word if config_next else (
            word.split("=", 1)[1] if word.startswith("--config=") else None)
        config_next = word in ("-c", "--config")
        if path is not None:
            yield from ((key, path) for key in _keys(configs.get(path), ""))
        elif word.startswith("--") and len(word) > 2 and not config_next:
            yield word[2:].split("=", 1)[0], None


def _keys(node: Any, prefix: str) -> Iterator[str]:
    if not isinstance(node, dict) or node.keys() & _CLASS_KEYS:
        return
    for key, value in node.items():
        if not isinstance(key, str):
            continue
        path = prefix + key
        yield path
        yield from _keys(value, path + ".")


__all__ = ["KnownOptions", "kept", "of_parser", "refusal", "remember"]
