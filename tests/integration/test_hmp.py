"""The human monitor (HMP) through qmp-shell -H (python qemu.qmp), on a machine started with
QEMU's command line: every HMP command machine-server lists answers as QEMU's monitor does.

Environment: MACHINE_SERVER (tests skip without it), GUEST_DIR (default ../shared/guests).
Needs qmp-shell (pip's qemu.qmp), qemu-img and Debian's OpenSBI (the firmware xp reads back).
"""
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from guest_env import SERVER, KERNEL, INITRD, needs  # noqa: E402

FIRMWARE = Path("/usr/lib/riscv64-linux-gnu/opensbi/generic/fw_dynamic.bin")

pytestmark = needs("qemu-img") + [
    pytest.mark.skipif(shutil.which("qmp-shell") is None, reason="qmp-shell (pip qemu.qmp) is not installed"),
    pytest.mark.skipif(not FIRMWARE.exists(), reason="Debian's opensbi is not installed"),
]


def free_vnc_display():
    for n in range(40, 99):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 5900 + n))
                return n
            except OSError:
                continue
    pytest.skip("no free VNC port")


@pytest.fixture
def machine(tmp_path):
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    sock = tmp_path / "qmp.sock"
    argv = [SERVER, "-M", "virt", "-m", "256", "-kernel", str(KERNEL), "-initrd", str(INITRD),
            "-append", "console=ttyS0", "-nodefaults", "-serial", f"file:{tmp_path / 'serial.log'}",
            "-qmp", f"unix:{sock},server=on,wait=off", "-name", "hmp-guest",
            "-monitor", f"unix:{tmp_path / 'hmp.sock'},server=on,wait=off",
            "-drive", f"file={disk},format=qcow2,if=virtio", "-vnc", f"127.0.0.1:{free_vnc_display()}",
            "-S", "-pidfile", str(tmp_path / "pid"), "-daemonize"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    pid = int((tmp_path / "pid").read_text())
    yield tmp_path, sock
    try:
        os.kill(pid, 15)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)


def hmp(sock, *commands):
    """Runs the commands through qmp-shell -H; returns each command's output, in order."""
    r = subprocess.run(["qmp-shell", "-H", str(sock)], input="".join(c + "\n" for c in commands),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    # qmp-shell prints its prompt "(QEMU) " before each command's output.
    parts = r.stdout.split("(QEMU) ")[1:]
    assert len(parts) >= len(commands), r.stdout
    return [p.strip("\r\n ") for p in parts[:len(commands)]]


def test_hmp_commands_through_qmp_shell(machine):
    tmp_path, sock = machine
    out = dict(zip(["status", "version", "name", "cpus", "registers", "block", "chardev", "vnc", "mtree", "help",
                    "info", "unknown"],
                   hmp(sock, "info status", "info version", "info name", "info cpus", "info registers", "info block",
                       "info chardev", "info vnc", "info mtree", "help", "info", "frobnicate")))
    assert out["status"] == "VM status: paused (prelaunch)"
    assert re.match(r"7\.2\.\d+ \(machine-server", out["version"]), out["version"]
    assert out["name"] == "hmp-guest"
    assert re.match(r"\* CPU #0: thread_id=\d+", out["cpus"]), out["cpus"]
    # Before the first instruction: hart 0 in M-mode, a0 = hart id.
    assert re.search(r"^ ?pc +[0-9a-f]{16}$", out["registers"], re.M), out["registers"]
    assert re.search(r"priv +0000000000000003", out["registers"]), out["registers"]
    assert re.search(r"x10/a0 +0000000000000000", out["registers"]), out["registers"]
    assert "f31" in out["registers"]
    assert re.search(r"virtio0: .*disk\.qcow2 \(qcow2\)", out["block"]), out["block"]
    assert out["chardev"].startswith("serial0: filename=file:"), out["chardev"]
    assert "address: 127.0.0.1:59" in out["vnc"] and "auth: none" in out["vnc"], out["vnc"]
    assert re.search(r"0000000080000000-000000008fffffff \(prio 0, ram\): ram", out["mtree"]), out["mtree"]
    assert "uart0" in out["mtree"] and "plic" in out["mtree"]
    for cmd in ["info", "stop", "cont", "system_reset", "system_powerdown", "quit", "sendkey", "screendump", "x ", "xp"]:
        assert cmd in out["help"], (cmd, out["help"])
    assert "registers" in out["info"] and "mtree" in out["info"]
    assert out["unknown"] == "unknown command: 'frobnicate'"


def test_memory_dump_reads_the_loaded_firmware(machine):
    tmp_path, sock = machine
    words = [int.from_bytes(FIRMWARE.read_bytes()[i:i + 4], "little") for i in range(0, 16, 4)]
    expect = "0000000080000000: " + " ".join(f"0x{w:08x}" for w in words)
    xp, x, xpg, bad = hmp(sock, "xp /4xw 0x80000000", "x /4xw 0x80000000", "xp /2xg 0x80000000", "xp /4xw 0x10")
    assert xp == expect
    assert x == expect  # M-mode at reset: virtual = physical
    g0 = int.from_bytes(FIRMWARE.read_bytes()[0:8], "little")
    assert xpg.startswith(f"0000000080000000: 0x{g0:016x}"), xpg
    assert bad == "0000000000000010: Cannot access memory"  # QEMU's wording


def process_gone(pid, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z":
                return
        except (FileNotFoundError, ProcessLookupError):
            return
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_run_control_sendkey_and_screendump(machine):
    tmp_path, sock = machine
    pid = int((tmp_path / "pid").read_text())
    shot = tmp_path / "screen.ppm"
    # Before the guest runs, the GPU has no mode set: screendump reports it as QEMU's monitor
    # reports errors ("Error: ..."), through the QMP command it wraps.
    dump, cont, status, sendkey, stop, status2, reset, bad_key = hmp(
        sock, f"screendump {shot}", "cont", "info status", "sendkey ctrl-alt-f1", "stop", "info status",
        "system_reset", "sendkey nosuchkey")
    assert dump.startswith("Error: display") and "video mode" in dump, dump
    assert not shot.exists()
    assert (cont, sendkey, stop, reset) == ("", "", "", "")
    assert status == "VM status: running"
    assert status2 == "VM status: paused"
    assert bad_key == "invalid parameter: nosuchkey"
    # quit: the machine ends (qmp-shell may then see the socket close: its exit status is not checked).
    subprocess.run(["qmp-shell", "-H", str(sock)], input="quit\n", capture_output=True, text=True, timeout=60)
    process_gone(pid, 30, "quit ends the machine")


class Monitor:
    """A client of the readline monitor: each answer ends with the "(qemu) " prompt."""

    def __init__(self, path):
        self.conn = socket.socket(socket.AF_UNIX)
        self.conn.settimeout(30)
        self.conn.connect(path)
        self.buffer = b""

    def answer(self):
        while b"(qemu) " not in self.buffer:
            chunk = self.conn.recv(4096)
            assert chunk, f"the monitor closed the connection after {self.buffer!r}"
            self.buffer += chunk
        end = self.buffer.index(b"(qemu) ") + len(b"(qemu) ")
        text, self.buffer = self.buffer[:end], self.buffer[end:]
        return text.decode()


def test_monitor_socket_speaks_hmp_with_qemus_prompt(machine):
    """-monitor unix:...,server=on,wait=off: QEMU's readline monitor (banner, prompt, text answers)."""
    tmp_path, _ = machine
    pid = int((tmp_path / "pid").read_text())
    m = Monitor(str(tmp_path / "hmp.sock"))
    assert m.answer() == "QEMU 7.2.0 monitor - type 'help' for more information\r\n(qemu) "
    m.conn.sendall(b"info status\r\n")
    assert m.answer() == "VM status: paused (prelaunch)\r\n(qemu) "
    m.conn.sendall(b"info name\ninfo nosuch\n")
    assert m.answer() == "hmp-guest\r\n(qemu) "
    assert m.answer() == "unknown command: 'info nosuch'\r\n(qemu) "
    m.conn.sendall(b"x" * 5000 + b"\n")
    assert "line too long" in m.answer()
    m.conn.sendall(b"quit\n")
    m.answer()
    m.conn.close()
    process_gone(pid, 30, "quit on the monitor ends the machine")
