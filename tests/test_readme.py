"""The README's command blocks work as typed, in order, in a fresh directory."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import ROOT, read_until


# --- the README's commands work as typed ----------------------------------------------
def readme_commands(section: str = "## Using it") -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split(section, 1)[1].split("```", 2)[1]
    lines, current = [], ""
    for raw in block.splitlines():
        line = raw.split("  #", 1)[0].rstrip()
        if not line or line == "sh":
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            lines.append(current.strip())
            current = ""
    return lines


@pytest.mark.parametrize("section", ["## Using it", "## Continuous checkpoints"])
def test_every_command_in_the_readme_works_as_typed(tmp_path, section):
    """The README's command blocks ("Using it", checkpoints), run in order in a fresh
    directory with `guests/` beside it (commands ending in & run in the background)."""
    os.symlink(ROOT / "guests", tmp_path / "guests")
    background = []
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
               XDG_RUNTIME_DIR=str(tmp_path))
    commands = readme_commands(section)
    assert len(commands) >= 4 and all(c.startswith("kvmguest ") for c in commands), commands
    try:
        for command in commands:
            if command.endswith("&"):
                p = subprocess.Popen(command[:-1], shell=True, cwd=tmp_path, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                read_until(p.stdout, "ok")
                background.append(p)
                continue
            p = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=300)
            assert p.returncode == 0, (command, p.returncode, p.stdout[-1000:], p.stderr)
    finally:
        for p in background:
            if p.poll() is None:
                p.kill()
