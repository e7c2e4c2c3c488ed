#!/bin/sh
# Crash consistency of machine-img snapshot -c/-a/-d. strace kills machine-img (SIGKILL) on entry
# to each of its pwrite64 and fsync calls in turn, so every point between two of its writes is
# tried. After every kill, qemu-img check must find the image clean (not even a leak), and the
# disk plus every snapshot must read exactly as before the operation or exactly as after it;
# both outcomes must occur.
# Usage: tests/storage/snapshot-kill.sh [/absolute/path/to/machine-img]
#        (exit 0 = passed; skips without qemu-img, qemu-io or strace)
set -eu
M=${1:-$(cd "$(dirname "$0")/../.." && pwd)/.build/debug/machine-img}
for tool in qemu-img qemu-io strace; do
    command -v $tool >/dev/null || { echo "SKIP: $tool not installed"; exit 0; }
done
[ -x "$M" ] || { echo "machine-img not found at $M (build it first)"; exit 1; }
T=$(mktemp -d); trap 'rm -rf "$T"' EXIT
cd "$T"
fails=0

# What an image holds: the disk's and every snapshot's MD5, with the snapshots' IDs and names.
state() {
    qemu-img convert -O raw "$1" s.raw && echo "disk $(md5sum < s.raw)"
    qemu-img snapshot -l "$1" | tail -n +3 | while read -r id tag _; do
        qemu-img convert -l "snapshot.id=$id" -O raw "$1" s.raw && echo "$id $tag $(md5sum < s.raw)"
    done
}

# 8 MiB, 4 KiB clusters (four L2 tables, several refcount blocks), snapshots by both tools.
qemu-img create -q -f qcow2 -o cluster_size=4096 p.qcow2 8M
qemu-io -c "write -P 0x11 0 3M" -c "write -P 0x12 5M 1M" p.qcow2 >/dev/null
qemu-img snapshot -c a p.qcow2
qemu-io -c "write -P 0x21 1M 3M" p.qcow2 >/dev/null
"$M" snapshot -c b p.qcow2
qemu-io -c "write -P 0x31 2M 1M" -c "write -z 5M 64k" p.qcow2 >/dev/null

for op in "-c new" "-a a" "-d b" "-d a"; do
    state p.qcow2 > before
    cp p.qcow2 done.qcow2
    # shellcheck disable=SC2086
    "$M" snapshot $op done.qcow2
    state done.qcow2 > after
    cmp -s before after && { echo "FAIL $op changes nothing"; fails=$((fails + 1)); }
    cp p.qcow2 count.qcow2
    # shellcheck disable=SC2086
    strace -f -qq -o trace -e trace=pwrite64,fsync "$M" snapshot $op count.qcow2
    olds=0 news=0
    for call in pwrite64 fsync; do
        n=$(grep -c "$call(" trace || true)
        i=1
        while [ "$i" -le "$n" ]; do
            cp p.qcow2 k.qcow2
            set +e
            # shellcheck disable=SC2086
            strace -f -qq -o /dev/null -e trace=$call -e inject=$call:signal=KILL:when=$i "$M" snapshot $op k.qcow2 2>/dev/null
            rc=$?
            set -e
            where="$op, killed at $call #$i"
            [ "$rc" = 137 ] || { echo "FAIL $where: exit $rc, not killed"; fails=$((fails + 1)); }
            if ! out=$(qemu-img check k.qcow2 2>&1); then
                echo "FAIL $where: qemu-img check: $(echo "$out" | head -3)"; fails=$((fails + 1))
            fi
            state k.qcow2 > now
            if cmp -s now before; then olds=$((olds + 1))
            elif cmp -s now after; then news=$((news + 1))
            else echo "FAIL $where: neither the old nor the new image"; diff before now | head -5; fails=$((fails + 1)); fi
            i=$((i + 1))
        done
    done
    if [ $olds -gt 0 ] && [ $news -gt 0 ]; then echo "ok   snapshot $op: $olds kills left the old image, $news the new one, all clean"
    else echo "FAIL snapshot $op: old $olds, new $news"; fails=$((fails + 1)); fi
    cp done.qcow2 p.qcow2  # the next operation starts from this one's result
done

[ $fails = 0 ] && echo "all snapshot kill tests passed" || { echo "$fails failed"; exit 1; }
