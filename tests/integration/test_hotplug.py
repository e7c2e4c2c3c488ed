"""Whole-guest tests of PCIe hot-plug through QMP: blockdev-add a qcow2 image, device_add a
virtio-blk-pci behind a pcie-root-port, use it from the guest's shell, device_del (the guest's
pciehp powers the slot off about five seconds after the attention button) and blockdev-del;
refused requests leave query-pci unchanged; add/remove cycles leak no file descriptor and a
bounded amount of memory; an unplug in the middle of guest writes loses none it acknowledged.

Environment: MACHINE_SERVER (the built machine-server; tests skip without it), GUEST_DIR (the
shared guest). The guest runs a shell on its serial line, driven through a ring-buffer chardev.
"""
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("qemu.qmp")
sys.path.insert(0, os.path.dirname(__file__))
from guest_shell import Guest  # noqa: E402
from guest_env import SERVER, needs  # noqa: E402


pytestmark = needs("qemu-img")

UNPLUG_TIMEOUT = 90   # pciehp waits 5 s after the button; generous for a loaded CI machine


@pytest.fixture
def guest(tmp_path):
    g = Guest(tmp_path, server=SERVER)
    yield g
    g.close()


def qcow2(tmp_path, name, size="64M"):
    path = tmp_path / name
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    return path


def add_node(g, name, path, driver="qcow2"):
    g.ok("blockdev-add", **{"driver": driver, "node-name": name, "file": {"driver": "file", "filename": str(path)}})


def plug_disk(g, id_, node, bus):
    g.ok("device_add", driver="virtio-blk-pci", id=id_, bus=bus, drive=node)


def unplug(g, id_):
    g.ok("device_del", id=id_)
    e = g.wait_event("DEVICE_DELETED", {"device": id_}, timeout=UNPLUG_TIMEOUT)
    assert e["data"]["path"] == f"/machine/peripheral/{id_}"


def disks(g):
    """The guest's virtio disks and their sizes in 512-byte sectors."""
    out = g.sh("for d in /sys/block/vd*; do [ -e $d/size ] && echo $(basename $d) $(cat $d/size); done")
    return dict(line.split() for line in out.splitlines() if re.fullmatch(r"vd[a-z]+ \d+", line.strip()))


def wait_disks(g, predicate, timeout=60):
    out = g.poll_sh("for d in /sys/block/vd*; do [ -e $d/size ] && echo $(basename $d) $(cat $d/size); done",
                    lambda o: predicate(dict(l.split() for l in o.splitlines() if re.fullmatch(r"vd[a-z]+ \d+", l.strip()))),
                    timeout=timeout)
    return dict(l.split() for l in out.splitlines() if re.fullmatch(r"vd[a-z]+ \d+", l.strip()))


def port_children(g):
    [bus] = g.ok("query-pci")
    return {d["qdev_id"]: [c["qdev_id"] for c in d["pci_bridge"].get("devices", [])]
            for d in bus["devices"] if "pci_bridge" in d}


def check_image(path):
    r = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "No errors were found" in r.stdout, r.stdout


def test_hot_plugged_qcow2_disk_is_used_and_released(guest, tmp_path):
    img = qcow2(tmp_path, "hot.qcow2", "64M")
    add_node(guest, "node1", img)
    [n] = [n for n in guest.ok("query-named-block-nodes") if n["node-name"] == "node1"]
    assert n["drv"] == "qcow2" and n["file"] == str(img) and n["image"]["virtual-size"] == 64 << 20
    assert port_children(guest) == {"rp0": [], "rp1": []}

    plug_disk(guest, "disk1", "node1", "rp0")
    assert wait_disks(guest, lambda d: "vda" in d) == {"vda": str((64 << 20) // 512)}
    assert port_children(guest) == {"rp0": ["disk1"], "rp1": []}
    [b] = [b for b in guest.ok("query-block") if b["device"] == "disk1"]
    assert b["inserted"]["file"] == str(img) and b["inserted"]["drv"] == "qcow2"
    assert guest.ok("qom-get", path="/machine/peripheral/disk1", property="drive") == "node1"
    assert guest.ok("qom-get", path="/machine/peripheral/disk1", property="hotplugged") is True
    names = {p["name"]: p["type"] for p in guest.ok("qom-list", path="/machine/peripheral")}
    assert names.get("disk1") == "child<virtio-blk-pci>" and names.get("rp0") == "child<pcie-root-port>"

    out = guest.sh("mke2fs -q /dev/vda && mount /dev/vda /mnt && echo hot-plugged-ok > /mnt/f && "
                   "sync && cat /mnt/f && umount /mnt && echo fs-done", timeout=180)
    assert "hot-plugged-ok" in out and "fs-done" in out, out

    # A node in use cannot be closed.
    err = guest.error("blockdev-del", **{"node-name": "node1"})
    assert err["class"] == "GenericError" and "node1" in err["desc"] and "disk1" in err["desc"]

    unplug(guest, "disk1")
    assert "vda" not in wait_disks(guest, lambda d: "vda" not in d)
    assert port_children(guest) == {"rp0": [], "rp1": []}
    assert not [b for b in guest.ok("query-block") if b["device"] == "disk1"]
    guest.ok("blockdev-del", **{"node-name": "node1"})
    assert guest.ok("query-named-block-nodes") == []
    check_image(img)

    # The image holds what the guest wrote: plug it again into the other port and read it back.
    add_node(guest, "node2", img)
    plug_disk(guest, "disk2", "node2", "rp1")
    wait_disks(guest, lambda d: "vda" in d)
    out = guest.sh("mount /dev/vda /mnt && cat /mnt/f && umount /mnt")
    assert "hot-plugged-ok" in out, out
    # HMP sees it too.
    pci = guest.ok("human-monitor-command", **{"command-line": "info pci"})
    assert 'id "disk2"' in pci and 'id "rp1"' in pci and "PCI bridge" in pci
    assert "disk2: " + str(img) in guest.ok("human-monitor-command", **{"command-line": "info block"})
    # Saved states cover the machine as launched: refused while a hot-plugged device is in.
    err = guest.error("migrate", uri=f"file:{tmp_path / 'state.bin'}")
    assert "hot-plugged" in err["desc"] and "device_del" in err["desc"]
    assert guest.ok("human-monitor-command", **{"command-line": "device_del disk2"}) == ""
    guest.wait_event("DEVICE_DELETED", {"device": "disk2"}, timeout=UNPLUG_TIMEOUT)
    guest.ok("blockdev-del", **{"node-name": "node2"})
    check_image(img)
    # With the device gone, a saved state can be taken again.
    guest.ok("migrate", uri=f"file:{tmp_path / 'state.bin'}")
    m = guest.wait_qmp("query-migrate", lambda m: m.get("status") in ("completed", "failed"), timeout=120)
    assert m["status"] == "completed", m


REFUSALS = [
    ({"driver": "virtio-foo", "id": "x", "bus": "rp1"}, "GenericError", "'virtio-foo' is not a valid device model name"),
    ({"driver": "virtio-gpu-pci", "id": "x", "bus": "rp1"}, "GenericError", "can not be hotplugged"),
    ({"driver": "virtio-rng-pci", "id": "x"}, "GenericError", "Bus 'pcie.0' does not support hotplugging"),
    ({"driver": "virtio-rng-pci", "id": "x", "bus": "pcie.0"}, "GenericError", "Bus 'pcie.0' does not support hotplugging"),
    ({"driver": "virtio-rng-pci", "id": "x", "bus": "nope"}, "GenericError", "Bus 'nope' not found"),
    ({"driver": "virtio-rng-pci", "id": "rp0", "bus": "rp1"}, "GenericError", "Duplicate device ID 'rp0'"),
    ({"driver": "virtio-rng-pci", "id": "disk1", "bus": "rp1"}, "GenericError", "Duplicate device ID 'disk1'"),
    ({"driver": "virtio-rng-pci", "id": "x", "bus": "rp0"}, "GenericError", "in use by 'disk1' on bus 'rp0'"),
    ({"driver": "virtio-rng-pci", "id": "x", "bus": "rp1", "foo": "1"}, "GenericError", "Property 'virtio-rng-pci.foo' not found"),
    ({"driver": "virtio-rng-pci", "id": "x", "bus": "rp1", "addr": "3"}, "GenericError", "one slot, 0"),
    ({"driver": "virtio-rng-pci", "id": "9x", "bus": "rp1"}, "GenericError", "expects an identifier"),
    ({"driver": "virtio-blk-pci", "id": "x", "bus": "rp1"}, "GenericError", "drive property not set"),
    ({"driver": "virtio-blk-pci", "id": "x", "bus": "rp1", "drive": "nonode"}, "GenericError", "can't find value 'nonode'"),
    ({"driver": "virtio-blk-pci", "id": "x", "bus": "rp1", "drive": "node1"}, "GenericError", "in use by device 'disk1'"),
    ({"driver": "virtio-blk-pci", "id": "x", "bus": "rp1", "drive": "filenode"}, "GenericError", "is a file node"),
    ({"bus": "rp1"}, "GenericError", "Parameter 'driver' is missing"),
]


def test_refused_requests_name_the_problem_and_change_nothing(guest, tmp_path):
    img, other = qcow2(tmp_path, "a.qcow2"), qcow2(tmp_path, "b.qcow2")
    add_node(guest, "node1", img)
    guest.ok("blockdev-add", **{"driver": "file", "node-name": "filenode", "filename": str(other)})
    plug_disk(guest, "disk1", "node1", "rp0")
    wait_disks(guest, lambda d: "vda" in d)
    before = guest.ok("query-pci")
    nodes_before = guest.ok("query-named-block-nodes")
    for arguments, klass, text in REFUSALS:
        err = guest.error("device_add", **arguments)
        assert err["class"] == klass and text in err["desc"], (arguments, err)
        assert guest.ok("query-pci") == before, arguments
    assert guest.ok("query-named-block-nodes") == nodes_before

    # device_del: unknown ids, launch-time devices, and twice in a row.
    err = guest.error("device_del", id="nope")
    assert err["class"] == "DeviceNotFound" and "Device 'nope' not found" in err["desc"]
    err = guest.error("device_del", id="rp0")
    assert err["class"] == "GenericError" and "rp0" in err["desc"] and "cannot be unplugged" in err["desc"]
    # blockdev-add / -del refusals.
    for arguments, text in [
        ({"driver": "qcow2", "node-name": "node1", "file": {"driver": "file", "filename": str(other)}}, "Duplicate nodes with node-name='node1'"),
        ({"driver": "qcow2", "file": {"driver": "file", "filename": str(other)}}, "'node-name' must be specified"),
        ({"driver": "qcow2", "node-name": "n9", "file": {"driver": "file", "filename": str(tmp_path / "missing")}}, "No such file"),
        ({"driver": "qcow2", "node-name": "n9", "file": {"driver": "file", "filename": str(img)}}, "lock"),
        ({"driver": "qcow2", "node-name": "n9", "file": "nosuch"}, "Failed to find node with node-name='nosuch'"),
        ({"driver": "vmdk", "node-name": "n9", "file": "filenode"}, "Parameter 'driver' does not accept value 'vmdk'"),
        ({"driver": "qcow2", "node-name": "n9", "file": "filenode", "backing": "node1"}, "backing"),
    ]:
        err = guest.error("blockdev-add", **arguments)
        assert err["class"] == "GenericError" and text in err["desc"], (arguments, err)
    err = guest.error("blockdev-del", **{"node-name": "nosuch"})
    assert "Failed to find node with node-name='nosuch'" in err["desc"]
    assert guest.ok("query-named-block-nodes") == nodes_before
    # HMP answers refusals with the same message.
    out = guest.ok("human-monitor-command", **{"command-line": "device_add virtio-rng-pci,id=y,bus=rp0"})
    assert out.startswith("Error: ") and "in use by 'disk1'" in out
    assert guest.ok("query-pci") == before

    guest.ok("device_del", id="disk1")
    err = guest.error("device_del", id="disk1")
    assert "already in the process of unplug" in err["desc"]
    guest.wait_event("DEVICE_DELETED", {"device": "disk1"}, timeout=UNPLUG_TIMEOUT)
    # Once free, the node and the port take new work.
    guest.ok("device_add", driver="virtio-rng-pci", id="rng1", bus="rp0")
    guest.poll_sh("ls /sys/bus/pci/devices", lambda o: "0000:01:00.0" in o)
    guest.ok("blockdev-del", **{"node-name": "node1"})
    check_image(img)


def test_add_remove_cycles_leak_nothing(guest, tmp_path):
    imgs = [qcow2(tmp_path, f"c{i}.qcow2", "16M") for i in range(2)]

    def cycle(n):
        for i, img in enumerate(imgs):
            add_node(guest, f"n{i}", img)
            plug_disk(guest, f"d{i}", f"n{i}", f"rp{i}")
        got = wait_disks(guest, lambda d: len(d) == 2)
        assert sorted(got.values()) == [str((16 << 20) // 512)] * 2, (n, got)
        for i in range(2):
            guest.ok("device_del", id=f"d{i}")
        for i in range(2):
            guest.wait_event("DEVICE_DELETED", {"device": f"d{i}"}, timeout=UNPLUG_TIMEOUT)
        for i in range(2):
            guest.ok("blockdev-del", **{"node-name": f"n{i}"})
        wait_disks(guest, lambda d: len(d) == 0)

    cycle(0)   # warm-up: the guest's and our lazily built structures exist after one round
    fds, rss = guest.fd_count(), guest.rss_kib()
    for n in range(1, 10):   # 2 disks per round: 20 add/remove cycles in all
        cycle(n)
    assert guest.fd_count() == fds
    growth = guest.rss_kib() - rss
    assert growth < 24 * 1024, f"RSS grew by {growth} KiB over 18 cycles"
    for img in imgs:
        check_image(img)


def test_unplug_during_guest_writes_loses_nothing_acknowledged(guest, tmp_path):
    img = qcow2(tmp_path, "io.qcow2", "16M")
    add_node(guest, "node1", img)
    plug_disk(guest, "disk1", "node1", "rp0")
    wait_disks(guest, lambda d: "vda" in d)
    # Each record is written and flushed (conv=fsync) before the guest acknowledges it. dd
    # reopens the disk through fd 3 (/proc/self/fd/3), which fails once the disk is gone, where
    # of=/dev/vda would then create a plain file in /dev.
    guest.write_serial("(exec 3<>/dev/vda; i=0; while [ $i -lt 4000 ]; do printf 'record-%08d' $i | "
                  "dd of=/proc/self/fd/3 bs=512 seek=$i count=1 conv=fsync,notrunc 2>/dev/null || break; "
                  "echo ack-$i; i=$((i+1)); done); echo writer-ended\n")
    guest.wait_for("ack-30", timeout=120)
    guest.ok("device_del", id="disk1")
    guest.wait_event("DEVICE_DELETED", {"device": "disk1"}, timeout=UNPLUG_TIMEOUT)
    guest.wait_for("writer-ended", timeout=60)
    guest.ok("blockdev-del", **{"node-name": "node1"})
    check_image(img)
    acked = [int(m) for m in re.findall(r"ack-(\d+)", guest.serial_log())]
    assert len(acked) > 30
    raw = tmp_path / "io.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(img), str(raw)], check=True)
    data = raw.read_bytes()
    for i in acked:
        assert data[i * 512:i * 512 + 15] == b"record-%08d" % i, f"acknowledged record {i} is not in the image"


def test_apply_description_adds_and_removes_two_disks_and_refuses_the_impossible_whole(guest, tmp_path):
    a, b = qcow2(tmp_path, "a.qcow2", "16M"), qcow2(tmp_path, "b.qcow2", "32M")
    launch = guest.ok("query-description")
    assert [d["driver"] for d in launch["devices"]] == ["pcie-root-port", "pcie-root-port"]
    disks_desc = [{"driver": "virtio-blk-pci", "id": "da", "bus": "rp0", "drive": {"file": str(a), "format": "qcow2"}},
                  {"driver": "virtio-blk-pci", "id": "db", "bus": "rp1", "drive": {"file": str(b), "format": "qcow2"}}]
    wanted = dict(launch, devices=launch["devices"] + disks_desc)

    # Refused whole: memory cannot change live, so neither disk is added.
    before = guest.ok("query-pci")
    err = guest.error("apply-description", description=dict(wanted, memory="512M"))
    assert err["class"] == "GenericError" and "'memory' cannot change" in err["desc"] and "nothing was changed" in err["desc"]
    # Refused whole: the second addition's image is missing, so the first is not added either.
    missing = dict(wanted, devices=launch["devices"] + [disks_desc[0], dict(disks_desc[1], drive={"file": str(tmp_path / "nope.qcow2"), "format": "qcow2"})])
    err = guest.error("apply-description", description=missing)
    assert "'db'" in err["desc"] and "nope.qcow2" in err["desc"]
    # Refused whole: a device of the launch cannot go.
    err = guest.error("apply-description", description=dict(wanted, devices=wanted["devices"][1:]))
    assert "rp0" in err["desc"] and "built at launch" in err["desc"]
    assert guest.ok("query-pci") == before
    assert guest.ok("query-named-block-nodes") == []

    # Two disks in one call.
    guest.ok("apply-description", description=wanted)
    got = wait_disks(guest, lambda d: len(d) == 2)
    assert sorted(got.values()) == [str((16 << 20) // 512), str((32 << 20) // 512)]
    assert port_children(guest) == {"rp0": ["da"], "rp1": ["db"]}
    now = guest.ok("query-description")
    assert now["devices"][2:] == [dict(d, drive=dict(d["drive"], **{"read-only": False})) for d in disks_desc]
    guest.ok("apply-description", description=now)       # round-trips: no change
    assert port_children(guest) == {"rp0": ["da"], "rp1": ["db"]}

    # And both removed in one call; their nodes close with them.
    guest.ok("apply-description", description=launch)
    for id_ in ("da", "db"):
        guest.wait_event("DEVICE_DELETED", {"device": id_}, timeout=UNPLUG_TIMEOUT)
    wait_disks(guest, lambda d: len(d) == 0)
    assert port_children(guest) == {"rp0": [], "rp1": []}
    assert guest.ok("query-named-block-nodes") == []
    assert guest.ok("query-description") == launch
    check_image(a)
    check_image(b)
