"""SMP: two harts, one host thread each. Linux brings both up, and guest-bench (whose qsort
and sieve stress memory, whose kernel uses LR/SC and AMO spinlocks across the harts) computes
QEMU's checksum."""
import re

import pytest

from guest_console import BOOT_OK, BOOT_TIMEOUT, INITRD, KERNEL, OPENSBI, SERVER, description, start_server
from test_boot import CHECKSUM, QEMU_CHECKSUM_SCALE1, consoles  # noqa: F401 (fixture)

pytestmark = [
    pytest.mark.skipif(not SERVER, reason="MACHINE_SERVER is not set"),
    pytest.mark.skipif(not (KERNEL.exists() and INITRD.exists()), reason="no shared guest"),
    pytest.mark.skipif(not OPENSBI.exists(), reason="Debian's opensbi is not installed"),
]


def test_two_harts_boot_and_compute_qemus_checksum(tmp_path, consoles):  # noqa: F811
    console = start_server(tmp_path, description(cpus=2, append="console=ttyS0 guest.run=guest-bench,1"))
    consoles.append(console)
    console.expect(r"smp: Brought up 1 node, 2 CPUs", 120, why="both harts online")
    # The whole line, not just its start: the rest may not have arrived yet.
    console.expect(re.escape(BOOT_OK) + r" \(riscv64, 2 cpu, ", BOOT_TIMEOUT, why="boot to init on 2 cpus")
    m = console.expect(CHECKSUM, 600, why="guest-bench,1 on two harts")
    assert m.group(2) == QEMU_CHECKSUM_SCALE1, f"checksum {m.group(2)}\n{console.tail()}"
    console.expect(r"guest: run done, status 0", 60)
    assert console.wait(60) == 0, console.tail()
