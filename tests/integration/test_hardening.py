"""Reproducers for issue 15 (hardening) that need the whole server: hostile paths in the
machine description, serial output errors, and the QMP and VNC listeners under misbehaving
clients. Each test failed (hung, exhausted memory, or answered wrongly) before its fix.

Environment:
  MACHINE_SERVER  path of the built machine-server executable (tests skip without it)
  GUEST_DIR       the shared guest (default ../shared/guests beside the repository)
"""
import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

SERVER = os.environ.get("MACHINE_SERVER")
REPO = Path(__file__).resolve().parents[2]
GUEST_DIR = Path(os.environ.get("GUEST_DIR", REPO.parent / "shared" / "guests"))
KERNEL = GUEST_DIR / "linux-6.1-rv64-Image"
INITRD = GUEST_DIR / "initramfs-rv64.cpio.gz"
OPENSBI = Path("/usr/lib/riscv64-linux-gnu/opensbi/generic/fw_dynamic.bin")

pytestmark = [
    pytest.mark.skipif(not SERVER, reason="MACHINE_SERVER is not set"),
    pytest.mark.skipif(not KERNEL.exists(), reason="the shared guest is not in GUEST_DIR"),
]


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
