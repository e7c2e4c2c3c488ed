#!/usr/bin/env python3
"""Guest disk throughput of machine-server against qemu-system-riscv64, on raw and qcow2 images.

One run boots the shared Linux guest (../shared/guests, or GUEST_DIR) once per (format, emulator)
with two virtio-blk disks: the disk under test and a small raw "script disk" that holds the guest's
benchmark script (the guest finds it by its '#BENCH' first line and runs it with busybox sh). The
script runs, in order, on the disk under test:

  seq-write   dd if=/dev/zero bs=1M count=SIZE oflag=direct conv=fsync   (fills the whole image)
  seq-read    dd bs=1M count=SIZE iflag=direct
  rand-write  OPS x (dd bs=4k count=1 seek=R oflag=direct), R uniform over the image, fixed seed
  rand-read   OPS x (dd bs=4k count=1 skip=R iflag=direct), same seed
  loop        OPS x (dd if=/dev/zero of=/dev/null bs=4k count=1 skip=R): the cost of the loop itself
              (busybox fork/exec per operation, which dominates random 4 KiB I/O in an emulator)

All guest I/O is O_DIRECT (busybox 1.35 dd supports iflag=direct/oflag=direct), so the guest's page
cache plays no part; page cache is also dropped between phases where the kernel allows it. Both
emulators open the images through the host page cache (QEMU's default cache=writeback; machine-server
uses pread/pwrite). Every (format, emulator) pair starts from a fresh image made by the same
`qemu-img create` command at the same path, so qcow2 allocation is measured the same way for both.
Durations are host wall-clock time between marker lines the guest prints on its serial console
(read from the emulator's stdout as they arrive); the guest's own /proc/uptime deltas are printed
beside them as a cross-check.

Usage: bench/disk.py [--size-mib 256] [--ops 500] [--only ours|qemu] [--formats raw,qcow2]
Environment: MACHINE_SERVER (default: builds a release machine-server with --scratch-path
$SCRATCH or .build), GUEST_DIR, QEMU (default qemu-system-riscv64).
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUESTS = os.environ.get("GUEST_DIR") or os.path.join(os.path.dirname(REPO), "shared", "guests")
KERNEL = os.path.join(GUESTS, "linux-6.1-rv64-Image")
INITRD = os.path.join(GUESTS, "initramfs-rv64.cpio.gz")
FIRMWARE = "/usr/lib/riscv64-linux-gnu/opensbi/generic/fw_dynamic.bin"
QEMU = os.environ.get("QEMU", "qemu-system-riscv64")
GUEST_TIMEOUT = 180  # seconds per boot

SCRIPT = """#BENCH
S=$1; D=/dev/vda; [ "$S" = /dev/vda ] && D=/dev/vdb
MB=@MB@; OPS=@OPS@; NB=$((MB*256)); FAIL=0
m() { echo "@@ $1 $(cut -d' ' -f1 /proc/uptime)"; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; }
echo "disk $D script $S size $(cat /sys/block/${D#/dev/}/size) sectors"
m ready
m seq-write-start
dd if=/dev/zero of=$D bs=1M count=$MB oflag=direct conv=fsync 2>/tmp/e || { cat /tmp/e; FAIL=$((FAIL+1)); }
m seq-write-end
drop
m seq-read-start
dd if=$D of=/dev/null bs=1M count=$MB iflag=direct 2>/tmp/e || { cat /tmp/e; FAIL=$((FAIL+1)); }
m seq-read-end
drop
RANDOM=4242; i=0
m rand-write-start
while [ $i -lt $OPS ]; do
  dd if=/dev/zero of=$D bs=4k count=1 seek=$(( (RANDOM*32768+RANDOM) % NB )) oflag=direct 2>/dev/null || FAIL=$((FAIL+1))
  i=$((i+1))
done
sync
m rand-write-end
drop
RANDOM=4242; i=0
m rand-read-start
while [ $i -lt $OPS ]; do
  dd if=$D of=/dev/null bs=4k count=1 skip=$(( (RANDOM*32768+RANDOM) % NB )) iflag=direct 2>/dev/null || FAIL=$((FAIL+1))
  i=$((i+1))
done
m rand-read-end
RANDOM=4242; i=0
m loop-start
while [ $i -lt $OPS ]; do
  dd if=/dev/zero of=/dev/null bs=4k count=1 skip=$(( (RANDOM*32768+RANDOM) % NB )) 2>/dev/null || FAIL=$((FAIL+1))
  i=$((i+1))
done
m loop-end
echo "@@ failures $FAIL"
m done
exit 0
"""

PHASES = ["seq-write", "seq-read", "rand-write", "rand-read", "loop"]


def guest_command(script_len):
    """The kernel command line's guest.run: find the disk whose first bytes are '#BENCH', run it."""
    run = (f"for d in /dev/vda /dev/vdb;do head -c 6 $d|grep -q ^#BENCH&&"
           f"head -c {script_len} $d|sh -s $d;done")
    return "console=ttyS0 guest.run=" + run.replace(" ", ",")


def make_script_disk(path, size_mib, ops):
    text = SCRIPT.replace("@MB@", str(size_mib)).replace("@OPS@", str(ops)).encode()
    with open(path, "wb") as f:
        f.write(text)
        f.truncate(1 << 20)
    return len(text)


def fresh_image(path, fmt, size_mib):
    if os.path.exists(path):
        os.remove(path)
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, path, f"{size_mib}M"], check=True)


def ours_command(server, work, image, fmt, script, append):
    d = {
        "version": 2, "machine": "virt", "cpus": 1, "memory": "256M",
        "kernel": KERNEL, "initrd": INITRD, "append": append,
        "serial": {"backend": "stdio"},
        "devices": [
            {"driver": "virtio-blk-device", "id": "d0", "drive": {"file": image, "format": fmt}},
            {"driver": "virtio-blk-device", "id": "d1", "drive": {"file": script, "format": "raw"}},
        ],
    }
    cfg = os.path.join(work, "machine.json")
    with open(cfg, "w") as f:
        json.dump(d, f)
    return [server, "--config", cfg]


def qemu_command(image, fmt, script, append):
    return [QEMU, "-M", "virt", "-smp", "1", "-m", "256M", "-nographic", "-bios", FIRMWARE,
            "-kernel", KERNEL, "-initrd", INITRD, "-append", append,
            "-drive", f"file={image},format={fmt},if=none,id=d0", "-device", "virtio-blk-device,drive=d0",
            "-drive", f"file={script},format=raw,if=none,id=d1", "-device", "virtio-blk-device,drive=d1"]


def run_guest(cmd):
    """Runs one boot; returns {marker: (host_time, guest_uptime)} and the console text."""
    marks, lines = {}, []
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + GUEST_TIMEOUT
    try:
        for raw in proc.stdout:
            now = time.monotonic()
            line = raw.decode(errors="replace").rstrip("\r\n")
            lines.append(line)
            m = re.search(r"@@ (\S+) (\S+)", line)
            if m:
                try:
                    marks[m.group(1)] = (now, float(m.group(2)))
                except ValueError:
                    marks[m.group(1)] = (now, m.group(2))
            if now > deadline:
                raise TimeoutError("the guest ran past %d s:\n%s" % (GUEST_TIMEOUT, "\n".join(lines[-20:])))
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()  # our own child, by its PID
            proc.wait()
    if "done" not in marks:
        raise RuntimeError("the benchmark did not finish:\n" + "\n".join(lines[-30:]))
    if marks.get("failures", (0, 0.0))[1] != 0:
        raise RuntimeError("guest I/O failed:\n" + "\n".join(lines[-30:]))
    return marks, lines


def durations(marks):
    out = {}
    for p in PHASES:
        (h0, g0), (h1, g1) = marks[p + "-start"], marks[p + "-end"]
        out[p] = (h1 - h0, g1 - g0)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=256, help="image size and sequential transfer (MiB)")
    ap.add_argument("--ops", type=int, default=500, help="random 4 KiB operations per random phase")
    ap.add_argument("--only", choices=["ours", "qemu"], help="run one emulator only")
    ap.add_argument("--formats", default="raw,qcow2")
    ap.add_argument("--dir", help="where the images go (default: a temporary directory)")
    args = ap.parse_args()

    server = os.environ.get("MACHINE_SERVER")
    if not server and args.only != "qemu":
        scratch = os.environ.get("SCRATCH", os.path.join(REPO, ".build"))
        subprocess.run(["swift", "build", "-c", "release", "--scratch-path", scratch, "--product", "machine-server"],
                       cwd=REPO, check=True, stdout=sys.stderr)
        bindir = subprocess.run(["swift", "build", "-c", "release", "--scratch-path", scratch, "--show-bin-path"],
                                cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()
        server = os.path.join(bindir, "machine-server")
    emulators = [e for e in ("ours", "qemu") if args.only in (None, e)]
    if "qemu" in emulators and shutil.which(QEMU) is None:
        sys.exit(f"{QEMU} is not installed")

    work = args.dir or tempfile.mkdtemp(prefix="disk-bench-")
    script = os.path.join(work, "script.raw")
    script_len = make_script_disk(script, args.size_mib, args.ops)
    append = guest_command(script_len)
    print(f"# bench/disk.py --size-mib {args.size_mib} --ops {args.ops}; images in {work}")
    print(f"# machine-server: {server}; qemu: {subprocess.run([QEMU, '--version'], capture_output=True, text=True).stdout.splitlines()[0] if 'qemu' in emulators else '-'}")
    print(f"# load average before: {open('/proc/loadavg').read().split()[:3]}, {os.cpu_count()} host CPUs")
    print("# method: O_DIRECT busybox dd in the guest (1 CPU, 256 MiB); seq = bs=1M over the whole image;"
          " rand = one dd bs=4k count=1 per op at a seeded random 4 KiB offset; host wall time between serial markers")

    results = {}
    for fmt in args.formats.split(","):
        image = os.path.join(work, f"disk.{fmt}")
        for emu in emulators:
            fresh_image(image, fmt, args.size_mib)
            cmd = ours_command(server, work, image, fmt, script, append) if emu == "ours" else \
                qemu_command(image, fmt, script, append)
            t0 = time.monotonic()
            marks, lines = run_guest(cmd)
            results[(fmt, emu)] = durations(marks)
            seen = next((l.strip() for l in lines if l.startswith("disk /dev/")), "?")
            print(f"# {fmt}/{emu}: boot to first marker {marks['ready'][0] - t0:.1f} s, whole run"
                  f" {time.monotonic() - t0:.1f} s; guest saw: {seen}", flush=True)
        os.remove(image)

    mib = args.size_mib
    rnd_mib = args.ops * 4096 / (1 << 20)
    print()
    print(f"{'format':7} {'phase':11} " + " ".join(f"{e + ' MB/s':>11} {e + ' guest':>11}" for e in emulators)
          + ("  ours/QEMU" if len(emulators) == 2 else ""))
    for fmt in args.formats.split(","):
        for p in PHASES:
            amount = mib if p.startswith("seq") else rnd_mib
            row, rates = [], {}
            for e in emulators:
                host, guest = results[(fmt, e)][p]
                rates[e] = amount * 1.048576 / host
                row.append(f"{rates[e]:11.2f} {amount * 1.048576 / guest if guest else 0:11.2f}")
            ratio = f"  {rates['ours'] / rates['qemu']:9.2f}" if len(emulators) == 2 else ""
            label = p if p != "loop" else "loop(no I/O)"
            print(f"{fmt:7} {label:11} " + " ".join(row) + ratio)
        for e in emulators:
            r = results[(fmt, e)]
            per_op = {p: r[p][0] / args.ops * 1000 for p in ("rand-write", "rand-read", "loop")}
            print(f"# {fmt}/{e}: ms per random op: write {per_op['rand-write']:.2f}, read {per_op['rand-read']:.2f},"
                  f" loop alone {per_op['loop']:.2f}; beyond the loop: write"
                  f" {per_op['rand-write'] - per_op['loop']:.2f}, read {per_op['rand-read'] - per_op['loop']:.2f}")
    print(f"# MB = 10^6 bytes; 'guest' columns use the guest's /proc/uptime; load average after:"
          f" {open('/proc/loadavg').read().split()[:3]}")
    if not args.dir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
