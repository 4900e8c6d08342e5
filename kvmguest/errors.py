"""The error tree: every error kvmguest means to report is a :class:`KvmguestError`.

Each carries the exit code the CLI returns for it, so the CLI catches one type, prints one
line and exits with ``err.exit_code``. Layers raise their own subclass and chain the
cause with ``raise ... from err``. Anything else reaching the CLI is a bug (``-v`` shows
its traceback).

Exit codes (docs/cli.md's table): the guest's own result when it writes one, 1 when the
guest crashes or an operation fails, 2 for bad input (options, files, snapshots, a host
that cannot run KVM), 121 when the guest reboots, 122 when its kernel panics, 123 when it
triple-faults, 124 on timeout, 130 (128 + signal) when interrupted.
"""

from __future__ import annotations

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_REBOOT = 121            # the guest reset the machine (kvmguest does not reboot)
EXIT_PANIC = 122             # the guest kernel panicked (Linux's panic line on the console)
EXIT_TRIPLE_FAULT = 123      # the guest triple-faulted
EXIT_TIMEOUT = 124
EXIT_GUEST_LOST = 125        # a migration's post-copy broke off: the guest is lost (both sides)
EXIT_INTERRUPTED = 130


class KvmguestError(Exception):
    """Base of every error kvmguest reports; ``exit_code`` is what the CLI exits with."""

    exit_code = EXIT_FAILED


class UsageError(KvmguestError, ValueError):
    """Options that are out of range or do not fit together."""

    exit_code = EXIT_BAD_INPUT


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived; what was in progress is cancelled cleanly.

    Like KeyboardInterrupt (which it is), it is not an Exception: an ``except Exception``
    anywhere (logging's own error handler, say) must not swallow it."""

    def __init__(self, message: str = "interrupted", signum: int = 2):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class Handover(BaseException):
    """The guest goes on in a new program image (a guest-requested migration was saved).

    Raised, not called: on its way out it passes every clean-up (the machine is closed
    and its RAM freed, sockets removed), and the CLI then replaces this process with
    ``argv`` (``os.execve``), so one process holds the guest at any time. Not an
    Exception, so that no ``except Exception`` stops it on the way."""

    def __init__(self, argv: list[str], env: dict[str, str], snapshot: str,
                 stdin_ended: bool = False):
        super().__init__("handover")
        self.argv, self.env, self.stdin_ended = argv, env, stdin_ended
        self.snapshot = snapshot            # what the new image restores

    def exec(self):
        import os
        import sys
        sys.stdout.flush()
        sys.stderr.flush()
        if self.stdin_ended:          # standard input ended while it was held
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.close(null)
        os.execve(self.argv[0], self.argv, self.env)


def printable(text: object, keep_newlines: bool = False) -> str:
    """``text`` with terminal control characters escaped (``\\x1b`` -> ``\\x1b`` as text),
    for anything that came from a file, a socket or a guest before it reaches a terminal."""
    out = []
    for ch in str(text):
        code = ord(ch)
        if ch == "\n" and keep_newlines:
            out.append(ch)
        elif code < 0x20 or code == 0x7F or 0x80 <= code < 0xA0 or 0xD800 <= code < 0xE000:
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)
