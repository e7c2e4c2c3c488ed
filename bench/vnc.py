#!/usr/bin/env python3
"""VNC update bandwidth and key-to-screen latency of machine-server against QEMU's VNC server.

For each emulator in turn (QEMU first, then machine-server; never both at once) the shared guest
boots with a virtio-gpu framebuffer console (console=tty0 console=ttyS0, the blinking cursor off so
an idle screen sends nothing), a virtio keyboard and tablet, and the VNC server on 127.0.0.1. A
minimal RFB 3.8 client in this file (raw sockets, no VNC library) then:

1. latency: with an incremental FramebufferUpdateRequest outstanding, sends one KeyEvent (an 'x',
   then a BackSpace, alternately) to the shell on tty1 and times the wait until the first
   FramebufferUpdate whose pixels differ from the client's copy of the screen (raw encoding,
   every pixel compared). Keys are KEY_GAP seconds apart with jitter; updates arriving between
   keys that change pixels are counted as "idle updates" (should be 0).
2. bandwidth: types `while true; do dmesg; echo -n . >/dev/ttyS0; done` into the tty1 shell, so
   the framebuffer console scrolls dmesg without pause and each loop prints one '.' on the
   serial console, then for each encoding (raw, zlib, ZRLE; a new connection each) keeps exactly
   one incremental request outstanding, as ordinary viewers do, for SECONDS and counts bytes
   received, FramebufferUpdate messages and rectangles. The '.' count is the guest's own
   progress (dmesg runs drawn), which depends on the emulator's CPU speed and on what the VNC
   server takes from it; a first window with no viewer connected gives the guest's own pace.
   Scrolling moves every text pixel, so bytes per loop depend on how many scroll steps each
   update coalesces: a server that updates more often per scrolled line sends more per loop.

Prints both emulators' figures, the ratios ours/QEMU and the load average (the machine is shared).

Usage: python3 bench/vnc.py [--seconds 20] [--keys 20] [--only ours|qemu] [--encodings raw,zlib,zrle]
Environment: MACHINE_SERVER (the binary to measure), GUEST_DIR (the shared guest).
"""
import argparse
import os
import random
import re
import select
import socket
import statistics
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "boot"))
from guest_console import (INITRD, KERNEL, OPENSBI, SERVER, Console,  # noqa: E402
                           description, start_server)

APPEND = "console=tty0 console=ttyS0 vt.global_cursor_default=0"
PROMPT = "guest:/# "
LOOP = "while true; do dmesg; echo -n . >/dev/ttyS0; done"
KEY_GAP = 0.3  # seconds between latency keystrokes (plus up to 0.1 s jitter)
ENCODINGS = {"raw": 0, "zlib": 6, "zrle": 16}
DESKTOP_SIZE = -223  # pseudo-encoding: the server may change the framebuffer size

# X11 keysyms for the few non-printing keys used here; printable ASCII is its own keysym.
XK_RETURN, XK_BACKSPACE, XK_SHIFT_L = 0xFF0D, 0xFF08, 0xFFE1
US_SHIFTED = set('~!@#$%^&*()_+{}|:"<>?') | set("ABCDEFGHIJKLMNOPQRSTUVWXYZ")


class RFBError(Exception):
    """The server broke the protocol or closed the connection; the message says where."""


class RFBClient:
    """A minimal RFB 3.8 viewer: security None, 32-bit little-endian true colour (B, G, R, X in
    memory), one incremental update request at a time. Counts every byte received.

    Decodes raw rectangles into `fb` (and reports whether any pixel changed); zlib and ZRLE
    rectangles are length-prefixed and only skipped (bandwidth runs need their size, not their
    pixels)."""

    def __init__(self, port: int, encodings: list[int], timeout: float = 30):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.received = 0
        version = self.read(12)
        if not version.startswith(b"RFB 003."):
            raise RFBError(f"not an RFB server: greeting {version!r}")
        self.sock.sendall(b"RFB 003.008\n")
        count = self.read(1)[0]
        if count == 0:
            (length,) = struct.unpack(">I", self.read(4))
            raise RFBError(f"server refused the connection: {self.read(length).decode(errors='replace')}")
        types = self.read(count)
        if 1 not in types:
            raise RFBError(f"server wants authentication (security types {list(types)}); run it without a password")
        self.sock.sendall(b"\x01")
        (result,) = struct.unpack(">I", self.read(4))
        if result != 0:
            raise RFBError(f"security handshake failed (result {result})")
        self.sock.sendall(b"\x01")  # ClientInit: shared
        self.width, self.height = struct.unpack(">HH", self.read(4))
        self.read(16)  # the server's pixel format; we set our own below
        (name_length,) = struct.unpack(">I", self.read(4))
        self.name = self.read(name_length).decode(errors="replace")
        # SetPixelFormat: 32 bpp, depth 24, little endian, true colour, 8 bits each, R<<16 G<<8 B.
        self.sock.sendall(struct.pack(">B3xBBBBHHHBBB3x", 0, 32, 24, 0, 1, 255, 255, 255, 16, 8, 0))
        self.sock.sendall(struct.pack(">BxH", 2, len(encodings)) + b"".join(struct.pack(">i", e) for e in encodings))
        self.fb = bytearray(self.width * self.height * 4)
        self.zlib_stream = zlib.decompressobj()

    def read(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = self.sock.recv(max(1 << 20, n - len(self.buf)))
            if not data:
                raise RFBError("the server closed the connection")
            self.received += len(data)
            self.buf += data
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def request(self, incremental: bool = True):
        self.sock.sendall(struct.pack(">BBHHHH", 3, int(incremental), 0, 0, self.width, self.height))

    def key(self, keysym: int, down: bool):
        self.sock.sendall(struct.pack(">BBxxI", 4, int(down), keysym))

    def press(self, keysym: int):
        self.key(keysym, True)
        self.key(keysym, False)

    def type(self, text: str, pause: float = 0.02):
        """Types ASCII text as a US-keyboard viewer would: Shift held around shifted symbols."""
        for ch in text:
            shifted = ch in US_SHIFTED
            if shifted:
                self.key(XK_SHIFT_L, True)
            self.press(ord(ch))
            if shifted:
                self.key(XK_SHIFT_L, False)
            time.sleep(pause)

    def pending(self, timeout: float) -> bool:
        """True when a server message has (begun to) arrive within `timeout` seconds."""
        if self.buf:
            return True
        r, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        return bool(r)

    def message(self, compare: bool = True):
        """Reads one server message. Returns (kind, rectangles, changed) where kind is
        'update' or 'other' and changed says whether a raw rectangle altered `fb` (always False
        when compare is off or for encodings this client does not decode)."""
        kind = self.read(1)[0]
        if kind == 0:
            (count,) = struct.unpack(">xH", self.read(3))
            changed = False
            for _ in range(count):
                x, y, w, h, enc = struct.unpack(">HHHHi", self.read(12))
                if enc == 0:
                    data = self.read(w * h * 4)
                    if compare:
                        changed |= self._blit(x, y, w, h, data)
                elif enc == 6 or enc == 16:  # zlib, ZRLE: u32 length + compressed bytes
                    (length,) = struct.unpack(">I", self.read(4))
                    self.read(length)
                elif enc == DESKTOP_SIZE:
                    self.width, self.height = w, h
                    self.fb = bytearray(w * h * 4)
                    changed = True
                else:
                    raise RFBError(f"server sent encoding {enc}, which was not asked for")
            return "update", count, changed
        if kind == 1:  # SetColourMapEntries (not used in true colour, but legal)
            _, _, n = struct.unpack(">xHH", self.read(5))
            self.read(6 * n)
        elif kind == 2:  # Bell
            pass
        elif kind == 3:  # ServerCutText
            (length,) = struct.unpack(">3xI", self.read(7))
            self.read(length)
        else:
            raise RFBError(f"unknown server message type {kind}")
        return "other", 0, False

    def _blit(self, x, y, w, h, data) -> bool:
        if x + w > self.width or y + h > self.height:
            raise RFBError(f"rectangle {w}x{h}+{x}+{y} outside the {self.width}x{self.height} screen")
        changed = False
        row = w * 4
        for r in range(h):
            at = ((y + r) * self.width + x) * 4
            src = data[r * row:(r + 1) * row]
            if self.fb[at:at + row] != src:
                self.fb[at:at + row] = src
                changed = True
        return changed

    def full_screen(self, timeout: float = 30):
        """Requests and reads a complete (non-incremental) frame."""
        self.request(incremental=False)
        deadline = time.monotonic() + timeout
        while True:
            if not self.pending(deadline - time.monotonic()):
                raise RFBError(f"no full frame within {timeout:g} s")
            kind, _, _ = self.message()
            if kind == "update":
                return

    def close(self):
        self.sock.close()


def wait_for_screen_text(client: RFBClient, quiet: float, limit: float):
    """Keeps one incremental request outstanding until no changed pixels arrived for `quiet`
    seconds (or `limit` passed); the request stays outstanding on return."""
    client.request()
    deadline = time.monotonic() + limit
    last_change = time.monotonic()
    while time.monotonic() - last_change < quiet and time.monotonic() < deadline:
        if client.pending(0.05):
            kind, _, changed = client.message()
            if kind == "update":
                if changed:
                    last_change = time.monotonic()
                client.request()


def measure_latency(client: RFBClient, keys: int) -> tuple[list[float], int]:
    """Key-to-changed-pixels latency for `keys` keystrokes, and the number of pixel-changing
    updates that arrived while no key was pending. An incremental request is outstanding on entry."""
    latencies, idle_updates = [], 0
    for i in range(keys):
        gap_end = time.perf_counter() + KEY_GAP + random.uniform(0, 0.1)
        while time.perf_counter() < gap_end:
            if client.pending(gap_end - time.perf_counter()):
                kind, _, changed = client.message()
                if kind == "update":
                    idle_updates += changed
                    client.request()
        keysym = ord("x") if i % 2 == 0 else XK_BACKSPACE
        t0 = time.perf_counter()
        client.press(keysym)
        while True:
            if not client.pending(10):
                raise RFBError(f"keystroke {i + 1}: no screen change within 10 s")
            kind, _, changed = client.message()
            if kind != "update":
                continue
            client.request()
            if changed:
                latencies.append(time.perf_counter() - t0)
                break
    return latencies, idle_updates


def measure_bandwidth(port: int, encoding: str, seconds: float, console: Console) -> dict:
    """Bytes, updates and rectangles received over `seconds` with one request outstanding, and the
    guest's dmesg loops ('.' on the serial console) over the same time."""
    client = RFBClient(port, [ENCODINGS[encoding], DESKTOP_SIZE])
    try:
        client.full_screen()
        client.request()
        start_bytes, updates, rects = client.received, 0, 0
        dots0 = console.text().count(".", console.pos)
        t0 = time.perf_counter()
        end = t0 + seconds
        while True:
            now = time.perf_counter()
            if now >= end:
                break
            if client.pending(end - now):
                kind, n, _ = client.message(compare=False)
                if kind == "update":
                    updates += 1
                    rects += n
                    client.request()
        elapsed = time.perf_counter() - t0
        loops = console.text().count(".", console.pos) - dots0
        return {"bytes": client.received - start_bytes, "updates": updates, "rects": rects,
                "loops": loops, "seconds": elapsed}
    finally:
        client.close()


def free_vnc_port() -> int:
    """A free TCP port 5910..5999 on 127.0.0.1 (QEMU's -vnc takes a display number = port - 5900)."""
    for port in random.sample(range(5910, 6000), 90):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise SystemExit("no free port in 5910..5999")


def start_qemu(tmp: Path, port: int) -> Console:
    argv = ["qemu-system-riscv64", "-M", "virt", "-m", "256M", "-smp", "1", "-bios", str(OPENSBI),
            "-kernel", str(KERNEL), "-initrd", str(INITRD), "-append", APPEND,
            "-global", "virtio-mmio.force-legacy=false", "-device", "virtio-gpu-device",
            "-device", "virtio-keyboard-device",
            "-device", "virtio-tablet-device", "-display", "none", "-vnc", f"127.0.0.1:{port - 5900}",
            "-serial", "stdio", "-monitor", "none"]
    return Console(argv, tmp / "qemu.serial.log", "qemu-system-riscv64")


def run_one(name: str, console: Console, port: int, args) -> dict:
    load = [os.getloadavg()[0]]
    try:
        t_start = time.monotonic()
        console.expect(re.escape(PROMPT), args.timeout, why="serial shell prompt")
        t_boot = time.monotonic() - t_start
        client = RFBClient(port, [ENCODINGS["raw"], DESKTOP_SIZE])
        try:
            client.full_screen()
            wait_for_screen_text(client, quiet=2.0, limit=30)  # the tty1 prompt is drawn
            latencies, idle = measure_latency(client, args.keys)
            load.append(os.getloadavg()[0])
            client.type(LOOP)
            client.press(XK_RETURN)
            # Wait until the loop runs: dots on the serial console.
            console.expect(r"\.\.\.", 60, why="the dmesg loop on tty1 printing dots on ttyS0")
        finally:
            client.close()
        # The guest's pace with nobody watching: what the VNC server costs the vCPU shows
        # as fewer loops per second in the runs below.
        dots0 = console.text().count(".", console.pos)
        t0 = time.perf_counter()
        time.sleep(args.seconds)
        bandwidth = {"none": {"bytes": 0, "updates": 0, "rects": 0, "seconds": time.perf_counter() - t0,
                              "loops": console.text().count(".", console.pos) - dots0}}
        load.append(os.getloadavg()[0])
        for enc in args.encodings:
            bandwidth[enc] = measure_bandwidth(port, enc, args.seconds, console)
            load.append(os.getloadavg()[0])
        status = console.proc.poll()
        if status is not None:
            raise AssertionError(f"{name} exited ({status}) during the measurement\n{console.tail()}")
        return {"boot": t_boot, "latency": latencies, "idle": idle, "bandwidth": bandwidth, "load": load}
    finally:
        console.close()


def summary(result: dict) -> dict:
    lat = sorted(result["latency"])
    return {"p50": statistics.median(lat), "p90": lat[min(len(lat) - 1, round(0.9 * (len(lat) - 1)))],
            "max": lat[-1], "mean": statistics.fmean(lat)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=20, help="bandwidth time per encoding (default 20)")
    ap.add_argument("--keys", type=int, default=20, help="keystrokes for the latency figure (default 20)")
    ap.add_argument("--only", choices=["ours", "qemu"], help="measure one emulator only")
    ap.add_argument("--encodings", default="raw,zlib,zrle", help="comma-separated: raw, zlib, zrle")
    ap.add_argument("--timeout", type=float, default=120, help="seconds allowed for one boot (default 120)")
    args = ap.parse_args()
    args.encodings = [e for e in args.encodings.split(",") if e]
    unknown = [e for e in args.encodings if e not in ENCODINGS]
    if unknown:
        sys.exit(f"--encodings: unknown {', '.join(unknown)} (known: {', '.join(ENCODINGS)})")
    if args.only != "qemu" and not SERVER:
        sys.exit("MACHINE_SERVER is not set (path of the machine-server binary)")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # One at a time: never two guests at once.
        if args.only != "ours":
            port = free_vnc_port()
            results["qemu"] = run_one("qemu-system-riscv64", start_qemu(tmp, port), port, args)
        if args.only != "qemu":
            port = free_vnc_port()
            desc = description(append=APPEND, display={"vnc": {"listen": f"127.0.0.1:{port}"}})
            results["ours"] = run_one("machine-server", start_server(tmp, desc), port, args)

    labels = {"ours": "machine-server", "qemu": "qemu-system"}
    names = [n for n in ("ours", "qemu") if n in results]
    print(f"key -> changed pixels latency ({args.keys} keys, {KEY_GAP:g}-{KEY_GAP + 0.1:g} s apart, raw encoding)")
    print(f"{'':16} {'p50 ms':>8} {'p90 ms':>8} {'max ms':>8} {'mean ms':>8} {'idle upd':>9} {'boot s':>7}")
    for n in names:
        s = summary(results[n])
        print(f"{labels[n]:16} {s['p50'] * 1e3:8.1f} {s['p90'] * 1e3:8.1f} {s['max'] * 1e3:8.1f} "
              f"{s['mean'] * 1e3:8.1f} {results[n]['idle']:9d} {results[n]['boot']:7.1f}")
    if len(names) == 2:
        a, b = summary(results["ours"]), summary(results["qemu"])
        print(f"{'ratio ours/qemu':16} {a['p50'] / b['p50']:8.2f} {a['p90'] / b['p90']:8.2f} "
              f"{a['max'] / b['max']:8.2f} {a['mean'] / b['mean']:8.2f}")
    print()
    print(f"scrolling dmesg on tty1, {args.seconds:g} s per encoding, one request outstanding")
    print("(encoding 'none': no viewer connected; loops = dmesg runs the guest finished in the window)")
    print(f"{'':16} {'encoding':>8} {'MB/s':>8} {'upd/s':>7} {'KB/upd':>7} {'rects/s':>8} {'loops/s':>7} {'MB/loop':>8}")
    for enc in ["none"] + args.encodings:
        rows = {}
        for n in names:
            b = results[n]["bandwidth"][enc]
            # Fewer than 2 loops in the window: too coarse to divide by.
            rows[n] = (b["bytes"] / b["seconds"] / 1e6, b["updates"] / b["seconds"],
                       b["bytes"] / 1e3 / b["updates"] if b["updates"] else float("nan"),
                       b["rects"] / b["seconds"], b["loops"] / b["seconds"],
                       b["bytes"] / 1e6 / b["loops"] if b["loops"] >= 2 else float("nan"))
            print(f"{labels[n]:16} {enc:>8} {rows[n][0]:8.2f} {rows[n][1]:7.1f} {rows[n][2]:7.0f} {rows[n][3]:8.1f} "
                  f"{rows[n][4]:7.2f} {rows[n][5]:8.2f}")
        if len(names) == 2:
            r = [a / b if b else float("nan") for a, b in zip(rows["ours"], rows["qemu"])]
            print(f"{'ratio ours/qemu':16} {enc:>8} {r[0]:8.2f} {r[1]:7.2f} {r[2]:7.2f} {r[3]:8.2f} {r[4]:7.2f} {r[5]:8.2f}")
    for n in names:
        print(f"load average (1 min) during {labels[n]}: "
              + " ".join(f"{x:.2f}" for x in results[n]["load"]) + f"  ({os.cpu_count()} cpus)")


if __name__ == "__main__":
    main()
