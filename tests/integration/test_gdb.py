"""The GDB stub (`--gdb tcp:HOST:PORT`) driven by Debian's gdb-multiarch in batch mode: a
bare-metal program on a machine started paused (breakpoint at a symbol, registers and memory
read and written, a single step, a watchpoint, the program's exit), and a running Linux guest
(attach, Ctrl-C, $pc and $satp, detach and the guest carries on).

Environment:
  MACHINE_SERVER  path of the built machine-server executable (tests skip without it)
  GUEST_DIR       the shared guest directory (default: ../shared/guests beside the repo)
"""
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import time

import pytest

SERVER = os.environ.get("MACHINE_SERVER")
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
GUESTS = os.environ.get("GUEST_DIR") or os.path.join(os.path.dirname(REPO), "shared", "guests")
KERNEL = os.path.join(GUESTS, "linux-6.1-rv64-Image")
INITRD = os.path.join(GUESTS, "initramfs-rv64.cpio.gz")
GDB = shutil.which("gdb-multiarch")
CC = shutil.which("riscv64-linux-gnu-gcc")

pytestmark = [
    pytest.mark.skipif(not SERVER, reason="MACHINE_SERVER is not set"),
    pytest.mark.skipif(GDB is None, reason="gdb-multiarch is not installed"),
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port, proc, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"machine-server exited {proc.returncode}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"nothing listens on {port}")


@pytest.mark.skipif(CC is None, reason="riscv64-linux-gnu-gcc is not installed")
@pytest.mark.parametrize("engine", ["jit", "interpreter"])
def test_bare_metal_program_under_gdb(tmp_path, engine):
    elf = tmp_path / "prog.elf"
    subprocess.run([CC, "-g", "-O1", "-static", "-nostdlib", "-nostartfiles", "-march=rv64gc", "-mabi=lp64d",
                    "-mcmodel=medany", "-fno-pic", "-T", os.path.join(HERE, "gdb", "link.ld"), "-o", str(elf),
                    os.path.join(HERE, "gdb", "prog.c")], check=True)
    port = free_port()
    cfg = tmp_path / "machine.json"
    cfg.write_text(json.dumps({"version": 2, "machine": "virt", "memory": "64M", "firmware": "none",
                               "kernel": str(elf), "serial": {"backend": "none"}, "accel": {"engine": engine}}))
    server = subprocess.Popen([SERVER, "--config", str(cfg), "--gdb", f"tcp:127.0.0.1:{port}", "-S"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port(port, server)
        script = tmp_path / "cmds.gdb"
        script.write_text(f"""set pagination off
set confirm off
target remote 127.0.0.1:{port}
info threads
p $pc == _start
break bump
continue
p $pc == bump
p/x $a0
p $priv
p/x (unsigned long)$misa >> 62
set var counter = 100
p counter
set $t0 = 0x1234
p/x $t0
stepi
p $pc == (char *)bump + 4
delete
watch watched
continue
p watched
p counter
delete
continue
""")
        r = subprocess.run([GDB, "-nx", "-batch", "-x", str(script), str(elf)], capture_output=True, text=True, timeout=120)
        out = r.stdout + r.stderr
        values = dict(re.findall(r"^\$(\d+) = (.*)$", out, re.M))
        assert "(hart 0)" in out, out
        assert values.get("1") == "1", out            # stopped at the entry
        assert "Breakpoint 1, bump" in out, out
        assert values.get("2") == "1", out            # at bump
        assert values.get("3") == "0x0", out          # first call: i = 0
        assert values.get("4") == "3", out            # M-mode
        assert values.get("5") == "0x2", out          # misa says RV64
        assert values.get("6") == "100", out          # memory written and read back
        assert values.get("7") == "0x1234", out       # register written and read back
        assert values.get("8") == "1", out            # one instruction stepped
        assert "Old value = 0" in out and "New value = 42" in out, out
        assert values.get("9") == "42", out
        assert values.get("10") == "145", out         # 100 + 0 + 1 + ... + 9
        assert "exited normally" in out, out
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


@pytest.mark.skipif(not os.path.exists(KERNEL), reason=f"the shared guest is not in {GUESTS}")
def test_attach_to_running_linux_interrupt_and_detach(tmp_path):
    port = free_port()
    serial = tmp_path / "serial.log"
    cfg = tmp_path / "machine.json"
    cfg.write_text(json.dumps({"version": 2, "machine": "virt", "memory": "256M", "kernel": KERNEL, "initrd": INITRD,
                               "append": "console=ttyS0 guest.run=sleep,40", "gdb": f"tcp:127.0.0.1:{port}",
                               "serial": {"backend": "file", "path": str(serial)}}))
    server = subprocess.Popen([SERVER, "--config", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 170
        while "guest: boot ok" not in (serial.read_text(errors="replace") if serial.exists() else ""):
            assert server.poll() is None, f"machine-server exited {server.returncode}"
            assert time.time() < deadline, "the guest did not boot"
            time.sleep(0.5)
        gdb = subprocess.Popen([GDB, "-nx", "-batch", "-ex", "set pagination off", "-ex", "set architecture riscv:rv64",
                                "-ex", f"target remote 127.0.0.1:{port}", "-ex", "p/x (unsigned long)$satp >> 60",
                                "-ex", "continue", "-ex", "p/x (unsigned long)$satp >> 60", "-ex", "p/x $pc", "-ex", "detach"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        # Once gdb has read $satp it continues the guest; Ctrl-C then interrupts it.
        out = b""
        fd = gdb.stdout.fileno()
        deadline = time.time() + 60
        while b"$1 = " not in out:
            assert time.time() < deadline and gdb.poll() is None, out.decode(errors="replace")
            if select.select([fd], [], [], 0.5)[0]:
                out += os.read(fd, 65536)
        time.sleep(2)  # gdb continues the guest right after printing $1
        gdb.send_signal(signal.SIGINT)
        rest, _ = gdb.communicate(timeout=60)
        out = (out + rest).decode(errors="replace")
        values = dict(re.findall(r"^\$(\d+) = (.*)$", out, re.M))
        assert "SIGINT" in out, out
        assert values.get("1") in ("0x8", "0x9"), out   # Linux runs with Sv39 or Sv48
        assert values.get("2") in ("0x8", "0x9"), out
        assert values.get("3", "").startswith("0xffffffff"), out   # in the kernel (or its idle loop)
        assert "Detaching" in out or "detached" in out.lower(), out
        # Detached, the guest carries on and powers off by itself.
        assert server.wait(timeout=120) == 0
        assert "guest: run done, status 0" in serial.read_text(errors="replace")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


@pytest.mark.skipif(CC is None, reason="riscv64-linux-gnu-gcc is not installed")
def test_hmp_gdbserver_starts_a_stub_and_kill_ends_the_machine(tmp_path):
    """HMP `gdbserver tcp::PORT` through QMP human-monitor-command starts the stub on a
    paused machine; gdb runs the program to a breakpoint, reads memory, and `kill` ends it."""
    from qemu.qmp.legacy import QEMUMonitorProtocol

    elf = tmp_path / "prog.elf"
    subprocess.run([CC, "-g", "-O1", "-static", "-nostdlib", "-nostartfiles", "-march=rv64gc", "-mabi=lp64d",
                    "-mcmodel=medany", "-fno-pic", "-T", os.path.join(HERE, "gdb", "link.ld"), "-o", str(elf),
                    os.path.join(HERE, "gdb", "prog.c")], check=True)
    sock = tmp_path / "qmp.sock"
    cfg = tmp_path / "machine.json"
    cfg.write_text(json.dumps({"version": 2, "machine": "virt", "memory": "64M", "firmware": "none",
                               "kernel": str(elf), "serial": {"backend": "none"}}))
    server = subprocess.Popen([SERVER, "--config", str(cfg), "--qmp", f"unix:{sock}", "-S"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 30
        while not sock.exists():
            assert server.poll() is None and time.time() < deadline, "no QMP socket"
            time.sleep(0.05)
        qmp = QEMUMonitorProtocol(str(sock))
        qmp.connect()
        port = free_port()
        bad = qmp.cmd_raw("human-monitor-command", {"command-line": "gdbserver udp::1"})["return"]
        assert "is not tcp:[HOST]:PORT" in bad, bad
        out = qmp.cmd_raw("human-monitor-command", {"command-line": f"gdbserver tcp::{port}"})["return"]
        assert f"tcp::{port}" in out, out
        r = subprocess.run([GDB, "-nx", "-batch", "-ex", "set confirm off", "-ex", f"target remote 127.0.0.1:{port}",
                            "-ex", "break finish", "-ex", "continue", "-ex", "p counter", "-ex", "kill", str(elf)],
                           capture_output=True, text=True, timeout=120)
        text = r.stdout + r.stderr
        assert re.search(r"Breakpoint 1(\.\d+)?, finish", text), text
        assert re.search(r"^\$1 = 1045$", text, re.M), text     # 0 + 1 + ... + 9 + 1000
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
