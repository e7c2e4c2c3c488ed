"""Crash durability of qcow2 images under machine-server: the guest writes without pause, the server
is killed with SIGKILL at random moments, and afterwards

  * `qemu-img check` finds no corruption (leaked clusters are allowed: exit status 0 or 3),
  * every record the guest saw acknowledged after an fsync (a virtio-blk FLUSH) is in the image,
  * the image opens again in machine-server and the guest reads exactly what qemu-img reads.

Both an image made by our `machine-img create -f qcow2` and one made by `qemu-img create -f qcow2`
are tested.

Environment:
  MACHINE_SERVER  path of the built machine-server executable (tests skip without it)
  MACHINE_IMG     path of machine-img (default: next to MACHINE_SERVER)
  GUEST_DIR       the shared guest (default ../shared/guests relative to the repository)
  DURABILITY_SEED seed of the random kill delays (printed by a failing test; default: the clock)
Needs qemu-img. Each boot is bounded; the whole file takes about a minute and a half with a release
build.
"""
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import time

import pytest

SERVER = os.environ.get("MACHINE_SERVER")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GUESTS = os.environ.get("GUEST_DIR") or os.path.join(os.path.dirname(REPO), "shared", "guests")
KERNEL = os.path.join(GUESTS, "linux-6.1-rv64-Image")
INITRD = os.path.join(GUESTS, "initramfs-rv64.cpio.gz")
MACHINE_IMG = os.environ.get("MACHINE_IMG") or (os.path.join(os.path.dirname(SERVER), "machine-img") if SERVER else None)

IMAGE_SIZE = 32 << 20      # bytes
CLUSTERS_64K = IMAGE_SIZE // 65536
RECORD_SLOTS = 256          # 4 KiB record slots per run; run r owns slots r*256 .. r*256+255 (first 4 MiB)
KILLS = 3                   # SIGKILLs per image
START_TIMEOUT = 90          # seconds from launch until the guest's writes are under way
GUEST_TIMEOUT = 120         # seconds for the final read-back boot

pytestmark = [
    pytest.mark.skipif(not SERVER, reason="MACHINE_SERVER is not set"),
    pytest.mark.skipif(not os.path.exists(KERNEL), reason=f"the shared guest is not in {GUESTS}"),
    pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed"),
]


def writer(run):
    """The guest command of kill run `run`: an endless loop of direct 64 KiB cluster-aligned writes and
    4 KiB unaligned-to-cluster writes of random data at random places in the bulk area (above 4 MiB),
    plus, while slots last, one record 'REC-run-i' written through the page cache and fsync'ed (so the
    device sees a FLUSH) before the guest prints 'ACK-run-i'. Spaces are commas (the guest's init turns
    them back); dd's conv= takes one flag only for that reason."""
    base = run * RECORD_SLOTS
    script = (
        "dd if=/dev/urandom of=/tmp/r bs=64k count=16 2>/dev/null;echo WRITER-GO;i=0;"
        "while true;do "
        f"dd if=/tmp/r of=/dev/vda bs=64k count=4 skip=$((RANDOM%12)) seek=$((64+RANDOM%{CLUSTERS_64K - 68})) "
        "oflag=direct 2>/dev/null;"
        f"dd if=/tmp/r of=/dev/vda bs=4k count=1 skip=$((RANDOM%256)) seek=$((1024+RANDOM%{IMAGE_SIZE // 4096 - 1024})) "
        "oflag=direct 2>/dev/null;"
        f"if [ $i -lt {RECORD_SLOTS} ];then "
        f"echo REC-{run}-$i|dd of=/dev/vda bs=4k seek=$(({base}+i)) conv=fsync 2>/dev/null&&echo ACK-{run}-$i;fi;"
        "i=$((i+1));done"
    )
    return script.replace(" ", ",")


def description(tmp_path, image, command, serial):
    d = {
        "version": 2, "machine": "virt", "cpus": 1, "memory": "256M",
        "kernel": KERNEL, "initrd": INITRD, "append": "console=ttyS0 guest.run=" + command,
        "serial": {"backend": "file", "path": str(serial)},
        "devices": [{"driver": "virtio-blk-device", "id": "disk0",
                     "drive": {"file": str(image), "format": "qcow2"}}],
    }
    path = tmp_path / "machine.json"
    path.write_text(json.dumps(d))
    return str(path)


def check_with_qemu_img(image):
    r = subprocess.run(["qemu-img", "check", "--output=json", str(image)], capture_output=True, text=True)
    assert r.returncode in (0, 3), f"qemu-img check exited {r.returncode}:\n{r.stdout}{r.stderr}"
    report = json.loads(r.stdout)
    assert report.get("corruptions", 0) == 0, report
    return report


def kill_while_writing(tmp_path, image, run, rng):
    """Boots the writer, waits until the image grows and records are acknowledged, lets it run a random
    0.3-3 s more, then SIGKILLs machine-server (our own child, by PID). Returns the acknowledged
    record numbers."""
    serial = tmp_path / f"serial-{run}.log"
    cfg = description(tmp_path, image, writer(run), serial)
    size_before = os.path.getsize(image)
    proc = subprocess.Popen([SERVER, "--config", cfg], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + START_TIMEOUT
        while True:
            out = serial.read_text(errors="replace") if serial.exists() else ""
            if os.path.getsize(image) > size_before and f"ACK-{run}-2" in out:
                break
            assert proc.poll() is None, f"machine-server exited {proc.returncode}: {proc.stderr.read()!r}\n{out[-2000:]}"
            assert time.time() < deadline, f"the writer never got going (run {run}):\n{out[-2000:]}"
            time.sleep(0.1)
        time.sleep(rng.uniform(0.3, 3.0))
        assert proc.poll() is None, "machine-server stopped before it was killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    out = serial.read_text(errors="replace")
    assert "WRITER-GO" in out
    return [int(n) for n in re.findall(rf"ACK-{run}-(\d+)\r?\n", out)]


def records_in(raw, run):
    """The record slots of `run` as they read from a raw copy of the image."""
    data = open(raw, "rb").read()
    return [data[(run * RECORD_SLOTS + i) * 4096:][:32] for i in range(RECORD_SLOTS)]


@pytest.mark.parametrize("creator", ["machine-img", "qemu-img"])
def test_qcow2_survives_sigkill_during_heavy_writes(tmp_path, creator):
    image = tmp_path / "disk.qcow2"
    if creator == "machine-img":
        if not MACHINE_IMG or not os.path.exists(MACHINE_IMG):
            pytest.skip("machine-img not found (set MACHINE_IMG)")
        subprocess.run([MACHINE_IMG, "create", "-f", "qcow2", str(image), str(IMAGE_SIZE)], check=True,
                       capture_output=True)
    else:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(IMAGE_SIZE)], check=True)
    seed = int(os.environ.get("DURABILITY_SEED", time.time_ns() % (1 << 32)))
    print(f"kill delays drawn with DURABILITY_SEED={seed}")  # shown by pytest when the test fails
    rng = random.Random(seed)
    acked = {}
    for run in range(KILLS):
        acked[run] = kill_while_writing(tmp_path, image, run, rng)
        assert len(acked[run]) >= 3
        check_with_qemu_img(image)
        if MACHINE_IMG and os.path.exists(MACHINE_IMG):
            ours = subprocess.run([MACHINE_IMG, "check", str(image)], capture_output=True, text=True)
            assert ours.returncode in (0, 3), f"machine-img check exited {ours.returncode}:\n{ours.stdout}{ours.stderr}"

    # Every acknowledged record is in the image, as qemu-img reads it.
    raw = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
    for run, numbers in acked.items():
        slots = records_in(raw, run)
        for i in numbers:
            assert slots[i].startswith(f"REC-{run}-{i}\n".encode()), \
                f"acknowledged record {run}-{i} is missing after the kill: {slots[i]!r}"

    # The image opens again in machine-server and the guest reads what qemu-img reads.
    expected = hashlib.md5(open(raw, "rb").read()).hexdigest()
    serial = tmp_path / "serial-read.log"
    cfg = description(tmp_path, image, "md5sum,/dev/vda", serial)
    r = subprocess.run([SERVER, "--config", cfg], capture_output=True, text=True, timeout=GUEST_TIMEOUT)
    out = serial.read_text(errors="replace")
    assert r.returncode == 0, f"machine-server exited {r.returncode}: {r.stderr}\n{out[-2000:]}"
    assert "guest: run done, status 0" in out, out[-2000:]
    assert f"{expected}  /dev/vda" in out, f"the guest read other data than qemu-img (want {expected}):\n{out[-1500:]}"
    report = check_with_qemu_img(image)
    assert report.get("check-errors", 0) == 0
