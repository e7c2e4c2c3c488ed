"""Whole-guest tests: machine-server boots Debian's OpenSBI with the shared Linux guest (and
Debian's U-Boot), with the serial console on a pseudo-terminal (the stdio backend).

A boot that stalls fails with a timeout whose message carries the tail of the serial log;
nothing here retries a boot. See guest_console.py for the environment variables.
"""
import json
import os
import re
import shutil
import subprocess
import time

import pytest

from guest_console import (BOOT_OK, BOOT_TIMEOUT, GUEST_DIR, INITRD, KERNEL, OPENSBI, SERVER, UBOOT,
                           description, start_qemu, start_server)

pytestmark = [
    pytest.mark.skipif(not SERVER, reason="MACHINE_SERVER is not set"),
    pytest.mark.skipif(not (KERNEL.exists() and INITRD.exists()), reason=f"no shared guest in {GUEST_DIR}"),
    pytest.mark.skipif(not OPENSBI.exists(), reason=f"Debian's opensbi is not installed ({OPENSBI})"),
]

# Measured with qemu-system-riscv64 7.2 on this kernel and initramfs (guest.run=guest-bench,1).
QEMU_CHECKSUM_SCALE1 = "0170a8bc544c8311"
SHELL_PROMPT = r"guest:[^\r\n]*# "
CHECKSUM = r"guest-bench total +([0-9.]+) s checksum ([0-9a-f]{16})"


@pytest.fixture
def consoles():
    """Closes (kills by PID) every console a test started, whatever happens."""
    started = []
    yield started
    for c in started:
        c.close()


def boot_to_shell(console):
    console.expect(re.escape(BOOT_OK), BOOT_TIMEOUT, why="boot to init")
    console.expect(SHELL_PROMPT, 60, why="shell prompt after boot ok")


def test_boot_to_shell_and_poweroff(tmp_path, consoles):
    """OpenSBI (the default firmware: the description names none) + Linux reach the init's
    "guest: boot ok"; the serial shell evaluates a typed command; poweroff -f exits 0."""
    console = start_server(tmp_path, description())
    consoles.append(console)
    console.expect(r"OpenSBI v\d", 60, why="OpenSBI banner")
    console.expect(r"Linux version 6\.1", 120, why="kernel banner")
    boot_to_shell(console)
    console.send("echo $((6*7))\r")
    console.expect(r"\n42\r*\n", 30, why="the shell's answer to echo $((6*7))")
    console.expect(SHELL_PROMPT, 30)
    console.send("poweroff -f\r")
    assert console.wait(60) == 0, console.tail()


def test_guest_reset_reboots(tmp_path, consoles):
    """reboot -f in the guest resets the machine (the server keeps running) and the guest
    boots to "guest: boot ok" a second time."""
    console = start_server(tmp_path, description())
    consoles.append(console)
    boot_to_shell(console)
    first = console.pos
    console.send("reboot -f\r")
    console.expect(r"OpenSBI v\d", 60, why="OpenSBI banner after the reset")
    boot_to_shell(console)
    assert console.text().count(BOOT_OK) == 2
    assert console.proc.poll() is None, "the server exited on guest reset"
    assert console.text().find(BOOT_OK, first) > first
    console.send("poweroff -f\r")
    assert console.wait(60) == 0, console.tail()


BOOT_REPEAT = int(os.environ.get("BOOT_REPEAT", "5"))


def test_repeated_boots_do_not_stall(tmp_path, consoles):
    """BOOT_REPEAT (default 5) boots in a row, each running `true` through guest.run and
    powering off with status 0: an intermittent stall (a lost interrupt after "Run /init",
    say) fails here with the boot's number and its serial tail, and is never retried."""
    for i in range(BOOT_REPEAT):
        console = start_server(tmp_path, description(append="console=ttyS0 guest.run=true"), name=f"boot{i}")
        consoles.append(console)
        console.expect(r"Run /init as init process", BOOT_TIMEOUT, why=f"boot {i + 1} of {BOOT_REPEAT}: kernel to init")
        console.expect(re.escape(BOOT_OK), 60, why=f"boot {i + 1} of {BOOT_REPEAT}: init's first line")
        console.expect(r"guest: run done, status 0", 60, why=f"boot {i + 1} of {BOOT_REPEAT}: guest.run=true")
        assert console.wait(60) == 0, f"boot {i + 1} of {BOOT_REPEAT}\n{console.tail()}"


@pytest.fixture(scope="session")
def qemu_checksum(tmp_path_factory):
    """guest-bench's checksum under qemu-system-riscv64 on the same guest, when QEMU is
    installed; otherwise the value measured with QEMU 7.2."""
    if shutil.which("qemu-system-riscv64") is None:
        return QEMU_CHECKSUM_SCALE1
    tmp = tmp_path_factory.mktemp("qemu")
    console = start_qemu(tmp, "console=ttyS0 guest.run=guest-bench,1")
    try:
        m = console.expect(CHECKSUM, 300, why="guest-bench under QEMU")
        console.wait(60)
    finally:
        console.close()
    return m.group(2)


@pytest.mark.slow
def test_guest_bench_checksum_matches_qemu(tmp_path, consoles, qemu_checksum):
    """guest-bench (integer, branchy, memory, floating point, calls) computes exactly what it
    computes under QEMU. Slow (minutes under our CPU) but required."""
    assert qemu_checksum == QEMU_CHECKSUM_SCALE1, "QEMU itself disagrees with the recorded checksum"
    console = start_server(tmp_path, description(append="console=ttyS0 guest.run=guest-bench,1"))
    consoles.append(console)
    console.expect(re.escape(BOOT_OK), BOOT_TIMEOUT, why="boot to init")
    start = time.monotonic()
    m = console.expect(CHECKSUM, 480, why="guest-bench,1 to finish")
    elapsed = time.monotonic() - start
    print(f"guest-bench under machine-server: guest-timed total {m.group(1)} s, wall {elapsed:.0f} s")
    assert m.group(2) == qemu_checksum, f"checksum {m.group(2)} != QEMU's {qemu_checksum}\n{console.tail()}"
    console.expect(r"guest: run done, status 0", 60)
    assert console.wait(60) == 0, console.tail()


@pytest.mark.skipif(not UBOOT.exists(), reason=f"Debian's u-boot-qemu is not installed ({UBOOT})")
def test_uboot_prompt_answers(tmp_path, consoles):
    """Debian's S-mode U-Boot, loaded as the kernel behind OpenSBI, reaches its prompt and
    answers `version`; SIGTERM then ends the server with status 0."""
    console = start_server(tmp_path, description(kernel=str(UBOOT), initrd=None, append=None))
    consoles.append(console)
    console.expect(r"U-Boot 20\d\d\.\d\d", 120, why="U-Boot banner")
    # Stop the autoboot countdown if there is one; keep poking until the prompt shows.
    deadline = time.monotonic() + 120
    while True:
        console.send(" ")
        try:
            console.expect(r"=> ", 2, why="U-Boot prompt")
            break
        except AssertionError:
            if time.monotonic() > deadline or console.proc.poll() is not None:
                raise
    console.send("\r")
    console.expect(r"=> ", 10)
    console.send("version\r")
    m = console.expect(r"U-Boot (20\d\d\.\d\d)[^\r\n]*", 30, why="U-Boot's answer to version")
    assert m.group(1) == "2023.01"
    console.expect(r"=> ", 30)
    console.proc.terminate()
    assert console.wait(30) == 0, console.tail()


BAD_DESCRIPTIONS = [
    # (name, file text, words the error message must contain)
    ("malformed-json", '{"version": 2, "machine": "virt", "memory": "256M",', ["machine.json", "not valid JSON", "line"]),
    ("unknown-key", json.dumps({**description(), "memroy": "256M"}), ["memroy:", "unknown member"]),
    ("bad-memory-size", json.dumps(description(memory="lots")), ["memory:", "'lots'"]),
    ("memory-too-small", json.dumps(description(memory="1M")), ["memory:", "16M"]),
    ("missing-kernel-file", json.dumps(description(kernel="/nonexistent/Image")), ["kernel:", "/nonexistent/Image"]),
    ("wrong-type", json.dumps(description(cpus="two")), ["cpus:"]),
]


@pytest.mark.parametrize("name,text,words", BAD_DESCRIPTIONS, ids=[b[0] for b in BAD_DESCRIPTIONS])
def test_bad_description_exits_1_naming_the_field(tmp_path, name, text, words):
    """A wrong description ends the server at once with status 1 and a message naming what is
    wrong, before anything starts: no serial output, no QMP socket."""
    sock = tmp_path / "qmp.sock"
    desc_path = tmp_path / "machine.json"
    if text.startswith("{") and name != "malformed-json":
        d = json.loads(text)
        d["qmp"] = [{"backend": "unix", "path": str(sock)}]
        text = json.dumps(d)
    desc_path.write_text(text)
    start = time.monotonic()
    proc = subprocess.run([SERVER, "--config", str(desc_path)], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=30)
    took = time.monotonic() - start
    assert proc.returncode == 1, f"exit status {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    assert proc.stderr.startswith("machine-server: error: "), proc.stderr
    for w in words:
        assert w in proc.stderr, f"{w!r} not named in: {proc.stderr}"
    assert proc.stdout == "", f"something ran: {proc.stdout!r}"
    assert not sock.exists(), "the QMP socket was created before the description was checked"
    assert took < 10, f"took {took:.1f} s to refuse the description"


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_default_example_boots_with_qmp_and_vnc(tmp_path, consoles):
    """examples/default.json (what scripts/boot starts) boots to a shell with its serial on
    the terminal, answers QMP query-status, and serves VNC (an RFB banner); the QMP and VNC
    addresses are moved to private ones so the test does not collide with a running machine."""
    import socket
    from guest_console import REPO, Console
    example = REPO / "examples" / "default.json"
    kernel = (example.parent / json.loads(example.read_text())["kernel"]).resolve()
    if not kernel.exists():
        pytest.skip(f"examples/default.json names {kernel}, which is not there")
    sock = tmp_path / "qmp.sock"
    port = free_port()
    console = Console([SERVER, "--config", str(example), "--qmp", f"unix:{sock}", "--vnc", f"127.0.0.1:{port}"],
                      tmp_path / "default.serial.log", "machine-server")
    consoles.append(console)
    boot_to_shell(console)

    with socket.create_connection(("127.0.0.1", port), timeout=10) as vnc:
        banner = vnc.recv(12)
    assert re.fullmatch(rb"RFB 003\.00[378]\n", banner), banner

    with socket.socket(socket.AF_UNIX) as q:
        q.settimeout(10)
        q.connect(str(sock))
        f = q.makefile("rwb")
        assert b'"QMP"' in f.readline()
        for cmd in ("qmp_capabilities", "query-status"):
            f.write(json.dumps({"execute": cmd}).encode() + b"\n")
            f.flush()
            while True:
                reply = json.loads(f.readline())
                if "return" in reply or "error" in reply:
                    break
        assert reply["return"]["status"] == "running", reply

    console.send("poweroff -f\r")
    assert console.wait(60) == 0, console.tail()
