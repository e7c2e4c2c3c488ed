"""Drives a running machine-server with the unmodified qemu.qmp library and qmp-shell.

Environment:
  MACHINE_SERVER      path of the machine-server executable (required; tests skip without it).
  MACHINE_SERVER_CMD  optional command template; "{server}" and "{description}" are replaced.
                      Default: "{server} --config {description}".
  GUEST_DIR           directory with the shared guest (default: ../shared/guests from the repo).

Each test writes a machine description (schema/machine-description.json) with a QMP unix
socket in a temporary directory, starts the server, and talks QMP to it.
"""
import asyncio
import json
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

qmp = pytest.importorskip("qemu.qmp")
from qemu.qmp import QMPClient  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
GUEST_DIR = Path(os.environ.get("GUEST_DIR", REPO.parent / "shared" / "guests"))
SERVER = os.environ.get("MACHINE_SERVER")

pytestmark = pytest.mark.skipif(not SERVER, reason="MACHINE_SERVER is not set")


def start_server(tmp_path: Path, append: str = "console=ttyS0", serial=None):
    sock = tmp_path / "qmp.sock"
    description = {
        "version": 2,
        "machine": "virt",
        "name": "qmp-test",
        "cpus": 1,
        "memory": "256M",
        "kernel": str(GUEST_DIR / "linux-6.1-rv64-Image"),
        "initrd": str(GUEST_DIR / "initramfs-rv64.cpio.gz"),
        "append": append,
        "serial": serial or {"backend": "ringbuf"},
        "qmp": [{"backend": "unix", "path": str(sock)}],
    }
    desc_path = tmp_path / "machine.json"
    desc_path.write_text(json.dumps(description))
    template = os.environ.get("MACHINE_SERVER_CMD", "{server} --config {description}")
    cmd = [part.format(server=SERVER, description=str(desc_path)) for part in shlex.split(template)]
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None:
            raise AssertionError(f"machine-server exited with {proc.returncode}: "
                                 f"{(tmp_path / 'server.log').read_text(errors='replace')}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("QMP socket did not appear within 30 s")
        time.sleep(0.05)
    assert (sock.stat().st_mode & 0o777) == 0o600
    return proc, sock


async def next_event(client: QMPClient, name: str, timeout: float = 10.0):
    async def wait():
        async for event in client.events:
            if event["event"] == name:
                return event
    return await asyncio.wait_for(wait(), timeout)


def test_run_control_and_events(tmp_path):
    proc, sock = start_server(tmp_path)

    async def scenario():
        client = QMPClient("machine-server-test")
        await client.connect(str(sock))
        greeting = client.greeting
        assert greeting is not None
        assert "oob" not in greeting.QMP.capabilities

        # The QMP listener is up before the machine starts (so a client can reach a machine
        # started with -S); without -S it goes from prelaunch to running at once.
        status = await client.execute("query-status")
        for _ in range(100):
            if status["status"] != "prelaunch":
                break
            await asyncio.sleep(0.05)
            status = await client.execute("query-status")
        assert status["running"] is True and status["status"] == "running"

        await client.execute("stop")
        stop_event = await next_event(client, "STOP")
        assert set(stop_event["timestamp"]) == {"seconds", "microseconds"}
        assert (await client.execute("query-status"))["status"] == "paused"

        await client.execute("cont")
        await next_event(client, "RESUME")
        assert (await client.execute("query-status"))["running"] is True

        names = {c["name"] for c in await client.execute("query-commands")}
        assert {"qmp_capabilities", "query-status", "stop", "cont", "quit", "query-qmp-schema"} <= names

        schema = await client.execute("query-qmp-schema")
        assert any(e["name"] == "query-status" and e["meta-type"] == "command" for e in schema)

        try:
            await client.execute("no-such-command")
            raise AssertionError("unknown command accepted")
        except qmp.ExecuteError as err:
            assert err.error_class == "CommandNotFound"

        await client.execute("system_powerdown")
        await next_event(client, "POWERDOWN")

        try:
            await client.execute("quit")
        except (qmp.ExecInterruptedError, EOFError):
            pass  # the guest may already have acted on the power button and shut down
        try:
            await client.disconnect()
        except EOFError:
            pass  # the same race: the server ended while the client was still reading

    try:
        asyncio.run(scenario())
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


# A guest loop that prints the guest's uptime every second, 15 times, then returns; the init
# then powers the machine off (commas become spaces in guest.run).
UPTIME_LOOP = "guest.run=i=0;while,[,$i,-lt,15,];do,echo,up,$(cut,-d.,-f1,/proc/uptime);sleep,1;i=$((i+1));done"


def test_stop_freezes_the_guest_and_guest_poweroff_is_a_guest_shutdown(tmp_path):
    """stop: the serial line goes quiet and guest time does not advance while paused; cont
    resumes where it stopped; the guest's own poweroff ends in SHUTDOWN (guest: true) and
    exit status 0."""
    console = tmp_path / "serial.log"
    proc, sock = start_server(tmp_path, append=f"console=ttyS0 {UPTIME_LOOP}",
                              serial={"backend": "file", "path": str(console)})

    def uptimes():
        return [int(line.split()[1]) for line in console.read_text(errors="replace").splitlines()
                if line.startswith("up ") and len(line.split()) == 2 and line.split()[1].isdigit()]

    async def wait_for_uptimes(n, timeout):
        deadline = time.monotonic() + timeout
        while len(uptimes()) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"guest printed {uptimes()} within {timeout} s; serial:\n"
                                     + console.read_text(errors="replace")[-2000:])
            await asyncio.sleep(0.2)

    async def scenario():
        client = QMPClient("machine-server-test")
        await client.connect(str(sock))
        await wait_for_uptimes(3, 180)

        await client.execute("stop")
        await next_event(client, "STOP")
        frozen_size = console.stat().st_size
        before = uptimes()
        await asyncio.sleep(4)
        assert console.stat().st_size == frozen_size, "the serial line kept talking while stopped"

        await client.execute("cont")
        await next_event(client, "RESUME")
        await wait_for_uptimes(len(before) + 2, 30)
        after = uptimes()
        # Printed once a second: with 4 paused seconds counted, the step would be 5 or more.
        step = after[len(before)] - before[-1]
        assert step <= 2, f"guest time advanced while stopped: {before} then {after}"

        shutdown = await next_event(client, "SHUTDOWN", timeout=120)
        assert shutdown["data"]["guest"] is True
        assert shutdown["data"]["reason"] == "guest-shutdown"
        try:
            await client.disconnect()
        except EOFError:
            pass  # the server exits after the guest's poweroff and may close the socket first

    try:
        asyncio.run(scenario())
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.skipif(shutil.which("tmux") is None or shutil.which("qmp-shell") is None,
                    reason="tmux or qmp-shell not installed")
def test_qmp_shell_under_tmux(tmp_path):
    proc, sock = start_server(tmp_path)
    session = f"qmpshell{os.getpid()}"
    try:
        subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "200", "-y", "50",
                        f"qmp-shell {sock}"], check=True)

        def pane():
            return subprocess.run(["tmux", "capture-pane", "-p", "-t", session],
                                  capture_output=True, text=True).stdout

        def wait_for(text, timeout=15):
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if text in pane():
                    return
                time.sleep(0.1)
            raise AssertionError(f"{text!r} not seen; pane:\n{pane()}")

        wait_for("Welcome to the QMP low-level shell")
        subprocess.run(["tmux", "send-keys", "-t", session, "query-status", "Enter"], check=True)
        wait_for('"status": "running"')
        subprocess.run(["tmux", "send-keys", "-t", session, "query-name", "Enter"], check=True)
        wait_for('"name": "qmp-test"')
        subprocess.run(["tmux", "send-keys", "-t", session, "quit", "Enter"], check=True)
        assert proc.wait(timeout=30) == 0
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
        if proc.poll() is None:
            proc.kill()
