"""Whole-guest tests of the PCIe host and the virtio-pci transport: the guest enumerates the
bus through ECAM, assigns the BARs itself (as Linux does on QEMU's virt), and uses a
virtio-blk-pci disk through INTx on the PLIC; a migrate file: save and --incoming restore with
a PCI disk in the middle of disk I/O.

Environment:
  MACHINE_SERVER  path of the built machine-server executable (tests skip without it)
  GUEST_DIR       the shared guest (default ../shared/guests)
Guest commands go on the kernel command line as guest.run=...; init turns commas into spaces,
runs the result with sh -c and powers off.
"""
import hashlib
import json
import re
import subprocess
from pathlib import Path

import pytest
from guest_env import SERVER, KERNEL, INITRD, BOOT_TIMEOUT, needs  # noqa: E402


pytestmark = needs("qemu-img")


def pci_disk(id_, file, fmt="raw", **extra):
    d = {"driver": "virtio-blk-pci", "id": id_, "drive": {"file": str(file), "format": fmt}}
    d.update(extra)
    return d


def run_guest(tmp_path, devices, command, expect_ok=True):
    serial = tmp_path / "serial.log"
    desc = {
        "version": 2, "machine": "virt", "cpus": 1, "memory": "256M",
        "kernel": str(KERNEL), "initrd": str(INITRD), "append": "console=ttyS0 guest.run=" + command,
        "serial": {"backend": "file", "path": str(serial)},
        "devices": list(devices),
    }
    path = tmp_path / "machine.json"
    path.write_text(json.dumps(desc))
    r = subprocess.run([SERVER, "--config", str(path)], capture_output=True, text=True, timeout=BOOT_TIMEOUT)
    out = serial.read_text(errors="replace") if serial.exists() else ""
    if expect_ok:
        assert r.returncode == 0, f"machine-server exited {r.returncode}: {r.stderr}\n{out[-2000:]}"
        assert "guest: run done, status 0" in out, out[-3000:]
    return r, out


def test_guest_enumerates_the_pci_disk_and_uses_it(tmp_path):
    img = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(img), "32M"], check=True)
    dev = "/sys/bus/pci/devices/0000:00:01.0"
    cmd = ("ls,/sys/bus/pci/devices;"
           f"cat,{dev}/vendor,{dev}/device,{dev}/class,{dev}/irq,/sys/bus/pci/devices/0000:00:00.0/device;"
           f"readlink,{dev}/driver;"
           "mke2fs,-q,/dev/vda&&mount,/dev/vda,/mnt&&echo,pci-disk-ok>/mnt/f&&umount,/mnt;cat,/proc/interrupts")
    _, out = run_guest(tmp_path, [pci_disk("d1", img)], cmd)
    assert "0000:00:00.0" in out and "0000:00:01.0" in out
    assert "0x1af4" in out and "0x1042" in out and "0x010000" in out
    assert "0x0008" in out                               # the gpex host bridge at 00:00.0
    assert "virtio-pci" in out                           # bound by the virtio-pci driver
    assert "Wrong magic value" not in out
    # Slot 1, INTA: PLIC source 33 by the interrupt-map swizzle, and it did fire.
    m = re.search(r"^\s*\d+:\s+(\d+)\s+SiFive PLIC\s+33\s.*virtio0", out, re.M)
    assert m and int(m.group(1)) > 0, out[-2000:]
    # A second boot reads back what the first wrote: the writes reached the image.
    _, out = run_guest(tmp_path, [pci_disk("d1", img)], "mount,/dev/vda,/mnt&&cat,/mnt/f&&umount,/mnt")
    assert "pci-disk-ok" in out


def test_mmio_and_pci_disks_side_by_side(tmp_path):
    a, b = tmp_path / "a.raw", tmp_path / "b.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(a), "16M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(b), "16M"], check=True)
    devices = [{"driver": "virtio-blk-device", "id": "m0", "drive": {"file": str(a), "format": "raw"}},
               pci_disk("p0", b, "qcow2", bus="pcie.0", addr="0x5")]
    cmd = ("ls,/sys/bus/pci/devices;cat,/sys/block/vda/serial,/sys/block/vdb/serial;"
           "dd,if=/dev/zero,of=/dev/vdb,bs=64k,count=16,2>/dev/null&&echo,wrote-vdb")
    _, out = run_guest(tmp_path, devices, cmd)
    assert "0000:00:05.0" in out
    assert "m0" in out and "p0" in out and "wrote-vdb" in out
    check = subprocess.run(["qemu-img", "check", str(b)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_entropy_and_input_devices_on_pci(tmp_path):
    devices = [{"driver": "virtio-rng-pci", "id": "rng0"}, {"driver": "virtio-keyboard-pci"},
               {"driver": "virtio-tablet-pci", "addr": "0x7"}]
    cmd = ("for,d,in,/sys/bus/pci/devices/*;do,echo,$d,$(cat,$d/vendor),$(cat,$d/device);done;"
           "cat,/sys/class/misc/hw_random/rng_current;"
           "dd,if=/dev/hwrng,bs=32,count=2,2>/dev/null|od,-An,-tx1;"
           "ls,/sys/class/input")
    _, out = run_guest(tmp_path, devices, cmd)
    assert "0000:00:01.0 0x1af4 0x1044" in out              # virtio-rng, the lowest free slot
    assert "0000:00:02.0 0x1af4 0x1052" in out              # virtio-input keyboard
    assert "0000:00:07.0 0x1af4 0x1052" in out              # the tablet where addr put it
    assert "virtio_rng" in out
    words = [w for line in out.splitlines() if re.fullmatch(r"( [0-9a-f]{2}){16}", line) for w in line.split()]
    assert len(words) == 64 and len(set(words)) > 8, out[-1500:]
    assert "event0" in out and "event1" in out


def test_disk_behind_a_root_port_with_a_hot_plug_slot(tmp_path):
    img = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(img), "16M"], check=True)
    devices = [{"driver": "pcie-root-port", "id": "rp0", "chassis": 1, "slot": 7},
               pci_disk("d1", img, bus="rp0")]
    cmd = ("for,d,in,/sys/bus/pci/devices/*;do,echo,$d,$(cat,$d/vendor),$(cat,$d/device);done;"
           "ls,/sys/bus/pci/slots;cat,/sys/bus/pci/slots/7/address;"
           "echo,behind-port>/tmp/x;dd,if=/tmp/x,of=/dev/vda,conv=fsync,2>/dev/null&&echo,wrote-ok")
    _, out = run_guest(tmp_path, devices, cmd)
    assert "0000:00:01.0 0x1b36 0x000c" in out              # the root port on the root bus
    assert "0000:01:00.0 0x1af4 0x1042" in out              # the disk on the port's secondary bus
    assert re.search(r"pciehp: Slot #7 AttnBtn\+ PwrCtrl\+ .*HotPlug\+", out), out[-3000:]
    assert "0000:01:00" in out and "wrote-ok" in out
    assert open(img, "rb").read(12) == b"behind-port\n"


def test_description_errors_name_the_pci_device(tmp_path):
    img = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(img), "1M"], check=True)
    r, _ = run_guest(tmp_path, [pci_disk("d1", img, bus="rp0")], "true", expect_ok=False)
    assert r.returncode != 0 and "devices[0].bus" in r.stderr and "Bus 'rp0' not found" in r.stderr, r.stderr
    img2 = tmp_path / "disk2.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(img2), "1M"], check=True)
    r, _ = run_guest(tmp_path, [pci_disk("d1", img, addr="3"), pci_disk("d2", img2, addr="0x3")], "true",
                     expect_ok=False)
    assert r.returncode != 0 and "devices[1].addr" in r.stderr, r.stderr
    r, _ = run_guest(tmp_path, [{"driver": "pcie-root-port", "id": "rp0"}, pci_disk("d1", img, bus="rp0"),
                                pci_disk("d2", img2, bus="rp0")], "true", expect_ok=False)
    assert r.returncode != 0 and "devices[2].bus" in r.stderr and "in use by devices[1]" in r.stderr, r.stderr


def test_migrate_file_with_a_pci_disk_mid_io_resumes_in_a_new_server(tmp_path):
    pytest.importorskip("qemu.qmp")
    sys_path = str(Path(__file__).resolve().parent)
    import sys
    if sys_path not in sys.path:
        sys.path.insert(0, sys_path)
    from test_snapshot import Server  # the QMP-driven server helper

    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    # Each round writes 4 MiB of "pci-N" lines at 4 MiB * N (dd with conv=fsync: the data
    # reaches the device before the round is reported).
    loop = ("for,n,in,1,2,3,4,5,6,7,8,9,10,11,12;do,"
            "yes,pci-$n|head,-c,4194304,>/tmp/p;"
            "dd,if=/tmp/p,of=/dev/vda,bs=256k,seek=$((n*16)),conv=fsync,2>/dev/null;echo,wrote,$n;done")
    drive = [pci_disk("d1", disk, "qcow2")]
    servers = []
    try:
        src = Server(tmp_path, "src", f"console=ttyS0 guest.run={loop}", devices=drive)
        servers.append(src)
        src.connect()
        src.expect(r"wrote 3\b", BOOT_TIMEOUT)
        info = src.migrate(f"file:{tmp_path / 'state'}")
        assert info["status"] == "completed", info
        assert "wrote 12" not in src.text(), "the writes finished before the save; save earlier"
        src.cmd("quit")
        src.proc.wait(30)
        dst = Server(tmp_path, "dst", f"console=ttyS0 guest.run={loop}", devices=drive,
                     extra=["--incoming", f"file:{tmp_path / 'state'}"])
        servers.append(dst)
        dst.connect()
        dst.expect(r"wrote 12\b", BOOT_TIMEOUT)
        dst.expect(r"guest: run done, status 0", BOOT_TIMEOUT)
        assert dst.proc.wait(60) == 0, dst.text()[-2000:]
        text = dst.text()
        assert "boot ok" not in text, "the destination booted afresh instead of going on"
        assert "I/O error" not in text and "needs reset" not in dst.log.read_text(), text[-2000:]
    finally:
        for s in servers:
            s.close()
    check = subprocess.run(["qemu-img", "check", str(disk)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    raw = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(disk), str(raw)], check=True)
    data = raw.read_bytes()
    for n in range(1, 13):
        line = f"pci-{n}\n".encode()
        want = (line * (4194304 // len(line) + 1))[:4194304]
        got = data[n * 4194304:(n + 1) * 4194304]
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(want).hexdigest(), f"round {n} is not on the disk"
