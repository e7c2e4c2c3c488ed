"""What the whole-guest test files share: the binaries under test, the shared guest, and skip
marks for what a test needs that a machine may lack.

Environment: MACHINE_SERVER and MACHINE_IMG (the built binaries; tests skip without them),
GUEST_DIR (the shared guest; default ../shared/guests beside the repository), BOOT_TIMEOUT
(seconds one boot may take; default 170, generous for a loaded 2-core CI machine).
"""
import os
import shutil
from pathlib import Path

SERVER = os.environ.get("MACHINE_SERVER")
MACHINE_IMG = os.environ.get("MACHINE_IMG")
REPO = Path(__file__).resolve().parents[2]
GUEST_DIR = Path(os.environ.get("GUEST_DIR") or REPO.parent / "shared" / "guests")
KERNEL = GUEST_DIR / "linux-6.1-rv64-Image"
INITRD = GUEST_DIR / "initramfs-rv64.cpio.gz"
BOOT_TIMEOUT = float(os.environ.get("BOOT_TIMEOUT", "170"))
# guest-bench,1's checksum under qemu-system-riscv64 (tests/boot checks it against QEMU itself).
QEMU_CHECKSUM_SCALE1 = "0170a8bc544c8311"


def needs(*tools):
    """Skip marks for a test file: machine-server built, the shared guest present, and each of
    `tools` on PATH."""
    import pytest  # here, so bench/ scripts can use the constants without pytest
    return [
        pytest.mark.skipif(not SERVER, reason="MACHINE_SERVER is not set"),
        pytest.mark.skipif(not KERNEL.exists(), reason=f"no shared guest in {GUEST_DIR}"),
    ] + [pytest.mark.skipif(shutil.which(t) is None, reason=f"{t} is not installed") for t in tools]
