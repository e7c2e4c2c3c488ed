"""Whole-guest test of a multi-function slot on the PCIe root bus, as libvirt 9 lays out its
automatic root ports on riscv virt: three pcie-root-ports as functions 0, 1 and 2 of slot 1
(function 0 with multifunction=on). Linux scans the functions, gives each port its own
secondary bus, and a disk hot-plugged behind the port at 01.2 shows up and goes again.

Environment: MACHINE_SERVER (the built machine-server; tests skip without it), GUEST_DIR (the
shared guest). The guest runs a shell on its serial line, driven through a ring-buffer chardev.
"""
import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("qemu.qmp")
sys.path.insert(0, os.path.dirname(__file__))
from guest_shell import Guest  # noqa: E402
from guest_env import SERVER, KERNEL, needs  # noqa: E402


pytestmark = needs("qemu-img")

UNPLUG_TIMEOUT = 90   # pciehp waits 5 s after the button; generous for a loaded CI machine

PORTS = [
    {"driver": "pcie-root-port", "id": "pci.1", "chassis": 1, "bus": "pcie.0", "addr": "0x1", "multifunction": True},
    {"driver": "pcie-root-port", "id": "pci.2", "chassis": 2, "bus": "pcie.0", "addr": "0x1.0x1"},
    {"driver": "pcie-root-port", "id": "pci.3", "chassis": 3, "bus": "pcie.0", "addr": "0x1.0x2"},
]

DISKS = "for d in /sys/block/vd*; do [ -e $d/size ] && echo disk $(basename $d) $(cat $d/size); done"


@pytest.fixture
def guest(tmp_path):
    g = Guest(tmp_path, server=SERVER, devices=PORTS)
    yield g
    g.close()


def root_ports(g):
    [bus] = g.ok("query-pci")
    return {d["qdev_id"]: d for d in bus["devices"] if "pci_bridge" in d}


def test_three_root_ports_in_one_slot_and_a_disk_hot_plugged_behind_function_2(guest, tmp_path):
    ports = root_ports(guest)
    assert {k: (d["bus"], d["slot"], d["function"]) for k, d in ports.items()} == \
        {"pci.1": (0, 1, 0), "pci.2": (0, 1, 1), "pci.3": (0, 1, 2)}
    # The guest found all three functions and numbered a secondary bus behind each.
    out = guest.sh("ls /sys/bus/pci/devices; for f in 0 1 2; do echo hdr$f $(cat /sys/bus/pci/devices/0000:00:01.$f/class); done")
    for f in range(3):
        assert f"0000:00:01.{f}" in out and f"hdr{f} 0x060400" in out, out
    secondaries = [ports[p]["pci_bridge"]["bus"]["secondary"] for p in ("pci.1", "pci.2", "pci.3")]
    assert len(set(secondaries)) == 3 and 0 not in secondaries, secondaries
    sec = secondaries[2]
    # The description keeps the layout and round-trips; a hot device asking for multifunction
    # behind a port is refused by name.
    now = guest.ok("query-description")
    assert now["devices"][:3] == PORTS, now["devices"]
    guest.ok("apply-description", description=now)
    bad = {"driver": "virtio-rng-pci", "id": "rng9", "bus": "pci.2", "multifunction": True}
    err = guest.error("apply-description", description=dict(now, devices=now["devices"] + [bad]))
    assert "multifunction" in err["desc"] and "nothing was changed" in err["desc"], err

    img = tmp_path / "hot.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "32M"], check=True)
    guest.ok("blockdev-add", **{"driver": "qcow2", "node-name": "n1", "file": {"driver": "file", "filename": str(img)}})
    guest.ok("device_add", driver="virtio-blk-pci", id="disk1", bus="pci.3", drive="n1")
    out = guest.poll_sh(DISKS, lambda o: "disk vda" in o, timeout=90)
    assert f"disk vda {(32 << 20) // 512}" in out, out
    dev = f"/sys/bus/pci/devices/0000:{sec:02x}:00.0"
    out = guest.sh(f"cat {dev}/vendor {dev}/device; ls {dev}/virtio*/block; "
                   "echo multi-ok > /tmp/x && dd if=/tmp/x of=/dev/vda conv=fsync 2>/dev/null && echo wrote-ok")
    assert "0x1af4" in out and "0x1042" in out and "vda" in out and "wrote-ok" in out, out
    [child] = root_ports(guest)["pci.3"]["pci_bridge"]["devices"]
    assert child["qdev_id"] == "disk1" and child["bus"] == sec
    assert root_ports(guest)["pci.2"]["pci_bridge"]["devices"] == []
    pci = guest.ok("human-monitor-command", **{"command-line": "info pci"})
    assert re.search(r"Bus\s+0, device\s+1, function 2:", pci) and 'id "pci.3"' in pci and 'id "disk1"' in pci, pci
    qtree = guest.ok("human-monitor-command", **{"command-line": "info qtree"})
    assert "addr = 01.2" in qtree and "addr = 01.1" in qtree, qtree

    guest.ok("device_del", id="disk1")
    guest.wait_event("DEVICE_DELETED", {"device": "disk1"}, timeout=UNPLUG_TIMEOUT)
    guest.poll_sh(DISKS, lambda o: "disk vda" not in o, timeout=60)
    assert root_ports(guest)["pci.3"]["pci_bridge"]["devices"] == []
    guest.ok("blockdev-del", **{"node-name": "n1"})
    r = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    # Each port has its own saved-state section: a saved state of the machine completes.
    guest.ok("migrate", uri=f"file:{tmp_path / 'state.bin'}")
    m = guest.wait_qmp("query-migrate", lambda m: m.get("status") in ("completed", "failed"), timeout=120)
    assert m["status"] == "completed", m


def test_qemus_multifunction_rules_refuse_the_description(tmp_path):
    base = {"version": 2, "machine": "virt", "cpus": 1, "memory": "128M", "kernel": str(KERNEL)}
    # Function 0 without multifunction, then function 1: QEMU's wording.
    single = [dict(PORTS[0], multifunction=False), PORTS[1]]
    cfg = tmp_path / "m.json"
    cfg.write_text(json.dumps(dict(base, devices=single)))
    r = subprocess.run([SERVER, "--config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "devices[1].addr: PCI: single function device can't be populated in function 1.1" in r.stderr, r.stderr
    # The other order: functions above 0 first, then a single-function function 0.
    cfg.write_text(json.dumps(dict(base, devices=[PORTS[1], dict(PORTS[0], multifunction=False)])))
    r = subprocess.run([SERVER, "--config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "devices[1].addr: PCI: 1.0 indicates single function, but 1.1 is already populated." in r.stderr, r.stderr
    # A function number outside 0...7.
    cfg.write_text(json.dumps(dict(base, devices=[dict(PORTS[1], addr="0x1.0x8")])))
    r = subprocess.run([SERVER, "--config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "devices[0].addr" in r.stderr, r.stderr


def test_disk_behind_function_2_keeps_working_across_a_saved_state(tmp_path):
    """A boot-time disk behind the port at 01.2, written in rounds; a migrate file: save in the
    middle and a new server going on from it: the ports' bus numbers and the disk come back."""
    from test_snapshot import Server  # the QMP-driven server helper

    disk = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(disk), "32M"], check=True)
    devices = PORTS + [{"driver": "virtio-blk-pci", "id": "d1", "bus": "pci.3",
                        "drive": {"file": str(disk), "format": "raw"}}]
    loop = ("for,n,in,1,2,3,4,5,6,7,8;do,yes,mf-$n|head,-c,1048576,>/tmp/p;"
            "dd,if=/tmp/p,of=/dev/vda,bs=64k,seek=$((n*16)),conv=fsync,2>/dev/null;echo,wrote,$n;done;"
            "ls,/sys/bus/pci/devices")
    servers = []
    try:
        src = Server(tmp_path, "src", f"console=ttyS0 guest.run={loop}", devices=devices)
        servers.append(src)
        src.connect()
        src.expect(r"wrote 2\b", 240)
        info = src.migrate(f"file:{tmp_path / 'state'}", timeout=120)
        assert info["status"] == "completed", info
        src.cmd("quit")
        src.proc.wait(30)
        dst = Server(tmp_path, "dst", f"console=ttyS0 guest.run={loop}", devices=devices,
                     extra=["--incoming", f"file:{tmp_path / 'state'}"])
        servers.append(dst)
        dst.connect()
        dst.expect(r"guest: run done, status 0", 240)
        text = dst.text()
        assert "boot ok" not in text and "wrote 8" in text, text[-2000:]
        assert "0000:00:01.2" in text and "I/O error" not in text, text[-2000:]
    finally:
        for s in servers:
            s.close()
    data = disk.read_bytes()
    for n in range(1, 9):
        line = f"mf-{n}\n".encode()
        assert data[n << 20:(n + 1) << 20] == (line * ((1 << 20) // len(line) + 1))[:1 << 20], f"round {n}"
