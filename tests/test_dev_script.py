"""./dev's venv rule: a venv built by another Python is rebuilt, not reused forever."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def fresh_venv_function() -> str:
    text = (ROOT / "dev").read_text()
    match = re.search(r"^fresh_venv\(\) \{.*?^\}", text, re.S | re.M)
    assert match is not None, "./dev defines fresh_venv"
    return match.group(0)


def test_a_venv_of_another_python_is_rebuilt(tmp_path: Path) -> None:
    venv = tmp_path / ".venv"
    (venv / "bin").mkdir(parents=True)
    stale = venv / "bin" / "python"
    stale.write_text("#!/bin/sh\necho 3.10\n")
    stale.chmod(0o755)
    (venv / "marker").write_text("from the old venv")
    script = fresh_venv_function() + "\nfresh_venv .venv\n"
    result = subprocess.run(
        ["bash", "-c", script],
        cwd=tmp_path,
        env={"PY": sys.executable, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "built by Python 3.10" in result.stderr and "rebuilding" in result.stderr
    assert not (venv / "marker").exists()
    version = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sys; print(sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert version.stdout.strip() == str(sys.version_info[:2])
