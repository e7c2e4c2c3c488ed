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

# Internal snapshots we create, apply and delete, exchanged with qemu-img (data checked by qemu-io).
qemu-img create -q -f qcow2 sn.qcow2 16M
qemu-io -c "write -P 0x11 0 1M" sn.qcow2 >/dev/null
check "$M" snapshot -c one sn.qcow2
qemu-io -c "write -P 0x22 512k 1M" sn.qcow2 >/dev/null
check qemu-img check sn.qcow2
[ "$(qemu-img snapshot -l sn.qcow2)" = "$("$M" snapshot -l sn.qcow2)" ] && ok "snapshot -l same as qemu-img" || bad "snapshot -l same as qemu-img"
qemu-img snapshot -c two sn.qcow2
check "$M" snapshot -a one sn.qcow2
check qemu-io -c "read -P 0x11 0 1M" -c "read -P 0 1M 1M" sn.qcow2
check qemu-img check sn.qcow2
check "$M" snapshot -a two sn.qcow2
check qemu-io -c "read -P 0x11 0 512k" -c "read -P 0x22 512k 1M" sn.qcow2
check "$M" snapshot -d two sn.qcow2
check qemu-img check sn.qcow2
qemu-io -c "write -P 0x33 0 64k" sn.qcow2 >/dev/null
check qemu-img snapshot -a one sn.qcow2
check qemu-io -c "read -P 0x11 0 1M" sn.qcow2
check qemu-img snapshot -d one sn.qcow2
check qemu-img check sn.qcow2
[ -z "$(qemu-img snapshot -l sn.qcow2)" ] && ok "all snapshots deleted" || bad "all snapshots deleted"
check "$M" check sn.qcow2

# Failures: same messages (but the program name) and exit codes as qemu-img.
for args in "-a nope" "-d nope" "-c x -d y"; do
    set +e
    # shellcheck disable=SC2086
    q=$(qemu-img snapshot $args sn.qcow2 2>&1 | sed 's/qemu-img/P/g')
    # shellcheck disable=SC2086
    m=$("$M" snapshot $args sn.qcow2 2>&1 | sed 's/machine-img/P/g')
    # shellcheck disable=SC2086
    qemu-img snapshot $args sn.qcow2 >/dev/null 2>&1; qrc=$?
    # shellcheck disable=SC2086
    "$M" snapshot $args sn.qcow2 >/dev/null 2>&1; mrc=$?
    set -e
    [ "$q" = "$m" ] && [ "$qrc" = "$mrc" ] && ok "snapshot $args fails as qemu-img ($mrc)" || bad "snapshot $args: ours=$mrc '$m' qemu=$qrc '$q'"
done

# QEMU's savevm/loadvm: its VM state survives our table rewrites, and our snapshot of it loads.
QS=$(command -v qemu-system-riscv64 || true)
if [ -n "$QS" ]; then
    qemu_vm() { "$QS" -machine virt -bios none -nodefaults -display none -S -m 64 -monitor stdio \
        -drive file=vm.qcow2,if=none,id=d0,format=qcow2 "$@"; }
    qemu-img create -q -f qcow2 vm.qcow2 64M
    printf 'savevm s1\nquit\n' | qemu_vm >/dev/null 2>&1
    "$M" snapshot -c disk vm.qcow2
    "$M" snapshot -d disk vm.qcow2
    check qemu-img check vm.qcow2
    printf 'info status\nquit\n' | qemu_vm -loadvm s1 2>&1 | grep -q "VM status: paused" && ok "QEMU loadvm after our table rewrites" || bad "QEMU loadvm after our table rewrites"
    check "$M" snapshot -a s1 vm.qcow2
    check qemu-img check vm.qcow2
else
    echo "skip QEMU savevm/loadvm (no qemu-system-riscv64)"
fi

[ $fails = 0 ] && echo "all interop tests passed" || { echo "$fails failed"; exit 1; }
