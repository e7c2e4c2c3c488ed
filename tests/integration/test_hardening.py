"""Reproducers for issue 15 (hardening) that need the whole server: hostile paths in the
machine description, serial output errors, and the QMP and VNC listeners under misbehaving
clients. Each test failed (hung, exhausted memory, or answered wrongly) before its fix.

Environment:
  MACHINE_SERVER  path of the built machine-server executable (tests skip without it)
  GUEST_DIR       the shared guest (default ../shared/guests beside the repository)
"""
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from guest_env import SERVER, KERNEL, INITRD, needs  # noqa: E402

OPENSBI = Path("/usr/lib/riscv64-linux-gnu/opensbi/generic/fw_dynamic.bin")

pytestmark = needs()


def write_description(tmp_path, **members):
    d = {"version": 2, "machine": "virt", "cpus": 1, "memory": "256M",
         "kernel": str(KERNEL), "initrd": str(INITRD), "append": "console=ttyS0",
         "serial": {"backend": "none"}}
    d.update(members)
    path = tmp_path / "machine.json"
    path.write_text(json.dumps(d))
    return path


def run_server(args, timeout=30):
    """Runs machine-server to its end; a hang is a test failure, not a stuck run."""
    try:
        return subprocess.run([SERVER, *args], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"machine-server {' '.join(args)} did not end within {timeout} s "
                             f"(stderr so far: {e.stderr!r})")


def error_line(r):
    lines = [line for line in r.stderr.splitlines() if line.startswith("machine-server: error: ")]
    assert r.returncode == 1 and lines, f"exit {r.returncode}, stderr: {r.stderr!r}"
    return lines[0][len("machine-server: error: "):]


@pytest.mark.parametrize("field", ["firmware", "kernel", "initrd"])
def test_a_boot_image_larger_than_ram_is_refused_by_name_without_reading_it(tmp_path, field):
    big = tmp_path / "big.img"
    with open(big, "wb") as f:
        f.truncate(20 << 30)  # 20 GiB, sparse
    members = {field: str(big)}
    if field == "firmware":
        members["kernel"] = str(KERNEL)
    cfg = write_description(tmp_path, **members)
    start = time.monotonic()
    r = run_server(["--config", str(cfg)])
    message = error_line(r)
    assert message.startswith(f"{field}: '{big}'"), message
    assert "larger than the guest RAM" in message, message
    assert time.monotonic() - start < 10


def fifo(tmp_path, name):
    p = tmp_path / name
    os.mkfifo(p)
    return p


@pytest.mark.parametrize("case", ["kernel-dev-null", "initrd-fifo", "firmware-fifo", "kernel-directory",
                                  "drive-fifo", "serial-fifo", "config-fifo"])
def test_special_files_are_refused_naming_the_field_without_blocking(tmp_path, case):
    expected = {
        "kernel-dev-null": ("kernel", "a character device"),
        "initrd-fifo": ("initrd", "a FIFO"),
        "firmware-fifo": ("firmware", "a FIFO"),
        "kernel-directory": ("kernel", "a directory"),
        "drive-fifo": ("devices[0].drive.file", "a FIFO"),
        "serial-fifo": ("serial", "a FIFO"),
        "config-fifo": ("--config", "a FIFO"),
    }[case]
    if case == "kernel-dev-null":
        cfg = write_description(tmp_path, kernel="/dev/null")
    elif case == "initrd-fifo":
        cfg = write_description(tmp_path, initrd=str(fifo(tmp_path, "initrd")))
    elif case == "firmware-fifo":
        cfg = write_description(tmp_path, firmware=str(fifo(tmp_path, "fw")))
    elif case == "kernel-directory":
        cfg = write_description(tmp_path, kernel=str(tmp_path))
    elif case == "drive-fifo":
        cfg = write_description(tmp_path, devices=[{"driver": "virtio-blk-device", "id": "disk0",
                                                    "drive": {"file": str(fifo(tmp_path, "disk")), "format": "raw"}}])
    elif case == "serial-fifo":
        cfg = write_description(tmp_path, serial={"backend": "file", "path": str(fifo(tmp_path, "serial"))})
    else:
        cfg = fifo(tmp_path, "machine.json")
    r = run_server(["--config", str(cfg)], timeout=20)
    message = error_line(r)
    field, kind = expected
    assert message.startswith(field + ":"), message
    assert kind in message, message


def test_a_serial_write_error_is_reported_once_and_the_guest_keeps_running(tmp_path):
    cfg = write_description(tmp_path, append="console=ttyS0 guest.run=echo,hello",
                            serial={"backend": "file", "path": "/dev/full"})
    r = run_server(["--config", str(cfg)], timeout=170)
    reports = [line for line in r.stderr.splitlines() if "/dev/full" in line]
    assert len(reports) == 1, r.stderr
    assert "No space left on device" in reports[0], reports
    assert r.returncode == 0, r.stderr  # the guest ran its command and powered off


# --- QMP under misbehaving clients -------------------------------------------------------

def start_paused_server(tmp_path, **members):
    """Starts a paused machine with a QMP unix socket; returns (process, socket path)."""
    sock = tmp_path / "qmp.sock"
    cfg = write_description(tmp_path, qmp=[{"backend": "unix", "path": str(sock)}], start="paused", **members)
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen([SERVER, "--config", str(cfg)], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert proc.poll() is None, (tmp_path / "server.log").read_text(errors="replace")
        assert time.monotonic() < deadline, "the QMP socket did not appear"
        time.sleep(0.05)
    return proc, sock


def stop_server(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError("machine-server did not end within 20 s of SIGTERM")


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def qmp_connect(sock, timeout=10):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(str(sock))
    f = s.makefile("rb")
    json.loads(f.readline())  # greeting
    s.sendall(b'{"execute":"qmp_capabilities"}\n')
    assert "return" in json.loads(f.readline())
    return s, f


def test_qmp_clients_that_never_read_are_throttled_not_buffered(tmp_path):
    """20 clients send commands as fast as the server takes them and never read a reply. The
    server used to buffer every reply (2.45 GB after a minute) and starve other clients; it
    must stop reading from them instead, keep answering a well-behaved client, and give the
    memory back when they leave."""
    import threading
    proc, sock = start_paused_server(tmp_path)
    stop = threading.Event()
    flooders = []
    try:
        good, good_f = qmp_connect(sock, timeout=15)
        time.sleep(0.5)
        baseline = rss_bytes(proc.pid)
        request = b'{"execute":"query-qmp-schema"}' * 256

        def flood(s):
            s.settimeout(0.2)
            while not stop.is_set():
                try:
                    s.sendall(request)
                except (socket.timeout, BlockingIOError):
                    pass  # the server stopped reading from this client: that is the point
                except OSError:
                    return

        for _ in range(20):
            s, _ = qmp_connect(sock)
            flooders.append(s)
        threads = [threading.Thread(target=flood, args=(s,), daemon=True) for s in flooders]
        for t in threads:
            t.start()
        latencies = []
        peak = baseline
        end = time.monotonic() + 15
        while time.monotonic() < end:
            t = time.monotonic()
            good.sendall(b'{"execute":"query-status","id":"probe"}\n')
            while True:
                m = json.loads(good_f.readline())
                if m.get("id") == "probe":
                    break
            latencies.append(time.monotonic() - t)
            peak = max(peak, rss_bytes(proc.pid))
            time.sleep(0.1)
        stop.set()
        for t in threads:
            t.join()
        latencies.sort()
        p90, worst = latencies[int(len(latencies) * 0.9)], latencies[-1]
        print(f"peak growth {(peak - baseline) >> 20} MiB, {len(latencies)} probes, p90 {p90:.2f} s, worst {worst:.2f} s")
        assert peak - baseline < 200 << 20, f"the server grew by {(peak - baseline) >> 20} MiB"
        # Before the fix the probe starved (its 15 s socket timeout expired). A loaded CI machine
        # can delay a few probes by seconds (the flooders' 20 threads compete with the server
        # for 2 cores), so the bound is on the 90th percentile, with a loose one on the worst.
        assert p90 < 2.0, f"a well-behaved client waited {p90:.1f} s for 1 reply in 10 (worst {worst:.1f} s)"
        assert worst < 10.0, f"a well-behaved client waited {worst:.1f} s for a reply"
        for s in flooders:
            s.close()
        flooders = []
        time.sleep(2)
        after = rss_bytes(proc.pid)
        assert after - baseline < 64 << 20, f"{(after - baseline) >> 20} MiB still held after the clients left"
        good.sendall(b'{"execute":"query-status","id":"last"}\n')
        assert json.loads(good_f.readline()).get("id") == "last"
        good.close()
    finally:
        stop.set()
        for s in flooders:
            s.close()
        stop_server(proc)


# --- VNC under half-open connections ------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rfb_handshake(port, timeout):
    """A minimal RFB 3.8 viewer: version, security type None, ClientInit; returns the
    desktop size from ServerInit. Raises on timeout."""
    deadline = time.monotonic() + timeout
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def read(n):
        data = b""
        while len(data) < n:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = s.recv(n - len(data))
            if not chunk:
                raise AssertionError("the VNC server closed the connection")
            data += chunk
        return data
    try:
        assert read(12).startswith(b"RFB 003.")
        s.sendall(b"RFB 003.008\n")
        count = read(1)[0]
        types = read(count)
        assert 1 in types, types
        s.sendall(b"\x01")
        assert read(4) == b"\0\0\0\0"
        s.sendall(b"\x01")
        init = read(24)
        read(int.from_bytes(init[20:24], "big"))
        return int.from_bytes(init[0:2], "big"), int.from_bytes(init[2:4], "big")
    finally:
        s.close()


def test_half_open_vnc_connections_block_neither_a_viewer_nor_shutdown(tmp_path):
    """20 connections that send a few bytes and go quiet used to hold libvncserver's event
    thread (a 4-byte peek that spins on fewer bytes, then blocking reads of partial messages):
    no viewer got in and SIGTERM never ended the server."""
    port = free_port()
    proc, sock = start_paused_server(tmp_path, display={"vnc": {"listen": f"127.0.0.1:{port}"}})
    stalled = []
    try:
        for i in range(20):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            if i % 2 == 0:
                s.sendall(b"RF")  # part of a handshake, before the server spoke
            stalled.append(s)
        time.sleep(0.5)
        for s in stalled[1::2]:
            s.sendall(b"RFB 00")  # after the server's greeting: part of the version
        time.sleep(0.2)
        start = time.monotonic()
        width, height = rfb_handshake(port, timeout=5)
        assert width > 0 and height > 0
        assert time.monotonic() - start < 5
        start = time.monotonic()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            raise AssertionError("machine-server did not end within 20 s of SIGTERM with half-open VNC clients")
        assert proc.returncode == 0, proc.returncode
    finally:
        for s in stalled:
            s.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- machine-img on hostile images ----------------------------------------------------------

MACHINE_IMG = os.path.join(os.path.dirname(SERVER), "machine-img") if SERVER else None


def make_qcow2_with_backing_offset(path, offset):
    subprocess.run([MACHINE_IMG, "create", "-q", "-f", "qcow2", str(path), "1M"], check=True)
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(offset.to_bytes(8, "big") + (16).to_bytes(4, "big"))


@pytest.mark.parametrize("command", ["info", "check", "convert"])
def test_machine_img_reports_a_backing_offset_that_overflows_as_corrupt(tmp_path, command):
    """backing_file_offset 0xFFFF_FFFF_FFFF_FFFF killed machine-img with SIGILL (an overflow trap)."""
    img = tmp_path / "bad.qcow2"
    make_qcow2_with_backing_offset(img, 0xFFFF_FFFF_FFFF_FFFF)
    args = {"info": ["info", str(img)], "check": ["check", str(img)],
            "convert": ["convert", "-O", "raw", str(img), str(tmp_path / "out.raw")]}[command]
    r = subprocess.run([MACHINE_IMG, *args], capture_output=True, text=True, timeout=30)
    assert r.returncode > 0, f"machine-img {command} ended with {r.returncode} (a signal?): {r.stderr}"
    assert "corrupt" in r.stderr and "backing file name" in r.stderr, r.stderr


@pytest.mark.parametrize("where", ["image", "backing"])
@pytest.mark.parametrize("command", ["info", "check", "convert"])
def test_machine_img_refuses_a_fifo_without_blocking(tmp_path, command, where):
    fifo = tmp_path / "fifo"
    target = fifo
    if where == "backing":
        # The overlay is made over a regular file, which then becomes a FIFO.
        fifo.write_bytes(b"")
        target = tmp_path / "top.qcow2"
        subprocess.run([MACHINE_IMG, "create", "-q", "-f", "qcow2", "-b", "fifo", "-F", "raw", str(target), "1M"],
                       check=True, timeout=30)
        fifo.unlink()
    os.mkfifo(fifo)
    args = {"info": ["info", str(target)], "check": ["check", str(target)],
            "convert": ["convert", "-O", "raw", str(target), str(tmp_path / "out.raw")]}[command]
    try:
        r = subprocess.run([MACHINE_IMG, *args], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"machine-img {command} blocked on a FIFO ({where})")
    assert r.returncode != 0
    assert "FIFO" in r.stderr, r.stderr
