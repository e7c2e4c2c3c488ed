"""Whole-guest tests of the description's devices: virtio-blk on raw and qcow2 images, and the
VNC display (virtio-gpu + keyboard + tablet) seen through a real VNC client.

Environment:
  MACHINE_SERVER  path of the built machine-server executable (tests skip without it)
The shared guest (Linux 6.1 + busybox initramfs) is taken from GUEST_DIR (default: ../shared/guests
relative to the repository). Guest commands go on the kernel command line as guest.run=…; the guest's init turns
commas into spaces, runs the result with sh -c and powers off.
Needs qemu-img (images, check) and vncdotool (pip install vncdotool) for the VNC test.
"""
import hashlib
import json
import os
import shutil
import socket
import subprocess
import time

import pytest

SERVER = os.environ.get("MACHINE_SERVER")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GUESTS = os.environ.get("GUEST_DIR") or os.path.join(os.path.dirname(REPO), "shared", "guests")
KERNEL = os.path.join(GUESTS, "linux-6.1-rv64-Image")
INITRD = os.path.join(GUESTS, "initramfs-rv64.cpio.gz")
BOOT_TIMEOUT = 170  # seconds; every boot stays under 3 minutes

pytestmark = [
    pytest.mark.skipif(not SERVER, reason="MACHINE_SERVER is not set"),
    pytest.mark.skipif(not os.path.exists(KERNEL), reason=f"the shared guest is not in {GUESTS}"),
    pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed"),
]


def description(tmp_path, devices=(), append="console=ttyS0", **extra):
    d = {
        "version": 2, "machine": "virt", "cpus": 1, "memory": "256M",
        "kernel": KERNEL, "initrd": INITRD, "append": append,
        "serial": {"backend": "file", "path": str(tmp_path / "serial.log")},
        "devices": list(devices),
    }
    d.update(extra)
    path = tmp_path / "machine.json"
    path.write_text(json.dumps(d))
    return str(path)


def disk(id_, file, fmt, read_only=False):
    return {"driver": "virtio-blk-device", "id": id_, "drive": {"file": str(file), "format": fmt, "read-only": read_only}}


def run_guest(tmp_path, devices, command):
    """Boots the guest, runs `command` (commas for spaces) and returns the serial output once it powered off."""
    cfg = description(tmp_path, devices, append="console=ttyS0 guest.run=" + command)
    r = subprocess.run([SERVER, "--config", cfg], capture_output=True, text=True, timeout=BOOT_TIMEOUT)
    out = (tmp_path / "serial.log").read_text(errors="replace")
    assert r.returncode == 0, f"machine-server exited {r.returncode}: {r.stderr}\n{out[-2000:]}"
    assert "guest: run done, status 0" in out, out[-3000:]
    return out


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_raw_disk_survives_a_reboot(tmp_path):
    img = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(img), "32M"], check=True)
    out = run_guest(tmp_path, [disk("disk0", img, "raw")],
                    "test,-e,/sys/block/vda&&mke2fs,-q,/dev/vda&&mount,/dev/vda,/mnt&&echo,raw-ok>/mnt/f&&umount,/mnt")
    assert "Wrong magic value" not in out
    out = run_guest(tmp_path, [disk("disk0", img, "raw")], "mount,/dev/vda,/mnt&&cat,/mnt/f&&umount,/mnt")
    assert "raw-ok" in out


def test_qcow2_overlay_keeps_its_backing_file_unchanged(tmp_path):
    base = tmp_path / "base.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(base), "32M"], check=True)
    run_guest(tmp_path, [disk("disk0", base, "raw")],
              "mke2fs,-q,/dev/vda&&mount,/dev/vda,/mnt&&echo,from-base>/mnt/base.txt&&umount,/mnt")
    base_hash = sha256(base)
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(overlay)],
                   check=True, cwd=tmp_path)
    run_guest(tmp_path, [disk("disk0", overlay, "qcow2")],
              "mount,/dev/vda,/mnt&&cat,/mnt/base.txt&&echo,from-overlay>/mnt/new.txt&&umount,/mnt")
    out = run_guest(tmp_path, [disk("disk0", overlay, "qcow2")],
                    "mount,/dev/vda,/mnt&&cat,/mnt/base.txt,/mnt/new.txt&&umount,/mnt")
    assert "from-base" in out and "from-overlay" in out
    check = subprocess.run(["qemu-img", "check", str(overlay)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert sha256(base) == base_hash, "the backing file was written"


def test_read_only_disk_refuses_guest_writes(tmp_path):
    img = tmp_path / "ro.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(img), "8M"], check=True)
    before = sha256(img)
    out = run_guest(tmp_path, [disk("disk0", img, "raw", read_only=True)],
                    "cat,/sys/block/vda/ro;dd,if=/dev/zero,of=/dev/vda,bs=512,count=1,conv=fsync;true")
    assert "\n1" in out.replace("\r", "")
    assert sha256(img) == before


class QMP:
    """A minimal QMP client over a unix socket (greeting, negotiation, commands, events)."""

    def __init__(self, path, deadline=30):
        end = time.time() + deadline
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.time() > end:
                    raise
                time.sleep(0.1)
        self.file = self.sock.makefile("r")
        self.events = []
        assert "QMP" in self.read()
        assert self.execute("qmp_capabilities") == {}

    def read(self):
        line = self.file.readline()
        assert line, "QMP connection closed"
        return json.loads(line)

    def execute(self, name, **arguments):
        msg = {"execute": name}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode())
        while True:
            m = self.read()
            if "event" in m:
                self.events.append(m)
            elif "return" in m:
                return m["return"]
            else:
                raise AssertionError(f"{name}: {m['error']}")

    def close(self):
        self.sock.close()


class Server:
    """machine-server running in the background; killed (by its PID) when the test ends."""

    def __init__(self, tmp_path, cfg):
        self.tmp_path = tmp_path
        self.proc = subprocess.Popen([SERVER, "--config", cfg], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def serial(self):
        return (self.tmp_path / "serial.log").read_text(errors="replace") if (self.tmp_path / "serial.log").exists() else ""

    def wait_for_serial(self, text, timeout=120):
        end = time.time() + timeout
        while time.time() < end:
            if text in self.serial():
                return
            assert self.proc.poll() is None, f"machine-server exited: {self.proc.stderr.read()}"
            time.sleep(0.2)
        raise AssertionError(f"{text!r} never appeared on the serial line:\n{self.serial()[-2000:]}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def test_second_writer_is_refused_and_query_block_reports_the_image(tmp_path):
    img = tmp_path / "shared.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "16M"], check=True)
    cfg = description(tmp_path, [disk("disk0", img, "qcow2")], qmp=[{"backend": "unix", "path": str(tmp_path / "qmp.sock")}],
                      start="paused")
    first = Server(tmp_path, cfg)
    try:
        qmp = QMP(str(tmp_path / "qmp.sock"))
        [b] = qmp.execute("query-block")
        assert b["device"] == "disk0" and b["locked"] is False and b["removable"] is False
        assert b["inserted"]["file"] == str(img) and b["inserted"]["drv"] == "qcow2" and b["inserted"]["ro"] is False
        assert b["inserted"]["image"]["virtual-size"] == 16 << 20
        other = tmp_path / "other"
        other.mkdir()
        second = subprocess.run([SERVER, "--config", description(other, [disk("disk0", img, "qcow2")])],
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 1
        assert "devices[0].drive.file" in second.stderr and str(img) in second.stderr and "lock" in second.stderr
        qmp.execute("quit")
        qmp.close()
        first.proc.wait(timeout=30)
    finally:
        first.stop()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def rgb(path):
    from PIL import Image
    return Image.open(path).convert("RGB")


@pytest.mark.skipif(shutil.which("vncdo") is None, reason="vncdotool is not installed (pip install vncdotool)")
def test_vnc_shows_the_console_and_types_into_the_guest(tmp_path):
    port = free_port()
    cfg = description(tmp_path, [], append="console=tty0 console=ttyS0 vt.global_cursor_default=0",
                      qmp=[{"backend": "unix", "path": str(tmp_path / "qmp.sock")}],
                      display={"vnc": {"listen": f"127.0.0.1:{port}"}})
    server = Server(tmp_path, cfg)
    vnc = f"127.0.0.1::{port}"
    try:
        qmp = QMP(str(tmp_path / "qmp.sock"))
        info = qmp.execute("query-vnc")
        assert info["enabled"] is True and info["service"] == str(port) and info["host"] == "127.0.0.1"
        server.wait_for_serial("guest:/#")
        out = server.serial()
        assert "virtio_gpudrmfb" in out and "QEMU Virtio Keyboard" in out and "QEMU Virtio Tablet" in out
        assert "Wrong magic value" not in out

        # The framebuffer console shows the boot log: the top rows are not blank.
        cap = tmp_path / "boot.png"
        deadline = time.time() + 60
        while True:
            subprocess.run(["vncdo", "-s", vnc, "capture", str(cap)], check=True, timeout=60)
            img = rgb(cap)
            lit = sum(1 for y in range(0, 48) for x in range(0, img.width, 2) if img.getpixel((x, y)) != (0, 0, 0))
            if lit > 100 or time.time() > deadline:
                break
            time.sleep(1)
        assert img.size == (1280, 800)
        assert lit > 100, "the top of the screen is blank"

        # Keys typed in the viewer reach the shell on tty1.
        subprocess.run(["vncdo", "-s", vnc, "type", "echo vnc-ok > /dev/ttyS0", "key", "enter"], check=True, timeout=60)
        server.wait_for_serial("vnc-ok", timeout=60)

        # QMP screendump shows what the viewer sees.
        time.sleep(1.0)
        before, after = tmp_path / "a.png", tmp_path / "b.png"
        dump = tmp_path / "dump.ppm"
        subprocess.run(["vncdo", "-s", vnc, "capture", str(before)], check=True, timeout=60)
        qmp.execute("screendump", filename=str(dump), format="ppm")
        subprocess.run(["vncdo", "-s", vnc, "capture", str(after)], check=True, timeout=60)
        d = rgb(dump)
        assert d.size == (1280, 800)
        assert d.tobytes() in (rgb(before).tobytes(), rgb(after).tobytes()), "screendump differs from the VNC capture"

        # Viewers were reported as QMP events.
        qmp.execute("query-status")
        names = {e["event"] for e in qmp.events}
        assert {"VNC_CONNECTED", "VNC_INITIALIZED", "VNC_DISCONNECTED"} <= names, names

        # system_powerdown presses KEY_POWER on the keyboard (this guest's init ignores it) and
        # sends POWERDOWN; the guest keeps running.
        qmp.execute("system_powerdown")
        assert qmp.execute("query-status")["status"] == "running"
        assert "POWERDOWN" in {e["event"] for e in qmp.events}
        qmp.execute("quit")
        qmp.close()
        server.proc.wait(timeout=30)
    finally:
        server.stop()


KBD = {"driver": "virtio-keyboard-device"}


@pytest.mark.parametrize("devices,display,message", [
    ([disk("a", "missing.raw", "raw")], None, "devices[0].drive.file: "),
    ([KBD | {"id": "k"}, KBD | {"id": "k"}], None, "devices[1].id: 'k' is already the id of devices[0]"),
    ([{"driver": "virtio-gpu-device"}], None, "devices[0]: a virtio-gpu-device needs a display"),
    ([KBD] * 9, None, "devices[8]: the virt board has 8 virtio-mmio slots"),
    ([KBD] * 7, {"vnc": {"listen": "127.0.0.1:0"}}, "display.vnc: the VNC display adds virtio-gpu-device"),
])
def test_bad_device_lists_are_refused_naming_the_device(tmp_path, devices, display, message):
    extra = {"display": display} if display else {}
    r = subprocess.run([SERVER, "--config", description(tmp_path, devices, **extra)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert message in r.stderr, r.stderr
