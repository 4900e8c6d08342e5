"""x86 debug registers, as a debugger arms them through KVM_SET_GUEST_DEBUG: DR0-3 hold
addresses, DR7 enables each and says what it watches (SDM vol. 3, 18.2)."""

from __future__ import annotations

COUNT = 4                       # DR0-DR3
DR6_BS = 1 << 14                # DR6: the exit was a single step
DR7_GE = 1 << 9                 # exact data breakpoints
DR7_RW_EXEC, DR7_RW_ACCESS = 0, 3   # break on execution; on data reads or writes
DR7_LEN = {1: 0, 2: 1, 4: 3, 8: 2}  # the LEN field's encoding of a watched size


def hit(dr6: int) -> list[int]:
    """The debug registers whose condition a debug exit's DR6 reports."""
    return [i for i in range(COUNT) if dr6 & (1 << i)]


def arm(execute: dict[int, int], access: dict[tuple[int, int], int]) -> list[int] | None:
    """DR0-DR7 for execution breakpoints ``execute`` (address -> register) and access
    watchpoints ``access`` ((address, size) -> register); None when neither is set."""
    dr = [0] * 8
    dr7 = 0
    for addr, i in execute.items():
        dr[i] = addr
        dr7 |= 1 << (2 * i)
    for (addr, size), i in access.items():
        dr[i] = addr
        dr7 |= 1 << (2 * i) | (DR7_RW_ACCESS | DR7_LEN[size] << 2) << (16 + 4 * i)
    if not dr7:
        return None
    dr[7] = dr7 | DR7_GE
    return dr
