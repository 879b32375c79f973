"""The shell commands and Python snippets of README.md and docs/, and the checks that keep them true.

Every ``bash`` block line and every inline span that starts with ``python`` or ``torchrun`` is a
command. A command is checked without running anything heavy:

* ``python pretrain.py OVERRIDES`` (and ``torchrun ... pretrain.py OVERRIDES``): composed and validated
  by ``pretrain.compose_config``, as the real command does first; a multirun (``-m``) composes every
  combination of its sweeps.
* ``python -m MODULE ARGS``: the module's ``main`` parses ``ARGS`` with its own argparse parser, and
  stops right after (argparse's own parsing, then :class:`Parsed`).
* ``pip install``: the extras it names exist in pyproject.toml.
* Paths the commands name exist in the repository, are written by a documented command (``--out``,
  ``--output-dir``, a run's directory) or are files the docs tell the user to fetch (:data:`USER_FILES`).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import itertools
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
EXTERNAL_PROGRAMS = {
    "mkdocs": "builds this site (pip install -e '.[docs]')",
    "wandb": "W&B's own command line (the study's online sweep)",
    "git": "cloning for the CI rehearsal",
    "bash": "the CI script",
    "cd": "a directory change",
}
USER_FILES = {
    "kaggle": "the reference repository's Kaggle ARC files (docs/reference-code.md says where)",
    "sudoku-extreme": "Sudoku-Extreme's CSV files from the Hub (docs/reference-code.md)",
    "maze-hard": "Maze-Hard's CSV files from the Hub (docs/reference-code.md)",
}
METRIC_NAMESPACES = ("jd/", "train/", "eval/", "raw/")
OUTPUT_ATTRIBUTES = ("out", "output_dir", "out_dir", "output", "destination")
WRITTEN_ROOTS = {"data", "runs", "reports", "studies", "exported", "benchmarks", "outputs", "multirun"}


class Parsed(Exception):
    """Raised by a module's argument parser once it has parsed the arguments (nothing else runs)."""

    def __init__(self, namespace: argparse.Namespace) -> None:
        super().__init__("parsed")
        self.namespace = namespace


@dataclass
class Command:
    """One documented command: where it is, its words, and whether it is elided (``...`` in prose)."""

    where: str
    argv: list[str]
    elided: bool = False
    outputs: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.where}: {shlex.join(self.argv)}"


def _line_number(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _split_commands(words: list[str]) -> Iterator[list[str]]:
    """``a && b; c`` as three commands."""
    current: list[str] = []
    for word in words:
        if word in ("&&", ";", "||"):
            if current:
                yield current
            current = []
        else:
            current.append(word)
    if current:
        yield current


def documented_commands(documents: list[Path] = DOCUMENTS) -> list[Command]:
    """Every command in the documents' ``bash`` blocks and inline ``python``/``torchrun`` spans."""
    commands: list[Command] = []
    for document in documents:
        text = document.read_text(encoding="utf-8")
        name = document.relative_to(REPO).as_posix()
        for block in re.finditer(r"```(?:bash|sh)\n(.*?)```", text, re.S):
            start = _line_number(text, block.start(1))
            lines = block.group(1).split("\n")
            joined = ""
            for number, line in enumerate(lines):
                joined += line[:-1] + " " if line.endswith("\\") else line
                if line.endswith("\\"):
                    continue
                for argv in _split_commands(shlex.split(joined, comments=True)):
                    commands.append(Command(f"{name}:{start + number}", argv))
                joined = ""
        prose = re.sub(r"```.*?```", lambda match: "\n" * match.group(0).count("\n"), text, flags=re.S)
        for span in re.finditer(r"`((?:python|torchrun)\s[^`]+)`", prose):
            words = shlex.split(span.group(1).replace("\n", " "))
            if len(words) < 2 or words[1] == "..." or words[-1] == "-m":
                continue  # prose about commands (`python ...`, `python -m`), not a command
            for argv in _split_commands(words):
                commands.append(Command(f"{name}:{_line_number(prose, span.start())}", argv, elided="..." in argv))
    return commands


def python_snippets(documents: list[Path] = DOCUMENTS) -> list[tuple[str, str]]:
    """``(where, code)`` of every ``python`` block."""
    snippets = []
    for document in documents:
        text = document.read_text(encoding="utf-8")
        for block in re.finditer(r"```python\n(.*?)```", text, re.S):
            snippets.append((f"{document.relative_to(REPO).as_posix()}:{_line_number(text, block.start(1))}", block.group(1)))
    return snippets


# ------------------------------------------------------------------------------------------- checks
def check_command(command: Command) -> None:
    """Raise ``AssertionError`` (naming the command) when it would not run as documented; fill ``command.outputs``."""
    argv = command.argv
    program = argv[0]
    if program in EXTERNAL_PROGRAMS:
        return
    if program == "pip":
        _check_pip(command)
    elif program == "torchrun" and "-m" in argv:
        module = argv.index("-m") + 1
        _check_module(command, argv[module], argv[module + 1 :])
    elif program == "torchrun":
        script = next((i for i, word in enumerate(argv) if word.endswith(".py")), None)
        assert script is not None and argv[script] == "pretrain.py", f"{command}: torchrun runs pretrain.py or -m MODULE here"
        _check_pretrain(command, argv[script + 1 :])
    elif program == "python" and len(argv) > 1 and argv[1] == "pretrain.py":
        _check_pretrain(command, argv[2:])
    elif program == "python" and len(argv) > 2 and argv[1] == "-m":
        _check_module(command, argv[2], argv[3:])
    else:
        raise AssertionError(f"{command}: no check knows this program; add one to tests/helpers/docs.py")


def _check_pip(command: Command) -> None:
    extras = optional_dependencies()
    for word in command.argv[2:]:
        match = re.fullmatch(r"\.\[([a-z,_-]+)\]", word)
        if match:
            unknown = [extra for extra in match.group(1).split(",") if extra not in extras]
            assert not unknown, f"{command}: pyproject.toml has no extra {unknown} (it has {sorted(extras)})"


def optional_dependencies() -> list[str]:
    """The extras pyproject.toml declares (read as text: tomllib needs Python 3.11, the project 3.10)."""
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return re.findall(r"^([A-Za-z0-9_-]+) = \[", section, re.M)


def _sweep_choices(overrides: list[str]) -> list[list[str]]:
    """Every combination of a multirun's sweeps (``key=a,b``), as override lists."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    options: list[list[str]] = []
    for override in overrides:
        parsed = parser.parse_override(override)
        if parsed.is_sweep_override() and not parsed.is_hydra_override():
            options.append([f"{parsed.get_key_element()}={value}" for value in parsed.sweep_string_iterator()])
        else:
            options.append([override])
    return [list(choice) for choice in itertools.product(*options)]


def _check_pretrain(command: Command, args: list[str]) -> None:
    from pretrain import compose_config
    from training.config import ConfigError
    from training.run_dir import default_project_name

    multirun = any(arg in ("-m", "--multirun") for arg in args)
    overrides: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("-m", "--multirun"):
            continue
        elif arg in ("--cfg", "-c"):
            skip = True  # its value: job / hydra / all
        else:
            assert not arg.startswith("-"), f"{command}: pretrain.py flag {arg} is not one this check knows"
            overrides.append(arg)
    sweeps = [o for o in overrides if o.startswith(("hydra/", "hydra.", "+hydra"))]
    plain = [o for o in overrides if o not in sweeps]
    for choice in _sweep_choices(plain) if multirun else [plain]:
        try:
            config = compose_config(choice)
        except ConfigError as error:
            raise AssertionError(f"{command}: {error}") from None
        command.outputs.append(str(Path(config.runs_root) / default_project_name(config)))
    for sweep in sweeps:
        key, _, value = sweep.lstrip("+").partition("=")
        if "/" in key:  # a config group choice: hydra/sweeper=study_sweep
            assert (REPO / "config" / key / f"{value}.yaml").is_file(), f"{command}: no config/{key}/{value}.yaml"


def _check_module(command: Command, module: str, args: list[str]) -> None:
    assert importlib.util.find_spec(module) is not None, f"{command}: no module {module}"
    if module == "pytest" or command.elided or not args:
        return
    package_main = f"{module}.__main__"
    imported = importlib.import_module(package_main if importlib.util.find_spec(module).submodule_search_locations else module)  # type: ignore[union-attr]  # found above
    assert hasattr(imported, "main"), f"{command}: {module} has no main(argv)"
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self: argparse.ArgumentParser, *given: Any, **keywords: Any) -> argparse.Namespace:
        raise Parsed(original(self, *given, **keywords))

    argparse.ArgumentParser.parse_args = parse_then_stop  # type: ignore[method-assign]  # restored below
    try:
        imported.main(args)
    except Parsed as parsed:
        for attribute in OUTPUT_ATTRIBUTES:
            value = getattr(parsed.namespace, attribute, None)
            if isinstance(value, (str, Path)):
                command.outputs.append(str(value))
        return
    except SystemExit as stop:
        raise AssertionError(f"{command}: its arguments do not parse (exit {stop.code})") from None
    finally:
        argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]
    raise AssertionError(f"{command}: {module}.main returned without parsing arguments")


def named_paths(command: Command) -> list[str]:
    """The repository-relative paths a command names (placeholders such as ``RUN`` and metric names excluded)."""
    paths = []
    for word in command.argv[1:]:
        value = word.partition("=")[2] if "=" in word and not word.startswith("-") else word
        for item in value.strip("[]'\"").split(","):
            item = item.strip()
            first = item.split("/", 1)[0]
            if "/" not in item or "://" in item or item.startswith(("-", "$", "hf:")) or item.startswith(METRIC_NAMESPACES):
                continue
            if first in ("", ".", "..") or any(part.upper() == part and part.strip("_-") for part in item.split("/")):
                continue  # a placeholder: RUN, runs/PROJECT, OUT_DIR
            paths.append(item.split("*", 1)[0].rstrip("/"))
    return paths


def unmade_paths(commands: list[Command]) -> list[str]:
    """Paths named by a command that neither exist nor are written by a documented command (run
    :func:`check_command` on every command first: it records their outputs)."""
    made = [output.rstrip("/") for command in commands for output in command.outputs]
    problems = []
    for command in commands:
        if command.argv[0] in EXTERNAL_PROGRAMS or command.argv[0] == "pip":
            continue
        for path in named_paths(command):
            first = path.split("/", 1)[0]
            if (REPO / path).exists() or first in USER_FILES:
                continue
            if any(path == out or path.startswith(out + "/") or out.startswith(path + "/") for out in made):
                continue
            if first in WRITTEN_ROOTS or (REPO / first).exists():
                problems.append(f"{command}: {path} neither exists nor is written by a documented command")
    return problems
