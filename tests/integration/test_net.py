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
from guest_env import SERVER, KERNEL, INITRD, BOOT_TIMEOUT, needs  # noqa: E402


pytestmark = needs()

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


# --- Hot-plugged NICs: a shell guest with root ports rp0 and rp1 (guest_shell.Guest), a user
# netdev added at run time, device_add / device_del of virtio-net-pci.

UNPLUG_TIMEOUT = 90   # the guest's pciehp waits 5 s after the attention button; generous for CI


@pytest.fixture
def shell_guest(tmp_path):
    from guest_shell import Guest
    g = Guest(tmp_path, server=SERVER)
    yield g
    g.close()


IFACES = "for i in /sys/class/net/*; do echo iface-${i##*/}; done"


def parse_interfaces(out):
    """The interfaces in IFACES's output other than lo (kernel messages on the console skipped)."""
    return {m.group(1) for m in re.finditer(r"(?m)^iface-(\w+)\r?$", out)} - {"lo"}


def interfaces(g):
    """The guest's network interfaces other than lo."""
    return parse_interfaces(g.sh(IFACES))


def wait_interfaces(g, predicate, timeout=60):
    return parse_interfaces(g.poll_sh(IFACES, lambda o: predicate(parse_interfaces(o)), timeout=timeout))


def net_threads(g):
    """The names of the server's network threads (each netdev's loop is named net-ID)."""
    names = []
    for t in os.listdir(f"/proc/{g.proc.pid}/task"):
        try:
            names.append(Path(f"/proc/{g.proc.pid}/task/{t}/comm").read_text().strip())
        except OSError:
            pass   # the thread ended meanwhile
    return sorted(n for n in names if n.startswith("net-"))


def rx_filter(g, nic):
    """query-rx-filter for one NIC: the whole reply (Guest.ok's own first parameter is `name`)."""
    return g.qmp.cmd_raw("query-rx-filter", {"name": nic})


def hmp(g, line):
    return g.ok("human-monitor-command", **{"command-line": line})


def test_hot_plugged_nic_gets_dhcp_serves_through_hostfwd_and_goes(shell_guest, tmp_path):
    """device_add virtio-net-pci on a netdev added with netdev_add: the guest's eth0 appears
    with the MAC asked for, gets 10.0.2.15 by DHCP, and the host reads the guest's httpd
    through the netdev's hostfwd. While the NIC is in, its netdev is refused to a second NIC
    and to netdev_del, and saved states are refused naming the hot-plugged device. device_del:
    DEVICE_DELETED arrives, eth0 is gone, and netdev_del succeeds (its port closes)."""
    g = shell_guest
    fwd = free_port()
    g.ok("netdev_add", type="user", id="n0", hostfwd=[{"str": f"tcp:127.0.0.1:{fwd}-:80"}])
    assert interfaces(g) == set()
    g.ok("device_add", driver="virtio-net-pci", id="nic0", netdev="n0", mac="52:54:00:12:34:99", bus="rp0")
    assert wait_interfaces(g, lambda s: "eth0" in s) == {"eth0"}
    assert g.sh("cat /sys/class/net/eth0/address").strip() == "52:54:00:12:34:99"
    out = g.sh(f"{DHCP.replace(',', ' ')} >/dev/null 2>&1; ip -4 addr show eth0", timeout=120)
    assert "inet 10.0.2.15/24" in out, out
    out = g.sh("mkdir -p /tmp/www && echo guest-page-ok > /tmp/www/index.html && httpd -p 80 -h /tmp/www && echo httpd-up")
    assert "httpd-up" in out, out
    assert fetch(fwd).strip() == "guest-page-ok"

    # The NIC is seen as QEMU shows it.
    [f] = rx_filter(g, "nic0")["return"]
    assert f["main-mac"] == "52:54:00:12:34:99"
    info = hmp(g, "info network")
    assert "nic0: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:99" in info and " \\ n0: " in info, info
    assert g.ok("qom-get", path="/machine/peripheral/nic0", property="netdev") == "n0"
    [bus] = g.ok("query-pci")
    [rp0] = [d for d in bus["devices"] if d["qdev_id"] == "rp0"]
    [nic] = rp0["pci_bridge"]["devices"]
    assert nic["qdev_id"] == "nic0" and nic["class_info"]["class"] == 0x0200 and nic["id"]["device"] == 0x1041
    desc = g.ok("query-description")
    assert desc["devices"][-1] == {"driver": "virtio-net-pci", "id": "nic0", "netdev": "n0", "mac": "52:54:00:12:34:99", "bus": "rp0"}
    assert [n["id"] for n in desc["netdevs"]] == ["n0"]

    # Its netdev is taken while it is in.
    err = g.error("device_add", driver="virtio-net-pci", id="nic1", netdev="n0", bus="rp1")
    assert err["class"] == "GenericError" and "Property 'virtio-net-pci.netdev' can't take value 'n0', it's in use" in err["desc"], err
    err = g.error("netdev_del", id="n0")
    assert "in use by NIC 'nic0'" in err["desc"], err
    # Saved states cover the machine as launched: refused, naming the device.
    err = g.error("migrate", uri=f"file:{tmp_path / 'state.bin'}")
    assert "hot-plugged devices (virtio-net-pci 'nic0' in root port 'rp0')" in err["desc"] and "device_del" in err["desc"], err
    assert g.ok("query-status")["status"] == "running"

    # set_link on the NIC takes its netdev's link down too ...
    assert g.qmp.cmd_raw("set_link", {"name": "nic0", "up": False}) == {"return": {}}
    assert "[link=down]" in hmp(g, "info network")

    # device_del (through HMP): the guest lets go, DEVICE_DELETED follows, eth0 is gone.
    assert hmp(g, "device_del nic0") == ""
    e = g.wait_event("DEVICE_DELETED", {"device": "nic0"}, timeout=UNPLUG_TIMEOUT)
    assert e["data"]["path"] == "/machine/peripheral/nic0"
    assert wait_interfaces(g, lambda s: not s) == set()
    assert "invalid net client name: nic0" in rx_filter(g, "nic0")["error"]["desc"]
    info = hmp(g, "info network")
    # ... and the netdev, free again, has its link up (for the next NIC).
    assert "nic0" not in info and "n0: index=0,type=user" in info and "[link=down]" not in info, info
    assert g.ok("query-description")["devices"][-1]["driver"] == "pcie-root-port"
    # The netdev is free again: netdev_del succeeds and its forwarded port closes.
    g.ok("netdev_del", id="n0")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", fwd), timeout=5).close()
    # With the device gone, a saved state can be taken again.
    g.ok("migrate", uri=f"file:{tmp_path / 'state.bin'}")
    m = g.wait_qmp("query-migrate", lambda m: m.get("status") in ("completed", "failed"), timeout=120)
    assert m["status"] == "completed", m


NIC_REFUSALS = [
    ({"driver": "virtio-net-pci", "id": "x", "bus": "rp1", "netdev": "nope"},
     "Property 'virtio-net-pci.netdev' can't find value 'nope'"),
    ({"driver": "virtio-net-pci", "id": "x", "bus": "rp1", "netdev": "n0"},
     "Property 'virtio-net-pci.netdev' can't take value 'n0', it's in use"),
    ({"driver": "virtio-net-pci", "id": "x", "bus": "rp0", "netdev": "n1"}, "in use by 'nic0' on bus 'rp0'"),
    ({"driver": "virtio-net-pci", "id": "x", "bus": "rp1", "netdev": "n1", "mac": "52:54:00:zz:00:01"},
     "Property 'virtio-net-pci.mac' doesn't take value '52:54:00:zz:00:01'"),
    ({"driver": "virtio-net-pci", "id": "x", "bus": "rp1", "netdev": "n1", "mac": "52:54:00:12:34"},
     "doesn't take value '52:54:00:12:34'"),
    ({"driver": "virtio-net-pci", "id": "x", "bus": "rp1", "netdev": "n1", "mac": "01:00:5e:00:00:01"}, "multicast"),
    ({"driver": "virtio-net-pci", "id": "x", "bus": "rp1", "netdev": 5}, "Property 'virtio-net-pci.netdev'"),
    ({"driver": "virtio-net-pci", "id": "x", "bus": "rp1", "drive": "n1"}, "Property 'virtio-net-pci.drive' not found"),
    ({"driver": "virtio-net-pci", "id": "nic0", "bus": "rp1", "netdev": "n1"}, "Duplicate device ID 'nic0'"),
    ({"driver": "virtio-net-pci", "id": "x", "netdev": "n1"}, "Bus 'pcie.0' does not support hotplugging"),
    ({"driver": "virtio-net-device", "id": "x", "bus": "rp1", "netdev": "n1"}, "can not be hotplugged"),
]


def test_refused_nic_requests_name_the_problem_and_change_nothing(shell_guest):
    g = shell_guest
    g.ok("netdev_add", type="user", id="n0")
    g.ok("netdev_add", type="user", id="n1")
    g.ok("device_add", driver="virtio-net-pci", id="nic0", netdev="n0", bus="rp0")
    wait_interfaces(g, lambda s: s == {"eth0"})
    pci, info, filters = g.ok("query-pci"), hmp(g, "info network"), g.ok("query-rx-filter")
    for arguments, text in NIC_REFUSALS:
        err = g.error("device_add", **arguments)
        assert err["class"] == "GenericError" and text in err["desc"], (arguments, err)
        assert g.ok("query-pci") == pci, arguments
        assert hmp(g, "info network") == info, arguments
    assert g.ok("query-rx-filter") == filters
    out = hmp(g, "device_add virtio-net-pci,id=y,bus=rp1,netdev=nope")
    assert out.startswith("Error: ") and "can't find value 'nope'" in out, out
    assert g.ok("query-pci") == pci
    # Nothing was claimed by the refusals: n1 takes a NIC (without a mac: QEMU's default, the
    # first 52:54:00:12:34:XX from 56 no NIC has: nic0 has 56).
    assert hmp(g, "device_add virtio-net-pci,id=nic1,bus=rp1,netdev=n1") == ""
    assert wait_interfaces(g, lambda s: len(s) == 2) == {"eth0", "eth1"}
    assert [f["main-mac"] for f in g.ok("query-rx-filter")] == ["52:54:00:12:34:56", "52:54:00:12:34:57"]
    g.ok("device_del", id="nic0")
    assert "already in the process of unplug" in g.error("device_del", id="nic0")["desc"]
    g.wait_event("DEVICE_DELETED", {"device": "nic0"}, timeout=UNPLUG_TIMEOUT)
    # Released on unplug: n0 takes a new NIC in the freed port.
    g.ok("device_add", driver="virtio-net-pci", id="nic2", netdev="n0", bus="rp0")
    assert [f["name"] for f in g.ok("query-rx-filter")] == ["nic1", "nic2"]
    assert g.ok("query-status")["status"] == "running"


def test_nic_add_remove_cycles_leak_nothing(shell_guest):
    """Rounds of: netdev_add (with a hostfwd), a NIC on it in rp0 and a NIC without a netdev
    (a thread of its own) in rp1, DHCP on the first, device_del of both while the host fetches
    from the guest's httpd through the hostfwd and the guest pings the gateway (frames in flight
    as the NICs go), netdev_del. Both network threads run while the NICs are in and are gone
    after each round; after a warm-up round the file descriptors are back to where they were
    after each round, and RSS grows by less than 24 MiB over the rest."""
    g = shell_guest

    def cycle(n):
        fwd = free_port()
        g.ok("netdev_add", type="user", id="n0", hostfwd=[{"str": f"tcp:127.0.0.1:{fwd}-:80"}])
        g.ok("device_add", driver="virtio-net-pci", id="a", netdev="n0", bus="rp0")
        g.ok("device_add", driver="virtio-net-pci", id="b", bus="rp1")
        wait_interfaces(g, lambda s: len(s) == 2)
        assert net_threads(g) == sorted(["net-n0", "net-b-unconnected"[:15]]), net_threads(g)
        out = g.sh("for i in /sys/class/net/eth*; do grep -q 52:54:00:12:34:56 $i/address && echo nic-a-is-${i##*/}; done")
        iface = re.search(r"(?m)^nic-a-is-(eth\d+)", out).group(1)
        out = g.sh(f"udhcpc -i {iface} -n -q -t 10 >/dev/null 2>&1; ip -4 addr show {iface}", timeout=120)
        assert "inet 10.0.2.15/24" in out, (n, out)
        # Traffic both ways while the NICs go: the host keeps fetching from the guest's httpd
        # through the hostfwd, the guest keeps pinging the gateway.
        out = g.sh("mkdir -p /tmp/www && echo page > /tmp/www/index.html && httpd -p 80 -h /tmp/www && "
                   "(ping 10.0.2.2 >/dev/null 2>&1 &) && echo traffic-on")
        assert "traffic-on" in out, out
        assert fetch(fwd).strip() == "page"
        stop = threading.Event()
        fetched = []

        def hammer():
            while not stop.is_set():
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{fwd}/", timeout=5) as r:
                        fetched.append(r.read())
                except OSError:
                    time.sleep(0.01)

        t = threading.Thread(target=hammer, daemon=True)
        t.start()
        try:
            for id_ in ("a", "b"):
                g.ok("device_del", id=id_)
            for id_ in ("a", "b"):
                g.wait_event("DEVICE_DELETED", {"device": id_}, timeout=UNPLUG_TIMEOUT)
        finally:
            stop.set()
            t.join(30)
        assert fetched, "no page came through while the NIC was going"
        g.ok("netdev_del", id="n0")
        g.sh("killall httpd ping")
        wait_interfaces(g, lambda s: not s)

    def settled(predicate, what, timeout=10):
        """Waits briefly for a thread that was told to end to leave /proc (it signals before it exits)."""
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, what()
            time.sleep(0.05)

    cycle(0)   # warm-up
    settled(lambda: net_threads(g) == [], lambda: net_threads(g))
    fds, rss = g.fd_count(), g.rss_kib()
    for n in range(1, 5):
        cycle(n)
        settled(lambda: net_threads(g) == [], lambda: (n, net_threads(g)))
        settled(lambda: g.fd_count() == fds, lambda: (n, g.fd_count(), fds))
    growth = g.rss_kib() - rss
    assert growth < 24 * 1024, f"RSS grew by {growth} KiB over 4 rounds"


def test_apply_description_plugs_and_unplugs_a_nic(shell_guest):
    """query-description carries the netdevs added at run time; apply-description with a
    virtio-net-pci on one plugs it (the guest's eth0 appears), round-trips unchanged, refuses
    a NIC on an unknown or taken netdev whole, and removing the entry unplugs it, freeing the
    netdev."""
    g = shell_guest
    launch = g.ok("query-description")
    assert "netdevs" not in launch
    g.ok("netdev_add", type="user", id="n0")
    now = g.ok("query-description")
    assert now["netdevs"] == [{"type": "user", "id": "n0"}]
    nic = {"driver": "virtio-net-pci", "id": "nic0", "netdev": "n0", "mac": "52:54:00:12:34:70", "bus": "rp0"}
    pci = g.ok("query-pci")
    for bad, text in [(dict(nic, netdev="nope"), "can't find value 'nope'"),
                      (dict(nic, mac="01:02:03:04:05:06"), "not a unicast MAC address"),
                      (dict(nic, bus="rp9"), "Bus 'rp9' not found")]:
        err = g.error("apply-description", description=dict(now, devices=now["devices"] + [bad]))
        assert "nothing was changed" in err["desc"] and text in err["desc"], (bad, err)
    # Two NICs on one netdev: refused whole, neither is plugged.
    err = g.error("apply-description", description=dict(now, devices=now["devices"] + [nic, dict(nic, id="nic1", bus="rp1")]))
    assert "netdev 'n0' is named by two NICs" in err["desc"], err
    assert g.ok("query-pci") == pci

    wanted = dict(now, devices=now["devices"] + [nic])
    g.ok("apply-description", description=wanted)
    assert wait_interfaces(g, lambda s: s == {"eth0"}) == {"eth0"}
    assert g.ok("query-description") == wanted
    g.ok("apply-description", description=wanted)          # no change
    err = g.error("netdev_del", id="n0")
    assert "in use by NIC 'nic0'" in err["desc"]
    # Another NIC naming the taken netdev is refused.
    err = g.error("apply-description", description=dict(wanted, devices=wanted["devices"] + [dict(nic, id="nic1", bus="rp1")]))
    assert "can't take value 'n0', it's in use" in err["desc"], err

    g.ok("apply-description", description=now)
    g.wait_event("DEVICE_DELETED", {"device": "nic0"}, timeout=UNPLUG_TIMEOUT)
    assert wait_interfaces(g, lambda s: not s) == set()
    assert g.ok("query-description") == now
    g.ok("netdev_del", id="n0")
    assert g.ok("query-description") == launch
