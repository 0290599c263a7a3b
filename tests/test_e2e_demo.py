"""`routerd demo` as a user runs it, and as a user stops it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path


def _group_members(pgid: int) -> list[int]:
    """Live processes in process group ``pgid`` (zombies excluded)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: the fields follow the last ')'.
        fields = stat.rpartition(")")[2].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def test_sigterm_to_the_demo_stops_every_child_and_removes_its_folder() -> None:
    demo = subprocess.Popen(
        [sys.executable, "-m", "routerd", "demo", "--requests", "400", "--clients", "4"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    assert demo.stdout is not None
    workdir: Path | None = None
    try:
        for line in demo.stdout:
            if match := re.search(r"config (\S+)/config\.toml", line):
                workdir = Path(match.group(1))
            if "client processes" in line:
                break
        assert workdir is not None and workdir.exists()
        # Let the clients connect and the requests flow before the signal.
        time.sleep(1.0)
        assert len(_group_members(demo.pid)) >= 6  # demo, mock, daemon, four clients
        demo.send_signal(signal.SIGTERM)
        rest = demo.stdout.read()
        assert demo.wait(timeout=40) == 143, rest
        assert "stopped by SIGTERM" in rest
        deadline = time.monotonic() + 10
        while _group_members(demo.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _group_members(demo.pid) == []
        assert not workdir.exists()
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        demo.stdout.close()
        for pid in _group_members(demo.pid):
            os.kill(pid, signal.SIGKILL)
