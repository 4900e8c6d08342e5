"""gdb's ``monitor`` commands (``qRcmd``): save the stopped guest, choose physical or
virtual addressing, and name or go to the checkpoint reverse execution goes back to."""

from __future__ import annotations

import shlex

from kvmguest.errors import KvmguestError

MONITOR_HELP = """kvmguest monitor commands:
  snapshot PATH    save the stopped guest (kvmguest restore PATH --gdb ... carries on);
                   PATH runs to the end of the line, or is one quoted word
  phys on|off      memory packets address guest-physical (on) or -virtual memory (off)
  checkpoints      the checkpoint reverse execution goes back to
  goto N           go to checkpoint generation N (the newest is the only one kept)
  help             this text
"""


def monitor_path(command: str) -> str:
    """The path a monitor command names: everything after the verb (spaces and all), or
    one shell-quoted word ('my dir/a.snap')."""
    rest = command.strip().split(None, 1)[1].strip()
    if rest[:1] in ("'", '"'):
        words = shlex.split(rest)
        if len(words) != 1:
            raise ValueError("quote the whole path, and only the path")
        return words[0]
    return rest




class Monitor:
    """Answers monitor commands for a DebugTarget; ``snapshot(path)`` saves the stopped
    guest and returns a line saying so (None: not offered)."""

    def __init__(self, target, snapshot=None):
        self.target, self.snapshot = target, snapshot

    def answer(self, command: str) -> str:
        """The text for gdb's console."""
        words = command.split()
        verb = words[0] if words else "help"
        try:
            if verb == "snapshot" and len(words) >= 2 and self.snapshot is not None:
                return self.snapshot(monitor_path(command)) + "\n"
            if verb == "phys" and len(words) == 2 and words[1] in ("on", "off"):
                self.target.phys = words[1] == "on"
                return (f"memory packets now address guest-"
                        f"{'physical' if self.target.phys else 'virtual'} memory\n")
            if verb == "checkpoints":
                return self._checkpoints_text()
            if verb == "goto" and len(words) == 2:
                return self._goto(int(words[1], 0))
            return MONITOR_HELP
        except (KvmguestError, ValueError) as err:
            return f"kvmguest: {err}\n"

    def _checkpoints_text(self) -> str:
        checkpoints = self.target.checkpoints
        if checkpoints is None:
            return "no checkpoints: run or restore with --checkpoint PATH --every SECONDS\n"
        if not checkpoints.generation:
            return "no checkpoint taken yet\n"
        return (f"checkpoint {checkpoints.generation} in {checkpoints.path} (the newest; "
                "reverse execution goes back to it)\n")

    def _goto(self, generation: int) -> str:
        checkpoints = self.target.checkpoints
        if checkpoints is None or checkpoints.generation != generation:
            raise ValueError(f"checkpoint {generation} is not kept (the newest is "
                             f"{getattr(checkpoints, 'generation', 0)})")
        checkpoints.rewind()
        return f"the guest is at checkpoint {generation}\n"
