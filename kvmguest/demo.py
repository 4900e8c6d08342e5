"""`make demo`: boot a guest, watch its dirty pages, pause and resume it."""

from __future__ import annotations

import sys
import time

from .machine import Machine

GUESTS = "guests/build"


def main() -> int:
    print("== 1. boot the hello guest on /dev/kvm")
    t = time.perf_counter()
    with Machine(f"{GUESTS}/hello.elf", cmdline="demo=1") as m:
        r = m.run(timeout=10)
    print(r.console, end="")
    print(f"   -> exit code {r.exit_code} in {(time.perf_counter() - t) * 1e3:.1f} ms "
          "(create to exit)\n")

    print("== 2. the dirty guest rewrites 512 pages over two memory slots; KVM's dirty log "
          "sees them")
    with Machine(f"{GUESTS}/dirty.elf", memory=(3 << 30) + (16 << 20),
                 cmdline=f"pages=512 base={(3 << 30) - (1 << 20)} passes=3") as m:
        m.dirty.start()
        m.dirty.harvest()
        r = m.run(timeout=60)
        print(r.console, end="")
        for slot, pages in m.dirty.harvest().items():
            print(f"   slot {slot}: {len(pages)} dirty pages")
    print()
    print("== 3. pause and resume a guest that never exits on its own")
    with Machine(f"{GUESTS}/spin.elf") as m:
        m.start()
        time.sleep(0.1)
        t = time.perf_counter()
        m.pause()
        print(f"   paused in {(time.perf_counter() - t) * 1e3:.2f} ms; resuming")
        m.resume()
        time.sleep(0.05)
        m.stop()
    print("demo done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
