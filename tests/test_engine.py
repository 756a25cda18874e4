"""The threshold engine, driven directly: readings in, decisions out, no clock or socket."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memctl_server.engine import (
    Decision,
    EngineSettings,
    Pause,
    Report,
    Resume,
    ScopeInput,
    ScopeMemo,
    Spill,
    Terminate,
    Thresholds,
    decide,
    watch_lines,
)
from memctl_server.readings import MemoryReadings

LIMIT = 1000
SETTINGS = EngineSettings(resume_margin=0.05, pause_timeout=False)


def worker(process: int, managed: int = 0, **kwargs: object) -> ScopeInput:
    fields: dict[str, object] = {
        "name": "w",
        "memory_limit": LIMIT,
        "thresholds": Thresholds(),
        "readings": MemoryReadings.of(
            process=process, managed=managed, unmanaged_old=process - managed, spilled=0
        ),
        "commandable": True,
        "is_worker": True,
    }
    fields.update(kwargs)
    return ScopeInput(**fields)  # type: ignore[arg-type]


def run(
    scope: ScopeInput,
    memo: ScopeMemo | None = None,
    now: float = 0.0,
    settings: EngineSettings = SETTINGS,
) -> tuple[list[Decision], ScopeMemo]:
    return decide(scope, memo or ScopeMemo(), now, settings)


def kinds(decisions: list[Decision]) -> list[type]:
    return [type(d) for d in decisions]


def test_quiet_below_every_line() -> None:
    decisions, memo = run(worker(process=500, managed=300))
    assert decisions == [] and memo == ScopeMemo()


def test_target_spills_managed_down_to_target() -> None:
    decisions, _ = run(worker(process=690, managed=650))
    (spill,) = decisions
    assert isinstance(spill, Spill) and spill.nbytes == 50
    assert "managed memory" in spill.reason and "target threshold (60%" in spill.reason


def test_spill_on_process_continues_until_under_target() -> None:
    decisions, memo = run(worker(process=750, managed=300))
    (spill,) = decisions
    assert isinstance(spill, Spill) and spill.nbytes == 150  # down to 600 = target
    assert "spill threshold (70%" in spill.reason and memo.spilling
    # Between target and spill: keeps going because it started above spill...
    decisions, memo = run(worker(process=650, managed=200), memo)
    assert kinds(decisions) == [Spill] and decisions[0].nbytes == 50  # type: ignore[union-attr]
    assert memo.spilling
    # ...until process is under target.
    decisions, memo = run(worker(process=590, managed=150), memo)
    assert decisions == [] and not memo.spilling
    # Never started: between target and spill does nothing.
    decisions, _ = run(worker(process=650, managed=200))
    assert decisions == []


def test_spill_never_asks_for_more_than_is_in_ram() -> None:
    (spill,), _ = run(worker(process=790, managed=20))
    assert isinstance(spill, Spill) and spill.nbytes == 20


def test_nothing_left_to_spill_is_said_once() -> None:
    decisions, memo = run(worker(process=750, managed=0))
    (report,) = decisions
    assert isinstance(report, Report) and "nothing is left to spill" in report.reason
    assert memo.stuck_reported
    decisions, memo = run(worker(process=760, managed=0), memo)
    assert decisions == []  # not every tick
    _, memo = run(worker(process=500), memo)  # episode over
    decisions, _ = run(worker(process=750), memo)
    assert kinds(decisions) == [Report]  # a new episode is reported again


def test_store_without_evict_turns_spilling_off() -> None:
    decisions, _ = run(worker(process=750, managed=700, can_spill=False))
    (report,) = decisions
    assert isinstance(report, Report) and "no evict()" in report.reason


def test_pause_then_resume_with_hysteresis() -> None:
    decisions, memo = run(worker(process=810), now=1.0)
    assert kinds(decisions) == [Report, Pause]  # process-driven spill has nothing in RAM
    assert memo.paused and memo.paused_since == 1.0
    pause = decisions[1]
    assert "pause threshold (80% of 1000 B = 800 B)" in pause.reason
    assert pause.readings.process == 810
    # Hovering just under the pause line does not resume: no flapping.
    for process in (790, 801, 760, 799, 751):
        decisions, memo = run(worker(process=process), memo, now=2.0)
        assert not any(isinstance(d, Pause | Resume) for d in decisions), process
        assert memo.paused
    decisions, memo = run(worker(process=749), memo, now=3.0)
    (resume,) = [d for d in decisions if isinstance(d, Resume)]
    assert "resume line (75%" in resume.reason and not memo.paused
    assert memo.paused_since is None


def test_margin_is_configurable() -> None:
    _, memo = run(worker(process=810))
    settings = EngineSettings(resume_margin=0.0)
    decisions, memo = run(worker(process=799), memo, settings=settings)
    assert kinds(decisions)[-1] is Resume


def test_terminate_once() -> None:
    decisions, memo = run(worker(process=960))
    assert kinds(decisions) == [Report, Pause, Terminate]
    assert "terminate threshold (95%" in decisions[2].reason
    assert memo.terminating
    decisions, memo = run(worker(process=990), memo)
    assert Terminate not in kinds(decisions)


def test_service_scope_is_never_terminated() -> None:
    service = worker(process=990, is_worker=False, name="service")
    decisions, _ = run(service)
    assert Terminate not in kinds(decisions) and Pause in kinds(decisions)


def test_detached_worker_gets_no_commands_but_still_spills() -> None:
    decisions, _ = run(worker(process=990, managed=500, commandable=False))
    assert kinds(decisions) == [Spill]


@pytest.mark.parametrize("switch", ["target", "spill", "pause", "terminate"])
def test_each_rule_can_be_switched_off(switch: str) -> None:
    thresholds = replace(Thresholds(), **{switch: False})
    decisions, _ = run(worker(process=990, managed=700, thresholds=thresholds))
    expected = {"target": Spill, "spill": Spill, "pause": Pause, "terminate": Terminate}
    present = {type(d) for d in decisions}
    if switch in ("pause", "terminate"):
        assert expected[switch] not in present
    else:
        assert Spill in present  # the other spill rule still spills
        (spill,) = [d for d in decisions if isinstance(d, Spill)]
        # target off: spill down to the spill line (990 - 700); spill off: to target.
        assert spill.nbytes == (100 if switch == "spill" else 290)


def test_ignore_process_memory() -> None:
    """Dask's "ignore process memory": spill, pause and terminate all off."""
    thresholds = Thresholds(target=0.6, spill=False, pause=False, terminate=False)
    decisions, memo = run(worker(process=999, managed=100, thresholds=thresholds))
    assert decisions == [] and memo == ScopeMemo()
    decisions, _ = run(worker(process=999, managed=700, thresholds=thresholds))
    assert kinds(decisions) == [Spill] and decisions[0].nbytes == 100  # type: ignore[union-attr]


def test_target_off_spills_down_to_spill_line() -> None:
    thresholds = Thresholds(target=False)
    (spill,), memo = run(worker(process=750, managed=500, thresholds=thresholds))
    assert isinstance(spill, Spill) and spill.nbytes == 50
    decisions, _ = run(worker(process=690, managed=450, thresholds=thresholds), memo)
    assert decisions == []


def test_no_limit_means_no_rules() -> None:
    decisions, memo = run(worker(process=10**12, managed=10**11, memory_limit=None))
    assert decisions == [] and memo == ScopeMemo()


def test_pause_timeout_restarts_only_supervised_workers() -> None:
    settings = EngineSettings(pause_timeout=60.0)
    for supervised in (True, False):
        _, memo = run(worker(process=850, supervised=supervised), now=0.0, settings=settings)
        decisions, memo2 = run(
            worker(process=850, supervised=supervised), memo, now=59.0, settings=settings
        )
        assert Terminate not in kinds(decisions)
        decisions, memo2 = run(
            worker(process=850, supervised=supervised), memo, now=61.0, settings=settings
        )
        if supervised:
            (terminate,) = [d for d in decisions if isinstance(d, Terminate)]
            assert "pause-timeout" in terminate.reason and memo2.terminating
        else:
            assert Terminate not in kinds(decisions)


fraction = st.one_of(st.just(False), st.floats(0.05, 1.5), st.sampled_from([0.7, 0.75, 0.8]))


@st.composite
def near_a_line(draw: st.DrawFn, thresholds: Thresholds) -> int:
    """Any reading, or one within a byte of a line, where an off-by-one would show."""
    fractions = [f for f in vars(thresholds).values() if f is not False]
    if thresholds.pause is not False:
        fractions.append(max(thresholds.pause - SETTINGS.resume_margin, 0.0))
    if not fractions or draw(st.booleans()):
        return draw(st.integers(0, 3 * LIMIT))
    line = int(draw(st.sampled_from(fractions)) * LIMIT)
    return max(line + draw(st.integers(-1, 2)), 0)


@settings(max_examples=300)
@given(
    data=st.data(),
    thresholds=st.builds(Thresholds, fraction, fraction, fraction, fraction),
    managed=st.integers(0, 3 * LIMIT),
    memo=st.builds(ScopeMemo, st.booleans(), st.booleans(), st.none(), st.booleans()),
    commandable=st.booleans(),
    is_worker=st.booleans(),
)
def test_watch_lines_are_where_decide_commands_or_starts_spilling(
    data: st.DataObject,
    thresholds: Thresholds,
    managed: int,
    memo: ScopeMemo,
    commandable: bool,
    is_worker: bool,
) -> None:
    """A worker reporting its RSS is decided on at once exactly when its reading
    crosses the lines: never too late, and no evaluation for nothing."""
    process = data.draw(near_a_line(thresholds))
    scope = worker(
        process,
        min(managed, process),
        thresholds=thresholds,
        commandable=commandable,
        is_worker=is_worker,
    )
    decisions, after = run(scope, memo)
    commands = [d for d in decisions if isinstance(d, Pause | Resume | Terminate)]
    acted = bool(commands) or (after.spilling and not memo.spilling)
    lines = watch_lines(scope, memo, SETTINGS)
    assert lines.crossed(scope.readings.process) == acted
    assert list(lines.above) == sorted(lines.above)


def test_watch_lines_follow_the_memo() -> None:
    running = watch_lines(worker(process=0), ScopeMemo(), SETTINGS)
    assert running.above == (700, 800, 950) and running.below is None
    paused = watch_lines(worker(process=0), ScopeMemo(spilling=True, paused=True), SETTINGS)
    assert paused.above == (950,) and paused.below == 750
    assert watch_lines(worker(process=0, memory_limit=None), ScopeMemo(), SETTINGS).above == ()


def test_watch_lines_round_as_decide_compares() -> None:
    # 1001 bytes: every line falls between two integers.
    def commands(process: int, memo: ScopeMemo) -> list[type]:
        decisions = run(worker(process=process, memory_limit=1001), memo)[0]
        return [kind for kind in kinds(decisions) if kind in (Pause, Resume, Terminate)]

    running = watch_lines(worker(process=0, memory_limit=1001), ScopeMemo(), SETTINGS)
    assert running.above == (700, 800, 950)
    assert commands(800, ScopeMemo()) == [] and commands(801, ScopeMemo()) == [Pause]
    paused = ScopeMemo(spilling=True, paused=True)
    assert watch_lines(worker(process=0, memory_limit=1001), paused, SETTINGS).below == 751
    assert commands(751, paused) == [] and commands(750, paused) == [Resume]
