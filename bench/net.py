#!/usr/bin/env python3
"""Guest network throughput and latency through user-mode NAT (libslirp): machine-server
against qemu-system-riscv64, same guest, same work, one run.

Each emulator boots the shared Linux guest (../shared/guests, or GUEST_DIR) with one virtio-net
NIC on a user netdev (`-netdev user,hostfwd=tcp:127.0.0.1:PORT-:5001` + `virtio-net-device`, or
`virtio-net-pci` with --nic pci) and the guest, scripted on its kernel command line:

  download  busybox wget of SIZE MiB from a host HTTP server at 10.0.2.2 to /dev/null
  upload    busybox wget --post-file of SIZE MiB (from tmpfs) to the same server
  latency   `nc -l -p 5001 -e cat` in the guest; the host sends 1 byte through the hostfwd rule
            and waits for the echo, ROUNDS times on one connection (TCP_NODELAY)

Durations are host wall-clock time between marker lines the guest prints on its serial console
(read as they arrive); latency is measured on the host around each round trip.

Usage: bench/net.py [--size-mib 64] [--rounds 2000] [--nic mmio|pci] [--only ours|qemu]
Environment: MACHINE_SERVER (default: builds a release machine-server with --scratch-path
$SCRATCH or .build), GUEST_DIR, QEMU (default qemu-system-riscv64).
"""
import argparse
import http.server
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUESTS = os.environ.get("GUEST_DIR") or os.path.join(os.path.dirname(REPO), "shared", "guests")
KERNEL = os.path.join(GUESTS, "linux-6.1-rv64-Image")
INITRD = os.path.join(GUESTS, "initramfs-rv64.cpio.gz")
FIRMWARE = "/usr/lib/riscv64-linux-gnu/opensbi/generic/fw_dynamic.bin"
QEMU = os.environ.get("QEMU", "qemu-system-riscv64")
GUEST_TIMEOUT = 300


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Host:
    """The host's HTTP server: GET /big serves SIZE MiB, POST /up swallows the body."""

    def __init__(self, size_mib):
        body = bytes(range(256)) * (4096 * size_mib)

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                view = memoryview(body)
                for i in range(0, len(body), 1 << 20):
                    self.wfile.write(view[i:i + (1 << 20)])

            def do_POST(self):
                n = int(self.headers.get("Content-Length", "0"))
                while n > 0:
                    chunk = self.rfile.read(min(n, 1 << 20))
                    if not chunk:
                        break
                    n -= len(chunk)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def guest_append(http_port, size_mib):
    script = (
        "m(){ read u x</proc/uptime;echo @@ $1 $u;};"
        "udhcpc -i eth0 -n -q -t 10 >/dev/null;m ready;"
        f"m dl-start;wget -q -O /dev/null http://10.0.2.2:{http_port}/big||m failed;m dl-end;"
        f"dd if=/dev/zero of=/tmp/up bs=1M count={size_mib} 2>/dev/null;"
        f"m ul-start;wget -q -O /dev/null --post-file=/tmp/up http://10.0.2.2:{http_port}/up||m failed;m ul-end;"
        "rm /tmp/up;m echo-ready;nc -l -p 5001 -e cat;m done")
    return "console=ttyS0 guest.run=" + script.replace(" ", ",")


def ours_command(server, work, append, fwd, nic):
    d = {
        "version": 2, "machine": "virt", "cpus": 1, "memory": "256M",
        "kernel": KERNEL, "initrd": INITRD, "append": append, "serial": {"backend": "stdio"},
        "netdevs": [{"type": "user", "id": "n0", "hostfwd": [{"str": f"tcp:127.0.0.1:{fwd}-:5001"}]}],
        "devices": [{"driver": "virtio-net-pci" if nic == "pci" else "virtio-net-device", "id": "nic0", "netdev": "n0"}],
    }
    cfg = os.path.join(work, "machine.json")
    with open(cfg, "w") as f:
        json.dump(d, f)
    return [server, "--config", cfg]


def qemu_command(append, fwd, nic):
    return [QEMU, "-M", "virt", "-smp", "1", "-m", "256M", "-nographic", "-bios", FIRMWARE,
            "-kernel", KERNEL, "-initrd", INITRD, "-append", append,
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{fwd}-:5001",
            "-device", ("virtio-net-pci,romfile=" if nic == "pci" else "virtio-net-device") + ",netdev=n0"]  # no option ROM: none is installed, and riscv has no use for it


def ping_pong(port, rounds):
    # slirp accepts at once and only then connects to the guest: until nc listens there, the
    # connection is reset. Retry until one echo comes back.
    deadline = time.monotonic() + 30
    while True:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(b"x")
            if s.recv(1) == b"x":
                break
            s.close()
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the guest's echo server never answered")
        time.sleep(0.2)
    times = []
    with s:
        for i in range(rounds + 50):
            t0 = time.perf_counter()
            s.sendall(b"x")
            if s.recv(1) != b"x":
                raise RuntimeError("the guest's echo did not answer")
            if i >= 50:                     # the first rounds warm the path up
                times.append(time.perf_counter() - t0)
    return times


def run_guest(cmd, fwd, rounds):
    marks, lines, rtts = {}, [], []
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + GUEST_TIMEOUT
    try:
        for raw in proc.stdout:
            now = time.monotonic()
            line = raw.decode(errors="replace").rstrip("\r\n")
            lines.append(line)
            m = re.match(r"@@ (\S+) (\S+)$", line)
            if m:
                marks[m.group(1)] = (now, float(m.group(2)))
                if m.group(1) == "failed":
                    raise RuntimeError("a transfer failed:\n" + "\n".join(lines[-20:]))
                if m.group(1) == "echo-ready":
                    rtts = ping_pong(fwd, rounds)
            if now > deadline:
                raise TimeoutError("the guest ran past %d s:\n%s" % (GUEST_TIMEOUT, "\n".join(lines[-20:])))
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()  # our own child, by its PID
            proc.wait()
    if "done" not in marks:
        raise RuntimeError("the benchmark did not finish:\n" + "\n".join(lines[-30:]))
    return marks, rtts


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=64, help="MiB moved each way")
    ap.add_argument("--rounds", type=int, default=2000, help="1-byte request/response round trips")
    ap.add_argument("--nic", choices=["mmio", "pci"], default="mmio")
    ap.add_argument("--only", choices=["ours", "qemu"], help="run one emulator only")
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

    host = Host(args.size_mib)
    append = guest_append(host.port, args.size_mib)
    work = tempfile.mkdtemp(prefix="net-bench-")
    print(f"# bench/net.py --size-mib {args.size_mib} --rounds {args.rounds} --nic {args.nic}")
    print(f"# machine-server: {server}; qemu: {subprocess.run([QEMU, '--version'], capture_output=True, text=True).stdout.splitlines()[0] if 'qemu' in emulators else '-'}")
    print(f"# load average before: {open('/proc/loadavg').read().split()[:3]}, {os.cpu_count()} host CPUs")
    results = {}
    for emu in emulators:
        fwd = free_port()
        cmd = ours_command(server, work, append, fwd, args.nic) if emu == "ours" else qemu_command(append, fwd, args.nic)
        t0 = time.monotonic()
        marks, rtts = run_guest(cmd, fwd, args.rounds)
        mb = args.size_mib * 1.048576
        results[emu] = {
            "download": mb / (marks["dl-end"][0] - marks["dl-start"][0]),
            "upload": mb / (marks["ul-end"][0] - marks["ul-start"][0]),
            "rtt-median": statistics.median(rtts) * 1e6,
            "rtt-p99": sorted(rtts)[int(len(rtts) * 0.99) - 1] * 1e6,
        }
        print(f"# {emu}: boot to DHCP lease {marks['ready'][0] - t0:.1f} s, whole run {time.monotonic() - t0:.1f} s", flush=True)
    shutil.rmtree(work)

    print()
    print(f"{'measure':22} " + " ".join(f"{e:>10}" for e in emulators) + ("   ours/QEMU" if len(emulators) == 2 else ""))
    for key, label, better_high in [("download", "download MB/s", True), ("upload", "upload MB/s", True),
                                    ("rtt-median", "TCP RTT median (us)", False), ("rtt-p99", "TCP RTT p99 (us)", False)]:
        row = " ".join(f"{results[e][key]:10.1f}" for e in emulators)
        ratio = ""
        if len(emulators) == 2:
            r = results["ours"][key] / results["qemu"][key]
            ratio = f"   {r:9.2f}" + ("" if better_high else " (lower is better)")
        print(f"{label:22} {row}{ratio}")
    print(f"# MB = 10^6 bytes; load average after: {open('/proc/loadavg').read().split()[:3]}")


if __name__ == "__main__":
    main()
