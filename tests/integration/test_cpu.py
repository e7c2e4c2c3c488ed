"""Whole-guest tests of the CPU's ISA: the device tree claims the extensions the harts run with,
Linux sees them (/proc/cpuinfo), and `"cpu": {"isa": ...}` narrows them.

Environment:
  MACHINE_SERVER  path of the built machine-server executable (tests skip without it)
  GUEST_DIR       the shared guest directory (default: ../shared/guests beside the repo)
"""
import json
import os
import re
import shutil
import subprocess

import pytest

SERVER = os.environ.get("MACHINE_SERVER")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GUESTS = os.environ.get("GUEST_DIR") or os.path.join(os.path.dirname(REPO), "shared", "guests")
KERNEL = os.path.join(GUESTS, "linux-6.1-rv64-Image")
INITRD = os.path.join(GUESTS, "initramfs-rv64.cpio.gz")
BOOT_TIMEOUT = 170

pytestmark = [
    pytest.mark.skipif(not SERVER, reason="MACHINE_SERVER is not set"),
    pytest.mark.skipif(not os.path.exists(KERNEL), reason=f"the shared guest is not in {GUESTS}"),
]


def run_guest(tmp_path, command, **extra):
    """Boots the guest with `extra` description members, runs `command`; returns the serial log."""
    d = {
        "version": 2, "machine": "virt", "cpus": 1, "memory": "256M",
        "kernel": KERNEL, "initrd": INITRD, "append": "console=ttyS0 guest.run=" + command,
        "serial": {"backend": "file", "path": str(tmp_path / "serial.log")},
    }
    d.update(extra)
    cfg = tmp_path / "machine.json"
    cfg.write_text(json.dumps(d))
    r = subprocess.run([SERVER, "--config", str(cfg)], capture_output=True, text=True, timeout=BOOT_TIMEOUT)
    out = (tmp_path / "serial.log").read_text(errors="replace")
    assert r.returncode == 0, f"machine-server exited {r.returncode}: {r.stderr}\n{out[-2000:]}"
    assert "guest: run done, status 0" in out, out[-3000:]
    return out


def isa_line(out):
    m = re.search(r"^isa\s*:\s*(\S+)", out, re.M)
    assert m, "no isa line in /proc/cpuinfo:\n" + out[-2000:]
    return m.group(1)


def test_linux_sees_the_claimed_extensions(tmp_path):
    """Linux 6.1 reports the extensions it knows from the device tree: Zicbom, Zihintpause,
    Sstc, Svinval, Svpbmt (it then uses stimecmp for its timer and PBMT in its page tables)."""
    out = run_guest(tmp_path, "cat,/proc/cpuinfo;cat,/proc/device-tree/cpus/cpu@0/riscv?isa")
    isa = isa_line(out)
    for ext in ["zicbom", "zihintpause", "sstc", "svinval", "svpbmt"]:
        assert ext in isa.split("_"), f"{ext} missing from {isa}"
    # Names Linux 6.1 does not know reach it in the device tree all the same (and it boots).
    m = re.search(r"(rv64imafdc_\S*zicsr\S*)", out[out.index("processor"):])
    assert m, out[-2000:]
    for ext in ["zfh", "zfhmin", "zba", "zbb"]:
        assert ext in m.group(1).split("_"), f"{ext} missing from the device tree's {m.group(1)}"


def test_narrowed_isa_claims_and_runs_only_rv64gc(tmp_path):
    """`"cpu": {"isa": "rv64gc"}` claims no extension beyond RV64GC, and the guest still boots."""
    out = run_guest(tmp_path, "cat,/proc/cpuinfo;cat,/proc/device-tree/cpus/cpu@0/riscv?isa", cpu={"isa": "rv64gc"})
    isa = isa_line(out)
    assert not any(e in isa for e in ["zicbom", "sstc", "svpbmt", "svinval", "zihintpause"]), isa
    assert re.search(r"rv64imafdc_zicsr_zifencei\b(?!_)", out[out.index("processor"):]), out[-2000:]


def test_bad_isa_string_is_refused_naming_the_extension(tmp_path):
    cfg = tmp_path / "machine.json"
    cfg.write_text(json.dumps({"version": 2, "machine": "virt", "memory": "64M", "kernel": KERNEL,
                               "cpu": {"isa": "rv64gc_zbb_zfoo"}}))
    r = subprocess.run([SERVER, "--config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "cpu.isa" in r.stderr and "zfoo" in r.stderr, r.stderr


SPIKE_PROGRAM = r"""
/* A Spike-style program (as riscv-tests are built): HTIF through the `tohost` symbol in RAM. */
    .section .text.init
    .globl _start
_start:
    la t0, fromhost
    sd zero, 0(t0)
    li a0, (CODE << 1) | 1
    la t0, tohost
1:  sd a0, 0(t0)
    j 1b
    .section .tohost, "aw", @progbits
    .align 6
    .globl tohost
tohost: .dword 0
    .align 6
    .globl fromhost
fromhost: .dword 0
"""


@pytest.mark.skipif(shutil.which("riscv64-linux-gnu-gcc") is None, reason="riscv64-linux-gnu-gcc is not installed")
@pytest.mark.parametrize("code", [0, 5])
def test_elf_with_tohost_symbol_gets_the_htif_there(tmp_path, code):
    src = tmp_path / "spike.S"
    src.write_text(SPIKE_PROGRAM)
    ld = tmp_path / "link.ld"
    ld.write_text("OUTPUT_ARCH(riscv)\nENTRY(_start)\nSECTIONS {\n . = 0x80000000;\n .text.init : { *(.text.init) }\n"
                  " . = ALIGN(0x1000);\n .tohost : { *(.tohost) }\n}\n")
    elf = tmp_path / "spike.elf"
    subprocess.run(["riscv64-linux-gnu-gcc", "-static", "-nostdlib", "-nostartfiles", "-fno-pie", "-fno-pic",
                    "-march=rv64gc", "-mabi=lp64d", f"-DCODE={code}", "-T", str(ld), "-o", str(elf), str(src)], check=True)
    cfg = tmp_path / "machine.json"
    cfg.write_text(json.dumps({"version": 2, "machine": "virt", "memory": "64M", "firmware": "none",
                               "kernel": str(elf), "serial": {"backend": "none"}}))
    r = subprocess.run([SERVER, "--config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode == code, r.stderr


ZFH_DIR = os.path.join(REPO, "tests", "integration", "zfh")
QEMU = shutil.which("qemu-system-riscv64")


def run_zfh_program(tmp_path, argv, serial_path=None):
    """Runs a build of zfh/random.c; returns its output lines (it ends with 'zfhdiff done')."""
    r = subprocess.run(argv, capture_output=True, text=True, timeout=240)
    out = open(serial_path, errors="replace").read() if serial_path else r.stdout
    assert "zfhdiff done" in out, f"{argv[0]} exited {r.returncode}: {r.stderr[-2000:]}\n{out[-2000:]}"
    lines = [l for l in out.splitlines() if re.match(r"^\S+ [0-9a-f]{16}$", l)]
    assert len(lines) == 32, out
    return lines


@pytest.mark.skipif(shutil.which("riscv64-linux-gnu-gcc") is None, reason="riscv64-linux-gnu-gcc is not installed")
@pytest.mark.skipif(QEMU is None, reason="qemu-system-riscv64 is not installed")
def test_zfh_results_and_flags_match_qemu(tmp_path):
    """Every Zfh instruction on random operands (specials, subnormals, unboxed registers) in all
    five rounding modes: the results and fflags hash the same on QEMU (softfloat) and on both of
    our engines."""
    elf = tmp_path / "zfh.elf"
    subprocess.run(["riscv64-linux-gnu-gcc", "-march=rv64gc_zfh", "-mabi=lp64d", "-O2", "-ffreestanding", "-nostdlib",
                    "-nostartfiles", "-static", "-fno-pic", "-no-pie", "-mcmodel=medany", "-Wl,--build-id=none",
                    "-DITERATIONS=1500", "-T", os.path.join(ZFH_DIR, "link.ld"), "-o", str(elf),
                    os.path.join(ZFH_DIR, "start.S"), os.path.join(ZFH_DIR, "random.c")],
                   check=True, capture_output=True)
    # QEMU 7.2 spells the property Zfh; later versions zfh.
    qemu = None
    for prop in ["Zfh=true", "zfh=true"]:
        argv = [QEMU, "-M", "virt", "-cpu", "rv64," + prop, "-bios", "none", "-kernel", str(elf),
                "-display", "none", "-serial", "stdio", "-monitor", "none"]
        if subprocess.run(argv[:5] + ["-M", "virt,dumpdtb=" + str(tmp_path / "probe.dtb")],
                          capture_output=True, timeout=60).returncode == 0:
            qemu = run_zfh_program(tmp_path, argv)
            break
    assert qemu, "qemu-system-riscv64 has no Zfh CPU property"
    for engine in ["jit", "interpreter"]:
        serial = tmp_path / f"serial-{engine}.log"
        cfg = tmp_path / f"zfh-{engine}.json"
        cfg.write_text(json.dumps({"version": 2, "machine": "virt", "memory": "64M", "firmware": "none",
                                   "kernel": str(elf), "accel": {"engine": engine},
                                   "serial": {"backend": "file", "path": str(serial)}}))
        ours = run_zfh_program(tmp_path, [SERVER, "--config", str(cfg)], serial_path=str(serial))
        differing = [f"{q} (qemu) != {o} ({engine})" for q, o in zip(qemu, ours) if q != o]
        assert not differing, "\n".join(differing)
