"""Whole-guest tests of saved machine state: `migrate` to a file or a command, `--incoming`
restore in a new server, what a paused machine's devices may do, and system_reset under disk
I/O.

Environment:
  MACHINE_SERVER  path of the built machine-server executable (tests skip without it)
The shared guest (Linux 6.1 + busybox initramfs) comes from GUEST_DIR (default
../shared/guests). Guest commands go on the kernel command line as guest.run=...; init turns
commas into spaces and runs the result with sh -c.
"""
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("qemu.qmp")
sys.path.insert(0, os.path.dirname(__file__))
from machine_process import MachineProcess, servers  # noqa: E402,F401
from guest_env import KERNEL, INITRD, BOOT_TIMEOUT, QEMU_CHECKSUM_SCALE1, needs  # noqa: E402

COUNTER = "i=0;while,true;do,echo,count,$i;i=$((i+1));sleep,0.2;done"

pytestmark = needs()


class Server(MachineProcess):
    """One machine-server with its serial console in a file and a QMP unix socket."""

    def __init__(self, tmp: Path, name: str, append: str, extra=(), memory="256M", devices=(), display=None):
        desc = {
            "version": 2, "machine": "virt", "cpus": 1, "memory": memory,
            "kernel": str(KERNEL), "initrd": str(INITRD), "append": append,
            "devices": list(devices),
        }
        if display:
            desc["display"] = display
        super().__init__(tmp, name, desc, extra)

    def migrate(self, uri, timeout=60):
        self.cmd("migrate", uri=uri)
        deadline = time.monotonic() + timeout
        while True:
            info = self.cmd("query-migrate")
            if info.get("status") in ("completed", "failed"):
                return info
            assert time.monotonic() < deadline, f"migration did not finish: {info}"
            time.sleep(0.02)

    def settled_status(self, timeout=30):
        """The run state once an incoming state has been loaded (inmigrate and restore-vm
        are the states while it loads)."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.cmd("query-status")["status"]
            if status not in ("inmigrate", "restore-vm"):
                return status
            assert time.monotonic() < deadline, f"still {status} after {timeout} s"
            time.sleep(0.02)


def counts(text):
    return [int(n) for n in re.findall(r"count (\d+)", text)]


def test_file_snapshot_restores_in_a_new_server(tmp_path, servers):
    """A guest counts on the serial line; migrate to a file leaves the source paused in
    postmigrate; a new server started with --incoming file: goes on counting from exactly the
    next value, with the guest's RAM mapped from the file."""
    src = Server(tmp_path, "src", f"console=ttyS0 guest.run={COUNTER}")
    servers.append(src)
    src.connect()
    src.expect(r"count 5\b", BOOT_TIMEOUT)
    info = src.migrate(f"file:{tmp_path / 'state'}")
    assert info["status"] == "completed", info
    assert info["ram"]["total"] == 256 << 20 and info["ram"]["normal"] > 0 and info["ram"]["duplicate"] > 0
    assert src.cmd("query-status")["status"] == "postmigrate"
    time.sleep(0.6)  # a paused source prints nothing more
    last = counts(src.text())[-1]
    assert counts(src.text())[-1] == last
    assert not list(tmp_path.glob("state.partial-*")), "the temporary file was left behind"
    src.cmd("quit")
    src.proc.wait(10)

    dst = Server(tmp_path, "dst", f"console=ttyS0 guest.run={COUNTER}", extra=["--incoming", f"file:{tmp_path / 'state'}"])
    servers.append(dst)
    dst.connect()
    dst.expect(r"count \d+", 10)
    assert dst.settled_status() == "running"
    assert counts(dst.text())[0] == last + 1, f"restored counter went from {last} to {counts(dst.text())[:3]}"
    assert "boot ok" not in dst.text(), "the destination booted instead of restoring"
    # The restored source can also go on itself (cont from postmigrate), as QEMU allows.


def test_exec_migration_and_paused_incoming(tmp_path, servers):
    """exec: writes the stream to a command and --incoming exec: reads it back; with -S the
    restored machine waits paused until cont; migrate-incoming serves --incoming defer."""
    src = Server(tmp_path, "src", f"console=ttyS0 guest.run={COUNTER}")
    servers.append(src)
    src.connect()
    src.expect(r"count 3\b", BOOT_TIMEOUT)
    # A destination that fails leaves the source running, as a failed QEMU migration does.
    for uri in ("exec:cat > /dev/null; exit 3", f"file:{tmp_path / 'no' / 'such' / 'dir'}"):
        info = src.migrate(uri)
        assert info["status"] == "failed" and info.get("error-desc"), info
        assert src.cmd("query-status")["status"] == "running", uri
    state = tmp_path / "state.gz"
    info = src.migrate(f"exec:gzip -c > {state}")
    assert info["status"] == "completed", info
    last = counts(src.text())[-1]
    src.cmd("quit")

    dst = Server(tmp_path, "dst", f"console=ttyS0 guest.run={COUNTER}",
                 extra=["-S", "--incoming", f"exec:gzip -dc {state}"])
    servers.append(dst)
    dst.connect()
    assert dst.settled_status() == "paused"
    time.sleep(0.5)
    assert counts(dst.text()) == []
    dst.cmd("cont")
    dst.expect(r"count \d+", 10)
    assert counts(dst.text())[0] == last + 1

    later = Server(tmp_path, "later", f"console=ttyS0 guest.run={COUNTER}", extra=["--incoming", "defer"])
    servers.append(later)
    later.connect()
    assert later.cmd("query-status")["status"] == "inmigrate"
    later.cmd("migrate-incoming", uri=f"exec:gzip -dc {state}")
    later.expect(r"count \d+", 10)
    assert counts(later.text())[0] == last + 1
    assert later.cmd("query-status")["status"] == "running"


def test_a_state_from_another_machine_is_refused(tmp_path, servers):
    """A state taken from a 256 MiB machine does not load into a 512 MiB one: the server exits
    1 naming the difference."""
    src = Server(tmp_path, "src", "console=ttyS0")
    servers.append(src)
    src.connect()
    src.expect(r"boot ok", BOOT_TIMEOUT)
    assert src.migrate(f"file:{tmp_path / 'state'}")["status"] == "completed"
    src.cmd("quit")
    dst = Server(tmp_path, "dst", "console=ttyS0", memory="512M", extra=["--incoming", f"file:{tmp_path / 'state'}"])
    servers.append(dst)
    assert dst.proc.wait(30) == 1
    out = dst.log.read_text()
    assert "--incoming" in out and "memory: saved 268435456, this machine 536870912" in out, out


def ram_pages(path: Path) -> dict:
    """Guest RAM of a state file as {page number: bytes} (the layout is documented in
    Sources/Board/MachineStateStream.swift)."""
    data = path.read_bytes()
    assert data[:8] == b"MSVMSTAT"
    (id_len,) = struct.unpack_from("<I", data, 16)
    pos = 20 + id_len + 4
    while data[pos] == 1:  # device sections
        (name_len,) = struct.unpack_from("<I", data, pos + 1)
        pos += 5 + name_len
        _, length, _ = struct.unpack_from("<IQI", data, pos)
        pos += 16 + length
    assert data[pos] == 2, "no RAM record"
    _, run_count = struct.unpack_from("<QI", data, pos + 1)
    pos += 13
    runs = [struct.unpack_from("<QQ", data, pos + 16 * i) for i in range(run_count)]
    pos += 16 * run_count + 8
    pos = (pos + 4095) // 4096 * 4096
    pages = {}
    for first, count in runs:
        for i in range(count):
            pages[first + i] = data[pos:pos + 4096]
            pos += 4096
    return pages


def test_a_paused_machine_does_not_touch_guest_ram(tmp_path, servers):
    """While stopped, a guest with a disk write loop in flight and a VNC client typing keeps
    its RAM exactly as it was: two saves 2 s apart hold the same pages."""
    vncdo = shutil.which("vncdo")
    if vncdo is None or shutil.which("qemu-img") is None:
        pytest.skip("needs vncdo and qemu-img")
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    port = 5900 + random.randint(200, 900)
    loop = "while,true;do,dd,if=/dev/urandom,of=/dev/vda,bs=64k,count=64,conv=fsync,2>/dev/null;echo,wrote;done"
    src = Server(tmp_path, "src", f"console=ttyS0 guest.run={loop}",
                 devices=[{"driver": "virtio-blk-device", "id": "d0", "drive": {"file": str(disk), "format": "qcow2"}}],
                 display={"vnc": {"listen": f"127.0.0.1:{port}"}})
    servers.append(src)
    src.connect()
    src.expect(r"wrote", BOOT_TIMEOUT)
    typing = subprocess.Popen([vncdo, "-s", f"127.0.0.1::{port}", "type", "x" * 400],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        src.cmd("stop")
        assert src.migrate(f"file:{tmp_path / 'a'}")["status"] == "completed"
        time.sleep(2)
        assert src.migrate(f"file:{tmp_path / 'b'}")["status"] == "completed"
    finally:
        typing.kill()
        typing.wait()
    a, b = ram_pages(tmp_path / "a"), ram_pages(tmp_path / "b")
    changed = sorted(p for p in set(a) | set(b) if a.get(p) != b.get(p))
    assert not changed, f"guest RAM changed while paused: {len(changed)} pages, first at {0x8000_0000 + changed[0] * 4096:#x}"
    src.cmd("cont")
    n = len(re.findall("wrote", src.text()))
    src.expect(r"wrote", 30, start=src.text().rfind("wrote") + 1)
    assert len(re.findall("wrote", src.text())) > n
    src.cmd("quit")
    src.proc.wait(10)
    check = subprocess.run(["qemu-img", "check", str(disk)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_system_reset_during_disk_io_boots_clean(tmp_path, servers):
    """system_reset while the guest writes its disk: the next boot is clean (the virtio
    transport is reset with the board, so nothing keeps using the old rings) and the image
    passes qemu-img check."""
    if shutil.which("qemu-img") is None:
        pytest.skip("needs qemu-img")
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    loop = "for,n,in,1,2,3,4,5,6,7,8;do,dd,if=/dev/urandom,of=/dev/vda,bs=256k,count=32,seek=$n,2>/dev/null;echo,wrote,$n;done"
    src = Server(tmp_path, "src", f"console=ttyS0 guest.run={loop}",
                 devices=[{"driver": "virtio-blk-device", "id": "d0", "drive": {"file": str(disk), "format": "qcow2"}}])
    servers.append(src)
    src.connect()
    src.expect(r"wrote 2", BOOT_TIMEOUT)
    src.cmd("system_reset")
    first = src.text().rfind("wrote")
    src.expect(r"boot ok", BOOT_TIMEOUT, start=first)
    src.expect(r"wrote 8", BOOT_TIMEOUT, start=first)
    assert src.proc.wait(60) == 0, src.text()[-2000:]
    check = subprocess.run(["qemu-img", "check", str(disk)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.slow
def test_guest_bench_saved_mid_run_gives_qemus_checksum(tmp_path, servers):
    """guest-bench saved part-way and restored in a new server finishes with the checksum it
    computes under QEMU."""
    src = Server(tmp_path, "src", "console=ttyS0 guest.run=guest-bench,1")
    servers.append(src)
    src.connect()
    # Saved once the first of its five kernels has finished (a few seconds before the end
    # under the JIT), so the save falls in the middle of the run.
    src.expect(r"guest-bench crc32 ", BOOT_TIMEOUT)
    assert src.migrate(f"file:{tmp_path / 'state'}")["status"] == "completed"
    assert "checksum" not in src.text(), "guest-bench finished before the save; save earlier"
    src.cmd("quit")
    dst = Server(tmp_path, "dst", "console=ttyS0 guest.run=guest-bench,1", extra=["--incoming", f"file:{tmp_path / 'state'}"])
    servers.append(dst)
    m = dst.expect(r"guest-bench total +([0-9.]+) s checksum ([0-9a-f]{16})", 480)
    assert m.group(2) == QEMU_CHECKSUM_SCALE1


def qcow2_disk(tmp_path: Path, name="disk.qcow2", size="64M") -> Path:
    disk = tmp_path / name
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), size], check=True)
    return disk


def hmp(server: Server, line: str) -> str:
    return server.cmd("human-monitor-command", **{"command-line": line})


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
def test_savevm_loadvm_in_the_qcow2_image(tmp_path, servers):
    """HMP savevm writes the machine state into the disk's qcow2 image, where qemu-img lists
    it with its VM state size; loadvm brings the counter back to the saved value, in this
    server and in a new one; delvm removes it; qemu-img check stays clean throughout."""
    disk = qcow2_disk(tmp_path)
    drive = [{"driver": "virtio-blk-device", "id": "disk0", "drive": {"file": str(disk), "format": "qcow2"}}]
    src = Server(tmp_path, "src", f"console=ttyS0 guest.run={COUNTER}", devices=drive)
    servers.append(src)
    src.connect()
    src.expect(r"count 5\b", BOOT_TIMEOUT)
    assert hmp(src, "savevm first") == ""
    saved = counts(src.text())[-1]
    assert src.cmd("query-status")["status"] == "running"
    listing = hmp(src, "info snapshots")
    assert re.search(r"--\s+first\s+\d+(\.\d+)? MiB", listing), listing
    src.expect(rf"count {saved + 5}\b", 10)
    mark = len(src.text())
    assert hmp(src, "loadvm first") == ""
    src.expect(r"count \d+", 10, start=mark)
    assert counts(src.text()[mark:])[0] == saved + 1, f"after loadvm: {counts(src.text()[mark:])[:3]}, saved {saved}"
    assert "Error" in hmp(src, "loadvm missing")
    src.cmd("quit")
    src.proc.wait(10)

    out = subprocess.run(["qemu-img", "snapshot", "-l", str(disk)], capture_output=True, text=True, check=True).stdout
    assert re.search(r"\bfirst\s+\d+(\.\d+)? MiB", out), out
    assert subprocess.run(["qemu-img", "check", str(disk)], capture_output=True).returncode == 0

    again = Server(tmp_path, "again", f"console=ttyS0 guest.run={COUNTER}", devices=drive)
    servers.append(again)
    again.connect()
    again.expect(r"count 1\b", BOOT_TIMEOUT)
    mark = len(again.text())
    assert hmp(again, "loadvm first") == ""
    again.expect(r"count \d+", 10, start=mark)
    assert counts(again.text()[mark:])[0] == saved + 1
    assert hmp(again, "delvm first") == ""
    assert hmp(again, "info snapshots").startswith("There is no snapshot")
    # savevm replaces a snapshot of the same name, never one whose ID equals the tag: "keep"
    # takes ID 1 on the now empty image, then "1" is saved twice.
    assert hmp(again, "savevm keep") == ""
    assert hmp(again, "savevm 1") == "" and hmp(again, "savevm 1") == ""
    again.cmd("quit")
    again.proc.wait(10)
    assert subprocess.run(["qemu-img", "check", str(disk)], capture_output=True).returncode == 0
    out = subprocess.run(["qemu-img", "snapshot", "-l", str(disk)], capture_output=True, text=True, check=True).stdout
    assert "first" not in out
    assert re.search(r"^1\s+keep\s", out, re.M), out
    assert len(re.findall(r"^\d+\s+1\s", out, re.M)) == 1, out


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
def test_snapshot_jobs_and_their_events(tmp_path, servers):
    """snapshot-save, -load and -delete run as jobs with QEMU's JOB_STATUS_CHANGE sequence,
    are listed by query-jobs until job-dismiss, and report a failure in the job's error."""
    disk = qcow2_disk(tmp_path)
    drive = [{"driver": "virtio-blk-device", "id": "disk0", "drive": {"file": str(disk), "format": "qcow2"}}]
    src = Server(tmp_path, "src", f"console=ttyS0 guest.run={COUNTER}", devices=drive)
    servers.append(src)
    src.connect()
    src.expect(r"count 3\b", BOOT_TIMEOUT)

    def run_job(command, job_id, **args):
        src.cmd(command, **{"job-id": job_id, **args})
        deadline = time.monotonic() + 60
        while True:
            jobs = {j["id"]: j for j in src.cmd("query-jobs")}
            if jobs[job_id]["status"] == "concluded":
                break
            assert time.monotonic() < deadline, jobs
            time.sleep(0.02)
        statuses = [e["data"]["status"] for e in src.qmp.get_events() if e["event"] == "JOB_STATUS_CHANGE"
                    and e["data"]["id"] == job_id]
        src.cmd("job-dismiss", id=job_id)
        assert job_id not in [j["id"] for j in src.cmd("query-jobs")]
        return jobs[job_id], statuses

    job, statuses = run_job("snapshot-save", "save0", tag="snap", vmstate="disk0", devices=["disk0"])
    assert "error" not in job, job
    assert statuses == ["created", "running", "waiting", "pending", "concluded"], statuses
    saved = counts(src.text())[-1]
    src.expect(rf"count {saved + 3}\b", 10)
    mark = len(src.text())
    job, _ = run_job("snapshot-load", "load0", tag="snap", vmstate="disk0", devices=["disk0"])
    assert "error" not in job, job
    src.expect(r"count \d+", 10, start=mark)
    assert counts(src.text()[mark:])[0] == saved + 1
    job, statuses = run_job("snapshot-save", "save1", tag="snap", vmstate="disk0", devices=["disk0"])
    assert job["error"] == "Snapshot 'snap' already exists in one or more devices", job
    assert "aborting" in statuses
    job, _ = run_job("snapshot-save", "save2", tag="other", vmstate="nodisk", devices=["nodisk"])
    assert "nodisk" in job["error"]
    job, _ = run_job("snapshot-delete", "del0", tag="snap", devices=["disk0"])
    assert "error" not in job
    r = src.qmp.cmd_raw("job-dismiss", {"id": "nope"})
    assert r["error"]["class"] == "GenericError"
    src.cmd("quit")
    src.proc.wait(10)
    assert subprocess.run(["qemu-img", "check", str(disk)], capture_output=True).returncode == 0


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
def test_screendump_after_loadvm_equals_the_one_at_savevm(tmp_path, servers):
    """The display comes back with the snapshot: the screendump after loadvm equals the one
    taken at savevm (the framebuffer is guest RAM and GPU resources, both saved)."""
    disk = qcow2_disk(tmp_path)
    drive = [{"driver": "virtio-blk-device", "id": "disk0", "drive": {"file": str(disk), "format": "qcow2"}}]
    port = 5900 + random.randint(200, 900)
    on_screen = "i=0;while,true;do,echo,count,$i;echo,count,$i>/dev/tty1;i=$((i+1));sleep,0.2;done"
    src = Server(tmp_path, "src", f"console=tty0 console=ttyS0 guest.run={on_screen}", devices=drive,
                 display={"vnc": {"listen": f"127.0.0.1:{port}"}})
    servers.append(src)
    src.connect()
    src.expect(r"count 10\b", BOOT_TIMEOUT)
    src.cmd("stop")
    assert hmp(src, "savevm screen") == ""
    src.cmd("screendump", filename=str(tmp_path / "at-save.ppm"))
    src.cmd("cont")
    src.expect(rf"count {counts(src.text())[-1] + 5}\b", 10)
    src.cmd("stop")
    src.cmd("screendump", filename=str(tmp_path / "later.ppm"))
    assert hmp(src, "loadvm screen") == ""
    src.cmd("screendump", filename=str(tmp_path / "after-load.ppm"))
    at_save = (tmp_path / "at-save.ppm").read_bytes()
    assert (tmp_path / "later.ppm").read_bytes() != at_save, "the screen did not change after the save; the test proves nothing"
    assert (tmp_path / "after-load.ppm").read_bytes() == at_save


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
def test_kill_during_saves_loses_nothing(tmp_path, servers):
    """kill -9 at moments spread over a savevm and over a migrate to a file: the snapshot taken
    before stays listed and loadable, the image is not corrupt (an interrupted VM-state write may
    only leak clusters), and the state file is either the old one or a complete new one."""
    disk = qcow2_disk(tmp_path)
    drive = [{"driver": "virtio-blk-device", "id": "disk0", "drive": {"file": str(disk), "format": "qcow2"}}]
    state = tmp_path / "state"
    good = None
    for attempt, delay in enumerate([0.0, 0.02, 0.05, 0.1, 0.2]):
        src = Server(tmp_path, f"s{attempt}", f"console=ttyS0 guest.run={COUNTER}", devices=drive)
        servers.append(src)
        src.connect()
        src.expect(r"count 2\b", BOOT_TIMEOUT)
        if attempt == 0:
            assert hmp(src, "savevm keep") == ""
            assert src.migrate(f"file:{state}")["status"] == "completed"
            good = state.read_bytes()
            src.cmd("cont")
        # savevm of another snapshot, killed part-way (from the HMP thread's point of view the
        # command is still running).
        sender = subprocess.Popen([sys.executable, "-c", HMP_ONE, str(src.sock), "savevm doomed"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        src.proc.kill()
        src.proc.wait()
        sender.wait(10)
        check = subprocess.run(["qemu-img", "check", str(disk)], capture_output=True, text=True)
        assert check.returncode in (0, 3), f"kill after {delay} s: {check.stdout}{check.stderr}"
        listing = subprocess.run(["qemu-img", "snapshot", "-l", str(disk)], capture_output=True, text=True).stdout
        assert re.search(r"\bkeep\b", listing), listing

    # A migrate to the same file killed part-way leaves the old file whole.
    src = Server(tmp_path, "mig", f"console=ttyS0 guest.run={COUNTER}", devices=drive)
    servers.append(src)
    src.connect()
    src.expect(r"count 2\b", BOOT_TIMEOUT)
    src.qmp.cmd_raw("migrate", {"uri": f"file:{state}"})
    src.proc.kill()
    src.proc.wait()
    assert state.read_bytes() == good or state.read_bytes()[-9:] == b"\xffMSVMSTAT"

    # The snapshot from before all the kills still loads.
    last = Server(tmp_path, "last", f"console=ttyS0 guest.run={COUNTER}", devices=drive)
    servers.append(last)
    last.connect()
    last.expect(r"count 1\b", BOOT_TIMEOUT)
    mark = len(last.text())
    assert hmp(last, "loadvm keep") == ""
    last.expect(r"count \d+", 10, start=mark)


# Sends one HMP command and waits for its reply (run in a child so the test can kill the
# server while the command is in flight).
HMP_ONE = """
import sys
from qemu.qmp.legacy import QEMUMonitorProtocol
q = QEMUMonitorProtocol(sys.argv[1]); q.connect()
try:
    q.cmd_raw('human-monitor-command', {'command-line': sys.argv[2]})
except Exception:
    pass
"""
