"""guest-bench and CoreMark under machine-server's two engines (the JIT and the interpreter)
and under qemu-system-riscv64, in one run.

Boots the shared guest (OpenSBI fw_dynamic + Linux + initramfs, 256M, 1 hart) with
guest.run=guest-bench,SCALE under each, one after the other, never two at once, and prints for
each: the wall time from process start to "guest: boot ok", every kernel's time and the total
as guest-bench reports them (timed by the guest's clock), the checksum, and each engine's ratio
to QEMU (time ours / time QEMU: below 1 is faster than QEMU).

With --coremark PATH it then runs EEMBC CoreMark, a standard CPU benchmark, the same way: the
binary reaches the guest as a raw virtio-blk disk, the guest copies it to /tmp and runs it for a
fixed number of iterations (the same work everywhere), and the script prints CoreMark's
iterations per second (its score, by the guest's clock), its CRCs (which must agree), and each
engine's score ratio to QEMU (above 1 is faster than QEMU). CoreMark's sources are not part of
this repository; build the binary from a copy of https://github.com/eembc/coremark with Debian's
cross compiler:

    git clone https://github.com/eembc/coremark && cd coremark
    make PORT_DIR=linux CC=riscv64-linux-gnu-gcc XCFLAGS=-static ITERATIONS=0 link
    # -> coremark.exe, a static riscv64 Linux binary

Usage: python3 bench/cpu.py [--scale N] [--runs N] [--timeout SECONDS]
                            [--coremark PATH [--coremark-iterations N]] [--only-coremark]
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
from guest_console import BOOT_OK, INITRD, KERNEL, OPENSBI, SERVER, Console, description, start_qemu, start_server  # noqa: E402

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


COREMARK_SCORE = r"Iterations/Sec +: ([0-9.]+)"
COREMARK_CRC = r"\[0\]crc(list|matrix|state|final) +: (0x[0-9a-f]{4})"


def coremark_disk(binary: Path, tmp: Path) -> Path:
    """A raw image holding the binary, padded to whole sectors (an ELF ignores trailing zeros)."""
    data = binary.read_bytes()
    disk = tmp / "coremark.img"
    disk.write_bytes(data + bytes(-len(data) % 512))
    return disk


def coremark_append(iterations: int) -> str:
    # CoreMark's arguments: the three seeds of a performance run, iterations, and the
    # defaults of its posix port. The guest's init runs guest.run with sh (commas are spaces).
    return ("console=ttyS0 guest.run=cat,/dev/vda,>/tmp/cm;chmod,+x,/tmp/cm;"
            f"/tmp/cm,0x0,0x0,0x66,{iterations},7,1,2000")


def measure_coremark(console, timeout):
    """Returns {"score": iterations per second, "crcs": "list/matrix/state/final"}."""
    try:
        console.expect(re.escape(BOOT_OK), timeout, why="boot")
        score = float(console.expect(COREMARK_SCORE, timeout, why="CoreMark's score").group(1))
        crcs = {}
        for _ in range(4):
            m = console.expect(COREMARK_CRC, timeout, why="CoreMark's CRCs")
            crcs[m.group(1)] = m.group(2)
        r = {"score": score, "crcs": "/".join(crcs[k] for k in ("list", "matrix", "state", "final"))}
        console.wait(60)
        return r
    finally:
        console.close()


def run_coremark(args):
    binary = Path(args.coremark).resolve()
    if not binary.is_file():
        sys.exit(f"--coremark: {binary} is not a file")
    append = coremark_append(args.coremark_iterations)

    def drive(disk):
        return [{"driver": "virtio-blk-device", "id": "cm", "drive": {"file": str(disk), "format": "raw", "read-only": True}}]

    def qemu(tmp, disk):
        argv = ["qemu-system-riscv64", "-M", "virt", "-m", "256M", "-nographic", "-bios", str(OPENSBI),
                "-kernel", str(KERNEL), "-initrd", str(INITRD), "-append", append,
                "-drive", f"file={disk},format=raw,if=none,id=cm,readonly=on", "-device", "virtio-blk-device,drive=cm"]
        return Console(argv, tmp / "qemu.coremark.log", "qemu-system-riscv64")

    emulators = [
        ("qemu-system", qemu),
        ("ours jit", lambda tmp, disk: start_server(tmp, description(append=append, accel={"engine": "jit"}, devices=drive(disk)))),
        ("ours interp", lambda tmp, disk: start_server(tmp, description(append=append, accel={"engine": "interpreter"}, devices=drive(disk)))),
    ]
    results = {name: [] for name, _ in emulators}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        disk = coremark_disk(binary, tmp)
        for _ in range(args.runs):
            for name, start in emulators:
                results[name].append(measure_coremark(start(tmp, disk), args.timeout))
    print(f"\nCoreMark, {args.coremark_iterations} iterations ({binary.name})")
    print(f"{'':16}{'iter/s':>10}{'vs qemu':>9}  crc list/matrix/state/final")
    q = median(results["qemu-system"], "score")
    for name, _ in emulators:
        runs = results[name]
        score = median(runs, "score")
        crcs = ",".join(sorted({r["crcs"] for r in runs}))
        print(f"{name:16}{score:10.1f}{score / q:9.2f}  {crcs}")
    ok = len({r["crcs"] for runs in results.values() for r in runs}) == 1
    print("CoreMark CRCs equal" if ok else "COREMARK CRCS DIFFER")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", type=int, default=1)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--coremark", metavar="PATH", help="a static riscv64 CoreMark binary (see above)")
    ap.add_argument("--coremark-iterations", type=int, default=30000)
    ap.add_argument("--only-coremark", action="store_true", help="skip guest-bench")
    args = ap.parse_args()
    if not SERVER:
        sys.exit("MACHINE_SERVER is not set (path of the machine-server binary)")
    if args.only_coremark:
        if not args.coremark:
            sys.exit("--only-coremark needs --coremark PATH")
        sys.exit(0 if run_coremark(args) else 1)
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
    if args.coremark:
        ok = run_coremark(args) and ok
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
