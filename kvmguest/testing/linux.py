"""Debian's stock kernel as a test guest (the tests and the bench boot it): the options
it needs on a host whose KVM emulates kernel code (kvm_pvm; README, "Linux kernels"),
and an initramfs whose /init exits at once.

``scripts/fetch-linux`` fetches the kernel by package name."""

from __future__ import annotations

import subprocess
from pathlib import Path

# The kernel parameters that step around the instructions kvm_pvm cannot emulate and
# the boot-time work that stalls there (DEVELOPERS.md, "Linux guests", says which is
# which). Linux 6.1 reads only the first 127 characters of clearcpuid=.
CMDLINE = ("console=ttyS0 earlyprintk=serial,ttyS0 noxsave clearcpuid=smap,smep,fsgsbase,"
           "avx,avx2,umip,popcnt,movbe,ssse3,sse4_1,sse4_2,aes,pclmulqdq,rdrand,rdseed,erms,"
           "fsrm,bmi1,bmi2,sha_ni initcall_blacklist=ftrace_check_for_weak_functions "
           "preempt=full cryptomgr.notests")
# `kvmguest run` options: SLUB's cmpxchg16b is not emulated either.
MACHINE = ("--memory", "512M", "--vcpus", "2", "--cpu", "host,-cx16")
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
