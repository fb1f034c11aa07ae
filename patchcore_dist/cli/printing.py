"""What the commands print: aligned tables, numbers to four significant digits, the sentences of
`maintain` (pure functions of what the jobs return)."""
from __future__ import annotations

import math


def g4(x) -> str:
    """A score or threshold to 4 significant digits ("n/a" when there is none)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.4g}"


def table(headers: list[str], rows: list[list], right: list[bool]) -> str:
    """A text table: each column as wide as its header and its widest cell, columns ``right`` right-aligned
    (numbers), None as an empty cell; trailing spaces stripped."""
    cells = [list(headers)] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row):
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)).rstrip()
    return "\n".join(line(row) for row in cells)


def _plural(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def maintain_lines(output: str, done: dict) -> list[str]:
    """One sentence per table of what `maintain` did (:func:`patchcore_dist.artifacts.scores.maintain`'s result)."""
    lines = [f"maintenance of {output}:"]
    for uri, step in done.items():
        parts = [f"table version {step['version']}"]
        if "converted" in step:
            parts.append(f"converted {_plural(step['converted'], 'old Parquet part')}")
        if "repaired" in step:
            parts.append(f"repair dropped {_plural(len(step['repaired']), 'missing data file')}")
        if "grids_dropped" in step:
            parts.append(f"dropped {_plural(step['grids_dropped'], 'unused patch-score grid')}")
        parts.append(_compaction(step.get("compacted")))
        parts.append("checkpoint written")
        if "vacuumed" in step:
            parts.append(f"vacuum deleted {_plural(len(step['vacuumed']), 'file')}")
        lines.append(f"  {uri}: " + ", ".join(parts))
    if not done:
        lines.append("  no score table here (nothing to do)")
    return lines


def _compaction(metrics: dict | None) -> str:
    if metrics is None:
        return "compaction postponed (a concurrent commit came first)"
    removed, added = metrics.get("numFilesRemoved", 0), metrics.get("numFilesAdded", 0)
    if not removed:
        return "nothing to compact"
    partitions = metrics.get("partitionsOptimized")
    where = f"{_plural(partitions, 'partition')} " if partitions else ""
    return f"compacted {where}({removed} files -> {added})"
