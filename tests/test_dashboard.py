"""The dashboard bars of ``memctl status``: the rendering, then the real thing in a terminal.

The unit tests render hand-built readings with rich consoles of a known width and
colour system. The end-to-end tests run ``memctl status`` (and ``--watch``) inside
a pseudo-terminal against a real daemon, with a worker paused for real.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Callable, Iterator
from typing import Literal

import psutil
import pytest
from rich.console import Console
from rich.style import Style

from memctl import Client
from memctl.dashboard import (
    SPILL_CELLS,
    STYLE_GREY,
    bar_layout,
    render_status,
    render_unreachable,
    scope_style,
)
from memctl.results import ScopeStatus, Status
from memctl.sizes import format_bytes
from tests.conftest import Daemon, memctl_command, run_memctl, wait_until

MiB = 1 << 20
DEFAULTS: dict[str, float | Literal[False]] = {
    "target": 0.6,
    "spill": 0.7,
    "pause": 0.8,
    "terminate": 0.95,
}
#: Any SGR sequence, and one that sets a colour (16-colour, bright, 256 or truecolor).
SGR = re.compile(r"\x1b\[[0-9;]*m")
COLOUR_SGR = re.compile(r"\x1b\[(?:[0-9;]*;)?(?:3[0-7]|9[0-7]|38;[25];[0-9;]+)m")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def scope(
    name: str = "w1",
    *,
    state: str = "running",
    spilling: bool = False,
    managed: int = 20 * MiB,
    unmanaged: int = 30 * MiB,
    recent: int = 10 * MiB,
    spilled: int = 0,
    limit: int | None = 100 * MiB,
    thresholds: dict[str, float | Literal[False]] | None = None,
    kind: str = "worker",
    keys_in_memory: int = 2,
    keys_on_disk: int = 0,
    pid: int = 4242,
) -> ScopeStatus:
    return ScopeStatus(
        name=name,
        kind=kind,
        state=state,
        spilling=spilling,
        process=managed + unmanaged + recent,
        managed=managed,
        unmanaged=unmanaged,
        unmanaged_recent=recent,
        spilled=spilled,
        memory_limit=limit,
        thresholds=dict(DEFAULTS) if thresholds is None else thresholds,
        keys_in_memory=keys_in_memory,
        keys_on_disk=keys_on_disk,
        pid=pid,
    )


def status(*scopes: ScopeStatus) -> Status:
    service = scope("service", kind="service", pid=0, limit=1024 * MiB)
    return Status(
        version="0.1.0",
        pid=1234,
        uptime_seconds=73.0,
        total_memory=16 * 1024 * MiB,
        spill_directory="/tmp/memctl-spill",
        max_spill=None,
        spill_compression="lz4",
        monitor_interval_seconds=0.2,
        scopes=[service, *scopes],
    )


def plain(*scopes: ScopeStatus, width: int = 120) -> list[str]:
    """The screen as text, as a recording console of ``width`` columns sees it."""
    console = Console(record=True, width=width, file=io.StringIO())
    console.print(render_status(status(*scopes)))
    return console.export_text().splitlines()


def coloured(*scopes: ScopeStatus, width: int = 120) -> str:
    """The screen with 16-colour escape codes, as on a basic terminal."""
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, color_system="standard", width=width)
    console.print(render_status(status(*scopes)))
    return out.getvalue()


def block(lines: list[str], name: str) -> tuple[str, str, str]:
    """A scope's readings (joined, if they wrapped), bar line and tick line."""
    (start,) = [i for i, line in enumerate(lines) if SGR.sub("", line).split()[:1] == [name]]
    bar = next(i for i in range(start + 1, len(lines)) if "spilled " in lines[i])
    return " ".join(lines[start:bar]), lines[bar], lines[bar + 1]


def bar_of(bar_line: str, indent: int) -> str:
    """The bar's own cells: from the indent up to the gap before the spilled part."""
    return bar_line[indent:].split("  ")[0]


def indent_of(readings_line: str) -> int:
    """Where the body (and so the bar) starts: after the padded name and the gap."""
    return len(readings_line) - len(readings_line[len(readings_line.split()[0]) :].lstrip())


# --- the geometry ----------------------------------------------------------------------------
def test_parts_fill_their_share_of_the_limit() -> None:
    layout = bar_layout(scope(managed=20 * MiB, unmanaged=30 * MiB, recent=10 * MiB), 50)
    assert (layout.managed, layout.unmanaged, layout.recent, layout.empty) == (10, 15, 5, 20)
    assert layout.scale == 100 * MiB
    # Threshold columns: the cell a bar filled exactly to the threshold ends in.
    assert layout.ticks == ((29, "t"), (34, "s"), (39, "p"), (47, "k"))


def test_rounding_keeps_the_total_exact() -> None:
    # Thirds of a 10-cell bar: each part rounds, and the parts still add up to process.
    third = 33 * MiB
    layout = bar_layout(scope(managed=third, unmanaged=third, recent=third, limit=99 * MiB), 10)
    assert layout.managed + layout.unmanaged + layout.recent == 10
    assert layout.empty == 0 and all(n in (3, 4) for n in (layout.managed, layout.recent))


def test_over_the_limit_scales_to_process_and_marks_the_limit() -> None:
    layout = bar_layout(scope(managed=0, unmanaged=120 * MiB, recent=30 * MiB), 60)
    assert layout.scale == 150 * MiB
    assert (layout.managed, layout.unmanaged, layout.recent, layout.empty) == (0, 48, 12, 0)
    # 100 MiB of 150 is 40 of 60 cells: the limit mark under cell 39, thresholds before it.
    assert layout.ticks == ((23, "t"), (27, "s"), (31, "p"), (37, "k"), (39, "|"))


def test_no_limit_fills_the_bar_and_has_no_ticks() -> None:
    layout = bar_layout(scope(limit=None), 40)
    assert layout.scale == 60 * MiB and layout.empty == 0 and layout.ticks == ()


def test_thresholds_turned_off_have_no_tick() -> None:
    off: dict[str, float | Literal[False]] = {**DEFAULTS, "spill": False, "terminate": False}
    layout = bar_layout(scope(thresholds=off), 50)
    assert [mark for _, mark in layout.ticks] == ["t", "p"]


def test_a_sliver_of_memory_still_shows() -> None:
    # 1 MiB of 16 GiB is far under half a cell; the largest part gets one cell.
    layout = bar_layout(
        scope(managed=MiB // 4, unmanaged=MiB // 2, recent=MiB // 4, limit=16 << 30), 50
    )
    assert (layout.managed, layout.unmanaged, layout.recent, layout.empty) == (0, 1, 0, 49)
    assert bar_layout(scope(managed=0, unmanaged=0, recent=0), 50).empty == 50


def test_spilled_segment_is_on_the_same_scale_and_capped() -> None:
    assert bar_layout(scope(spilled=10 * MiB), 50).spilled == 5
    small = bar_layout(scope(spilled=1), 50)
    assert small.spilled == 1 and not small.spilled_cut
    huge = bar_layout(scope(spilled=10 << 30), 50)
    assert huge.spilled == SPILL_CELLS and huge.spilled_cut


# --- the text ------------------------------------------------------------------------------
def test_plain_rendering_has_a_line_per_scope_with_its_readings() -> None:
    worker = scope(spilled=10 * MiB, keys_on_disk=3)
    lines = plain(worker)
    assert lines[0].startswith("memctl 0.1.0 (pid 1234), up 73 s, host memory 16.00 GiB")
    readings, bar, ticks = block(lines, "w1")
    for text in ("running", "process 60.00 MiB", "managed 20.00 MiB", "unmanaged 30.00 MiB"):
        assert text in readings
    assert "recent 10.00 MiB" in readings and "limit 100.00 MiB (60%)" in readings
    assert "spilled 10.00 MiB" in bar
    assert "keys: 2 in RAM, 3 on disk" in ticks and "pid 4242" in ticks
    service, _, service_ticks = block(lines, "service")
    assert "running" in service and "pid" not in service_ticks


def test_plain_bar_cells_match_the_readings() -> None:
    worker = scope(spilled=10 * MiB)
    readings, bar_line, tick_line = block(plain(worker), "w1")
    indent = indent_of(readings)
    bar = bar_of(bar_line, indent)
    width = len(bar)
    layout = bar_layout(worker, width)
    assert bar == "█" * layout.managed + "▓" * layout.unmanaged + "▒" * layout.recent + (
        "·" * layout.empty
    )
    # 20/30/10 of 100 MiB, within a cell of rounding.
    assert abs(bar.count("█") - 0.2 * width) <= 1 and abs(bar.count("▓") - 0.3 * width) <= 1
    assert abs(bar.count("▒") - 0.1 * width) <= 1
    # The spilled segment: 10% of the width (capped), in its own glyph, after the bar.
    assert bar_line[indent + width :].lstrip().startswith("░" * layout.spilled + " spilled")
    # Ticks under the columns of the thresholds.
    for fraction, mark in ((0.6, "t"), (0.7, "s"), (0.8, "p"), (0.95, "k")):
        column = indent + int(-(-fraction * width // 1)) - 1
        assert tick_line[column] == mark, (mark, tick_line)


def test_narrow_console_wraps_readings_under_the_body() -> None:
    lines = plain(scope(state="paused", spilling=True), width=60)
    first = next(i for i, line in enumerate(lines) if line.startswith("w1 "))
    assert "paused, spilling" in lines[first]
    assert lines[first + 1].startswith(" " * 9) and "limit 100.00 MiB" in "".join(
        lines[first : first + 3]
    )
    assert all(len(line) <= 60 for line in lines)


def test_ascii_console_gets_ascii_glyphs() -> None:
    console = Console(file=io.TextIOWrapper(io.BytesIO(), encoding="ascii"), width=120)
    assert console.options.ascii_only
    console.begin_capture()
    console.print(render_status(status(scope())))
    text = console.end_capture()
    text.encode("ascii")  # nothing outside ASCII
    readings, bar_line, _ = block(text.splitlines(), "w1")
    bar = bar_of(bar_line, indent_of(readings))
    layout = bar_layout(scope(), len(bar))
    assert bar == "#" * layout.managed + "=" * layout.unmanaged + "-" * layout.recent + (
        "." * layout.empty
    )


def test_no_limit_and_detached_read_plainly() -> None:
    readings, bar_line, ticks = block(plain(scope(state="detached", limit=None)), "w1")
    assert "detached" in readings and "limit none" in readings
    assert "no limit" in ticks and "·" not in bar_line


def test_unreachable_keeps_the_last_readings() -> None:
    console = Console(record=True, width=120, file=io.StringIO())
    console.print(render_unreachable("memctl status: cannot reach memctl", status(scope()), 3.2))
    text = console.export_text()
    assert text.startswith("memctl status: cannot reach memctl")
    assert "the last readings, from 3 s ago" in text and "w1" in text
    console.print(render_unreachable("memctl status: nobody there", None, None))
    assert "retrying" in console.export_text()


# --- the colours ---------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def fresh_styles() -> None:
    """rich keeps a style's escape codes on the (cached) Style object whatever the
    colour system (``Style._ansi``), so a process rendering with two colour systems
    gets the first one's codes. The CLI uses one; these tests use several."""
    Style.parse.__func__.cache_clear()  # type: ignore[attr-defined]
    Style._add.cache_clear()


@pytest.mark.parametrize(
    ("state", "spilling", "code"),
    [
        ("running", False, "34"),  # blue
        ("running", True, "33"),  # orange3, on a 16-colour terminal
        ("paused", False, "31"),  # red
        ("paused", True, "31"),  # paused wins over spilling
        ("terminating", False, "31"),
        ("detached", False, "37"),  # grey50, on a 16-colour terminal
    ],
)
def test_bar_colour_follows_the_state(state: str, spilling: bool, code: str) -> None:
    worker = scope(state=state, spilling=spilling, spilled=5 * MiB)
    readings, bar, _ = block(coloured(worker).splitlines(), "w1")
    # Every part of the bar in the state's colour, nothing else coloured in it.
    assert f"\x1b[{code}m" + "█" * bar_layout(worker, 1).managed in bar
    for glyph in "█▓▒":
        for run in re.findall(rf"((?:\x1b\[[0-9;]*m)+){glyph}+", bar):
            assert run.endswith(f"\x1b[{code}m"), (glyph, run)
    assert f"\x1b[1;{code}m{state}" in readings  # the state word too, in bold
    # Spilled bytes in grey, whatever the state.
    assert "\x1b[37m░" in bar and "\x1b[37mspilled 5.00 MiB" in bar


def test_colours_in_256_colour_terminals() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, color_system="256", width=120)
    console.print(render_status(status(scope(spilling=True, spilled=MiB))))
    assert "\x1b[38;5;172m█" in out.getvalue()  # orange3
    assert "\x1b[38;5;244m░" in out.getvalue()  # grey50
    assert scope_style(scope(state="detached")) == STYLE_GREY


def test_no_escape_codes_without_a_terminal() -> None:
    out = io.StringIO()
    Console(file=out, width=200).print(render_status(status(scope(state="paused"))))
    assert "\x1b" not in out.getvalue() and "paused" in out.getvalue()


def test_no_colour_under_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    out = io.StringIO()
    Console(file=out, force_terminal=True, width=120).print(
        render_status(status(scope(state="paused", spilled=MiB)))
    )
    text = out.getvalue()
    assert "█" in text and "paused" in text
    # NO_COLOR means no colour; rich keeps bold and dim, which the standard allows.
    assert not COLOUR_SGR.search(text), COLOUR_SGR.findall(text)[:5]


# --- end to end, in a pseudo-terminal -------------------------------------------------------
class Terminal:
    """A command on the slave side of a pty, 120x40, as in a terminal emulator."""

    def __init__(self, argv: list[str], *, controlling: bool = False):
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("NO_COLOR", "FORCE_COLOR", "COLORTERM", "TTY_COMPATIBLE", "LINES")
            and not k.startswith("MEMCTL_")
        }
        env.update(TERM="xterm-256color", COLUMNS="120")
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        if controlling:
            # A session of its own with the pty as its controlling terminal, so that
            # Ctrl-C typed into the pty becomes SIGINT, as in a shell.
            setsid = shutil.which("setsid")
            assert setsid, "setsid(1) from util-linux is needed"
            argv = [setsid, "--ctty", *argv]
        self.process = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True
        )
        os.close(slave)
        self.master = master
        self.output = b""
        self.closed = False

    def read_until(self, predicate: Callable[[bytes], bool], timeout: float = 30.0) -> bytes:
        """Read until ``predicate(output)`` holds or the terminal closes; fail at the deadline."""
        deadline = time.monotonic() + timeout
        while not predicate(self.output):
            if self.closed:
                raise AssertionError(f"terminal closed; output so far:\n{self.text()}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"not seen within {timeout} s; output:\n{self.text()}")
            if select.select([self.master], [], [], remaining)[0]:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # EIO: every slave end is closed
                    chunk = b""
                if chunk:
                    self.output += chunk
                else:
                    self.closed = True
        return self.output

    def finish(self, timeout: float = 30.0) -> int:
        """Read to the end of output and return the exit code."""
        self.read_until(lambda _: self.closed, timeout)
        return self.process.wait(timeout)

    def text(self) -> str:
        return self.output.decode(errors="replace")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.master)


@pytest.fixture
def terminals() -> Iterator[Callable[..., Terminal]]:
    opened: list[Terminal] = []

    def _open(*args: str, controlling: bool = False) -> Terminal:
        terminal = Terminal(memctl_command(*args), controlling=controlling)
        opened.append(terminal)
        return terminal

    yield _open
    for terminal in opened:
        terminal.close()


def screen_lines(output: bytes) -> list[str]:
    return output.decode(errors="replace").replace("\r\n", "\n").split("\n")


def test_paused_worker_is_red_in_a_terminal(
    spawn: Callable[..., Daemon], terminals: Callable[..., Terminal]
) -> None:
    # Terminate off, so the worker stays paused (red) rather than going on to terminating.
    daemon = spawn("--set", "memory.terminate=false")
    limit = 40 * MiB
    rss = psutil.Process().memory_info().rss
    assert rss > 0.9 * limit, f"this test needs the test process above 36 MiB RSS, not {rss}"
    with (
        Client(daemon.address) as client,
        client.attach("w", memory_limit=format_bytes(limit)) as session,
    ):
        session.wait_for("pause", timeout=30)
        client.put("spill-me", os.urandom(MiB))  # over target: straight to disk
        wait_until(
            lambda: any(s.name == "w" and s.keys_on_disk == 1 for s in client.status().scopes)
        )
        terminal = terminals("status", "--address", daemon.address)
        assert terminal.finish() == 0, terminal.text()

    readings, bar, ticks = block(screen_lines(terminal.output), "w")
    assert "paused" in SGR.sub("", readings) and "limit 40.00 MiB" in SGR.sub("", readings)
    assert "\x1b[1;31mpaused" in readings  # the state, bold red
    # The bar in red (rich's "red" is SGR 31 in the 256-colour mode TERM selects)...
    assert re.search(r"\x1b\[31m[█▓▒]+\x1b\[0m", bar), repr(bar)
    assert not re.search(r"\x1b\[(?:34|38;5;172)m[█▓▒]", bar), repr(bar)  # ...not blue/orange
    # ...and the spilled value beside it in grey (grey50 is 256-colour 244).
    assert "\x1b[38;5;244m░" in bar and "spilled" in bar
    assert "keys: 0 in RAM, 1 on disk" in SGR.sub("", ticks)
    assert f"pid {os.getpid()}" in SGR.sub("", ticks)
    assert "service " in SGR.sub("", terminal.text())
    assert "Traceback" not in terminal.text()


def test_watch_redraws_until_ctrl_c(daemon: Daemon, terminals: Callable[..., Terminal]) -> None:
    terminal = terminals(
        "status", "--watch", "--interval", "0.2", "--address", daemon.address, controlling=True
    )
    # The bars, then a redraw (rich moves up and erases the lines it drew before).
    terminal.read_until(lambda out: b"Ctrl-C to stop" in out and b"keys:" in out)
    terminal.read_until(lambda out: b"\x1b[2K\x1b[1A" in out)
    os.write(terminal.master, b"\x03")  # Ctrl-C, through the terminal's line discipline
    assert terminal.finish() == 0, terminal.text()
    assert "Traceback" not in terminal.text() and "KeyboardInterrupt" not in terminal.text()
    assert "\x1b[?25h" in terminal.text()  # the cursor is back


def test_watch_shows_an_unreachable_daemon_and_recovers(
    spawn: Callable[..., Daemon], terminals: Callable[..., Terminal]
) -> None:
    daemon = spawn()
    terminal = terminals("status", "--watch", "--interval", "0.2", "--address", daemon.address)
    terminal.read_until(lambda out: b"Ctrl-C to stop" in out)
    daemon.stop()
    # The error and the last readings come in one frame, but not always in one read.
    terminal.read_until(
        lambda out: b"cannot reach memctl" in out and b"the last readings, from" in out
    )
    seen = len(terminal.output)
    spawn(address=daemon.address)  # back, at the same address
    terminal.read_until(lambda out: b"Ctrl-C to stop" in out[seen:], timeout=60)
    terminal.process.send_signal(signal.SIGINT)
    assert terminal.finish() == 0, terminal.text()
    assert "Traceback" not in terminal.text()


def test_status_json_and_usage(daemon: Daemon) -> None:
    result = run_memctl("status", "--json", "--address", daemon.address)
    assert result.returncode == 0, result.stderr
    parsed = json.loads(result.stdout)
    assert parsed["scopes"][0]["name"] == "service"
    assert result.stdout.count(b"\n") == 1  # one line, exactly as before
    both = run_memctl("status", "--watch", "--json", "--address", daemon.address)
    assert both.returncode == 2 and b"--watch" in both.stderr
    lone = run_memctl("status", "--interval", "1", "--address", daemon.address)
    assert lone.returncode == 2 and b"--interval goes with --watch" in lone.stderr
    bad = run_memctl("status", "--watch", "--interval", "0", "--address", daemon.address)
    assert bad.returncode == 2


def test_piped_status_is_plain_text(daemon: Daemon) -> None:
    result = run_memctl("status", "--address", daemon.address)
    text = result.stdout.decode()
    assert result.returncode == 0 and "\x1b" not in text
    (service,) = [line for line in text.splitlines() if line.startswith("service ")]
    assert "running" in service and "process" in service and "managed" in service
