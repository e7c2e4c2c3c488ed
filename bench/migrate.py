#!/usr/bin/env python3
"""Live migration: machine-server against qemu-system-riscv64 on the same guests, one
emulator at a time, each migrating from one process to a second one on the same host over
tcp:127.0.0.1.

Guests (512 MiB, one vCPU, the shared Linux guest):
  - idle:        the shell after boot;
  - guest-bench: guest-bench,3 running (migrated once its first kernel has reported);
  - dirty:       a loop rewriting a 200 MiB file in RAM (/tmp is a tmpfs) with non-zero bytes,
                 migrated with auto-converge on;
  - dirty-postcopy: the same loop, postcopy-ram on both ends, migrate-start-postcopy as soon
                 as the migration is active (pass 1 then goes on as post-copy's background).
Both emulators get the same parameters: max-bandwidth (default 1 GiB/s) and downtime-limit
(default 300 ms, QEMU's), set with migrate-set-parameters. For each: total-time, downtime and
bytes sent (ram.transferred), passes (dirty-sync-count) and post-copy page requests
(postcopy-requests) from query-migrate on the source once completed; "pause", the time the guest really stood still, from the source's STOP event
to the destination's RESUME event (QMP timestamps, one host clock); and whether the
destination runs the guest on. Prints a table with the ratios ours/QEMU (below 1: ours lower).

Usage: python3 bench/migrate.py [--guests idle,guest-bench,dirty,dirty-postcopy] [--repeat 3]
                                [--bandwidth BYTES] [--downtime-limit MS]
Environment: MACHINE_SERVER (the binary to measure; default .build/release/machine-server),
GUEST_DIR (the shared guest).
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qemu.qmp.legacy import QEMUMonitorProtocol

REPO = Path(__file__).resolve().parents[1]
GUEST_DIR = Path(os.environ.get("GUEST_DIR", REPO.parent / "shared" / "guests"))
KERNEL = GUEST_DIR / "linux-6.1-rv64-Image"
INITRD = GUEST_DIR / "initramfs-rv64.cpio.gz"
OPENSBI = Path("/usr/lib/riscv64-linux-gnu/opensbi/generic/fw_dynamic.bin")
SERVER = os.environ.get("MACHINE_SERVER", str(REPO / ".build" / "release" / "machine-server"))
MEMORY = "512M"

GUESTS = {
    # name: (kernel command line, serial text that says the workload runs, auto-converge)
    # (dirty-postcopy: the dirty guest with post-copy, below)
    "idle": ("console=ttyS0", "boot ok", False),
    "guest-bench": ("console=ttyS0 guest.run=guest-bench,3", "guest-bench crc32", False),
    "dirty": ("console=ttyS0 guest.run=yes,abcdefghijklmnopqrstuvwxyz|head,-c,1048576,>/tmp/c&&"
              "for,n,in,$(seq,200);do,cat,/tmp/c;done>/tmp/a&&echo,filled&&i=0&&while,true;do,"
              "dd,if=/tmp/a,of=/tmp/a,bs=1M,conv=notrunc,2>/dev/null&&echo,round,$i;i=$((i+1));done",
              "round 1", True),
}


GUESTS["dirty-postcopy"] = (GUESTS["dirty"][0], GUESTS["dirty"][1], False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Machine:
    def __init__(self, kind, tmp: Path, name, append, incoming=None):
        self.kind = kind
        self.sock = tmp / f"{name}.qmp"
        self.serial = tmp / f"{name}.serial"
        self.log = tmp / f"{name}.log"
        if kind == "ours":
            desc = {"version": 2, "machine": "virt", "cpus": 1, "memory": MEMORY, "kernel": str(KERNEL),
                    "initrd": str(INITRD), "append": append,
                    "serial": {"backend": "file", "path": str(self.serial)},
                    "qmp": [{"backend": "unix", "path": str(self.sock)}]}
            (tmp / f"{name}.json").write_text(json.dumps(desc))
            argv = [SERVER, "--config", str(tmp / f"{name}.json")]
            if incoming:
                argv += ["--incoming", incoming]
        else:
            argv = ["qemu-system-riscv64", "-M", "virt", "-m", MEMORY, "-smp", "1", "-display", "none",
                    "-bios", str(OPENSBI), "-kernel", str(KERNEL), "-initrd", str(INITRD), "-append", append,
                    "-serial", f"file:{self.serial}", "-monitor", "none",
                    "-qmp", f"unix:{self.sock},server=on,wait=off"]
            if incoming:
                argv += ["-incoming", incoming]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)
        while not self.sock.exists():
            if self.proc.poll() is not None:
                sys.exit(f"{kind} exited: {self.log.read_text()}")
            time.sleep(0.005)
        # The socket file appears at bind, a moment before the server listens.
        for attempt in range(100):
            try:
                self.qmp = QEMUMonitorProtocol(str(self.sock))
                self.qmp.connect()
                break
            except Exception:
                if attempt == 99:
                    raise
                time.sleep(0.05)

    def cmd(self, name, **args):
        r = self.qmp.cmd_raw(name, args or None)
        if "return" not in r:
            sys.exit(f"{self.kind} {name}: {r}")
        return r["return"]

    def text(self):
        return self.serial.read_text(errors="replace") if self.serial.exists() else ""

    def wait_serial(self, text, timeout=600, start=0):
        deadline = time.monotonic() + timeout
        while text not in self.text()[start:]:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                sys.exit(f"{self.kind}: {text!r} did not appear:\n{self.text()[-1000:]}")
            time.sleep(0.05)

    def close(self):
        try:
            self.qmp.close()
        except Exception:
            pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def one_run(kind, guest, args):
    append, ready, auto_converge = GUESTS[guest]
    with tempfile.TemporaryDirectory(prefix="bench-migrate-") as d:
        tmp = Path(d)
        port = free_port()
        src = Machine(kind, tmp, "src", append)
        dst = Machine(kind, tmp, "dst", append, incoming=f"tcp:127.0.0.1:{port}")
        try:
            src.wait_serial(ready)
            if guest == "idle":
                time.sleep(2)  # let the boot's own writes settle
            src.cmd("migrate-set-parameters", **{"max-bandwidth": args.bandwidth, "downtime-limit": args.downtime_limit})
            caps = [{"capability": "auto-converge", "state": auto_converge}]
            postcopy = guest == "dirty-postcopy"
            if postcopy:
                caps.append({"capability": "postcopy-ram", "state": True})
                dst.cmd("migrate-set-capabilities", capabilities=[{"capability": "postcopy-ram", "state": True}])
            src.cmd("migrate-set-capabilities", capabilities=caps)
            src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
            started = False
            while True:
                info = src.cmd("query-migrate")
                if info.get("status") in ("completed", "failed", "cancelled", "postcopy-paused"):
                    break
                if postcopy and not started and info.get("status") == "active":
                    src.cmd("migrate-start-postcopy")
                    started = True
                time.sleep(0.01)
            if info["status"] != "completed":
                sys.exit(f"{kind} {guest}: {info}")
            # The guest goes on on the destination.
            marker = len(dst.text())
            deadline = time.monotonic() + 120
            while dst.cmd("query-status")["status"] != "running":
                if time.monotonic() > deadline:
                    sys.exit(f"{kind} {guest}: the destination did not run")
                time.sleep(0.01)
            if guest.startswith("dirty"):
                dst.wait_serial("round", start=marker)
            # The pause the guest sees: the source's STOP to the destination's RESUME (QMP event
            # timestamps, one host clock). query-migrate's downtime is each emulator's own
            # measure (QEMU's ends when the source has sent everything; ours when the
            # destination has confirmed it runs).
            def stamp(machine, name):
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    for e in machine.qmp.get_events():
                        if e["event"] == name:
                            return e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6
                    machine.qmp.pull_event(wait=0.1)
                sys.exit(f"{kind} {guest}: no {name} event")
            gap = (stamp(dst, "RESUME") - stamp(src, "STOP")) * 1000
            return {"total": info["total-time"], "downtime": info["downtime"], "pause": gap,
                    "bytes": info["ram"]["transferred"], "passes": info["ram"].get("dirty-sync-count", 0),
                    "requests": info["ram"].get("postcopy-requests", 0)}
        finally:
            src.close()
            dst.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--guests", default="idle,guest-bench,dirty,dirty-postcopy")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--bandwidth", type=int, default=1 << 30, help="max-bandwidth in bytes/s for both")
    p.add_argument("--downtime-limit", type=int, default=300, help="downtime-limit in ms for both")
    args = p.parse_args()
    if not Path(SERVER).exists():
        sys.exit(f"no machine-server at {SERVER} (swift build -c release, or set MACHINE_SERVER)")
    print(f"max-bandwidth {args.bandwidth} B/s, downtime-limit {args.downtime_limit} ms, {MEMORY} guests, "
          f"median of {args.repeat}")
    rows = []
    for guest in args.guests.split(","):
        results = {}
        for kind in ("ours", "qemu"):
            runs = [one_run(kind, guest, args) for _ in range(args.repeat)]
            results[kind] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            print(f"  {guest:12s} {kind:5s} " + ", ".join(f"{k} {[r[k] for r in runs]}" for k in runs[0]), flush=True)
        rows.append((guest, results))
    print()
    print(f"{'guest':12s} {'metric':10s} {'ours':>12s} {'qemu':>12s} {'ours/qemu':>10s}")
    for guest, r in rows:
        for metric, unit in (("total", "ms"), ("downtime", "ms"), ("pause", "ms"), ("bytes", "B"), ("passes", ""),
                             ("requests", "")):
            o, q = r["ours"][metric], r["qemu"][metric]
            ratio = f"{o / q:.2f}" if q else "-"
            print(f"{guest:12s} {metric + (' ' + unit if unit else ''):10s} {o:12.1f} {q:12.1f} {ratio:>10s}")


if __name__ == "__main__":
    main()
