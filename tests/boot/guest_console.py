"""Runs machine-server (or QEMU) with the serial console on a pseudo-terminal and waits for
text on it, failing with the tail of the serial log when the text does not come in time.

Environment:
  MACHINE_SERVER  path of the built machine-server executable (tests skip without it)
  GUEST_DIR       the shared guest directory (default: ../shared/guests beside the repo)
  BOOT_TIMEOUT    seconds allowed for one boot to "guest: boot ok" (default 120)
"""
import json
import os
import pty
import re
import select
import signal
import subprocess
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GUEST_DIR = Path(os.environ.get("GUEST_DIR", REPO.parent / "shared" / "guests"))
SERVER = os.environ.get("MACHINE_SERVER")
KERNEL = GUEST_DIR / "linux-6.1-rv64-Image"
INITRD = GUEST_DIR / "initramfs-rv64.cpio.gz"
OPENSBI = Path("/usr/lib/riscv64-linux-gnu/opensbi/generic/fw_dynamic.bin")
UBOOT = Path("/usr/lib/u-boot/qemu-riscv64_smode/u-boot.bin")
BOOT_TIMEOUT = float(os.environ.get("BOOT_TIMEOUT", "120"))
BOOT_OK = "guest: boot ok"


def description(**members):
    """A machine description for the shared guest; keyword arguments replace members."""
    d = {
        "version": 2,
        "machine": "virt",
        "name": "boot-test",
        "cpus": 1,
        "memory": "256M",
        "kernel": str(KERNEL),
        "initrd": str(INITRD),
        "append": "console=ttyS0",
        "serial": {"backend": "stdio"},
    }
    d.update(members)
    return {k: v for k, v in d.items() if v is not None}


class Console:
    """A process whose standard input and output are a pseudo-terminal, read by a thread.

    `expect` waits for a regular expression in the output after a position (by default the
    end of the previous match) and raises AssertionError with the last lines of output when
    the process ends or the time runs out first.
    """

    def __init__(self, argv, log_path: Path, what: str):
        self.what = what
        self.log_path = log_path
        master, slave = pty.openpty()
        self.stderr_path = log_path.with_suffix(".stderr")
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=self._stderr,
                                     start_new_session=True)
        os.close(slave)
        self.master = master
        self.started = time.monotonic()
        self._buf = bytearray()
        self._lock = threading.Lock()
        self._eof = False
        self._log = open(log_path, "wb")
        self.pos = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        while True:
            try:
                r, _, _ = select.select([self.master], [], [], 0.2)
                if not r:
                    if self.proc.poll() is not None:
                        # Drain what is left, then stop.
                        r, _, _ = select.select([self.master], [], [], 0.2)
                        if not r:
                            break
                    continue
                data = os.read(self.master, 65536)
            except OSError:  # EIO: the slave side is closed (process gone)
                break
            if not data:
                break
            with self._lock:
                self._buf += data
            self._log.write(data)
            self._log.flush()
        self._eof = True

    def text(self) -> str:
        with self._lock:
            return self._buf.decode("utf-8", errors="replace")

    def tail(self, lines: int = 30) -> str:
        out = re.sub(r"\r*\n", "\n", self.text()).replace("\r", "\n")
        last = "\n".join(out.rstrip("\n").split("\n")[-lines:])
        err = ""
        try:
            err = self.stderr_path.read_text(errors="replace").strip()
        except OSError:
            pass
        msg = f"--- last {lines} lines of the {self.what} serial console (full log: {self.log_path}) ---\n{last}"
        if err:
            msg += "\n--- stderr ---\n" + "\n".join(err.split("\n")[-15:])
        return msg

    def expect(self, pattern: str, timeout: float, after: int | None = None, why: str = ""):
        """Waits for `pattern` (a regular expression) in the output from `after` (default: the
        end of the last match); returns the match and moves the position past it."""
        start = self.pos if after is None else after
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            m = rx.search(text, start)
            if m:
                self.pos = m.end()
                return m
            elapsed = time.monotonic() - self.started
            if self._eof and self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.what} exited with status {self.proc.returncode} after {elapsed:.0f} s "
                    f"before {pattern!r} appeared{' (' + why + ')' if why else ''}\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.what}: {pattern!r} did not appear within {timeout:g} s "
                    f"({elapsed:.0f} s since start){' (' + why + ')' if why else ''}; "
                    f"the guest looks stalled\n{self.tail()}")
            time.sleep(0.05)

    def send(self, text: str):
        """Types `text` on the console, a byte at a time with a short pause, as a person
        would (the UART has a small receive FIFO)."""
        for b in text.encode():
            os.write(self.master, bytes([b]))
            time.sleep(0.01)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.what} did not exit within {timeout:.0f} s\n{self.tail()}")

    def close(self):
        """Kills the process if it is still running (only this process: it is in its own
        session, and we signal its PID) and releases the terminal."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=2)
        try:
            os.close(self.master)
        except OSError:
            pass
        self._log.close()
        self._stderr.close()


def start_server(tmp_path: Path, desc: dict, name: str = "machine-server", extra=()) -> Console:
    """Writes `desc` to tmp_path/NAME.json and starts machine-server on a pseudo-terminal."""
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(desc, indent=2))
    return Console([SERVER, "--config", str(path), *extra], tmp_path / f"{name}.serial.log", "machine-server")


def start_qemu(tmp_path: Path, append: str) -> Console:
    """Starts qemu-system-riscv64 on the same guest, firmware and memory size."""
    argv = ["qemu-system-riscv64", "-M", "virt", "-m", "256M", "-nographic", "-bios", str(OPENSBI),
            "-kernel", str(KERNEL), "-initrd", str(INITRD), "-append", append]
    return Console(argv, tmp_path / "qemu.serial.log", "qemu-system-riscv64")
