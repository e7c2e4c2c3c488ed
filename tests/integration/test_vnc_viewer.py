"""A real VNC viewer (TigerVNC's vncviewer under Xvfb, keys from xdotool) on the guest's screen.

What docs/vnc.md tells a newcomer to do, done by a test: boot the shared guest with --vnc, open
vncviewer on an X server of its own, type a command into the viewer window and see it run in the
guest (it writes to the serial console) and the viewer window show the console (not a black
window). TigerVNC negotiates its own encodings (Tight/ZRLE), pixel format and desktop-size
extensions, which the in-repository clients do not.

Environment:
  MACHINE_SERVER  path of the built machine-server executable (the test skips without it)
Needs the Debian packages xvfb, tigervnc-viewer, xdotool and imagemagick (skips without them).
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import pytest

SERVER = os.environ.get("MACHINE_SERVER")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GUESTS = os.environ.get("GUEST_DIR", os.path.join(os.path.dirname(REPO), "shared", "guests"))
KERNEL = os.path.join(GUESTS, "linux-6.1-rv64-Image")
INITRD = os.path.join(GUESTS, "initramfs-rv64.cpio.gz")
TOOLS = ("Xvfb", "vncviewer", "xdotool", "import")

pytestmark = [
    pytest.mark.skipif(not SERVER, reason="MACHINE_SERVER is not set"),
    pytest.mark.skipif(not os.path.exists(KERNEL), reason="the shared guest is not in ../shared/guests"),
    pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS),
                       reason="needs xvfb, tigervnc-viewer, xdotool and imagemagick (apt-get install)"),
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout, what, log=lambda: ""):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s\n{log()}")
        time.sleep(0.2)


def stop(proc):
    """Ends one process this test started (by its PID) and waits for it."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_tigervnc_types_into_the_guest_and_shows_its_console(tmp_path):
    serial = tmp_path / "serial.log"
    port = free_port()
    cfg = tmp_path / "machine.json"
    cfg.write_text(json.dumps({
        "version": 2, "machine": "virt", "cpus": 1, "memory": "256M", "kernel": KERNEL, "initrd": INITRD,
        "append": "console=tty0 console=ttyS0", "serial": {"backend": "file", "path": str(serial)},
    }))
    log = lambda: serial.read_text(errors="replace")[-2000:] if serial.exists() else "(no serial log)"
    xvfb = server = viewer = None
    try:
        # Xvfb picks a free display number and writes it to the pipe given by -displayfd.
        read_end, write_end = os.pipe()
        xvfb = subprocess.Popen(["Xvfb", "-displayfd", str(write_end), "-screen", "0", "1400x900x24",
                                 "-nolisten", "tcp"], pass_fds=(write_end,), stderr=subprocess.DEVNULL)
        os.close(write_end)
        with os.fdopen(read_end) as f:
            display = ":" + f.readline().strip()
        env = dict(os.environ, DISPLAY=display)

        server = subprocess.Popen([SERVER, "--config", str(cfg), "--vnc", f"127.0.0.1:{port}"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: "guest:/#" in (serial.read_text(errors="replace") if serial.exists() else ""),
                 170, "the serial shell prompt", log)

        viewer = subprocess.Popen(["vncviewer", f"127.0.0.1::{port}"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        found = subprocess.run(["xdotool", "search", "--sync", "--name", "TigerVNC"], env=env,
                               capture_output=True, text=True, timeout=60)
        assert found.returncode == 0 and found.stdout.split(), "no TigerVNC window appeared"
        window = found.stdout.split()[0]
        subprocess.run(["xdotool", "windowfocus", "--sync", window], env=env, check=True, timeout=30)

        # Shifted symbols ($, (, *, >) exercise the keysym -> US key mapping through a real viewer.
        subprocess.run(["xdotool", "type", "--delay", "60", "echo viewer-$((6*7)) > /dev/ttyS0"],
                       env=env, check=True, timeout=60)
        subprocess.run(["xdotool", "key", "Return"], env=env, check=True, timeout=30)
        wait_for(lambda: "viewer-42" in serial.read_text(errors="replace"), 60,
                 "the command typed in the viewer running in the guest", log)

        # The viewer window shows the console: the top three text rows hold the boot log (about
        # 5000 lit pixels; a prompt and one command line alone light about 1200, a black window 0).
        # Rows 0-47 stay clear of TigerVNC's "Press F8" banner, drawn from row 50 for a few seconds.
        ppm = tmp_path / "viewer.ppm"
        subprocess.run(["import", "-window", window, "-depth", "8", f"ppm:{ppm}"], env=env, check=True, timeout=60)
        data = ppm.read_bytes()
        header = re.match(rb"P6\s+(\d+)\s+(\d+)\s+255\s", data)
        assert header, f"import did not write an 8-bit binary PPM: {data[:20]!r}"
        width, height = int(header.group(1)), int(header.group(2))
        pixels = data[header.end():]
        assert (width, height) == (1280, 800), f"viewer window is {width}x{height}, expected the guest's 1280x800"
        top = pixels[:width * 48 * 3]
        lit = sum(1 for i in range(0, len(top), 3) if top[i] or top[i + 1] or top[i + 2])
        assert lit > 3000, f"the viewer window's top rows do not show the boot log ({lit} lit pixels)"
    finally:
        stop(viewer)
        stop(server)
        stop(xvfb)
