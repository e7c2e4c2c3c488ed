"""guest-bench under machine-server's two engines (the JIT and the interpreter) and under
qemu-system-riscv64, in one run.

Boots the shared guest (OpenSBI fw_dynamic + Linux + initramfs, 256M, 1 hart) with
guest.run=guest-bench,SCALE under each, one after the other, never two at once, and prints for
each: the wall time from process start to "guest: boot ok", every kernel's time and the total
as guest-bench reports them (timed by the guest's clock), the checksum, and each engine's ratio
to QEMU (time ours / time QEMU: below 1 is faster than QEMU).

Usage: python3 bench/cpu.py [--scale N] [--runs N] [--timeout SECONDS]
Environment: MACHINE_SERVER (the binary to measure), GUEST_DIR (the shared guest).
With --runs N each emulator runs N times and the median of each figure is shown.
"""
import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "boot"))
from guest_console import BOOT_OK, SERVER, description, start_qemu, start_server  # noqa: E402

KERNEL_LINE = r"guest-bench (\w+) +([0-9.]+) s +result"
TOTAL = r"guest-bench total +([0-9.]+) s checksum ([0-9a-f]{16})"
KERNELS = ["crc32", "qsort", "sieve", "matmul", "calls"]


def measure(console, timeout):
    """Returns {"boot": s, kernel: s..., "total": s, "checksum": hex}."""
    try:
        console.expect(re.escape(BOOT_OK), timeout, why="boot")
        r = {"boot": time.monotonic() - console.started}
        for _ in KERNELS:
            m = console.expect(KERNEL_LINE, timeout, why="a guest-bench kernel")
            r[m.group(1)] = float(m.group(2))
        m = console.expect(TOTAL, timeout, why="guest-bench total")
        r["total"] = float(m.group(1))
        r["checksum"] = m.group(2)
        console.wait(60)
        return r
    finally:
        console.close()


def median(runs, key):
    return statistics.median(r[key] for r in runs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", type=int, default=1)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args()
    if not SERVER:
        sys.exit("MACHINE_SERVER is not set (path of the machine-server binary)")
    append = f"console=ttyS0 guest.run=guest-bench,{args.scale}"
    emulators = [
        ("qemu-system", lambda tmp: start_qemu(tmp, append)),
        ("ours jit", lambda tmp: start_server(tmp, description(append=append, accel={"engine": "jit"}))),
        ("ours interp", lambda tmp: start_server(tmp, description(append=append, accel={"engine": "interpreter"}))),
    ]
    results = {name: [] for name, _ in emulators}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.runs):
            for name, start in emulators:
                results[name].append(measure(start(Path(tmp)), args.timeout))
    cols = ["boot"] + KERNELS + ["total"]
    print(f"{'(seconds)':16}" + "".join(f"{c:>9}" for c in cols) + "  checksum")
    for name, _ in emulators:
        runs = results[name]
        sums = {r["checksum"] for r in runs}
        print(f"{name:16}" + "".join(f"{median(runs, c):9.3f}" for c in cols) + "  " + ",".join(sorted(sums)))
    q = results["qemu-system"]
    for name in ("ours jit", "ours interp"):
        print(f"{name + '/qemu':16}" + "".join(f"{median(results[name], c) / median(q, c):9.2f}" for c in cols))
    qsum = {r["checksum"] for r in q}
    ok = all({r["checksum"] for r in results[n]} == qsum for n in results) and len(qsum) == 1
    print("checksums equal" if ok else "CHECKSUMS DIFFER")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
