"""Format probing of images machine-server does not read: files made by qemu-img as VMDK,
VDI, VHD (vpc) and LUKS must not be taken for raw disks. `machine-img info` without -f refuses
them naming the format; with -f raw (the format said explicitly) the bytes are a raw disk.

Environment: MACHINE_SERVER (machine-img is taken next to it) or MACHINE_IMG.
"""
import os
import shutil
import subprocess

import pytest

SERVER = os.environ.get("MACHINE_SERVER")
MACHINE_IMG = os.environ.get("MACHINE_IMG") or (os.path.join(os.path.dirname(SERVER), "machine-img") if SERVER else None)

pytestmark = [
    pytest.mark.skipif(not MACHINE_IMG or not os.path.exists(MACHINE_IMG), reason="machine-img is not built"),
    pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed"),
]

FORMATS = [
    ("vmdk", ["-f", "vmdk"]),
    ("vdi", ["-f", "vdi"]),
    ("vpc", ["-f", "vpc"]),
    ("vpc", ["-f", "vpc", "-o", "subformat=fixed"]),
    ("luks", ["--object", "secret,id=sec0,data=hunter2", "-f", "luks", "-o", "key-secret=sec0"]),
]


@pytest.mark.parametrize("fmt,args", FORMATS, ids=[" ".join(a) for _, a in FORMATS])
def test_foreign_formats_are_refused_unless_raw_is_said(tmp_path, fmt, args):
    img = tmp_path / f"disk.{fmt}"
    subprocess.run(["qemu-img", "create", "-q"] + args + [str(img), "8M"], check=True)
    r = subprocess.run([MACHINE_IMG, "info", str(img)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0, r.stdout
    assert f"the {fmt} format" in r.stderr and "raw explicitly" in r.stderr, r.stderr
    r = subprocess.run([MACHINE_IMG, "info", "-f", "raw", str(img)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "file format: raw" in r.stdout


def test_raw_and_qcow2_still_probe(tmp_path):
    for fmt in ("raw", "qcow2"):
        img = tmp_path / f"disk.{fmt}"
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(img), "8M"], check=True)
        r = subprocess.run([MACHINE_IMG, "info", str(img)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and f"file format: {fmt}" in r.stdout, r.stdout + r.stderr
