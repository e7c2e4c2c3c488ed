"""Whole-guest tests of live migration between two machine-servers (`migrate tcp:`/`unix:`,
`--incoming tcp:`/`unix:`): a guest moves mid-run and finishes on the destination; cancel,
a killed destination, a dropped connection and a refused stream leave the source running;
a guest writing its qcow2 disk loses nothing; a guest dirtying memory fast converges with
auto-converge.

Environment:
  MACHINE_SERVER  path of the built machine-server executable (tests skip without it)
The shared guest (Linux 6.1 + busybox initramfs) comes from GUEST_DIR (default
../shared/guests).
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("qemu.qmp")
sys.path.insert(0, os.path.dirname(__file__))
from machine_process import MachineProcess, servers  # noqa: E402,F401

SERVER = os.environ.get("MACHINE_SERVER")
REPO = Path(__file__).resolve().parents[2]
GUEST_DIR = Path(os.environ.get("GUEST_DIR", REPO.parent / "shared" / "guests"))
KERNEL = GUEST_DIR / "linux-6.1-rv64-Image"
INITRD = GUEST_DIR / "initramfs-rv64.cpio.gz"
BOOT_TIMEOUT = float(os.environ.get("BOOT_TIMEOUT", "120"))
# guest-bench,1 under qemu-system-riscv64 (the value tests/boot checks against QEMU).
QEMU_CHECKSUM_SCALE1 = "0170a8bc544c8311"
COUNTER = "i=0;while,true;do,echo,count,$i;i=$((i+1));sleep,0.2;done"

pytestmark = [
    pytest.mark.skipif(not SERVER, reason="MACHINE_SERVER is not set"),
    pytest.mark.skipif(not KERNEL.exists(), reason=f"no shared guest in {GUEST_DIR}"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server(MachineProcess):
    """One machine-server with its serial console in a file and a QMP unix socket, connected."""

    def __init__(self, tmp: Path, name: str, append: str, extra=(), memory="256M", devices=(), cpus=1):
        desc = {
            "version": 2, "machine": "virt", "cpus": cpus, "memory": memory,
            "kernel": str(KERNEL), "initrd": str(INITRD), "append": append,
            "devices": list(devices),
        }
        super().__init__(tmp, name, desc, extra)
        self.connect()

    def wait_migration(self, states, timeout=120):
        deadline = time.monotonic() + timeout
        while True:
            info = self.cmd("query-migrate")
            if info.get("status") in states:
                return info
            assert time.monotonic() < deadline, f"migration did not reach {states}: {info}"
            time.sleep(0.02)

    def wait_status(self, wanted, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            status = self.cmd("query-status")["status"]
            if status == wanted:
                return
            assert time.monotonic() < deadline, f"run state {status}, not {wanted}, after {timeout} s"
            time.sleep(0.02)


def counts(text):
    return [int(n) for n in re.findall(r"count (\d+)", text)]


def assert_source_runs_on(src: Server):
    """The source is running and its guest still counts on its serial console."""
    src.wait_status("running")
    seen = counts(src.text())[-1]
    src.expect(rf"count {seen + 2}\b", 30)


def assert_destination_gave_up(dst: Server):
    """A destination whose stream failed exits with status 1 and runs no guest."""
    assert dst.proc.wait(30) == 1, dst.log.read_text()[-2000:]
    assert "load of migration failed" in dst.log.read_text()
    assert counts(dst.text()) == [], "the destination ran the guest"


def test_guest_bench_moves_mid_run_and_finishes_with_qemus_checksum(tmp_path, servers):
    """guest-bench starts on one server and finishes on the other after migrate tcp:, with the
    checksum QEMU computes; the source stays paused in postmigrate with its console quiet, the
    destination's console carries on, and query-migrate and the events say what happened."""
    port = free_port()
    src = Server(tmp_path, "src", "console=ttyS0 guest.run=guest-bench,1")
    dst = Server(tmp_path, "dst", "console=ttyS0 guest.run=guest-bench,1", extra=["--incoming", f"tcp:127.0.0.1:{port}"])
    servers += [src, dst]
    assert dst.cmd("query-status")["status"] == "inmigrate"
    src.cmd("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
    src.expect(r"guest-bench crc32 ", BOOT_TIMEOUT)
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    info = src.wait_migration(("completed", "failed"))
    assert info["status"] == "completed", info
    assert "checksum" not in src.text(), "guest-bench finished before the switch-over; migrate earlier"
    assert src.cmd("query-status")["status"] == "postmigrate"
    ram = info["ram"]
    assert ram["total"] == 256 << 20 and ram["normal"] > 0 and ram["duplicate"] > 0 and ram["remaining"] == 0
    assert ram["transferred"] >= ram["normal"] * 4096 and ram["dirty-sync-count"] >= 1
    assert 0 <= info["downtime"] <= info["total-time"]
    events = [(e["event"], e.get("data", {})) for e in src.qmp.get_events()]
    statuses = [d["status"] for e, d in events if e == "MIGRATION"]
    assert statuses == ["setup", "active", "completed"], events
    assert ("MIGRATION_PASS", {"pass": 1}) in events and ("STOP", {}) in events
    hmp = src.cmd("human-monitor-command", **{"command-line": "info migrate"})
    assert "Migration status: completed" in hmp and "dirty sync count:" in hmp, hmp

    m = dst.expect(r"guest-bench total +([0-9.]+) s checksum ([0-9a-f]{16})", 480)
    assert m.group(2) == QEMU_CHECKSUM_SCALE1
    assert "boot ok" not in dst.text(), "the destination booted instead of receiving the guest"
    # The disks (none here) and the guest are the destination's: cont does not revive the source.
    src.cmd("cont")
    assert src.cmd("query-status")["status"] == "postmigrate"
    assert "already migrated" in src.qmp.cmd_raw("migrate", {"uri": "tcp:127.0.0.1:1"})["error"]["desc"]


def test_counter_moves_over_unix_socket_under_the_interpreter(tmp_path, servers):
    """The interpreter logs dirty pages through the same TLB: a guest counting on the serial
    line goes on from exactly the next value on a destination reached over unix:, which was
    started with --incoming defer and told where to listen with migrate-incoming."""
    path = tmp_path / "migrate.sock"
    src = Server(tmp_path, "src", f"console=ttyS0 guest.run={COUNTER}", extra=["--accel", "interpreter"])
    dst = Server(tmp_path, "dst", f"console=ttyS0 guest.run={COUNTER}",
                 extra=["--accel", "interpreter", "--incoming", "defer"])
    servers += [src, dst]
    dst.cmd("migrate-incoming", uri=f"unix:{path}")
    assert dst.cmd("query-migrate")["status"] == "setup"
    again = dst.qmp.cmd_raw("migrate-incoming", {"uri": f"unix:{path}"})
    assert "already been started" in again["error"]["desc"], again
    src.expect(r"count 3\b", BOOT_TIMEOUT * 2)
    src.cmd("migrate", uri=f"unix:{path}")
    info = src.wait_migration(("completed", "failed"))
    assert info["status"] == "completed", info
    last = counts(src.text())[-1]
    dst.expect(r"count \d+", 30)
    dst.wait_status("running")
    assert counts(dst.text())[0] == last + 1
    assert dst.cmd("query-migrate")["status"] == "completed"


class DroppingProxy:
    """Forwards one TCP connection to `port` and drops both sides when told to."""

    def __init__(self, port: int):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.port = self.listener.getsockname()[1]
        self.target = port
        self.forwarded = 0
        self.conns = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        a, _ = self.listener.accept()
        b = socket.create_connection(("127.0.0.1", self.target))
        self.conns = [a, b]
        threading.Thread(target=self._pump, args=(b, a), daemon=True).start()
        self._pump(a, b)

    def _pump(self, x, y):
        try:
            while True:
                data = x.recv(65536)
                if not data:
                    break
                y.sendall(data)
                self.forwarded += len(data)
        except OSError:
            pass

    def drop(self):
        # shutdown() takes effect at once, even with a pump thread blocked in recv on it.
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
                c.close()
            except OSError:
                pass
        self.listener.close()


def test_cancel_killed_destination_and_dropped_connection_leave_the_source_running(tmp_path, servers):
    """With max-bandwidth low enough to interrupt: migrate_cancel, kill -9 of the destination
    and a connection dropped in the middle each end the migration (cancelled, failed, failed),
    and the source runs on with its console; a destination that lost its stream exits with
    status 1 without running the guest. Then the same source migrates fully."""
    src = Server(tmp_path, "src", f"console=ttyS0 guest.run={COUNTER}")
    servers.append(src)
    src.expect(r"count 3\b", BOOT_TIMEOUT)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 2 << 20})
    assert src.cmd("query-migrate-parameters")["max-bandwidth"] == 2 << 20

    def start(name):
        port = free_port()
        dst = Server(tmp_path, name, f"console=ttyS0 guest.run={COUNTER}", extra=["--incoming", f"tcp:127.0.0.1:{port}"])
        servers.append(dst)
        return dst, port

    def wait_some_transferred():
        deadline = time.monotonic() + 60
        while True:
            info = src.cmd("query-migrate")
            assert info["status"] in ("setup", "active"), info
            if info["status"] == "active" and info["ram"]["transferred"] > 1 << 20:
                return info
            assert time.monotonic() < deadline, info
            time.sleep(0.05)

    # 1. migrate_cancel
    dst, port = start("dst1")
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    active = wait_some_transferred()
    assert "expected-downtime" in active and active["total-time"] >= 0
    src.cmd("migrate_cancel")
    info = src.wait_migration(("cancelled", "failed", "completed"))
    assert info["status"] == "cancelled", info
    assert_source_runs_on(src)
    assert_destination_gave_up(dst)

    # 2. kill -9 of the destination
    dst, port = start("dst2")
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    wait_some_transferred()
    dst.proc.send_signal(signal.SIGKILL)
    dst.proc.wait(10)
    info = src.wait_migration(("cancelled", "failed", "completed"), timeout=60)
    assert info["status"] == "failed" and "error-desc" in info, info
    assert_source_runs_on(src)

    # 3. the connection drops
    dst, port = start("dst3")
    proxy = DroppingProxy(port)
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{proxy.port}")
    wait_some_transferred()
    proxy.drop()
    info = src.wait_migration(("cancelled", "failed", "completed"), timeout=60)
    assert info["status"] == "failed", info
    assert_source_runs_on(src)
    assert_destination_gave_up(dst)

    # The source is intact: a full migration now goes through.
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 30})
    dst, port = start("dst4")
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    assert src.wait_migration(("completed", "failed"))["status"] == "completed"
    last = counts(src.text())[-1]
    dst.expect(r"count \d+", 30)
    assert counts(dst.text())[0] == last + 1


def test_a_destination_of_another_shape_refuses_the_stream(tmp_path, servers):
    """A destination with a different machine description refuses the stream at its header,
    says why, and exits 1; the source reports the reason and runs on."""
    port = free_port()
    src = Server(tmp_path, "src", f"console=ttyS0 guest.run={COUNTER}")
    dst = Server(tmp_path, "dst", f"console=ttyS0 guest.run={COUNTER}", memory="128M",
                 extra=["--incoming", f"tcp:127.0.0.1:{port}"])
    servers += [src, dst]
    src.expect(r"count 2\b", BOOT_TIMEOUT)
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    info = src.wait_migration(("completed", "failed"))
    assert info["status"] == "failed", info
    assert "different machine" in info["error-desc"] and "memory" in info["error-desc"], info
    assert_source_runs_on(src)
    assert_destination_gave_up(dst)


def assert_locked(disk: Path):
    r = subprocess.run(["qemu-img", "check", str(disk)], capture_output=True, text=True)
    assert r.returncode != 0 and "lock" in r.stderr, r.stdout + r.stderr


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
def test_a_guest_writing_its_qcow2_disk_loses_nothing(tmp_path, servers):
    """A two-hart guest writes a counter to consecutive sectors of its qcow2 disk (each synced)
    and is migrated mid-loop; the disk's locks pass from the source to the destination at the
    switch-over. After the guest powers off on the destination, every value is there in
    order and qemu-img check finds nothing wrong."""
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    n = 400
    loop = (f"i=0;while [ $i -lt {n} ];do echo value-$i|dd of=/dev/vda bs=512 seek=$i conv=fsync 2>/dev/null;"
            "echo wrote $i;i=$((i+1));done").replace(" ", ",")
    drive = [{"driver": "virtio-blk-device", "id": "d0", "drive": {"file": str(disk), "format": "qcow2"}}]
    port = free_port()
    src = Server(tmp_path, "src", f"console=ttyS0 guest.run={loop}", devices=drive, cpus=2)
    dst = Server(tmp_path, "dst", f"console=ttyS0 guest.run={loop}", devices=drive, cpus=2,
                 extra=["--incoming", f"tcp:127.0.0.1:{port}"])
    servers += [src, dst]
    src.expect(r"wrote 20\b", BOOT_TIMEOUT)
    assert_locked(disk)  # by the source (the waiting destination holds no lock)
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    assert src.wait_migration(("completed", "failed"))["status"] == "completed"
    src.close()
    if dst.proc.poll() is None:
        assert_locked(disk)  # now by the destination, the source having quit
    assert f"wrote {n - 1}" not in src.text(), "the loop ended before the switch-over"
    assert dst.proc.wait(240) == 0, dst.text()[-2000:]
    assert f"wrote {n - 1}" in dst.text()
    check = subprocess.run(["qemu-img", "check", str(disk)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    raw = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(disk), str(raw)], check=True)
    data = raw.read_bytes()
    for i in range(n):
        sector = data[i * 512:(i + 1) * 512]
        assert sector.startswith(f"value-{i}\n".encode()), f"sector {i} holds {sector[:16]!r}"


def test_a_guest_dirtying_memory_fast_converges_with_auto_converge(tmp_path, servers):
    """A guest rewrites 200 MiB of RAM-backed files with non-zero bytes in a tight loop, faster than a
    link capped at 64 MiB/s carries; with auto-converge the source throttles the vCPU until
    the rest fits the downtime limit, and the guest goes on on the destination."""
    # /tmp is a tmpfs (RAM); the guest has no /dev/shm. Copying the file onto itself rewrites
    # every one of its pages.
    loop = ("yes,abcdefghijklmnopqrstuvwxyz|head,-c,1048576,>/tmp/c&&for,n,in,$(seq,200);do,cat,/tmp/c;done>/tmp/a&&"
            "echo,filled,$(wc,-c</tmp/a)&&"
            "i=0&&while,true;do,dd,if=/tmp/a,of=/tmp/a,bs=1M,conv=notrunc,2>/dev/null&&echo,round,$i;i=$((i+1));done")
    port = free_port()
    src = Server(tmp_path, "src", f"console=ttyS0 guest.run={loop}", memory="512M")
    dst = Server(tmp_path, "dst", f"console=ttyS0 guest.run={loop}", memory="512M",
                 extra=["--incoming", f"tcp:127.0.0.1:{port}"])
    servers += [src, dst]
    src.cmd("migrate-set-capabilities", capabilities=[{"capability": "auto-converge", "state": True},
                                                     {"capability": "events", "state": True}])
    # A steep throttle keeps the test short.
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 64 << 20, "downtime-limit": 100,
                                         "cpu-throttle-initial": 60, "cpu-throttle-increment": 20})
    src.expect(r"filled 209715200", BOOT_TIMEOUT * 2)
    src.expect(r"round 0\b", BOOT_TIMEOUT)
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    throttled = 0
    deadline = time.monotonic() + 300
    while True:
        info = src.cmd("query-migrate")
        throttled = max(throttled, info.get("cpu-throttle-percentage", 0))
        if info["status"] in ("completed", "failed"):
            break
        assert time.monotonic() < deadline, info
        time.sleep(0.1)
    assert info["status"] == "completed", info
    assert throttled >= 60, f"auto-converge never throttled: {info}"
    assert info["ram"]["dirty-sync-count"] >= 3, info
    passes = [e["data"]["pass"] for e in src.qmp.get_events() if e["event"] == "MIGRATION_PASS"]
    assert passes == list(range(1, len(passes) + 1)) and len(passes) >= 3, passes
    last = int(re.findall(r"round (\d+)", src.text())[-1])
    dst.expect(rf"round {last + 1}\b", 120)
