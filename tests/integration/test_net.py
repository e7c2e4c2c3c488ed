"""Whole-guest tests of networking: virtio-net on virtio-mmio and virtio-pci behind a user
(libslirp) netdev, a stream netdev linking two machine-servers, forwarding rules added at run
time and kept by a restored state, and bad input refused with the server still running.

Environment:
  MACHINE_SERVER  path of the built machine-server executable (tests skip without it)
  GUEST_DIR       the shared guest (default ../shared/guests)
Guest commands go on the kernel command line as guest.run=...; init turns commas into spaces,
runs the result with sh -c and powers off. udhcpc's lease script configures eth0.
"""
import hashlib
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
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
BOOT_TIMEOUT = float(os.environ.get("BOOT_TIMEOUT", "170"))

pytestmark = [
    pytest.mark.skipif(not SERVER, reason="MACHINE_SERVER is not set"),
    pytest.mark.skipif(not KERNEL.exists(), reason=f"no shared guest in {GUEST_DIR}"),
]

DHCP = "udhcpc,-i,eth0,-n,-q,-t,10"
# The guest serves /tmp/www on port 80 and then waits to be stopped.
GUEST_HTTPD = "mkdir,-p,/tmp/www;echo,guest-page-ok>/tmp/www/index.html;httpd,-p,80,-h,/tmp/www;echo,httpd,up;sleep,3600"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server(MachineProcess):
    """One machine-server with its serial console in a file and a QMP unix socket."""

    def __init__(self, tmp: Path, name: str, append: str, netdevs=(), devices=(), extra=()):
        desc = {
            "version": 2, "machine": "virt", "cpus": 1, "memory": "256M",
            "kernel": str(KERNEL), "initrd": str(INITRD), "append": "console=ttyS0 guest.run=" + append,
            "netdevs": list(netdevs),
            "devices": list(devices),
        }
        super().__init__(tmp, name, desc, extra)

    def hmp(self, line):
        return self.cmd("human-monitor-command", **{"command-line": line})


def fetch(port, timeout=60) -> str:
    """GETs http://127.0.0.1:PORT/ until it answers (the guest's httpd may still be starting)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
                return r.read().decode()
        except OSError as e:
            assert time.monotonic() < deadline, f"no answer on port {port}: {e}"
            time.sleep(0.3)


@pytest.fixture
def host_http(tmp_path):
    """A host HTTP server on 127.0.0.1 serving a 16 MiB random file; yields (port, sha256)."""
    root = tmp_path / "www"
    root.mkdir()
    data = os.urandom(16 << 20)
    (root / "big.bin").write_bytes(data)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield httpd.server_address[1], hashlib.sha256(data).hexdigest()
    httpd.shutdown()


@pytest.mark.parametrize("driver", ["virtio-net-device", "virtio-net-pci"])
def test_dhcp_download_and_hostfwd(tmp_path, servers, host_http, driver):
    """The guest gets 10.0.2.15 by DHCP, downloads 16 MiB from the host's HTTP server at
    10.0.2.2 with a matching sha256, reaches a host command through a guestfwd rule, and the
    host reads a page from the guest's httpd through a hostfwd rule of the description."""
    port, digest = host_http
    fwd = free_port()
    s = Server(tmp_path, "m", f"{DHCP};ip,-4,addr,show,eth0;wget,-q,-O,/tmp/b,http://10.0.2.2:{port}/big.bin;"
                              f"sha256sum,/tmp/b;nc,10.0.2.100,1234,</dev/null;{GUEST_HTTPD}",
               netdevs=[{"type": "user", "id": "n0", "hostfwd": [{"str": f"tcp:127.0.0.1:{fwd}-:80"}],
                         "guestfwd": [{"str": "tcp:10.0.2.100:1234-cmd:echo from-the-host-command"}]}],
               devices=[{"driver": driver, "id": "nic0", "netdev": "n0", "mac": "52:54:00:12:34:56"}])
    servers.append(s)
    s.connect()
    s.expect(r"(?m)^httpd up", BOOT_TIMEOUT)
    out = s.text()
    assert "inet 10.0.2.15/24" in out, out[-3000:]
    m = re.search(r"^([0-9a-f]{64})\s+/tmp/b", out, re.M)
    assert m and m.group(1) == digest, f"sha256 {m and m.group(1)} != {digest}\n{out[-2000:]}"
    assert re.search(r"(?m)^from-the-host-command", out), out[-2000:]
    assert fetch(fwd).strip() == "guest-page-ok"
    info = s.hmp("info network")
    assert "nic0:" in info and "macaddr=52:54:00:12:34:56" in info and f"tcp:127.0.0.1:{fwd}-:80" in info, info
    [f] = s.cmd("query-rx-filter", name="nic0")
    assert f["main-mac"] == "52:54:00:12:34:56" and f["name"] == "nic0"


def test_two_machines_on_a_stream_link(tmp_path, servers):
    """Two machine-servers joined by a stream netdev (one listening on a unix socket, one
    connecting) with static addresses: they ping each other and one fetches a 1 MiB file
    from the other's httpd, byte for byte."""
    sock = tmp_path / "link.sock"
    a = Server(tmp_path, "a",
               "ip,addr,add,192.168.76.1/24,dev,eth0;ip,link,set,eth0,up;mkdir,-p,/tmp/www;"
               "dd,if=/dev/urandom,of=/tmp/www/f,bs=1024,count=1024,2>/dev/null;sha256sum,/tmp/www/f;"
               "httpd,-p,80,-h,/tmp/www;echo,a,ready;sleep,3600",
               netdevs=[{"type": "stream", "id": "l0", "server": True, "addr": {"type": "unix", "path": str(sock)}}],
               devices=[{"driver": "virtio-net-device", "id": "nic0", "netdev": "l0", "mac": "52:54:00:00:00:01"}])
    servers.append(a)
    a.connect()
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert time.monotonic() < deadline, "the stream listener did not appear"
        time.sleep(0.05)
    b = Server(tmp_path, "b",
               "ip,addr,add,192.168.76.2/24,dev,eth0;ip,link,set,eth0,up;"
               "for,i,in,$(seq,1,120);do,ping,-c,1,-W,1,192.168.76.1>/dev/null&&break;done;"
               "ping,-c,3,192.168.76.1;"
               "for,i,in,$(seq,1,60);do,wget,-q,-O,/tmp/f,http://192.168.76.1/f&&break;sleep,1;done;"
               "sha256sum,/tmp/f;echo,b,done;sleep,3600",
               netdevs=[{"type": "stream", "id": "l0", "addr": {"type": "unix", "path": str(sock)}}],
               devices=[{"driver": "virtio-net-pci", "id": "nic0", "netdev": "l0", "mac": "52:54:00:00:00:02"}])
    servers.append(b)
    b.connect()
    b.expect(r"(?m)^b done", BOOT_TIMEOUT * 1.5)
    a.expect(r"(?m)^a ready", 30)
    out_b = b.text()
    assert re.search(r"3 packets transmitted, 3 packets received", out_b), out_b[-2000:]
    sum_a = re.search(r"^([0-9a-f]{64})\s+/tmp/www/f", a.text(), re.M).group(1)
    m = re.search(r"^([0-9a-f]{64})\s+/tmp/f", out_b, re.M)
    assert m and m.group(1) == sum_a, out_b[-2000:]
    assert "connected" in a.hmp("info network")


@pytest.mark.skipif(shutil.which("qemu-system-riscv64") is None, reason="qemu-system-riscv64 is not installed")
def test_a_stream_link_to_qemu(tmp_path, servers):
    """Our stream netdev speaks QEMU 7.2's -netdev stream framing: our server listens on TCP,
    qemu-system-riscv64 connects with -netdev stream,server=off, and our guest pings QEMU's."""
    port = free_port()
    ours = Server(tmp_path, "ours",
                  "ip,addr,add,192.168.77.1/24,dev,eth0;ip,link,set,eth0,up;"
                  "for,i,in,$(seq,1,120);do,ping,-c,1,-W,1,192.168.77.2>/dev/null&&break;done;"
                  "ping,-c,3,192.168.77.2;echo,pinged,qemu;sleep,3600",
                  netdevs=[{"type": "stream", "id": "l0", "server": True,
                            "addr": {"type": "inet", "host": "127.0.0.1", "port": str(port)}}],
                  devices=[{"driver": "virtio-net-device", "id": "nic0", "netdev": "l0", "mac": "52:54:00:00:01:01"}])
    servers.append(ours)
    ours.connect()
    qemu_log = open(tmp_path / "qemu.log", "wb")
    qemu = subprocess.Popen(
        ["qemu-system-riscv64", "-M", "virt", "-smp", "1", "-m", "256M", "-nographic",
         "-bios", "/usr/lib/riscv64-linux-gnu/opensbi/generic/fw_dynamic.bin",
         "-kernel", str(KERNEL), "-initrd", str(INITRD),
         "-append", "console=ttyS0 guest.run=ip,addr,add,192.168.77.2/24,dev,eth0;ip,link,set,eth0,up;sleep,3600",
         "-netdev", f"stream,id=l0,server=off,addr.type=inet,addr.host=127.0.0.1,addr.port={port}",
         "-device", "virtio-net-device,netdev=l0,mac=52:54:00:00:01:02"],
        stdin=subprocess.DEVNULL, stdout=qemu_log, stderr=subprocess.STDOUT)
    try:
        ours.expect(r"(?m)^pinged qemu", BOOT_TIMEOUT * 1.5)
        assert "3 packets transmitted, 3 packets received" in ours.text(), ours.text()[-2000:]
        assert "connected from 127.0.0.1" in ours.hmp("info network")
    finally:
        qemu.kill()      # our own child, by its PID
        qemu.wait()


def test_runtime_forwarding_survives_a_restore(tmp_path, servers):
    """netdev_add and netdev_del work at run time (the added netdev's port listens, then is
    released); hostfwd_add forwards a port to the guest's httpd; after migrate to a file and
    --incoming into a new server whose description has no forwarding rule, the same port
    still reaches the guest. Bad input gets clear errors and the server keeps running."""
    s = Server(tmp_path, "src", f"{DHCP};{GUEST_HTTPD}",
               netdevs=[{"type": "user", "id": "n0"}],
               devices=[{"driver": "virtio-net-device", "id": "nic0", "netdev": "n0"}])
    servers.append(s)
    s.connect()
    s.expect(r"(?m)^httpd up", BOOT_TIMEOUT)

    extra = free_port()
    s.cmd("netdev_add", type="user", id="n1", hostfwd=[{"str": f"tcp:127.0.0.1:{extra}-:22"}])
    assert "n1: index=0,type=user" in s.hmp("info network")
    with socket.create_connection(("127.0.0.1", extra), timeout=5):
        pass                                   # slirp listens on the added netdev's port
    r = s.raw("netdev_add", type="user", id="n1")
    assert r["error"]["desc"] == "Duplicate ID 'n1' for netdev", r
    s.cmd("netdev_del", id="n1")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", extra), timeout=5).close()
    r = s.raw("netdev_del", id="n1")
    assert r["error"]["class"] == "DeviceNotFound", r
    r = s.raw("netdev_del", id="n0")
    assert "in use by NIC 'nic0'" in r["error"]["desc"], r

    # Bad input: each refused with a message naming what is wrong.
    r = s.raw("netdev_add", type="user", id="bad", hostfwd=[{"str": "tcp:127.0.0.1:notaport-:80"}])
    assert "bad host port 'notaport'" in r["error"]["desc"], r
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    r = s.raw("netdev_add", type="user", id="bad", hostfwd=[{"str": f"tcp:127.0.0.1:{busy.getsockname()[1]}-:80"}])
    assert "Could not set up host forwarding rule" in r["error"]["desc"], r
    busy.close()
    r = s.raw("netdev_add", type="stream", id="st", addr={"type": "unix", "path": str(tmp_path / "nobody.sock")})
    assert "Failed to connect to unix:" in r["error"]["desc"], r
    r = s.raw("netdev_add", type="stream", id="st", addr={"type": "inet", "host": "127.0.0.1", "port": "http"})
    assert "Parameter 'addr.port'" in r["error"]["desc"], r
    assert "Invalid host forwarding rule" in s.hmp("hostfwd_add n0 tcp:x:1-:80")
    assert "not found" in s.hmp("hostfwd_add nope tcp::1-:80")
    r = s.raw("set_link", name="nope", up=False)
    assert r["error"]["class"] == "DeviceNotFound", r
    assert s.cmd("query-status")["status"] == "running"

    fwd = free_port()
    assert s.hmp(f"hostfwd_add n0 tcp:127.0.0.1:{fwd}-:80") == ""
    assert fetch(fwd).strip() == "guest-page-ok"
    # set_link down: the guest sees its carrier go and frames stop; up again and it answers.
    s.cmd("set_link", name="nic0", up=False)
    assert "[link=down]" in s.hmp("info network")
    s.cmd("set_link", name="nic0", up=True)
    assert fetch(fwd).strip() == "guest-page-ok"

    state = tmp_path / "state"
    s.cmd("migrate", uri=f"file:{state}")
    deadline = time.monotonic() + 60
    while (st := s.cmd("query-migrate").get("status")) not in ("completed", "failed"):
        assert time.monotonic() < deadline, st
        time.sleep(0.05)
    assert st == "completed"
    s.cmd("quit")
    s.proc.wait(10)

    d = Server(tmp_path, "dst", f"{DHCP};{GUEST_HTTPD}",
               netdevs=[{"type": "user", "id": "n0"}],
               devices=[{"driver": "virtio-net-device", "id": "nic0", "netdev": "n0"}],
               extra=["--incoming", f"file:{state}"])
    servers.append(d)
    d.connect()
    deadline = time.monotonic() + 30
    while d.cmd("query-status")["status"] in ("inmigrate", "restore-vm"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert f"tcp:127.0.0.1:{fwd}-:80" in d.hmp("info network")
    assert fetch(fwd).strip() == "guest-page-ok"
    assert "boot ok" not in d.text(), "the destination booted instead of restoring"


def test_a_bad_network_description_is_refused(tmp_path):
    """A NIC naming an unknown netdev, a malformed hostfwd and a port in use each stop the
    launch with a message naming the member at fault."""
    def launch(netdevs, devices):
        desc = {"version": 2, "machine": "virt", "memory": "64M", "kernel": str(KERNEL),
                "serial": {"backend": "none"}, "netdevs": netdevs, "devices": devices}
        p = tmp_path / "bad.json"
        p.write_text(json.dumps(desc))
        r = subprocess.run([SERVER, "--config", str(p)], capture_output=True, text=True, timeout=60)
        assert r.returncode != 0
        return r.stderr

    err = launch([], [{"driver": "virtio-net-device", "netdev": "nope"}])
    assert "devices[0].netdev" in err and "'nope'" in err, err
    err = launch([{"type": "user", "id": "n0", "hostfwd": [{"str": "tcp:1.2.3:80-:22"}]}], [])
    assert "netdevs[0]" in err and "bad host address '1.2.3'" in err, err
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    err = launch([{"type": "user", "id": "n0", "hostfwd": [{"str": f"tcp:127.0.0.1:{busy.getsockname()[1]}-:22"}]}], [])
    busy.close()
    assert "Could not set up host forwarding rule" in err, err
    err = launch([{"type": "user", "id": "n0"}],
                 [{"driver": "virtio-net-device", "netdev": "n0"}, {"driver": "virtio-net-device", "netdev": "n0"}])
    assert "devices[1].netdev" in err and "in use" in err, err


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")
def test_savevm_loadvm_brings_a_removed_forward_back(tmp_path, servers):
    """A forward added with hostfwd_add is in the internal snapshot savevm writes into the qcow2
    disk: after hostfwd_remove the port is closed, and loadvm makes it reach the guest again."""
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    s = Server(tmp_path, "s", f"{DHCP};{GUEST_HTTPD}", netdevs=[{"type": "user", "id": "n0"}],
               devices=[{"driver": "virtio-net-device", "id": "nic0", "netdev": "n0"},
                        {"driver": "virtio-blk-device", "id": "disk0", "drive": {"file": str(disk), "format": "qcow2"}}])
    servers.append(s)
    s.connect()
    s.expect(r"(?m)^httpd up", BOOT_TIMEOUT)
    port = free_port()
    assert s.hmp(f"hostfwd_add tcp:127.0.0.1:{port}-:80") == ""
    assert fetch(port).strip() == "guest-page-ok"
    assert s.hmp("savevm net") == ""
    assert s.hmp(f"hostfwd_remove tcp:127.0.0.1:{port}") == ""
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    assert "not found" in s.hmp(f"hostfwd_remove tcp:127.0.0.1:{port}")
    assert s.hmp("loadvm net") == ""
    assert fetch(port).strip() == "guest-page-ok"
    assert s.cmd("query-status")["status"] == "running"
