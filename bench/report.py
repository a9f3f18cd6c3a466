"""Statistics and reStructuredText tables for benchmark results."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


def percentile(values: Sequence[float], q: float) -> float:
    """Return the `q`-th percentile (0..100) by linear interpolation; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = math.ceil(position)
    if low == high:
        return ordered[low]
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Iterable[float]) -> float:
    """Return the median of the values that are not NaN; NaN when there are none."""
    present = [v for v in values if not math.isnan(v)]
    return statistics.median(present) if present else math.nan


def ratio(numerator: float, denominator: float) -> float:
    if math.isnan(numerator) or math.isnan(denominator) or denominator == 0:
        return math.nan
    return numerator / denominator


def fmt(value: float, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


@dataclass
class Table:
    """One table: a title, column headers and rows of already formatted cells."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)

    def add(self, *cells: str) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(
                f"row has {len(cells)} cells, table {self.title!r} has {len(self.columns)} columns"
            )
        self.rows.append(list(cells))

    def render(self) -> str:
        """Return the table as a reStructuredText simple table under its title."""
        widths = [len(c) for c in self.columns]
        for row in self.rows:
            widths = [max(w, len(cell)) for w, cell in zip(widths, row)]
        rule = "  ".join("=" * w for w in widths)

        def line(cells: Sequence[str]) -> str:
            # The first column is text, the others are numbers.
            parts = [cells[0].ljust(widths[0])]
            parts += [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:])]
            return "  ".join(parts).rstrip()

        out = [self.title, "-" * len(self.title), "", rule, line(self.columns), rule]
        out += [line(row) for row in self.rows]
        out.append(rule)
        return "\n".join(out)


@dataclass
class Target:
    """A goal from the project brief with the measured value."""

    name: str
    met: bool | None
    """None when the value could not be measured."""
    detail: str

    def render(self) -> str:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[self.met]
        return f"- {self.name}: {verdict} ({self.detail})"


@dataclass
class ScenarioResult:
    """Tables, notes and target checks of one scenario."""

    name: str
    description: str
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)

    def render(self) -> str:
        title = f"Scenario: {self.name}"
        out = [title, "=" * len(title), "", self.description, ""]
        for table in self.tables:
            out += [table.render(), ""]
        for note in self.notes:
            out.append(f"- {note}")
        if self.notes:
            out.append("")
        if self.targets:
            out.append("Targets:")
            out.append("")
            out += [target.render() for target in self.targets]
            out.append("")
        return "\n".join(out)
