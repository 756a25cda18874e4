"""The memory bars of ``memctl status``: Dask's dashboard, drawn with rich.

Pure rendering: a ``Status`` goes in, rich renderables come out; printing (and
``--watch``'s redrawing) is the CLI's business. Per scope (here 92 columns wide)::

    w  paused, spilling  process 58.71 MiB  managed 0 B  unmanaged 54.06 MiB  recent 4.65 MiB
       limit 40.00 MiB (147%)
       ▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓▒▒▒▒  ░ spilled 1.00 MiB
                            t  s   p    k |                  keys: 0 in RAM, 1 on disk  pid 1991

The first line starts with the scope's name and carries its state and readings
(``format_bytes`` units), flowed onto more lines, between readings, when the
console is narrow. The bar stacks managed (█), unmanaged (▓) and unmanaged
recent (▒) up to process memory, against the memory limit: the bar's width is the
limit, or process memory when that is larger or there is no limit (then ``|``
marks the limit). Under it, a letter marks each threshold that is on: t target,
s spill, p pause, k terminate. Beside it, spilled bytes in grey (░), on the same
scale but at most ``SPILL_CELLS`` wide. Colours follow Dask: blue when running,
orange while spilling, red when paused or terminating, grey for spilled bytes and
detached scopes. The characters differ per part, so the bars read without colour;
a console that cannot encode them gets ASCII instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.measure import Measurement
from rich.text import Text

from .results import ScopeStatus, Status
from .sizes import format_bytes

#: Bar colours (rich style names). Plain "red" and "blue" are the terminal's own
#: SGR 31 and 34; "orange3" is 256-colour 172 and falls back to yellow (33) on a
#: 16-colour terminal, so spilling never looks like paused; "grey50" falls back to 37.
STYLE_RUNNING = "blue"
STYLE_SPILLING = "orange3"
STYLE_PAUSED = "red"
STYLE_GREY = "grey50"
STYLE_EMPTY = "dim"

#: Threshold keys in bar order, with the letter that marks each under the bar.
TICK_LETTERS: dict[str, str] = {"target": "t", "spill": "s", "pause": "p", "terminate": "k"}
#: Marks the memory limit when the bar is scaled past it.
LIMIT_MARK = "|"


@dataclass(frozen=True)
class Glyphs:
    managed: str
    unmanaged: str
    recent: str
    empty: str
    spilled: str
    more: str  # the spilled segment was cut at SPILL_CELLS


UNICODE = Glyphs(managed="█", unmanaged="▓", recent="▒", empty="·", spilled="░", more="»")
ASCII = Glyphs(managed="#", unmanaged="=", recent="-", empty=".", spilled=":", more=">")

#: The spilled segment is at most this many cells (its size is also given as text).
SPILL_CELLS = 10
#: Bar width bounds, in cells.
MIN_BAR = 10
MAX_BAR = 80
#: Longer scope names are cut (with "…") so the bars keep their room.
MAX_NAME = 24
GAP = "  "


# --- the geometry: pure numbers, tested directly -----------------------------------------
@dataclass(frozen=True)
class BarLayout:
    """How one scope's bar is drawn ``width`` cells wide."""

    width: int
    #: Bytes the full width stands for: the limit, or process memory if larger or no limit.
    scale: int
    managed: int
    unmanaged: int
    recent: int
    empty: int
    #: Cells of the spilled segment (at most SPILL_CELLS), and whether it was cut.
    spilled: int
    spilled_cut: bool
    #: (column, mark) under the bar: threshold letters, and the limit when scaled past it.
    ticks: tuple[tuple[int, str], ...]


def _cells(nbytes: int, scale: int, width: int) -> int:
    """``nbytes`` as cells of a ``width``-cell bar standing for ``scale`` bytes (rounded)."""
    if scale <= 0:
        return 0
    return min(width, int(nbytes / scale * width + 0.5))


def _tick_column(nbytes: float, scale: int, width: int) -> int:
    """The cell whose span holds the position of ``nbytes``: a bar filled up to
    ``nbytes`` ends exactly above it."""
    position = nbytes / scale * width
    return min(max(math.ceil(position - 1e-9) - 1, 0), width - 1)


def bar_layout(scope: ScopeStatus, width: int) -> BarLayout:
    """The cells of each part of ``scope``'s bar. The three parts are rounded at
    their cumulative edges, so together they fill exactly ``process / scale``."""
    limit = scope.memory_limit
    scale = max(scope.process, limit or 0)
    edge_managed = _cells(scope.managed, scale, width)
    edge_unmanaged = _cells(scope.managed + scope.unmanaged, scale, width)
    edge_process = _cells(scope.process, scale, width)
    if scope.process > 0 and edge_process == 0 and width > 0:
        # Too small to round to a cell: one cell, to the largest part, so it shows.
        edge_process = 1
        sizes = (scope.managed, scope.unmanaged, scope.unmanaged_recent)
        largest = sizes.index(max(sizes))  # 0 managed, 1 unmanaged, 2 recent
        edge_managed = int(largest == 0)
        edge_unmanaged = int(largest <= 1)
    spilled = _cells(scope.spilled, scale, width)
    if scope.spilled > 0:
        spilled = max(spilled, 1)  # on disk, however little: visible
    spilled_cut = spilled > SPILL_CELLS
    ticks: list[tuple[int, str]] = []
    if limit:
        for key, letter in TICK_LETTERS.items():
            fraction = scope.thresholds.get(key, False)
            if fraction is not False:
                ticks.append((_tick_column(fraction * limit, scale, width), letter))
        if scale > limit:
            ticks.append((_tick_column(limit, scale, width), LIMIT_MARK))
    return BarLayout(
        width=width,
        scale=scale,
        managed=edge_managed,
        unmanaged=edge_unmanaged - edge_managed,
        recent=edge_process - edge_unmanaged,
        empty=width - edge_process,
        spilled=min(spilled, SPILL_CELLS),
        spilled_cut=spilled_cut,
        ticks=tuple(ticks),
    )


def scope_style(scope: ScopeStatus) -> str:
    """The bar's colour: red paused/terminating, grey detached, orange spilling, else blue."""
    if scope.state in ("paused", "terminating"):
        return STYLE_PAUSED
    if scope.state == "detached":
        return STYLE_GREY
    if scope.spilling:
        return STYLE_SPILLING
    return STYLE_RUNNING


# --- text pieces ----------------------------------------------------------------------------
def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def state_label(scope: ScopeStatus) -> str:
    return scope.state + (", spilling" if scope.spilling else "")


def _flow(parts: Sequence[Text], width: int) -> list[Text]:
    """``parts`` joined by two spaces into lines of at most ``width`` cells, breaking
    only between parts (a part wider than ``width`` gets a line of its own)."""
    lines: list[Text] = []
    line = Text()
    for part in parts:
        if line and line.cell_len + len(GAP) + part.cell_len > width:
            lines.append(line)
            line = Text()
        if line:
            line.append(GAP)
        line.append_text(part)
    lines.append(line)
    return lines


def _reading(label: str, value: str) -> Text:
    return Text.assemble((label + " ", "dim"), value)


def reading_parts(scope: ScopeStatus) -> list[Text]:
    """State and readings: the words after the scope's name on its first line."""
    parts = [
        Text(state_label(scope), style=f"bold {scope_style(scope)}"),
        _reading("process", format_bytes(scope.process)),
        _reading("managed", format_bytes(scope.managed)),
        _reading("unmanaged", format_bytes(scope.unmanaged)),
        _reading("recent", format_bytes(scope.unmanaged_recent)),
    ]
    if scope.memory_limit:
        share = scope.process / scope.memory_limit
        parts.append(_reading("limit", f"{format_bytes(scope.memory_limit)} ({share:.0%})"))
    else:
        parts.append(_reading("limit", "none"))
    return parts


def spilled_label(scope: ScopeStatus) -> str:
    return f"spilled {format_bytes(scope.spilled)}"


def keys_label(scope: ScopeStatus) -> str:
    """Key counts, and the worker's PID."""
    label = f"keys: {scope.keys_in_memory} in RAM, {scope.keys_on_disk} on disk"
    if scope.kind == "worker" and scope.pid:
        label += f"{GAP}pid {scope.pid}"
    return label


def bar_line(scope: ScopeStatus, layout: BarLayout, glyphs: Glyphs = UNICODE) -> Text:
    """The bar, then the spilled segment and its size, in grey."""
    style = scope_style(scope)
    text = Text(no_wrap=True, overflow="crop")
    text.append(glyphs.managed * layout.managed, style=style)
    text.append(glyphs.unmanaged * layout.unmanaged, style=style)
    text.append(glyphs.recent * layout.recent, style=style)
    text.append(glyphs.empty * layout.empty, style=STYLE_EMPTY)
    text.append(GAP)
    if layout.spilled:
        text.append(glyphs.spilled * layout.spilled, style=STYLE_GREY)
        if layout.spilled_cut:
            text.append(glyphs.more, style=STYLE_GREY)
        text.append(" ")
    text.append(spilled_label(scope), style=STYLE_GREY)
    return text


def tick_line(scope: ScopeStatus, layout: BarLayout) -> Text:
    """Threshold letters under their columns, then the key counts."""
    if scope.memory_limit:
        cells = [" "] * layout.width
        for column, mark in layout.ticks:  # the limit mark comes last and wins a shared cell
            cells[column] = mark
        marks = "".join(cells)
    else:
        marks = "no limit".ljust(layout.width)[: layout.width]
    text = Text(no_wrap=True, overflow="crop")
    text.append(marks, style="dim")
    text.append(GAP)
    text.append(keys_label(scope), style="dim")
    return text


def legend_parts(scopes: Sequence[ScopeStatus], glyphs: Glyphs = UNICODE) -> list[Text]:
    """What the characters and letters mean (with the percentages when every scope
    with a limit has the same thresholds)."""
    parts = [
        Text(f"{glyph} {name}", style="dim")
        for glyph, name in (
            (glyphs.managed, "managed"),
            (glyphs.unmanaged, "unmanaged"),
            (glyphs.recent, "recent"),
            (glyphs.spilled, "spilled"),
        )
    ]
    kinds = {tuple(sorted(s.thresholds.items())) for s in scopes if s.memory_limit}
    shared = dict(next(iter(kinds))) if len(kinds) == 1 else None
    for key, letter in TICK_LETTERS.items():
        fraction = shared.get(key, False) if shared is not None else None
        if fraction is not False:
            percent = f" {fraction:.0%}" if fraction is not None else ""
            parts.append(Text(f"{letter} {key}{percent}", style="dim"))
    parts.append(Text(f"{LIMIT_MARK} limit", style="dim"))
    return parts


def header(status: Status) -> Text:
    return Text(
        f"memctl {status.version} (pid {status.pid}), up {status.uptime_seconds:.0f} s, "
        f"host memory {format_bytes(status.total_memory)}, "
        f"spilling to {status.spill_directory}"
    )


# --- the renderables ------------------------------------------------------------------------
class Bars:
    """Every scope's readings and bar, sized to the console's width when rendered."""

    def __init__(self, scopes: Sequence[ScopeStatus]):
        self.scopes = list(scopes)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if not self.scopes:
            yield Text("no scopes", style="dim")
            return
        glyphs = ASCII if options.ascii_only else UNICODE
        name_width = min(max(len(s.name) for s in self.scopes), MAX_NAME)
        body = max(options.max_width - name_width - len(GAP), 1)
        beside = len(GAP) + max(
            max(len(spilled_label(s)) + SPILL_CELLS + 2, len(keys_label(s))) for s in self.scopes
        )
        width = min(max(body - beside, MIN_BAR), MAX_BAR)
        for scope in self.scopes:
            yield from scope_lines(scope, name_width, body, width, glyphs)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(options.max_width, options.max_width)


def scope_lines(
    scope: ScopeStatus, name_width: int, body: int, width: int, glyphs: Glyphs = UNICODE
) -> Iterator[Text]:
    """One scope: its name and readings (flowed into ``body`` cells), its bar
    ``width`` cells wide, and the ticks under it."""
    name = Text(scope.name, style="bold")
    name.truncate(name_width, overflow="ellipsis")
    name.pad_right(name_width - name.cell_len)
    pad = " " * (name_width + len(GAP))
    layout = bar_layout(scope, width)
    for number, line in enumerate(_flow(reading_parts(scope), body)):
        yield Text.assemble(name if number == 0 else pad, GAP if number == 0 else "", line)
    yield Text.assemble(pad, bar_line(scope, layout, glyphs), no_wrap=True, overflow="crop")
    yield Text.assemble(pad, tick_line(scope, layout), no_wrap=True, overflow="crop")


class _Legend:
    """The legend, in the glyphs the console can show, flowed to its width."""

    def __init__(self, scopes: Sequence[ScopeStatus]):
        self.scopes = list(scopes)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        glyphs = ASCII if options.ascii_only else UNICODE
        yield from _flow(legend_parts(self.scopes, glyphs), options.max_width)


def render_status(status: Status, *, note: str | None = None) -> RenderableType:
    """The whole ``memctl status`` screen: header, legend, then every scope's bar.
    ``note`` (``--watch``'s refresh line) goes under the header."""
    parts: list[RenderableType] = [header(status)]
    if note:
        parts.append(Text(note, style="dim"))
    parts += [_Legend(status.scopes), Text(""), Bars(status.scopes)]
    return Group(*parts)


def render_unreachable(
    error: str, last: Status | None, age_seconds: float | None
) -> RenderableType:
    """``--watch`` while the daemon does not answer: the error, then the last
    readings (if any), marked as such."""
    parts: list[RenderableType] = [Text(error, style="bold red")]
    if last is None:
        parts.append(Text("retrying…", style="dim"))
    else:
        age = f"{age_seconds:.0f} s ago" if age_seconds is not None else "earlier"
        parts.append(render_status(last, note=f"retrying; the last readings, from {age}:"))
    return Group(*parts)
