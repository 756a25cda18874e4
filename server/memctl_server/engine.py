"""The threshold engine: one scope's readings and memo in, decisions and a new memo out.

A pure function (``decide``) with no clock, socket, thread or store inside: the
monitor passes the time and the readings, and applies the decisions it gets back
(``monitor.py``). The rules are PRODUCT.md's thresholds table:

========== ======= ========== ==================================================
key        default measured   action
========== ======= ========== ==================================================
target     0.60    managed    spill LRU values until managed <= target
spill      0.70    process    spill LRU values until process < target (or spill,
                              when target is off), or nothing is left to spill
pause      0.80    process    PAUSE; RESUME once process < pause - resume-margin
terminate  0.95    process    TERMINATE (worker scopes only)
========== ======= ========== ==================================================

and ``pause-timeout``: a supervised worker paused that long is terminated, so the
nanny restarts it (Dask's paused workers can deadlock a cluster: #3761, #5999).
Every decision carries its reason and the readings behind it (#2297).

``watch_lines`` says, for the same scope and memo, where process memory would make
``decide`` act: a reading that crosses them is worth deciding on at once, without
waiting for the next tick (a worker reporting its own RSS sends it as it crosses).

Not covered here: measuring memory, reaching workers, signalling processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from memctl.sizes import format_bytes

from .config import Threshold
from .readings import MemoryReadings


@dataclass(frozen=True)
class Thresholds:
    """Fractions of a scope's memory limit; ``False`` turns a rule off."""

    target: Threshold = 0.60
    spill: Threshold = 0.70
    pause: Threshold = 0.80
    terminate: Threshold = 0.95


@dataclass(frozen=True)
class EngineSettings:
    #: Resume below ``pause - resume_margin`` (fraction of the limit).
    resume_margin: float = 0.05
    #: Seconds a supervised worker may stay paused before it is restarted.
    pause_timeout: float | Literal[False] = False


@dataclass(frozen=True)
class ScopeInput:
    """What the engine knows of a scope at one tick."""

    name: str
    memory_limit: int | None
    thresholds: Thresholds
    readings: MemoryReadings
    #: A worker scope whose worker is attached: PAUSE/RESUME/TERMINATE can reach it.
    #: The service scope's pause goes to every worker, so it counts as commandable.
    commandable: bool = False
    is_worker: bool = False
    #: Started by this service (nanny mode): may be restarted after pause-timeout.
    supervised: bool = False
    #: The store can move values to disk (built-in, or has ``evict()`` and ``fast``).
    can_spill: bool = True


@dataclass(frozen=True)
class ScopeMemo:
    """What the engine remembers of a scope between ticks."""

    spilling: bool = False
    paused: bool = False
    paused_since: float | None = None
    terminating: bool = False
    #: "Cannot get under target" was said for the current spilling episode.
    stuck_reported: bool = False


@dataclass(frozen=True)
class _Decision:
    """What to do about a scope, why, and the readings that made it so."""

    scope: str
    reason: str
    readings: MemoryReadings


@dataclass(frozen=True)
class Spill(_Decision):
    #: In-RAM bytes of the scope's least recently used values to move to disk.
    nbytes: int


class Pause(_Decision):
    pass


class Resume(_Decision):
    pass


class Terminate(_Decision):
    pass


class Report(_Decision):
    """Something a person should know, said once: the monitor logs it."""


Decision = Spill | Pause | Resume | Terminate | Report


def _line(name: str, fraction: float, limit: int) -> str:
    return (
        f"{name} threshold ({fraction:.0%} of {format_bytes(limit)} = "
        f"{format_bytes(int(fraction * limit))})"
    )


def decide(
    scope: ScopeInput, memo: ScopeMemo, now: float, settings: EngineSettings
) -> tuple[list[Decision], ScopeMemo]:
    """Apply every rule to one scope; the decisions in the order to carry them out."""
    limit = scope.memory_limit
    if limit is None:
        return [], memo
    t, r = scope.thresholds, scope.readings
    decisions: list[Decision] = []

    # --- target and spill: move LRU values to disk -------------------------------------
    spill_reasons: list[str] = []
    wanted = 0
    if t.target is not False and r.managed > t.target * limit:
        wanted = r.managed - int(t.target * limit)
        spill_reasons.append(
            f"managed memory {format_bytes(r.managed)} is above the "
            + _line("target", t.target, limit)
        )
    spilling = False
    if t.spill is not False:
        stop = t.target if t.target is not False else t.spill
        if r.process > t.spill * limit or (memo.spilling and r.process >= stop * limit):
            spilling = True
            wanted = max(wanted, r.process - int(stop * limit))
            spill_reasons.append(
                f"process memory {format_bytes(r.process)} is above the "
                + _line("spill", t.spill, limit)
                if r.process > t.spill * limit
                else f"process memory {format_bytes(r.process)} is not yet under the "
                + _line("target" if t.target is not False else "spill", stop, limit)
            )
    stuck_reported = memo.stuck_reported if spilling else False
    if wanted > 0 and scope.can_spill and r.managed > 0:
        decisions.append(
            Spill(scope.name, "; ".join(spill_reasons), r, nbytes=min(wanted, r.managed))
        )
    elif spilling and not stuck_reported:
        stuck_reported = True
        decisions.append(
            Report(
                scope.name,
                f"{spill_reasons[-1]}, but nothing is left to spill: "
                + (
                    f"unmanaged memory is {format_bytes(r.unmanaged + r.unmanaged_recent)}; "
                    "look for leaks or try `memctl trim`"
                    if scope.can_spill
                    else "the store has no evict(), so spilling is off"
                ),
                r,
            )
        )

    # --- pause and resume, with a margin -----------------------------------------------
    paused, paused_since = memo.paused, memo.paused_since
    if t.pause is not False and scope.commandable:
        resume_line = max(t.pause - settings.resume_margin, 0.0)
        if not paused and r.process > t.pause * limit:
            paused, paused_since = True, now
            decisions.append(
                Pause(
                    scope.name,
                    f"process memory {format_bytes(r.process)} is above the "
                    + _line("pause", t.pause, limit),
                    r,
                )
            )
        elif paused and r.process < resume_line * limit:
            paused, paused_since = False, None
            decisions.append(
                Resume(
                    scope.name,
                    f"process memory {format_bytes(r.process)} is back under the resume line "
                    f"({resume_line:.0%} of {format_bytes(limit)}: pause "
                    f"{t.pause:.0%} - margin {settings.resume_margin:.0%})",
                    r,
                )
            )
    elif paused:  # pause turned off, or the worker went away: nothing holds it paused
        paused, paused_since = False, None

    # --- terminate, and restart after pause-timeout -------------------------------------
    terminating = memo.terminating
    if scope.is_worker and scope.commandable and not terminating:
        if t.terminate is not False and r.process > t.terminate * limit:
            terminating = True
            decisions.append(
                Terminate(
                    scope.name,
                    f"process memory {format_bytes(r.process)} is above the "
                    + _line("terminate", t.terminate, limit),
                    r,
                )
            )
        elif (
            paused
            and scope.supervised
            and settings.pause_timeout is not False
            and paused_since is not None
            and now - paused_since >= settings.pause_timeout
        ):
            terminating = True
            decisions.append(
                Terminate(
                    scope.name,
                    f"paused for {now - paused_since:.0f} s, longer than memory.pause-timeout "
                    f"({settings.pause_timeout:.0f} s); restarting it",
                    r,
                )
            )

    # Every field, so no replace(): this runs for every scope at every tick.
    return decisions, ScopeMemo(spilling, paused, paused_since, terminating, stuck_reported)


@dataclass(frozen=True)
class Lines:
    """Process memory (bytes) beyond which ``decide`` would act on a scope: above any
    of ``above`` (ascending) or below ``below``; None is no line."""

    above: tuple[int, ...] = ()
    below: int | None = None

    def crossed(self, process: int) -> bool:
        return bool(self.above and process > self.above[0]) or (
            self.below is not None and process < self.below
        )


def watch_lines(scope: ScopeInput, memo: ScopeMemo, settings: EngineSettings) -> Lines:
    """The lines of ``decide`` that process memory alone can cross from here: up over
    the spill, pause and terminate lines not yet acted on, down under the resume line
    of a paused scope. (Not the time-based pause-timeout, nor the end of spilling,
    which commands nothing.)"""
    limit, t = scope.memory_limit, scope.thresholds
    if limit is None:
        return Lines()
    up: list[float] = []
    if t.spill is not False and not memo.spilling:
        up.append(t.spill)
    below = None
    if t.pause is not False and scope.commandable:
        if memo.paused:
            below = math.ceil(max(t.pause - settings.resume_margin, 0.0) * limit)
        else:
            up.append(t.pause)
    if t.terminate is not False and scope.is_worker and scope.commandable and not memo.terminating:
        up.append(t.terminate)
    # decide() compares an integer reading with fraction * limit: > x is > floor(x),
    # < x is < ceil(x).
    return Lines(tuple(sorted(int(fraction * limit) for fraction in up)), below)
