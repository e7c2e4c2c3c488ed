#!/usr/bin/env bash
# Boot time and guest-bench speed of machine-server against qemu-system-riscv64 (see
# bench/boot_and_cpu.py). Builds machine-server in release mode unless MACHINE_SERVER names a
# binary. Usage: bench/boot-and-cpu.sh [--scale N] [--timeout SECONDS]
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${MACHINE_SERVER:-}" ]; then
    SCRATCH=${SCRATCH:-$REPO/.build}
    (cd "$REPO" && swift build -c release --scratch-path "$SCRATCH" --product machine-server >&2)
    MACHINE_SERVER=$(cd "$REPO" && swift build -c release --scratch-path "$SCRATCH" --show-bin-path)/machine-server
fi
export MACHINE_SERVER
export GUEST_DIR=${GUEST_DIR:-$REPO/../shared/guests}
exec python3 "$REPO/bench/boot_and_cpu.py" "$@"
