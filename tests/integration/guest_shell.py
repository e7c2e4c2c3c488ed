"""A booted guest driven through QMP: its shell on the serial line (a ring-buffer chardev read
and written with ringbuf-read / ringbuf-write) and QMP commands and events. Works the same
against machine-server and qemu-system-riscv64, so tests and bench/hotplug.py share it.

The shared guest gives a shell on the serial line ("guest:/# ") when its kernel command line
has no guest.run.
"""
import json
import os
import socket
import subprocess
import time
from pathlib import Path

from qemu.qmp.legacy import QEMUMonitorProtocol

from guest_env import INITRD, KERNEL
PROMPT = "guest:/# "


class Guest:
    """One machine (ours or QEMU) with root ports rp0 and rp1, booted to its shell."""

    def __init__(self, workdir, server=None, qemu=None, ports=2, memory="256M", boot_timeout=240, devices=None):
        """`devices` replaces the root ports rp0… of our description (machine-server only)."""
        self.workdir = Path(workdir)
        self.sock = str(self.workdir / "qmp.sock")
        self.counter = 0
        self.pending = ""
        self.log = ""
        self.events = []
        if server:
            desc = {
                "version": 2, "machine": "virt", "cpus": 1, "memory": memory,
                "kernel": str(KERNEL), "initrd": str(INITRD), "append": "console=ttyS0",
                "serial": {"backend": "ringbuf", "size": 1 << 20},
                "qmp": [{"backend": "unix", "path": self.sock}],
                "devices": devices if devices is not None else
                           [{"driver": "pcie-root-port", "id": f"rp{i}", "chassis": i + 1, "slot": i + 1} for i in range(ports)],
            }
            cfg = self.workdir / "machine.json"
            cfg.write_text(json.dumps(desc))
            argv = [server, "--config", str(cfg)]
        else:
            argv = [qemu, "-machine", "virt", "-cpu", "rv64", "-smp", "1", "-m", memory, "-nographic", "-nodefaults",
                    "-bios", "default", "-kernel", str(KERNEL), "-initrd", str(INITRD), "-append", "console=ttyS0",
                    # QEMU's ringbuf-write feeds the ring (what ringbuf-read returns), not the
                    # guest, so its serial line is a unix socket instead.
                    "-chardev", f"socket,id=serial0,path={self.workdir / 'serial.sock'},server=on,wait=off",
                    "-serial", "chardev:serial0",
                    "-qmp", f"unix:{self.sock},server=on,wait=off"]
            for i in range(ports):
                argv += ["-device", f"pcie-root-port,id=rp{i},chassis={i + 1},slot={i + 1}"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        self.serial_sock = None
        self.qmp = self._connect()
        if qemu:
            self.serial_sock = socket.socket(socket.AF_UNIX)
            self.serial_sock.connect(str(self.workdir / "serial.sock"))
            self.serial_sock.setblocking(False)
        self.wait_for(PROMPT, timeout=boot_timeout)

    def _connect(self, deadline=60):
        end = time.time() + deadline
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"the machine exited {self.proc.returncode}: {self.proc.stderr.read()}")
            if os.path.exists(self.sock):
                try:
                    q = QEMUMonitorProtocol(self.sock)
                    q.connect()
                    return q
                except (OSError, ConnectionError):
                    pass
            if time.time() > end:
                raise AssertionError("the QMP socket never accepted a connection")
            time.sleep(0.1)

    # QMP

    def cmd(self, name, **arguments):
        """Runs a command; returns the whole reply ({"return": ...} or {"error": ...})."""
        reply = self.qmp.cmd_raw(name, arguments or None)
        self.events += self.qmp.get_events()
        self.qmp.clear_events()
        return reply

    def ok(self, name, **arguments):
        reply = self.cmd(name, **arguments)
        assert "return" in reply, f"{name} {arguments}: {reply}"
        return reply["return"]

    def error(self, name, **arguments):
        reply = self.cmd(name, **arguments)
        assert "error" in reply, f"{name} {arguments} was accepted: {reply}"
        return reply["error"]

    def wait_event(self, name, match=None, timeout=60):
        """Waits for event `name` whose data contains `match`; returns it."""
        end = time.time() + timeout
        while True:
            for e in self.events:
                if e["event"] == name and all(e.get("data", {}).get(k) == v for k, v in (match or {}).items()):
                    self.events.remove(e)
                    return e
            left = end - time.time()
            if left <= 0:
                raise AssertionError(f"no {name} {match} within {timeout}s (events: {self.events})")
            try:
                e = self.qmp.pull_event(wait=min(left, 1.0))
            except Exception:  # the legacy client raises on timeout
                e = None
            if e:
                self.events.append(e)
            self.events += self.qmp.get_events()
            self.qmp.clear_events()

    # Serial shell

    def read_serial(self):
        if self.serial_sock:
            try:
                data = self.serial_sock.recv(1 << 20).decode(errors="replace")
            except BlockingIOError:
                data = ""
        else:
            data = self.ok("ringbuf-read", device="serial0", size=1 << 20)
        self.pending += data
        self.log += data
        return data

    def write_serial(self, text):
        """Types `text` into the guest's serial line."""
        if self.serial_sock:
            self.serial_sock.setblocking(True)
            self.serial_sock.sendall(text.encode())
            self.serial_sock.setblocking(False)
        else:
            self.ok("ringbuf-write", device="serial0", data=text)

    def serial_log(self):
        """Everything the guest printed so far."""
        self.read_serial()
        return self.log

    def wait_for(self, text, timeout=120):
        end = time.time() + timeout
        while text not in self.pending:
            if self.proc.poll() is not None:
                raise AssertionError(f"the machine exited {self.proc.returncode}: {self.proc.stderr.read()}")
            if time.time() > end:
                raise AssertionError(f"{text!r} never appeared on the serial line:\n{self.pending[-2000:]}")
            if not self.read_serial():
                time.sleep(0.05)
        i = self.pending.index(text) + len(text)
        before, self.pending = self.pending[:i], self.pending[i:]
        return before

    def sh(self, command, timeout=120):
        """Runs `command` in the guest shell and returns its output (without the echo)."""
        self.counter += 1
        marker = 7000 + self.counter
        self.write_serial(f"{command}; echo END-$(({marker}+0))-END\n")
        out = self.wait_for(f"END-{marker}-END", timeout=timeout)
        out = out[: out.rindex(f"END-{marker}-END")]
        # Drop the echoed command line (and the prompt before it).
        lines = out.replace("\r", "").split("\n")
        return "\n".join(l for l in lines if f"END-$(({marker}+0))-END" not in l)

    def poll_sh(self, command, predicate, timeout=60):
        """Runs `command` until `predicate(output)` holds; returns the output."""
        end = time.time() + timeout
        while True:
            out = self.sh(command)
            if predicate(out):
                return out
            if time.time() > end:
                raise AssertionError(f"{command!r} never gave the expected output; last:\n{out}")
            time.sleep(0.2)

    def wait_qmp(self, name, predicate, timeout=60, **arguments):
        """Runs QMP command `name` until `predicate(return value)` holds; returns the value."""
        end = time.time() + timeout
        while True:
            value = self.ok(name, **arguments)
            if predicate(value):
                return value
            if time.time() > end:
                raise AssertionError(f"{name} never gave the expected answer; last: {value}")
            time.sleep(0.1)

    def fd_count(self):
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def rss_kib(self):
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def close(self):
        try:
            if self.proc.poll() is None:
                try:
                    self.qmp.cmd_raw("quit")
                except Exception:
                    pass
                self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        finally:
            if self.serial_sock:
                self.serial_sock.close()
            try:
                self.qmp.close()
            except Exception:
                pass
