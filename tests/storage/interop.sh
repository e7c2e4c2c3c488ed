#!/bin/sh
# Interop between machine-img / the Storage module and Debian's qemu-img.
# Usage: tests/storage/interop.sh [path/to/machine-img]   (exit 0 = all passed; skips if qemu-img is absent)
set -eu
M=${1:-$(dirname "$0")/../../.build/debug/machine-img}
command -v qemu-img >/dev/null || { echo "SKIP: qemu-img not installed"; exit 0; }
[ -x "$M" ] || { echo "machine-img not found at $M (build it first)"; exit 1; }
T=$(mktemp -d); trap 'rm -rf "$T"' EXIT
cd "$T"
fails=0
ok()   { echo "ok   $1"; }
bad()  { echo "FAIL $1"; fails=$((fails + 1)); }
check() { if "$@" >/dev/null 2>&1; then ok "$*"; else bad "$*"; fi; }

head -c 3000000 /dev/urandom > rnd
qemu-img create -q -f raw base.raw 64M
dd if=rnd of=base.raw conv=notrunc bs=1M seek=3 status=none

# qemu-img made images, read by us: byte-for-byte equal.
qemu-img convert -O qcow2 base.raw base.qcow2
qemu-img convert -c -O qcow2 base.raw comp.qcow2
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 ov.qcow2
qemu-io -c "write -P 0x55 1M 100k" -c "write -z 3M 64k" ov.qcow2 >/dev/null
qemu-img create -q -f qcow2 -o compat=0.10 -b ov.qcow2 -F qcow2 v2.qcow2
qemu-img convert -O raw ov.qcow2 ov.ref.raw
for img in base.qcow2 comp.qcow2 ov.qcow2 v2.qcow2; do
    "$M" convert -O raw "$img" "$img.ours.raw"
    ref=base.raw; case $img in ov.qcow2|v2.qcow2) ref=ov.ref.raw;; esac
    check cmp "$ref" "$img.ours.raw"
done

# Images we write: qemu-img check clean, compare equal.
"$M" convert -O qcow2 ov.qcow2 ours.qcow2
"$M" convert -c -O qcow2 base.raw ourscomp.qcow2
"$M" create -q -f qcow2 -b base.qcow2 -F qcow2 ourov.qcow2
"$M" resize ours.qcow2 +64M >/dev/null
for img in ours.qcow2 ourscomp.qcow2 ourov.qcow2; do check qemu-img check "$img"; done
check qemu-img compare base.raw ourscomp.qcow2
check qemu-img compare base.raw ourov.qcow2
[ "$(qemu-img info --output=json ours.qcow2 | grep virtual-size)" = '    "virtual-size": 134217728,' ] && ok "resize +64M" || bad "resize +64M"

# Our check agrees with qemu-img on a leaky image (exit code 3).
qemu-img create -q -f qcow2 leak.qcow2 1M
printf '\0\2' | dd of=leak.qcow2 bs=1 seek=$((2 * 65536 + 2 * 3)) conv=notrunc status=none   # refcount of the L1 cluster = 2
set +e; qemu-img check leak.qcow2 >/dev/null 2>&1; q=$?; "$M" check leak.qcow2 >/dev/null 2>&1; m=$?; set -e
[ "$q" = "$m" ] && [ "$m" = 3 ] && ok "check leak exit code $m" || bad "check leak exit code ours=$m qemu=$q"

# Lock: a second writer is refused while qemu-io holds the image.
qemu-img create -q -f qcow2 locked.qcow2 1M
( qemu-io -c "sleep 2000" locked.qcow2 >/dev/null 2>&1 & )
sleep 0.5
if "$M" resize locked.qcow2 +1M >/dev/null 2>&1; then bad "second writer refused"; else ok "second writer refused"; fi
sleep 2

# Snapshots made by qemu-img are listed.
qemu-img snapshot -c snap1 base.qcow2
"$M" snapshot -l base.qcow2 | grep -q snap1 && ok "snapshot -l" || bad "snapshot -l"

[ $fails = 0 ] && echo "all interop tests passed" || { echo "$fails failed"; exit 1; }
