"""libvirt (Debian 12's 9.0) and machine-server as a QEMU binary: what works today
(docs/libvirt.md).

- libvirt's capability probe of machine-server passes (`virsh domcapabilities`), answered by
  the real probing commands;
- a domain with <emulator> machine-server is defined;
- the command line libvirt generates for it (`virsh domxml-to-native qemu-argv`) boots the
  shared guest on machine-server, driven over the QMP socket libvirt asked for;
- virsh start, dominfo, suspend, resume, domblklist, vncdisplay, qemu-monitor-command (QMP and
  HMP), screenshot, send-key and destroy work on a running domain whose guest boots.

libvirtd runs as a private session daemon (as the user 'nobody' when the test runs as root),
with its own directories under /tmp, started by virsh and stopped by the test.
Environment: MACHINE_SERVER, GUEST_DIR. Needs virsh and libvirtd (scripts/deps libvirt).
"""
import asyncio
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("qemu.qmp")
from qemu.qmp import QMPClient  # noqa: E402
from guest_env import SERVER, KERNEL, INITRD, BOOT_TIMEOUT, needs  # noqa: E402


pytestmark = needs("qemu-img") + [
    pytest.mark.skipif(shutil.which("virsh") is None or not Path("/usr/sbin/libvirtd").exists(),
                       reason="libvirt is not installed (scripts/deps libvirt)"),
]


def daemon_dirs(base, host_uuid, log):
    """The directories of one private session daemon under `base`; its libvirtd.conf logs
    what it says to the monitor into `log` and names its host `host_uuid` (two daemons on one
    machine must differ, or libvirt refuses to migrate between them)."""
    dirs = {k: base / k for k in ("home", "run", "config", "cache")}
    for d in dirs.values():
        d.mkdir(parents=True)
    dirs["run"].chmod(0o700)
    (dirs["config"] / "libvirt").mkdir()
    (dirs["config"] / "libvirt" / "libvirtd.conf").write_text(
        f'log_filters="1:qemu.qemu_monitor 3:*"\nlog_outputs="1:file:{log}"\nhost_uuid="{host_uuid}"\n')
    return dirs


def daemon_client(dirs, as_root):
    """The command prefix that runs a program as the daemon's user in its environment, and
    virsh on that daemon's qemu:///session (virsh starts the daemon)."""
    env = {"HOME": str(dirs["home"]), "XDG_RUNTIME_DIR": str(dirs["run"]), "XDG_CONFIG_HOME": str(dirs["config"]),
           "XDG_CACHE_HOME": str(dirs["cache"]), "PATH": "/usr/bin:/usr/sbin:/bin"}
    prefix = (["runuser", "-u", "nobody", "--"] if as_root else []) + ["env", "-i"] + [f"{k}={v}" for k, v in env.items()]

    def virsh(*args, check=True):
        r = subprocess.run(prefix + ["virsh", "-c", "qemu:///session", *args], capture_output=True, text=True, timeout=120)
        if check:
            assert r.returncode == 0, f"virsh {' '.join(args)}: {r.stderr}"
        return r
    return prefix, virsh


def stop_daemons(dirs):
    for daemon in ("libvirtd", "virtlogd"):
        pidfile = dirs["run"] / "libvirt" / f"{daemon}.pid"
        if pidfile.exists():
            try:
                os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass


@pytest.fixture(scope="module")
def session():
    """A private libvirt session: directories, a copy of the binary the daemon user can run,
    virsh; and a second daemon ("dest", another host as far as libvirt knows) to migrate to."""
    root = Path(tempfile.mkdtemp(prefix="ms-libvirt-"))
    root.chmod(0o755)
    dirs = daemon_dirs(root, "6b0d5e8c-0000-4000-8000-000000000001", root / "libvirtd.log")
    dest_dirs = daemon_dirs(root / "dest", "6b0d5e8c-0000-4000-8000-000000000002", root / "dest-libvirtd.log")
    dirs["guest"] = root / "guest"
    dirs["guest"].mkdir()
    emulator = root / "machine-server"
    shutil.copy2(SERVER, emulator)
    for f in (KERNEL, INITRD):
        shutil.copy2(f, dirs["guest"] / f.name)
    for disk, size in (("ms-test.qcow2", "32M"), ("ms-run.qcow2", "32M"), ("ms-hp.qcow2", "32M"), ("ms-hp-extra.qcow2", "16M")):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(dirs["guest"] / disk), size], check=True)
    as_root = os.geteuid() == 0
    if as_root:
        nobody = pwd.getpwnam("nobody")
        for p in [root, *root.rglob("*")]:
            os.chown(p, nobody.pw_uid, nobody.pw_gid)
    prefix, virsh = daemon_client(dirs, as_root)
    dest_prefix, dest_virsh = daemon_client(dest_dirs, as_root)

    yield {"root": root, "emulator": emulator, "guest": dirs["guest"], "virsh": virsh, "prefix": prefix,
           "dest_virsh": dest_virsh, "dest_prefix": dest_prefix,
           "dest_uri": f"qemu+unix:///session?socket={dest_dirs['run'] / 'libvirt' / 'libvirt-sock'}"}
    for domain in ("ms-run", "ms-hp"):
        virsh("destroy", domain, check=False)
    dest_virsh("destroy", "ms-hp", check=False)
    stop_daemons(dirs)
    stop_daemons(dest_dirs)
    shutil.rmtree(root, ignore_errors=True)


def domain_xml(s, name="ms-test", run="echo,libvirt-argv-ok", serial="serial.log"):
    """A domain; its serial console goes to `serial` in the guest directory (through libvirt's
    virtlogd pipe, passed with -add-fd, when libvirt starts it)."""
    g = s["guest"]
    cmdline = "console=ttyS0" + (f" guest.run={run}" if run else "")
    uuid = "6b0d5e8c-8f0a-4c5e-9d2e-3f1a2b3c4d5e" if name == "ms-test" else "7c1e6f9d-9a1b-4d6f-8e3f-4a2b3c4d5e6f"
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='riscv64' machine='virt'>hvm</type>
    <kernel>{g / KERNEL.name}</kernel>
    <initrd>{g / INITRD.name}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <devices>
    <emulator>{s["emulator"]}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{g / (name + ".qcow2")}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    {f"<serial type='file'><source path='{g / serial}'/></serial>" if serial else ""}
    <input type='keyboard' bus='virtio'/>
    <graphics type='vnc' port='-1' listen='127.0.0.1'/>
    <video><model type='virtio'/></video>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def test_capability_probe_passes(session):
    out = session["virsh"]("domcapabilities", "--emulatorbin", str(session["emulator"]), "--arch", "riscv64",
                           "--machine", "virt", "--virttype", "qemu").stdout
    assert "<domain>qemu</domain>" in out and "<machine>virt</machine>" in out and "<arch>riscv64</arch>" in out
    assert "<vcpu max='8'/>" in out
    assert "<value>vnc</value>" in out  # graphics from qom-list-types / the schema
    assert "<value>file</value>" in out  # memoryBacking: memory-backend-file


def test_libvirts_command_line_boots_the_guest(session):
    xml = session["root"] / "ms-test.xml"
    xml.write_text(domain_xml(session))
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(xml, nobody.pw_uid, nobody.pw_gid)
    session["virsh"]("define", str(xml))
    assert re.search(r"State:\s+shut off", session["virsh"]("dominfo", "ms-test").stdout)
    native = session["virsh"]("domxml-to-native", "--format", "qemu-argv", "--domain", "ms-test").stdout
    words = shlex.split(native)
    while "=" in words[0] and not words[0].startswith("/"):  # the environment libvirt sets
        words.pop(0)
    assert words[0] == str(session["emulator"])
    argv = [SERVER, *words[1:]]
    described = subprocess.run(argv + ["--print-description"], capture_output=True, text=True, timeout=30)
    assert described.returncode == 0, described.stderr
    d = json.loads(described.stdout)
    assert d["memory"] == "256M" and d["cpus"] == 1 and d["start"] == "paused"
    assert d["uuid"] == "6b0d5e8c-8f0a-4c5e-9d2e-3f1a2b3c4d5e" and d["name"] == "ms-test"
    # libvirt 9 puts virtio on PCI: its own root ports, packed as functions of slot 1, and
    # each virtio device behind one of them (no virtio-mmio address needed).
    devs = {x.get("id"): x for x in d["devices"]}
    disk = devs["virtio-disk0"]
    assert disk["driver"] == "virtio-blk-pci" and disk["drive"]["format"] == "qcow2"
    ports = [x for x in d["devices"] if x["driver"] == "pcie-root-port"]
    assert ports[0]["addr"] == "0x1" and ports[0]["multifunction"] is True
    assert [p["addr"] for p in ports[1:]] == [f"0x1.0x{i}" for i in range(1, len(ports))]
    assert disk["bus"] in {p["id"] for p in ports}
    assert d["actions"]["shutdown"] == "pause"  # libvirt's -no-shutdown
    monitor = d["qmp"][0]["path"]

    # Run it for real (as root here; libvirt would run it as the daemon user). -S: paused until cont.
    Path(monitor).parent.mkdir(parents=True, exist_ok=True)
    log = open(session["root"] / "emulator.log", "wb")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not Path(monitor).exists():
            assert proc.poll() is None, (session["root"] / "emulator.log").read_text()
            assert time.monotonic() < deadline, "the monitor socket did not appear"
            time.sleep(0.1)

        async def drive():
            c = QMPClient("libvirt-test")
            await c.connect(monitor)
            try:
                assert (await c.execute("query-status"))["status"] == "prelaunch"
                assert await c.execute("query-uuid") == {"UUID": "6b0d5e8c-8f0a-4c5e-9d2e-3f1a2b3c4d5e"}
                await c.execute("cont")
                async def shutdown():
                    async for ev in c.events:
                        if ev["event"] == "SHUTDOWN":
                            return ev
                ev = await asyncio.wait_for(shutdown(), BOOT_TIMEOUT)
                assert ev["data"]["reason"] == "guest-shutdown"
                # -no-shutdown: the process stays until told to quit, as libvirt expects.
                assert (await c.execute("query-status"))["status"] == "shutdown"
                await c.execute("quit")
            finally:
                try:
                    await c.disconnect()
                except EOFError:
                    pass
        asyncio.run(drive())
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = (session["guest"] / "serial.log").read_text(errors="replace")
    assert "libvirt-argv-ok" in out and "guest: run done, status 0" in out, out[-2000:]
    session["virsh"]("undefine", "ms-test")


def test_virsh_drives_a_running_domain(session):
    virsh = session["virsh"]
    xml = session["root"] / "ms-run.xml"
    xml.write_text(domain_xml(session, name="ms-run", run=None, serial="run-serial.log"))
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(xml, nobody.pw_uid, nobody.pw_gid)
    virsh("define", str(xml))
    virsh("start", "ms-run")
    # The guest boots: its console (through virtlogd) shows the init's line, and hart 0
    # executes in S-mode at a kernel virtual address.
    serial = session["guest"] / "run-serial.log"
    deadline = time.monotonic() + BOOT_TIMEOUT
    while "guest: boot ok" not in (serial.read_text(errors="replace") if serial.exists() else ""):
        assert time.monotonic() < deadline, "the guest did not boot under libvirt"
        time.sleep(0.5)
    while True:
        regs = virsh("qemu-monitor-command", "ms-run", "--hmp", "info registers").stdout
        if re.search(r"^ ?pc +ffffffff8", regs, re.M) and re.search(r"priv +0000000000000001", regs):
            break
        assert time.monotonic() < deadline, f"the guest kernel did not start under libvirt:\n{regs}"
        time.sleep(1)
    info = virsh("dominfo", "ms-run").stdout
    assert re.search(r"State:\s+running", info) and re.search(r"CPU\(s\):\s+1", info), info
    virsh("suspend", "ms-run")
    assert virsh("domstate", "ms-run").stdout.strip() == "paused"
    assert json.loads(virsh("qemu-monitor-command", "ms-run", '{"execute":"query-status"}').stdout)["return"]["status"] == "paused"
    virsh("resume", "ms-run")
    assert virsh("domstate", "ms-run").stdout.strip() == "running"
    assert "VM status: running" in virsh("qemu-monitor-command", "ms-run", "--hmp", "info status").stdout
    blk = virsh("domblklist", "ms-run").stdout
    assert re.search(r"vda\s+.*ms-run\.qcow2", blk), blk
    assert re.match(r"127\.0\.0\.1:\d+", virsh("vncdisplay", "ms-run").stdout.strip())
    # virsh (the daemon's user) writes the file; the GPU has a picture once the guest's
    # virtio-gpu driver has set a mode, a little after the kernel starts.
    shot = session["guest"] / "shot.png"
    while True:
        r = virsh("screenshot", "ms-run", str(shot), check=False)
        if r.returncode == 0:
            break
        assert "has not set a video mode yet" in r.stderr, r.stderr
        assert time.monotonic() < deadline, "the guest never set a video mode"
        time.sleep(1)
    assert shot.stat().st_size > 0
    virsh("send-key", "ms-run", "KEY_A")
    virsh("destroy", "ms-run")
    assert virsh("domstate", "ms-run").stdout.strip() == "shut off"
    virsh("undefine", "ms-run")


class Console:
    """`virsh console DOMAIN` on a pseudo-terminal of its own (virsh wants a terminal), read
    and typed into as a person would; the domain's serial line is machine-server's pty chardev."""

    def __init__(self, session, domain, prefix=None):
        import pty
        argv = (prefix or session["prefix"]) + ["virsh", "-c", "qemu:///session", "console", "--force", domain]
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.execvp(argv[0], argv)
        self.out = b""

    def read_until(self, pattern, timeout, poke=None):
        """Reads until `pattern` (bytes) appears after what was seen so far; `poke` is sent
        every few seconds meanwhile (a newline brings a prompt back)."""
        import select
        start = len(self.out)
        deadline = time.monotonic() + timeout
        next_poke = time.monotonic()
        while pattern not in self.out[start:]:
            now = time.monotonic()
            assert now < deadline, f"{pattern!r} did not appear on the console:\n{self.out[-2000:].decode(errors='replace')}"
            if poke is not None and now >= next_poke:
                os.write(self.fd, poke)
                next_poke = now + 3
            r, _, _ = select.select([self.fd], [], [], 0.5)
            if r:
                try:
                    self.out += os.read(self.fd, 65536)
                except OSError:
                    break
        return self.out[start:].decode(errors="replace")

    def run(self, command, expect, timeout=60):
        """Types a shell command and waits for `expect` in what follows (the terminal echoes
        the command: `expect` must be something only its output contains)."""
        assert expect not in command
        os.write(self.fd, command.encode() + b"\r")
        return self.read_until(expect.encode(), timeout)

    def close(self):
        try:
            os.write(self.fd, b"\x1d")  # virsh's escape, Ctrl-]
        except OSError:
            pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if os.waitpid(self.pid, os.WNOHANG)[0] == self.pid:
                break
            time.sleep(0.1)
        else:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self.fd)


def hotplug_domain_xml(s, name="ms-hp"):
    """A domain with its serial console on a pty and two PCIe root ports: libvirt puts vda
    (virtio on PCI, no address given) behind one and leaves the other free for hot-plug; it
    packs them as functions of slot 1."""
    g = s["guest"]
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <uuid>8d2f7a0e-ab2c-4e7a-9f4a-5b3c4d5e6f70</uuid>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='riscv64' machine='virt'>hvm</type>
    <kernel>{g / KERNEL.name}</kernel>
    <initrd>{g / INITRD.name}</initrd>
    <cmdline>console=ttyS0</cmdline>
  </os>
  <devices>
    <emulator>{s["emulator"]}</emulator>
    <controller type='pci' model='pcie-root'/>
    <controller type='pci' model='pcie-root-port'/>
    <controller type='pci' model='pcie-root-port'/>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{g / (name + ".qcow2")}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='pty'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def write_as_daemon_user(path, text):
    path.write_text(text)
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(path, nobody.pw_uid, nobody.pw_gid)


def test_virsh_console_hotplug_snapshots_save_restore(session):
    """On one booted domain: virsh console (the pty chardev), attach-device/detach-device of a
    virtio disk on the domain's pcie-root-port, snapshot-create-as/list/revert/delete
    (internal snapshots, the guest's memory comes back), save and restore (migration to the
    descriptor libvirt passes with getfd, and back with migrate-incoming fd:N)."""
    virsh = session["virsh"]
    root, g = session["root"], session["guest"]
    write_as_daemon_user(root / "ms-hp.xml", hotplug_domain_xml(session))
    write_as_daemon_user(root / "vdb.xml", f"""<disk type='file' device='disk'>
  <driver name='qemu' type='qcow2'/>
  <source file='{g / "ms-hp-extra.qcow2"}'/>
  <target dev='vdb' bus='virtio'/>
</disk>
""")
    virsh("define", str(root / "ms-hp.xml"))
    virsh("start", "ms-hp")
    chardev = json.loads(virsh("qemu-monitor-command", "ms-hp", '{"execute":"query-chardev"}').stdout)["return"]
    assert chardev[0]["label"] == "charserial0" and chardev[0]["filename"].startswith("pty:/dev/pts/"), chardev

    console = Console(session, "ms-hp")
    try:
        # The guest's shell on its serial line, through the pty: a newline brings the prompt.
        console.read_until(b"guest:/# ", BOOT_TIMEOUT, poke=b"\r")
        console.run("echo console-$((6*7))", "console-42")
        # The UART (PLIC source 10 on virt) has interrupted for what was typed (HMP info irq).
        irq = virsh("qemu-monitor-command", "ms-hp", "--hmp", "info irq").stdout
        assert "IRQ statistics for plic:" in irq and re.search(r"^ ?10: [1-9]", irq, re.M), irq

        # Hot-plug: libvirt's blockdev-add (file and qcow2 nodes), device_add on its root port.
        virsh("attach-device", "ms-hp", str(root / "vdb.xml"))
        assert re.search(r"vdb\s+.*ms-hp-extra\.qcow2", virsh("domblklist", "ms-hp").stdout)
        console.run("for i in $(seq 60); do [ -e /sys/block/vdb ] && break; sleep 1; done; echo vdb-$(cat /sys/block/vdb/size)",
                    "vdb-32768")
        # Block statistics (query-blockstats): the guest's writes to the new disk are counted.
        console.run("dd if=/dev/zero of=/dev/vdb bs=4096 count=4 conv=fsync; echo dd-$((1+1))", "dd-2")
        stats = dict(line.split()[1:3] for line in virsh("domblkstat", "ms-hp", "vdb").stdout.splitlines() if line.strip())
        assert int(stats["wr_bytes"]) >= 16384 and int(stats["wr_req"]) >= 1, stats
        assert int(dict(line.split()[1:3] for line in virsh("domblkstat", "ms-hp", "vda").stdout.splitlines() if line.strip())["rd_req"]) > 0
        assert re.search(r"virtio-disk1: rd_bytes=\d+ wr_bytes=(\d+)", virsh("qemu-monitor-command", "ms-hp", "--hmp", "info blockstats").stdout)
        # The disk went onto a free one of libvirt's root ports, functions of slot 1 (query-pci).
        pci = json.loads(virsh("qemu-monitor-command", "ms-hp", '{"execute":"query-pci"}').stdout)["return"][0]["devices"]
        [port] = [d for d in pci if [c["qdev_id"] for c in d.get("pci_bridge", {}).get("devices", [])] == ["virtio-disk1"]]
        assert port["bus"] == 0 and port["slot"] == 1, port
        # HMP info qtree: the root port on pcie.0 at its slot.function and the disk on the bus behind it.
        qtree = virsh("qemu-monitor-command", "ms-hp", "--hmp", "info qtree").stdout
        pid = re.escape(port["qdev_id"])
        assert re.search(rf'dev: pcie-root-port, id "{pid}"\s+addr = 01\.{port["function"]}.*?bus: {pid}\b.*?'
                         r'dev: virtio-blk-pci, id "virtio-disk1"', qtree, re.S), qtree
        assert re.search(r"dev: uart0?.*\n\s+mmio 0000000010000000/", qtree) or "mmio 0000000010000000/" in qtree, qtree
        # Unplug: device_del, the guest lets go, DEVICE_DELETED, blockdev-del.
        virsh("detach-device", "ms-hp", str(root / "vdb.xml"))
        deadline = time.monotonic() + 60
        while "vdb" in virsh("domblklist", "ms-hp").stdout:
            assert time.monotonic() < deadline, "the disk was never removed"
            time.sleep(0.5)
        console.run("[ -e /sys/block/vdb ] || echo vdb-$((2+3))", "vdb-5")

        # Internal snapshots (HMP savevm/loadvm/delvm in libvirt 9.0; revert restarts the
        # machine with -loadvm). The guest's memory comes back with the snapshot.
        console.run("echo before > /tmp/mark; echo marked-$((3+4))", "marked-7")
        virsh("snapshot-create-as", "ms-hp", "snap1")
        assert "snap1" in virsh("snapshot-list", "ms-hp", "--name").stdout
        console.run("echo after > /tmp/mark; echo changed-$((4+5))", "changed-9")
    finally:
        console.close()
    virsh("snapshot-revert", "ms-hp", "snap1")
    assert virsh("domstate", "ms-hp").stdout.strip() == "running"
    console = Console(session, "ms-hp")
    try:
        console.read_until(b"guest:/# ", 60, poke=b"\r")
        console.run("echo mark-$(cat /tmp/mark)", "mark-before")
    finally:
        console.close()
    virsh("snapshot-delete", "ms-hp", "snap1")
    assert virsh("snapshot-list", "ms-hp", "--name").stdout.strip() == ""
    assert "There is no snapshot available" in virsh("qemu-monitor-command", "ms-hp", "--hmp", "info snapshots").stdout

    # save: the machine's state goes into libvirt's file through the passed descriptor; the
    # process ends. restore: a new process receives it and the guest goes on where it was.
    saved = g / "ms-hp.save"
    virsh("save", "ms-hp", str(saved))
    assert virsh("domstate", "ms-hp").stdout.strip() == "shut off"
    assert saved.stat().st_size > 1 << 20
    virsh("restore", str(saved))
    assert virsh("domstate", "ms-hp").stdout.strip() == "running"
    console = Console(session, "ms-hp")
    try:
        console.read_until(b"guest:/# ", 60, poke=b"\r")
        console.run("echo restored-$(cat /tmp/mark)", "restored-before")
    finally:
        console.close()
    log = (root / "libvirtd.log").read_text(errors="replace") if (root / "libvirtd.log").exists() else ""
    if log:  # what libvirt sent, when the daemon logs the monitor
        assert '"execute":"getfd"' in log and "fd:migrate" in log

    # Live migration to the second daemon: libvirt starts the destination with -incoming defer
    # and migrate-incoming tcp:[::]:PORT, connects to it itself and passes the socket to the
    # source (getfd, migrate fd:migrate). Same host, so the storage is shared (--unsafe: libvirt
    # cannot tell). The guest goes on on the destination.
    dest = session["dest_virsh"]
    dest("list")  # starts the destination daemon
    virsh("migrate", "--live", "--unsafe", "ms-hp", session["dest_uri"])
    assert dest("domstate", "ms-hp").stdout.strip() == "running"
    assert virsh("domstate", "ms-hp").stdout.strip() == "shut off"
    console = Console(session, "ms-hp", prefix=session["dest_prefix"])
    try:
        console.read_until(b"guest:/# ", 60, poke=b"\r")
        console.run("echo migrated-$(cat /tmp/mark)", "migrated-before")
    finally:
        console.close()
    dest("destroy", "ms-hp")
    virsh("undefine", "ms-hp", "--snapshots-metadata")
