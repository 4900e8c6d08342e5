"""Debian's stock kernel as a test guest (the tests and the bench boot it): its command
line and machine, and an initramfs whose /init exits at once. (On a host whose KVM
emulates kernel code, kvmguest adds what Linux needs there itself: arch.x86.linux.)

``scripts/fetch-linux`` fetches the kernel by package name."""

from __future__ import annotations

import subprocess
from pathlib import Path

CMDLINE = "console=ttyS0 earlyprintk=serial,ttyS0"
MACHINE = ("--memory", "512M", "--vcpus", "2")     # `kvmguest run` options
RUN_INIT = "Run /init as init process"
INIT = """
.globl _start
_start:
    mov $60, %eax           /* exit(0) */
    xor %edi, %edi
    syscall
    hlt
"""


def build_initramfs(work: Path) -> Path:
    """A newc initramfs in ``work`` whose /init exits at once (built with gcc and
    Debian's cpio)."""
    (work / "init.S").write_text(INIT)
    root = work / "root"
    root.mkdir()
    subprocess.run(["gcc", "-nostdlib", "-static", "-o", root / "init", work / "init.S"],
                   check=True)
    with open(work / "initramfs.cpio", "wb") as out:
        subprocess.run("find . | cpio -o -H newc --quiet", shell=True, cwd=root, stdout=out,
                       check=True)
    return work / "initramfs.cpio"
