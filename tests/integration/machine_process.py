"""One machine-server process for the whole-guest tests that drive it over QMP: its serial
console in a file and a QMP unix socket, added to the description the test gives. Shared by
test_snapshot.py, test_migration.py and test_net.py (not collected: no test_ prefix).

Environment: MACHINE_SERVER, the executable.
"""
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

SERVER = os.environ.get("MACHINE_SERVER")


class MachineProcess:
    """machine-server started on `desc` (a description without "serial" and "qmp", which
    this adds) with extra command-line arguments `extra`."""

    def __init__(self, tmp: Path, name: str, desc: dict, extra=()):
        self.tmp = tmp
        self.serial = tmp / f"{name}.serial.log"
        self.sock = tmp / f"{name}.qmp"
        desc = {**desc, "serial": {"backend": "file", "path": str(self.serial)},
                "qmp": [{"backend": "unix", "path": str(self.sock)}]}
        self.desc_path = tmp / f"{name}.json"
        self.desc_path.write_text(json.dumps(desc))
        self.log = tmp / f"{name}.log"
        self.proc = subprocess.Popen([SERVER, "--config", str(self.desc_path), *extra], stdin=subprocess.DEVNULL,
                                     stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)
        self.qmp = None

    def connect(self, timeout=30):
        deadline = time.monotonic() + timeout
        while not self.sock.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"machine-server exited with {self.proc.returncode}: {self.log.read_text()}")
            assert time.monotonic() < deadline, "QMP socket did not appear"
            time.sleep(0.05)
        self.qmp = QEMUMonitorProtocol(str(self.sock))
        self.qmp.connect()
        return self

    def raw(self, command, /, **args):
        return self.qmp.cmd_raw(command, args or None)

    def cmd(self, command, /, **args):
        r = self.raw(command, **args)
        assert "return" in r, f"{command}: {r}"
        return r["return"]

    def text(self) -> str:
        try:
            return self.serial.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def expect(self, pattern, timeout, start=0):
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.text(), start)
            if m:
                return m
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited ({self.proc.returncode}) before {pattern!r}:\n"
                                     f"{self.text()[-2000:]}\n{self.log.read_text()[-2000:]}")
            assert time.monotonic() < deadline, f"{pattern!r} did not appear in {timeout} s:\n{self.text()[-2000:]}"
            time.sleep(0.05)

    def close(self):
        if self.qmp:
            try:
                self.qmp.close()
            except Exception:
                pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def servers():
    """A list the test appends its servers to; each is closed when the test ends."""
    started = []
    yield started
    for s in started:
        s.close()
