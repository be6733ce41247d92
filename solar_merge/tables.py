"""Results as one table: a row per model (or stage, grid point, seam), a column per metric, the
best value of each ranked column in bold.

One rendering for the terminal and the output folder: aligned Markdown, which reads as plain
columns in a terminal or a CI log and renders as a table on the Hub and GitHub (results.md).
A column is ranked when its direction is known (`better`: lm-eval's `higher_is_better` for
lm-eval metrics); arrows in its header say which way is better.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Table:
    rows: dict[str, dict]                               # row label -> {column: value}
    better: dict[str, bool] = field(default_factory=dict)  # column -> higher is better?
    headers: dict[str, str] = field(default_factory=dict)  # column -> its header (default: itself)
    corner: str = "model"                               # the header of the label column
    formats: dict[str, str] = field(default_factory=dict)  # column -> format spec, e.g. ".1f"
    notes: list[str] = field(default_factory=list)      # lines printed under the table

    @property
    def columns(self) -> list[str]:
        return list(dict.fromkeys(c for row in self.rows.values() for c in row))

    def best(self, column: str) -> set[str]:
        """The rows holding the best value of a ranked column (ties: all of them); none when
        the column is not ranked or fewer than two different values are there to compare."""
        if column not in self.better:
            return set()
        values = {label: row[column] for label, row in self.rows.items()
                  if _number(row.get(column))}
        if len(set(values.values())) < 2:
            return set()
        top = (max if self.better[column] else min)(values.values())
        return {label for label, v in values.items() if v == top}

    def markdown(self) -> list[str]:
        """The table as aligned Markdown lines, then a legend and the notes."""
        columns = self.columns
        best = {c: self.best(c) for c in columns}
        head = [self.corner, *(self.header(c) for c in columns)]
        body = [[label, *(_cell(row.get(c), label in best[c], self.formats.get(c))
                          for c in columns)] for label, row in self.rows.items()]
        widths = [max(len(r[i]) for r in (head, *body)) for i in range(len(head))]
        # numbers to the right (digits line up), words and the labels to the left
        right = [False, *(any(_number(row.get(c)) for row in self.rows.values())
                          for c in columns)]

        def line(cells):
            return "| " + " | ".join(c.rjust(w) if r else c.ljust(w)
                                     for c, w, r in zip(cells, widths, right)) + " |"

        rule = "|" + "|".join("-" * (w + 1) + ":" if r else "-" * (w + 2)
                              for w, r in zip(widths, right)) + "|"
        lines = [line(head), rule, *(line(r) for r in body)]
        legend = ["**bold**: the best of its column (↑ higher is better, ↓ lower)"
                  ] if any(best.values()) else []
        extra = [*legend, *self.notes]
        return lines + (["", *extra] if extra else [])

    def text(self) -> str:
        return "\n".join(self.markdown())

    def header(self, column: str) -> str:
        arrow = {True: " ↑", False: " ↓"}.get(self.better.get(column), "")
        return self.headers.get(column, column) + arrow

    def write(self, path) -> Path:
        """The table as Markdown in `path` (results.md); returns the path."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.text() + "\n")
        tmp.replace(path)
        return path


def merged(tables, corner: str = "model") -> Table:
    """One table from several (e.g. a recipe's eval stages): a label's rows are joined, a
    column scored twice for one label keeps the later value."""
    out = Table({}, corner=corner)
    for t in tables:
        for label, row in t.rows.items():
            out.rows.setdefault(label, {}).update(row)
        out.better.update(t.better)
        out.headers.update(t.headers)
        out.notes += [n for n in t.notes if n not in out.notes]
    return out


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def fmt(v, spec: str | None = None) -> str:
    """A value as the tables print it: by `spec` if given, else floats with 4 decimals below
    100, 1 decimal below a million, then 4 significant digits; '–' for a missing value."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if spec and _number(v):
        return format(v, spec)
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}" if abs(v) < 1e6 else f"{v:.4g}"
    return str(v)


def _cell(v, best: bool, spec: str | None) -> str:
    return f"**{fmt(v, spec)}**" if best else fmt(v, spec)
