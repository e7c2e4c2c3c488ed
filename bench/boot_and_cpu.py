"""Boot time and CPU speed of machine-server against qemu-system-riscv64, in one run.

Boots the shared guest (OpenSBI fw_dynamic + Linux + initramfs, 256M, 1 hart) with
guest.run=guest-bench,SCALE under each emulator, one after the other, and prints each one's
wall time from process start to "guest: boot ok", guest-bench's own total (timed by the guest's
clock), the wall time from "boot ok" to the checksum, the checksums, and the ratios ours/QEMU.

Usage: python3 bench/boot_and_cpu.py [--scale N] [--timeout SECONDS]
Environment: MACHINE_SERVER (the binary to measure), GUEST_DIR (the shared guest).
"""
import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "boot"))
from guest_console import BOOT_OK, SERVER, description, start_qemu, start_server  # noqa: E402

CHECKSUM = r"guest-bench total +([0-9.]+) s checksum ([0-9a-f]{16})"


def measure(console, timeout):
    try:
        boot = console.expect(re.escape(BOOT_OK), timeout, why="boot")
        t_boot = time.monotonic() - console.started
        m = console.expect(CHECKSUM, timeout, why="guest-bench")
        t_bench = time.monotonic() - console.started - t_boot
        console.wait(60)
        return t_boot, float(m.group(1)), t_bench, m.group(2)
    finally:
        console.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args()
    if not SERVER:
        sys.exit("MACHINE_SERVER is not set (path of the machine-server binary)")
    append = f"console=ttyS0 guest.run=guest-bench,{args.scale}"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        results = {}
        # One at a time: never two guests at once.
        results["qemu"] = measure(start_qemu(tmp, append), args.timeout)
        results["ours"] = measure(start_server(tmp, description(append=append)), args.timeout)
    print(f"{'':14} {'boot ok (s)':>12} {'bench total (s)':>16} {'bench wall (s)':>15}  checksum")
    for name, label in (("ours", "machine-server"), ("qemu", "qemu-system")):
        b, t, w, c = results[name]
        print(f"{label:14} {b:12.2f} {t:16.3f} {w:15.2f}  {c}")
    (ob, ot, ow, oc), (qb, qt, qw, qc) = results["ours"], results["qemu"]
    print(f"{'ratio ours/qemu':14} {ob / qb:12.1f} {ot / qt:16.1f} {ow / qw:15.1f}  "
          f"{'checksums equal' if oc == qc else 'CHECKSUMS DIFFER'}")
    sys.exit(0 if oc == qc else 1)


if __name__ == "__main__":
    main()
