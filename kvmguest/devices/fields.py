"""What each device's saved state may hold: every field's type and range, checked when a
snapshot's state is decoded (before a VM is made), so that a hostile file is refused in
one line instead of failing inside a device (``debug_exit.result = "x"``)."""

from __future__ import annotations

import math


def uint(bits: int):
    """A whole number in [0, 2**bits)."""
    def check(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << bits
    check.what = f"a whole number below 2**{bits}"
    return check


def hex_bytes(most: int, exact: bool = False):
    """Hex text of at most (or exactly) ``most`` bytes."""
    def check(v) -> bool:
        if not isinstance(v, str) or len(v) % 2 or len(v) > 2 * most \
                or (exact and len(v) != 2 * most):
            return False
        try:
            bytes.fromhex(v)
        except ValueError:
            return False
        return True
    check.what = f"hex of {'exactly' if exact else 'at most'} {most} bytes"
    return check


def boolean(v) -> bool:
    return isinstance(v, bool) or (isinstance(v, int) and v in (0, 1))


boolean.what = "true or false"


def seconds(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) \
        and abs(v) <= 1e11


seconds.what = "a finite number of seconds"


def optional(inner):
    def check(v) -> bool:
        return v is None or inner(v)
    check.what = f"null or {inner.what}"
    return check


def registers(names, bits: int = 8):
    """An object with exactly ``names``, each a whole number of ``bits`` bits."""
    value = uint(bits)

    def check(v) -> bool:
        return isinstance(v, dict) and set(v) == set(names) and all(map(value, v.values()))
    check.what = f"an object of the registers {', '.join(sorted(names))}"
    return check


def check_fields(device: str, state, fields: dict, required=()) -> str | None:
    """What is wrong with ``state`` for ``device`` (None: nothing). Fields missing from an
    older snapshot keep the device's reset value, unless ``required``."""
    if not isinstance(state, dict):
        return f"device {device}'s state is not an object"
    for name in state:
        if name not in fields:
            return f"device {device}'s state has an unknown field {name!r}"
    for name, check in fields.items():
        if name not in state:
            if name in required:
                return f"device {device}'s state has no {name}"
            continue
        if not check(state[name]):
            return f"device {device}'s field {name} is not {check.what}"
    return None
