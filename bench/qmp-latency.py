#!/usr/bin/env python3
"""QMP round-trip latency of machine-server against qemu-system-riscv64 under guest CPU load.

For each emulator in turn (never both at once): boots the shared guest with
guest.run=guest-bench,SCALE (a CPU-bound load that outlasts the measurement), waits for
"guest: boot ok", connects to the QMP unix socket, negotiates capabilities, then times N
sequential `query-status` round trips (send, read until the reply) over a plain socket, and
prints p50/p99/max for both and the ratios ours/QEMU.

Usage: python3 bench/qmp-latency.py [--count 10000] [--scale 20]
Environment: MACHINE_SERVER (the binary to measure), GUEST_DIR (the shared guest).
"""
import argparse
import json
import re
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "boot"))
from guest_console import (BOOT_OK, INITRD, KERNEL, OPENSBI, SERVER, Console,  # noqa: E402
                           description, start_server)


class QMPLine:
    """A minimal QMP client over a unix socket: one JSON object per line."""

    def __init__(self, path: Path, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.sock.settimeout(timeout)
        self.buf = b""
        greeting = self.read()
        assert "QMP" in greeting, greeting
        self.sock.sendall(b'{"execute": "qmp_capabilities"}\n')
        assert "return" in self.reply()

    def read(self) -> dict:
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("QMP connection closed")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def reply(self) -> dict:
        while True:
            msg = self.read()
            if "return" in msg or "error" in msg:
                return msg

    def round_trips(self, count: int) -> list[float]:
        request = b'{"execute": "query-status"}\n'
        times = []
        for _ in range(count):
            t0 = time.perf_counter()
            self.sock.sendall(request)
            r = self.reply()
            times.append(time.perf_counter() - t0)
            if "return" not in r:
                raise AssertionError(f"query-status failed: {r}")
        return times


def percentile(sorted_values, p):
    return sorted_values[min(len(sorted_values) - 1, int(round(p / 100 * (len(sorted_values) - 1))))]


def measure(console: Console, sock: Path, count: int):
    try:
        console.expect(re.escape(BOOT_OK), 600, why="boot")
        time.sleep(1)  # let guest-bench get going
        client = QMPLine(sock)
        client.round_trips(100)  # warm-up
        times = sorted(client.round_trips(count))
        status = console.proc.poll()
        assert status is None, f"the emulator exited ({status}) during the measurement"
        assert "guest-bench total" not in console.text(), "the guest load ended during the measurement; raise --scale"
        return [t * 1e6 for t in (percentile(times, 50), percentile(times, 99), times[-1])]
    finally:
        console.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=10000)
    ap.add_argument("--scale", type=int, default=20)
    args = ap.parse_args()
    if not SERVER:
        sys.exit("MACHINE_SERVER is not set (path of the machine-server binary)")
    append = f"console=ttyS0 guest.run=guest-bench,{args.scale}"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        qsock = tmp / "qemu.qmp"
        qemu = Console(["qemu-system-riscv64", "-M", "virt", "-m", "256M", "-nographic",
                        "-bios", str(OPENSBI), "-kernel", str(KERNEL), "-initrd", str(INITRD),
                        "-append", append, "-qmp", f"unix:{qsock},server=on,wait=off"],
                       tmp / "qemu.serial.log", "qemu-system-riscv64")
        q = measure(qemu, qsock, args.count)
        osock = tmp / "ours.qmp"
        ours = start_server(tmp, description(append=append, qmp=[{"backend": "unix", "path": str(osock)}]))
        o = measure(ours, osock, args.count)
    print(f"{args.count} query-status round trips, guest running guest-bench,{args.scale}")
    print(f"{'':16} {'p50 (us)':>10} {'p99 (us)':>10} {'max (us)':>10}")
    print(f"{'machine-server':16} {o[0]:10.1f} {o[1]:10.1f} {o[2]:10.1f}")
    print(f"{'qemu-system':16} {q[0]:10.1f} {q[1]:10.1f} {q[2]:10.1f}")
    print(f"{'ratio ours/qemu':16} {o[0] / q[0]:10.2f} {o[1] / q[1]:10.2f} {o[2] / q[2]:10.2f}")


if __name__ == "__main__":
    main()
