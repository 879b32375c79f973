"""``python -m jd``: what the ``jd.*`` config accepts, from the registries themselves.

Lists every split (with ``m`` and its formula), aggregator and scalarizer (with their required and
optional arguments), engine, stack semantics, and the training presets. ``python -m jd --markdown``
prints the split table of ``docs/jacobian-descent.md`` (a test keeps the two equal).
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import get_args

from jd.aggregators import accepted_kwargs, aggregator_names, required_kwargs
from jd.config import JDConfig
from jd.scalarizers import accepted_arguments, scalarizer_names
from jd.splits import INTERNAL_LOSSES, SUPERVISION_LOOPS, get_split, split_names


def _wrap(text: str, indent: str = "      ") -> str:
    return textwrap.fill(" ".join(text.split()), width=110, initial_indent=indent, subsequent_indent=indent)


def describe() -> str:
    """The listing as text."""
    lines = ["jd.split (m objectives; B samples per rank, S positions, H H-cycles, K supervision steps):"]
    for name in split_names():
        lines += [f"  {name}", _wrap(get_split(name).describe().replace("``", "`"))]
    lines += ["", "jd.aggregator (default upgrad; arguments in jd.aggregator_kwargs, required ones marked *):"]
    for name in aggregator_names():
        required = set(required_kwargs(name))
        arguments = ", ".join(f"{a}*" if a in required else a for a in accepted_kwargs(name))
        lines.append(f"  {name:<14} {arguments}")
    lines += ["", "jd.scalarizer (a loss-weighting baseline instead of an aggregator; jd.scalarizer_kwargs, required marked *):"]
    for name in scalarizer_names():
        needed, optional = accepted_arguments(name)
        lines.append(f"  {name:<14} {', '.join([f'{a}*' for a in needed] + optional)}")
    engines = get_args(JDConfig.model_fields["engine"].annotation)
    lines += [
        "",
        f"jd.engine: {', '.join(engines)}",
        f"jd.supervision_loop (supervision stacks): {', '.join(SUPERVISION_LOOPS)} (default {SUPERVISION_LOOPS[0]}, the JD study's)",
        f"jd.internal_loss (internal-cycle stacks): {', '.join(INTERNAL_LOSSES)} (default {INTERNAL_LOSSES[0]}, the JD study's)",
        f"jd.distributed: {', '.join(get_args(JDConfig.model_fields['distributed'].annotation))}",
    ]
    config = Path(__file__).resolve().parents[1] / "config"
    for group in ("experiment", "compat", "arch"):
        names = sorted(p.stem for p in (config / group).glob("*.yaml"))
        lines.append(f"{group}= (config/{group}/): {', '.join(names)}")
    return "\n".join(lines)


def split_table() -> str:
    """The splits as a Markdown table, from each split's own description (``docs/jacobian-descent.md`` holds it)."""
    rows = ["| `jd.split` | objectives |", "|---|---|"]
    for name in split_names():
        description = " ".join(get_split(name).describe().replace("``", "`").split())
        rows.append(f"| `{name}` | {description.replace('|', '&#124;')} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the listing, or with ``--markdown`` the split table."""
    parser = argparse.ArgumentParser(prog="python -m jd", description="What the jd.* config accepts.")
    parser.add_argument("--markdown", action="store_true", help="print the split table as Markdown (docs/jacobian-descent.md)")
    args = parser.parse_args(argv)
    sys.stdout.write((split_table() if args.markdown else describe()) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
