#!/usr/bin/env python3
"""Saving and restoring machine state: machine-server against qemu-system-riscv64 on the same
guest, at several RAM sizes, one emulator at a time.

For each size and emulator: boot the shared guest (a shell, idle after boot), then
  - file save: `migrate` of the running guest to a file until query-migrate says completed
    (ours: file:PATH; QEMU 7.2 has no file: URI, so exec:cat > PATH, which is also measured
    for ours);
  - restore to running: a new process started with -incoming / --incoming on that file, from
    spawn until query-status says running (ours also prints its own restore time, measured
    from the start of the load to the machine running, which excludes process start-up);
  - savevm / loadvm (HMP through human-monitor-command) with a qcow2 disk attached, timed
    from command to reply, when --savevm is given.
Prints one table per size with the ratios ours/QEMU (below 1 means we are faster).

Usage: python3 bench/snapshot.py [--sizes 256M,1G] [--repeat 3] [--savevm]
Environment: MACHINE_SERVER (the binary to measure), GUEST_DIR (the shared guest).
"""
import argparse
import json
import os
import re
import shutil
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


class Machine:
    def __init__(self, kind, tmp: Path, name, memory, incoming=None, disk=None):
        self.kind = kind
        self.sock = tmp / f"{name}.qmp"
        self.serial = tmp / f"{name}.serial"
        self.log = tmp / f"{name}.log"
        if kind == "ours":
            desc = {"version": 2, "machine": "virt", "cpus": 1, "memory": memory, "kernel": str(KERNEL),
                    "initrd": str(INITRD), "append": "console=ttyS0",
                    "serial": {"backend": "file", "path": str(self.serial)},
                    "qmp": [{"backend": "unix", "path": str(self.sock)}]}
            if disk:
                desc["devices"] = [{"driver": "virtio-blk-device", "id": "d0", "drive": {"file": str(disk), "format": "qcow2"}}]
            (tmp / f"{name}.json").write_text(json.dumps(desc))
            argv = [SERVER, "--config", str(tmp / f"{name}.json")]
            if incoming:
                argv += ["--incoming", incoming]
        else:
            argv = ["qemu-system-riscv64", "-M", "virt", "-m", memory, "-smp", "1", "-display", "none",
                    "-bios", str(OPENSBI), "-kernel", str(KERNEL), "-initrd", str(INITRD), "-append", "console=ttyS0",
                    "-serial", f"file:{self.serial}", "-monitor", "none",
                    "-qmp", f"unix:{self.sock},server=on,wait=off"]
            if disk:
                argv += ["-drive", f"file={disk},format=qcow2,if=none,id=d0", "-device", "virtio-blk-device,drive=d0"]
            if incoming:
                argv += ["-incoming", incoming]
        self.spawned = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)
        while not self.sock.exists():
            if self.proc.poll() is not None:
                sys.exit(f"{kind} exited: {self.log.read_text()}")
            time.sleep(0.001)
        self.qmp = QEMUMonitorProtocol(str(self.sock))
        self.qmp.connect()

    def cmd(self, name, **args):
        r = self.qmp.cmd_raw(name, args or None)
        if "return" not in r:
            sys.exit(f"{self.kind} {name}: {r}")
        return r["return"]

    def hmp(self, line):
        return self.cmd("human-monitor-command", **{"command-line": line})

    def wait_serial(self, text, timeout=180):
        deadline = time.monotonic() + timeout
        while text not in (self.serial.read_text(errors="replace") if self.serial.exists() else ""):
            if time.monotonic() > deadline:
                sys.exit(f"{self.kind}: {text!r} did not appear")
            time.sleep(0.05)

    def migrate(self, uri):
        start = time.monotonic()
        self.cmd("migrate", uri=uri)
        while True:
            info = self.cmd("query-migrate")
            if info.get("status") in ("completed", "failed"):
                break
            time.sleep(0.001)
        if info["status"] != "completed":
            sys.exit(f"{self.kind} migrate {uri}: {info}")
        return time.monotonic() - start

    def wait_running(self):
        while self.cmd("query-status")["status"] != "running":
            time.sleep(0.0005)
        return time.monotonic() - self.spawned

    def close(self):
        try:
            self.cmd("quit")
        except BaseException:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        try:
            self.qmp.close()
        except (EOFError, OSError):
            pass  # the server closed the connection on quit


def measure(kind, memory, tmp: Path, savevm: bool):
    out = {}
    disk = None
    if savevm:
        disk = tmp / f"{kind}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    m = Machine(kind, tmp, f"{kind}-src", memory, disk=disk)
    m.wait_serial("guest: boot ok")
    time.sleep(2)
    if savevm:
        t = time.monotonic()
        m.hmp("savevm bench")
        out["savevm"] = time.monotonic() - t
        t = time.monotonic()
        reply = m.hmp("loadvm bench")
        out["loadvm"] = time.monotonic() - t
        if reply.strip():
            sys.exit(f"{kind} loadvm: {reply}")
        m.cmd("cont")
    state = tmp / f"{kind}.state"
    if kind == "ours":
        out["file save (file:)"] = m.migrate(f"file:{state}")
        m.cmd("cont")
        out["file save (exec:cat)"] = m.migrate(f"exec:cat > {tmp / 'ours-exec.state'}")
    else:
        out["file save (exec:cat)"] = m.migrate(f"exec:cat > {state}")
    m.close()
    uri = f"file:{state}" if kind == "ours" else f"exec:cat {state}"
    d = Machine(kind, tmp, f"{kind}-dst", memory, incoming=uri, disk=disk)
    out["restore to running (from spawn)"] = d.wait_running()
    out["state file MiB"] = state.stat().st_size / (1 << 20)
    d.close()
    if kind == "ours":
        m2 = re.search(r"restored the machine state from \S+ in ([0-9.]+) ms", d.log.read_text())
        if not m2:
            sys.exit(f"no restore time in {d.log}")
        out["restore to running (after start-up)"] = float(m2.group(1)) / 1000
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="256M,512M,1G")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--savevm", action="store_true", help="also time savevm/loadvm on a qcow2 disk")
    args = ap.parse_args()
    if shutil.which("qemu-system-riscv64") is None:
        sys.exit("qemu-system-riscv64 is not installed")
    for size in args.sizes.split(","):
        results = {"ours": [], "qemu": []}
        for _ in range(args.repeat):
            for kind in ("ours", "qemu"):
                with tempfile.TemporaryDirectory() as tmp:
                    results[kind].append(measure(kind, size, Path(tmp), args.savevm))
        print(f"\n### {size} guest (median of {args.repeat})\n")
        print("| | machine-server | QEMU | ratio |")
        print("|---|---|---|---|")
        keys = list(dict.fromkeys(list(results["ours"][0]) + list(results["qemu"][0])))
        for k in keys:
            ours = [r[k] for r in results["ours"] if k in r]
            qemu = [r[k] for r in results["qemu"] if k in r]
            o = statistics.median(ours) if ours else None
            q = statistics.median(qemu) if qemu else None
            unit = "" if "MiB" in k else " s"
            fmt = (lambda v: f"{v:.1f}{unit}") if "MiB" in k else (lambda v: f"{v * 1000:.1f} ms")
            ratio = f"{o / q:.2f}x" if o is not None and q else "-"
            print(f"| {k} | {fmt(o) if o is not None else '-'} | {fmt(q) if q is not None else '-'} | {ratio} |")


if __name__ == "__main__":
    main()
