"""The documentation stays true: README.md and docs/ commands compose, parse and name real paths;
the split table is the splits' own; the README stays short; every page is in the site."""

from __future__ import annotations

import functools
import re

import pytest

from tests.helpers.docs import DOCUMENTS, REPO, Command, check_command, documented_commands, unmade_paths

COMMANDS = documented_commands()


@functools.cache
def _problems() -> dict[int, str]:
    """Each documented command checked once (``check_command`` also records what it writes), by position."""
    problems = {}
    for position, command in enumerate(COMMANDS):
        try:
            check_command(command)
        except AssertionError as error:
            problems[position] = str(error)
    return problems


def test_the_readme_is_short_and_links_every_docs_page() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    pages = sorted(path.name for path in (REPO / "docs").glob("*.md") if path.name != "index.md")
    assert [page for page in pages if f"(docs/{page}" not in readme] == []


def test_every_docs_page_is_in_the_site_navigation() -> None:
    site = (REPO / "mkdocs.yml").read_text(encoding="utf-8")
    navigation = set(re.findall(r":\s+([\w-]+\.md)\s*$", site, re.M))
    assert navigation == {path.name for path in (REPO / "docs").glob("*.md")}


def test_the_split_table_is_python_m_jd_markdown() -> None:
    from jd.__main__ import split_table

    page = (REPO / "docs" / "jacobian-descent.md").read_text(encoding="utf-8")
    assert split_table() in page, "docs/jacobian-descent.md's split table differs from `python -m jd --markdown`: paste its output"


def test_the_documents_have_commands_of_every_kind() -> None:
    programs = {" ".join(command.argv[:2]) for command in COMMANDS}
    assert {"python pretrain.py", "python -m", "pip install"} <= programs
    assert len(COMMANDS) > 100 and all(document.exists() for document in DOCUMENTS)


@pytest.mark.parametrize("position", range(len(COMMANDS)), ids=[command.where for command in COMMANDS])
def test_every_documented_command_composes_or_parses(position: int) -> None:
    assert position not in _problems(), _problems()[position]


def test_every_path_a_command_names_exists_or_a_documented_command_writes_it() -> None:
    _problems()
    assert unmade_paths(COMMANDS) == []


@pytest.mark.parametrize(
    ("words", "complaint"),
    [
        ("python pretrain.py jd.split=iwrm_with_q_halt_in jd.aggregatr=upgrad", "did you mean jd.aggregator"),
        ("python pretrain.py -m jd.split=none,iwrm_with_q_halt_in jd.aggregator=upgard", "upgard"),
        ("torchrun --nproc-per-node 2 pretrain.py experiment=arc3", "no such preset"),
        ("python -m analysis.compare runs/x --html --colour red", "do not parse"),
        ("python -m analysis.nothing runs/x", "no module"),
        ("pip install -e .[gpu]", "no extra"),
        ("make docs", "no check knows"),
    ],
)
def test_the_checks_fail_on_a_misspelt_command(words: str, complaint: str) -> None:
    import shlex

    with pytest.raises(AssertionError, match=complaint):
        check_command(Command("test", shlex.split(words)))


def test_a_path_nothing_writes_is_named() -> None:
    import shlex

    commands = [Command("a", shlex.split("python -m analysis.compare runs/never-made --html"))]
    made = Command("b", shlex.split("python -m analysis.compare runs/sweep1 --out reports/made"))
    check_command(made)
    reader = Command("c", shlex.split("python -m analysis.plot_gd_similarity reports/made/x runs/RUN"))
    unmade = [problem.split(": ")[-1].split()[0] for problem in unmade_paths([*commands, made, reader])]
    assert unmade == ["runs/never-made", "runs/sweep1"]  # reports/made/x is written by b; runs/RUN is a placeholder
