"""QEMU's command line: the same argv boots the shared guest on qemu-system-riscv64 and on
machine-server, with only the binary swapped (docs/qemu-cli.md).

Each scenario runs once per binary with identical arguments and identical assertions; the
QEMU run is the reference that proves the assertions hold for QEMU itself.

Environment:
  MACHINE_SERVER  path of the built machine-server executable (tests skip without it)
  GUEST_DIR       the shared guest (default ../shared/guests)
Needs qemu-system-riscv64 (the reference) and python's qemu.qmp.
"""
import asyncio
import os
import re
import shutil
import subprocess
import time

import pytest

pytest.importorskip("qemu.qmp")
from qemu.qmp import QMPClient  # noqa: E402
from guest_env import SERVER, KERNEL, INITRD, BOOT_TIMEOUT, needs  # noqa: E402

QEMU = shutil.which("qemu-system-riscv64")

pytestmark = needs()

BINARIES = [
    pytest.param("qemu", marks=pytest.mark.skipif(QEMU is None, reason="qemu-system-riscv64 is not installed")),
    "machine-server",
]


def binary(which):
    return QEMU if which == "qemu" else SERVER


def guest_argv(tmp_path, run, *extra):
    """The argv a script would use to boot the shared guest on qemu-system-riscv64."""
    return ["-M", "virt", "-m", "256", "-smp", "1",
            "-kernel", str(KERNEL), "-initrd", str(INITRD),
            "-append", f"console=ttyS0 guest.run={run}",
            "-nographic", "-nodefaults", "-serial", f"file:{tmp_path / 'serial.log'}",
            "-qmp", f"unix:{tmp_path / 'qmp.sock'},server=on,wait=off",
            "-pidfile", str(tmp_path / "vm.pid"), "-daemonize", *extra]


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie of ours would still answer; daemons are reparented, so this is the real state.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pid, timeout, what):
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            raise AssertionError(f"{what}: process {pid} still running after {timeout} s")
        time.sleep(0.2)


def daemonize(tmp_path, which, argv):
    """Runs the binary with -daemonize: it must return 0 once the machine is up, with the pid file written."""
    r = subprocess.run([binary(which), *argv], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"{which} exited {r.returncode}: {r.stderr}"
    pid = int((tmp_path / "vm.pid").read_text().strip())
    assert pid_alive(pid)
    assert (tmp_path / "qmp.sock").exists(), "the QMP socket listens before the parent returns"
    return pid


def serial(tmp_path):
    p = tmp_path / "serial.log"
    return p.read_text(errors="replace") if p.exists() else ""


async def qmp_session(tmp_path, body):
    client = QMPClient("cli-test")
    await client.connect(str(tmp_path / "qmp.sock"))
    try:
        return await body(client)
    finally:
        try:
            await client.disconnect()
        except EOFError:
            pass  # the server closed the connection first (it shut down)


async def next_event(client, name, timeout):
    async def wait():
        async for ev in client.events:
            if ev["event"] == name:
                return ev
    return await asyncio.wait_for(wait(), timeout)


@pytest.mark.parametrize("which", BINARIES)
def test_the_same_argv_boots_the_guest(tmp_path, which):
    pid = daemonize(tmp_path, which, guest_argv(tmp_path, "echo,cli-boot-ok", "-no-reboot", "-name", "cli-guest"))

    async def check(client):
        name = await client.execute("query-name")
        assert name == {"name": "cli-guest"}
        status = await client.execute("query-status")
        assert status["status"] in ("running", "shutdown")
    asyncio.run(qmp_session(tmp_path, check))
    wait_gone(pid, BOOT_TIMEOUT, f"{which}: the guest powers off and the process ends")
    out = serial(tmp_path)
    assert "cli-boot-ok" in out and "guest: run done, status 0" in out, out[-3000:]
    assert not (tmp_path / "vm.pid").exists(), "the pid file is removed at exit"


@pytest.mark.parametrize("which", BINARIES)
def test_S_then_cont_and_no_reboot_turns_a_guest_reboot_into_a_shutdown(tmp_path, which):
    pid = daemonize(tmp_path, which, guest_argv(tmp_path, "echo,before-reboot;reboot,-f", "-no-reboot", "-S"))

    async def scenario(client):
        assert (await client.execute("query-status"))["status"] == "prelaunch"
        await client.execute("cont")
        ev = await next_event(client, "SHUTDOWN", BOOT_TIMEOUT)
        assert ev["data"] == {"guest": True, "reason": "guest-reset"}
    asyncio.run(qmp_session(tmp_path, scenario))
    wait_gone(pid, 30, f"{which}: -no-reboot ends the process")
    assert "before-reboot" in serial(tmp_path)


# machine-server only: Debian's QEMU 7.2 ends the process on a riscv virt guest power-off even
# with -no-shutdown (observed: no SHUTDOWN event, the socket closes), so there is no reference run.
@pytest.mark.parametrize("which", ["machine-server"])
def test_no_shutdown_keeps_a_powered_off_guest_until_quit(tmp_path, which):
    pid = daemonize(tmp_path, which, guest_argv(tmp_path, "echo,powering-off", "-no-shutdown", "-S",
                                                "-uuid", "6b0d5e8c-8f0a-4c5e-9d2e-3f1a2b3c4d5e"))

    async def scenario(client):
        assert await client.execute("query-uuid") == {"UUID": "6b0d5e8c-8f0a-4c5e-9d2e-3f1a2b3c4d5e"}
        await client.execute("cont")
        ev = await next_event(client, "SHUTDOWN", BOOT_TIMEOUT)
        assert ev["data"] == {"guest": True, "reason": "guest-shutdown"}
        await next_event(client, "STOP", 30)
        status = await client.execute("query-status")
        assert status["status"] == "shutdown" and status["running"] is False
        assert pid_alive(pid), "-no-shutdown keeps the process"
        await client.execute("quit")
    asyncio.run(qmp_session(tmp_path, scenario))
    wait_gone(pid, 30, f"{which}: quit ends the process")


@pytest.mark.parametrize("which", BINARIES)
def test_memory_backend_file_shared_holds_the_guest_ram(tmp_path, which):
    ram = tmp_path / "ram"
    pid = daemonize(tmp_path, which, guest_argv(tmp_path, "echo,ram-file-ok", "-no-reboot",
                                                "-machine", "memory-backend=ram0",
                                                "-object", f"memory-backend-file,id=ram0,size=256M,mem-path={ram},share=on"))
    wait_gone(pid, BOOT_TIMEOUT, f"{which}: the guest powers off")
    assert "ram-file-ok" in serial(tmp_path)
    assert ram.stat().st_size == 256 << 20
    # The guest's writes reached the file: the kernel's own banner is in it.
    with open(ram, "rb") as f:
        assert b"Linux version 6.1" in f.read()


@pytest.mark.parametrize("which", BINARIES)
def test_version_and_help_answer_as_qemu_does(which):
    r = subprocess.run([binary(which), "-version"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0
    first = r.stdout.splitlines()[0]
    # libvirt's parser: "QEMU emulator version X.Y.Z" at the start of the first line.
    assert first.startswith("QEMU emulator version 7.2."), first
    r = subprocess.run([binary(which), "-help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "-machine" in r.stdout and "-nographic" in r.stdout


@pytest.mark.parametrize("which", BINARIES)
def test_refused_options_exit_1_naming_the_option(which):
    for argv, named in [(["-M", "virt", "-m", "256", "-bogus-option"], "-bogus-option"),
                        (["-M", "virt", "-m", "lots"], "-m"),
                        (["-M", "no-such-board"], "unsupported machine type")]:
        r = subprocess.run([binary(which), *argv, "-display", "none", "-S"], capture_output=True, text=True,
                           timeout=30, stdin=subprocess.DEVNULL)
        assert r.returncode == 1, (which, argv, r.stderr)
        assert named in r.stderr, (which, argv, r.stderr)


def test_print_description_shows_what_the_command_line_became(tmp_path):
    r = subprocess.run([SERVER, *guest_argv(tmp_path, "true", "-no-reboot"), "--print-description"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    import json
    d = json.loads(r.stdout)
    assert d["machine"] == "virt" and d["memory"] == "256M" and d["cpus"] == 1
    assert d["kernel"] == str(KERNEL) and d["serial"] == {"backend": "file", "path": str(tmp_path / "serial.log"), "append": False}
    assert d["qmp"] == [{"backend": "unix", "path": str(tmp_path / "qmp.sock")}]
    assert d["actions"]["reboot"] == "shutdown"
    # The description, written to a file, runs through the native front end unchanged.
    desc = tmp_path / "m.json"
    desc.write_text(r.stdout)
    r2 = subprocess.run([SERVER, "--config", str(desc), "--print-description"], capture_output=True, text=True, timeout=30)
    assert r2.returncode == 0 and json.loads(r2.stdout) == d, r2.stderr


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch(port, pid, timeout):
    """GETs http://127.0.0.1:PORT/ until it answers (the guest's httpd may still be starting)."""
    import urllib.request
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
                return r.read().decode()
        except OSError as e:
            assert pid_alive(pid), "the machine ended"
            assert time.monotonic() < deadline, f"no answer on port {port}: {e}"
            time.sleep(0.5)


# The guest takes a DHCP lease from user-mode networking, serves a page with busybox httpd on
# port 80 and waits to be stopped.
GUEST_HTTPD = ("udhcpc,-i,eth0,-n,-q,-t,10;mkdir,-p,/tmp/www;echo,cli-page-ok>/tmp/www/index.html;"
               "httpd,-p,80,-h,/tmp/www;echo,httpd,up;sleep,3600")


@pytest.mark.parametrize("which", BINARIES)
def test_netdev_user_hostfwd_reaches_the_guests_httpd(tmp_path, which):
    fwd = free_port()
    pid = daemonize(tmp_path, which, guest_argv(tmp_path, GUEST_HTTPD,
                                                "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{fwd}-:80",
                                                "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:60,romfile="))
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while "httpd up" not in serial(tmp_path):
            assert pid_alive(pid), f"{which} ended: {serial(tmp_path)[-3000:]}"
            assert time.monotonic() < deadline, f"{which}: no httpd: {serial(tmp_path)[-3000:]}"
            time.sleep(0.5)
        assert fetch(fwd, pid, 60).strip() == "cli-page-ok"

        async def quit(client):
            await client.execute("quit")
        asyncio.run(qmp_session(tmp_path, quit))
        wait_gone(pid, 30, f"{which}: quit ends the process")
    finally:
        if pid_alive(pid):
            os.kill(pid, 9)  # our own daemon, by its pid


def test_print_description_shows_netdevs_nics_and_gdb(tmp_path):
    """-incoming tcp: is accepted too (it is not part of the description)."""
    import json
    argv = ["-M", "virt", "-netdev", "user,id=n0,hostfwd=tcp:127.0.0.1:2222-:22,hostfwd=udp::5353-:53",
            "-device", "virtio-net-device,netdev=n0,id=nic0", "-s", "-incoming", "tcp:127.0.0.1:4444",
            "--print-description"]
    r = subprocess.run([SERVER, *argv], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["netdevs"] == [{"type": "user", "id": "n0",
                             "hostfwd": [{"str": "tcp:127.0.0.1:2222-:22"}, {"str": "udp::5353-:53"}]}]
    assert d["devices"] == [{"driver": "virtio-net-device", "id": "nic0", "netdev": "n0"}]
    assert d["gdb"] == "tcp:0.0.0.0:1234"


def test_bad_network_options_are_refused_by_name():
    for argv, words in [(["-nic", "user"], "needs model="), (["-net", "nic"], "-net: not supported"),
                        (["-netdev", "tap,id=t0"], "-netdev tap"),
                        (["-device", "virtio-net-pci,netdev=nowhere"], "netdev=nowhere"),
                        (["-machine", "none", "-kernel", "/x"], "-machine none")]:
        r = subprocess.run([SERVER, "-M", "virt", *argv], capture_output=True, text=True, timeout=30)
        assert r.returncode == 1 and words in r.stderr, (argv, r.stderr)


@pytest.mark.parametrize("which", BINARIES)
def test_gdb_tcp_with_an_empty_host_answers_the_remote_protocol(tmp_path, which):
    """-gdb tcp::PORT (what -s is, on port 1234) listens on every interface; a stop-reason query
    answers with a stop packet on both binaries."""
    import socket
    port = free_port()
    pid = daemonize(tmp_path, which, guest_argv(tmp_path, "true", "-S", "-gdb", f"tcp::{port}"))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"$?#3f")
            reply = b""
            while not re.search(rb"\$[^#]*#[0-9a-fA-F]{2}", reply):
                chunk = s.recv(4096)
                assert chunk, f"{which}: the stub closed the connection ({reply!r})"
                reply += chunk
            assert re.match(rb"\+?\$[ST][0-9a-fA-F]{2}", reply), (which, reply)
            s.sendall(b"+")

        async def quit(client):
            await client.execute("quit")
        asyncio.run(qmp_session(tmp_path, quit))
        wait_gone(pid, 30, f"{which}: quit ends the process")
    finally:
        if pid_alive(pid):
            os.kill(pid, 9)  # our own daemon, by its pid
