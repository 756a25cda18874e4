"""The wire contract: the committed generated code matches the .proto, and buf lint passes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert generated, "the generator wrote nothing"
    committed = ROOT / "client"
    stale = [
        str(path)
        for path in generated
        if (tmp_path / path).read_bytes() != (committed / path).read_bytes()
    ]
    assert not stale, f"regenerate with `python scripts/gen_protos.py`: {stale} differ"


def test_buf_lint_is_clean() -> None:
    buf = shutil.which("buf", path=str(Path(sys.executable).parent)) or shutil.which("buf")
    assert buf, "buf is missing: install the test extra (buf-bin)"
    result = subprocess.run([buf, "lint"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_contract_does_not_break_the_released_one() -> None:
    """``protos/baseline/memctl-v1.json`` is the contract as first released (``buf
    build -o``); every later change must be additive."""
    buf = shutil.which("buf", path=str(Path(sys.executable).parent)) or shutil.which("buf")
    assert buf
    result = subprocess.run(
        [buf, "breaking", "--against", "protos/baseline/memctl-v1.json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
