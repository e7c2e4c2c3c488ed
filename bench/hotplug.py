#!/usr/bin/env python3
"""PCIe hot-plug latency of machine-server against qemu-system-riscv64, in one run.

Each emulator boots the shared Linux guest (GUEST_DIR) with two pcie-root-ports
(`-device pcie-root-port,id=rp0,chassis=1,slot=1`, and rp1) and a shell on its serial line;
then, ROUNDS times, on the same qcow2 image made by `qemu-img create`:

  add   blockdev-add the image, start a guest loop that waits for /sys/block/vda (polling every
        10 ms with usleep) and prints a marker, send device_add virtio-blk-pci,bus=rp0; the time
        is host wall clock from sending device_add to the marker arriving on the serial line.
  del   device_del; the time is host wall clock to the DEVICE_DELETED event. Linux pciehp waits
        five seconds after the attention button before it powers the slot off, so about 5 s of
        this is the guest's own wait, the same for both.

Prints the median of each, and the ratio ours/QEMU.

QEMU note: on riscv `virt` without AIA (the default; the 6.1 guest has no IMSIC driver) there is
no MSI, so QEMU's pcie-root-port signals hot-plug on INTA, the wire its slot's device also uses;
the guest's pciehp thread then waits for itself in synchronize_irq while removing the device and
device_del never completes (the bench reports the timeout). machine-server gives each root port
an interrupt pin off the wires of devices behind ports, so its unplug completes.

When an unplug never completes the machine is booted again for the next round, so every round
measures an add into an empty slot. Rounds alternate between rp0 and rp1.

Usage: bench/hotplug.py [--rounds 5] [--only ours|qemu] [--del-timeout 30]
Environment: MACHINE_SERVER (default .build/release/machine-server), GUEST_DIR, QEMU.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests", "integration"))
from guest_shell import Guest  # noqa: E402


def measure(kind, binary, rounds, del_timeout):
    work = tempfile.mkdtemp(prefix=f"hotplug-{kind}-")
    img = os.path.join(work, "disk.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "64M"], check=True)

    def boot():
        return Guest(work, server=binary) if kind == "ours" else Guest(work, qemu=binary)

    g = boot()
    adds, dels = [], []
    try:
        for n in range(rounds):
            # Alternate the ports: Linux pciehp ignores presence changes for a second after it
            # powered a slot off, so an add into the slot just emptied would take the
            # attention-button path (five seconds) instead.
            node, dev, port = f"n{n}", f"d{n}", f"rp{n % 2}"
            g.ok("blockdev-add", **{"driver": "qcow2", "node-name": node, "file": {"driver": "file", "filename": img}})
            marker = f"seen-{1000 + n}"
            g.write_serial(f"while [ ! -e /sys/block/vda/size ]; do usleep 10000; done; echo seen-$((1000+{n}))\n")
            time.sleep(0.5)   # the loop is running
            g.read_serial()
            g.pending = ""
            t = time.monotonic()
            g.ok("device_add", driver="virtio-blk-pci", id=dev, bus=port, drive=node)
            g.wait_for(marker, timeout=120)
            adds.append(time.monotonic() - t)
            t = time.monotonic()
            g.ok("device_del", id=dev)
            try:
                g.wait_event("DEVICE_DELETED", {"device": dev}, timeout=del_timeout)
            except AssertionError:
                dels.append(None)
                print(f"  {kind}: round {n}: no DEVICE_DELETED within {del_timeout:.0f} s; booting again", flush=True)
                g.close()
                g = boot()
                continue
            dels.append(time.monotonic() - t)
            g.ok("blockdev-del", **{"node-name": node})
            g.poll_sh("ls /sys/block", lambda o: "vda" not in o)
    finally:
        g.close()
    return adds, dels


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", choices=["ours", "qemu"])
    ap.add_argument("--del-timeout", type=float, default=30)
    a = ap.parse_args()
    ours = os.environ.get("MACHINE_SERVER") or os.path.join(REPO, ".build", "release", "machine-server")
    qemu = os.environ.get("QEMU", "qemu-system-riscv64")
    results = {}
    for kind, binary in [("ours", ours), ("qemu", qemu)]:
        if a.only and a.only != kind:
            continue
        adds, dels = measure(kind, binary, a.rounds, a.del_timeout)
        results[kind] = (adds, dels)
        done = [d for d in dels if d is not None]
        print(f"{kind}: device_add -> disk visible: median {statistics.median(adds) * 1000:.0f} ms "
              f"({', '.join(f'{x * 1000:.0f}' for x in adds)})", flush=True)
        print(f"{kind}: device_del -> DEVICE_DELETED: "
              + (f"median {statistics.median(done) * 1000:.0f} ms ({', '.join(f'{x * 1000:.0f}' for x in done)})"
                 if done else "never") + (f"; timed out after {a.del_timeout:.0f} s" if None in dels else ""), flush=True)
    if "ours" in results and "qemu" in results:
        add = statistics.median(results["ours"][0]) / statistics.median(results["qemu"][0])
        print(f"ratio ours/qemu, device_add -> visible: {add:.2f}")
        od = [d for d in results["ours"][1] if d is not None]
        qd = [d for d in results["qemu"][1] if d is not None]
        if od and qd:
            print(f"ratio ours/qemu, device_del -> DEVICE_DELETED: {statistics.median(od) / statistics.median(qd):.2f}")
        else:
            print("ratio ours/qemu, device_del -> DEVICE_DELETED: n/a (" + ("QEMU" if not qd else "ours") + " never finished)")


if __name__ == "__main__":
    main()
