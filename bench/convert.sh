#!/usr/bin/env bash
# `machine-img convert` against `qemu-img convert` on a 1 GiB image about 30% full:
# raw->qcow2, qcow2->raw and raw->qcow2 compressed (-c). Prints both median times and the ratio
# ours/qemu-img (above 1 = we are slower), then checks with `qemu-img compare` that every output
# (ours and qemu-img's) reads exactly like the source.
#
# The source is made once with a fixed seed: 1 GiB sparse raw, then extents of 1-8 MiB at random
# places until ~30% is written, alternately random bytes (incompressible, from /dev/urandom) and
# qemu-io byte patterns (compressible). A qcow2 copy of it (qemu-img convert) is the qcow2 source.
# Each timed run is `TOOL convert ... && sync OUT` (fsync of the output file only), so both tools
# are measured until the output is on disk whatever their own cache policy; the sources are read
# once beforehand so both tools find them in the host page cache.
#
# Usage: bench/convert.sh [WORKDIR]   (default: a temporary directory, removed at the end)
# Environment: MACHINE_IMG (default: builds a release machine-img with --scratch-path $SCRATCH
# or .build), SIZE_MIB (default 1024), FILL_PERCENT (default 30), REPEAT (runs per tool, default 3;
# the median is shown, every run is listed).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
SIZE_MIB=${SIZE_MIB:-1024}
FILL_PERCENT=${FILL_PERCENT:-30}
REPEAT=${REPEAT:-3}
if [ -z "${MACHINE_IMG:-}" ]; then
    SCRATCH=${SCRATCH:-$REPO/.build}
    (cd "$REPO" && swift build -c release --scratch-path "$SCRATCH" --product machine-img >&2)
    MACHINE_IMG=$(cd "$REPO" && swift build -c release --scratch-path "$SCRATCH" --show-bin-path)/machine-img
fi
for tool in qemu-img qemu-io; do
    command -v "$tool" >/dev/null || { echo "convert.sh: $tool is not installed (apt-get install qemu-utils)" >&2; exit 1; }
done

if [ $# -ge 1 ]; then WORK=$1; mkdir -p "$WORK"; KEEP=1; else WORK=$(mktemp -d /tmp/convert-bench.XXXXXX); KEEP=0; fi
cleanup() { [ "$KEEP" = 1 ] || rm -rf "$WORK"; }
trap cleanup EXIT

now() { date +%s.%N; }

# --- the source image -------------------------------------------------------------------------
SRC=$WORK/src.raw
rm -f "$SRC"
qemu-img create -q -f raw "$SRC" "${SIZE_MIB}M"
RANDOM=2024
target=$((SIZE_MIB * FILL_PERCENT / 100))
written=0
n=0
patterns=()
while [ "$written" -lt "$target" ]; do
    len=$((1 + RANDOM % 8))
    off=$(( (RANDOM * 32768 + RANDOM) % (SIZE_MIB - len) ))
    if [ $((n % 2)) -eq 0 ]; then
        dd if=/dev/urandom of="$SRC" bs=1M seek="$off" count="$len" conv=notrunc status=none
    else
        patterns+=(-c "write -q -P $((1 + RANDOM % 255)) ${off}M ${len}M")
    fi
    written=$((written + len))
    n=$((n + 1))
done
qemu-io -f raw "${patterns[@]}" "$SRC" >/dev/null
QSRC=$WORK/src.qcow2
rm -f "$QSRC"
qemu-img convert -f raw -O qcow2 "$SRC" "$QSRC"
cat "$SRC" "$QSRC" >/dev/null
allocated=$(du -m "$SRC" | cut -f1)

echo "# bench/convert.sh: ${SIZE_MIB} MiB image, ${n} extents (${written} MiB written, ${allocated} MiB allocated on disk);" \
     "half random bytes, half byte patterns"
echo "# machine-img: $MACHINE_IMG"
echo "# $(qemu-img --version | head -1)"
echo "# load average before: $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) host CPUs; each time = convert + fsync of the output, median of $REPEAT"

results=()
timed() {  # timed OUT COMMAND...: seconds for COMMAND plus an fsync of OUT (OUT removed first)
    local out=$1 t0 t1
    shift
    rm -f "$out"
    t0=$(now)
    "$@"
    sync "$out"
    t1=$(now)
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f\n", b - a }'
}
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

run() {  # run NAME SRC-FMT SRC OUT-FMT EXTRA...: REPEAT alternating runs of each tool, medians shown
    local name=$1 sfmt=$2 src=$3 ofmt=$4
    shift 4
    local ours=$WORK/$name.ours.$ofmt qemu=$WORK/$name.qemu.$ofmt i to=() tq=()
    for i in $(seq "$REPEAT"); do
        to+=("$(timed "$ours" "$MACHINE_IMG" convert -f "$sfmt" -O "$ofmt" "$@" "$src" "$ours")")
        tq+=("$(timed "$qemu" qemu-img convert -f "$sfmt" -O "$ofmt" "$@" "$src" "$qemu")")
    done
    local same_ours same_qemu
    if qemu-img compare -q -f "$sfmt" -F "$ofmt" "$src" "$ours"; then same_ours=identical; else same_ours=DIFFERENT; fi
    if qemu-img compare -q -f "$sfmt" -F "$ofmt" "$src" "$qemu"; then same_qemu=identical; else same_qemu=DIFFERENT; fi
    local ours_mib qemu_mib
    ours_mib=$(du -m "$ours" | cut -f1)
    qemu_mib=$(du -m "$qemu" | cut -f1)
    awk -v n="$name" -v a="$(median "${to[@]}")" -v b="$(median "${tq[@]}")" -v so="$same_ours" -v sq="$same_qemu" \
        -v mo="$ours_mib" -v mq="$qemu_mib" -v all="ours ${to[*]} / qemu ${tq[*]}" \
        'BEGIN { printf "%-18s %9.2f %9.2f %9.2f   %6d %6d   %-21s  %s\n", n, a, b, a / b, mo, mq, so "/" sq, all }'
    [ "$same_ours" = identical ] && [ "$same_qemu" = identical ] || results+=("$name")
}

printf '%-18s %9s %9s %9s   %6s %6s   %-21s  %s\n' "conversion" "ours s" "qemu s" "ours/qemu" "MiB us" "MiB q" \
    "compare (ours/qemu)" "every run (s)"
run raw-to-qcow2 raw "$SRC" qcow2
run qcow2-to-raw qcow2 "$QSRC" raw
run raw-to-qcow2-c raw "$SRC" qcow2 -c
echo "# load average after: $(cut -d' ' -f1-3 /proc/loadavg); 'MiB' = space allocated on disk by the output"
if [ ${#results[@]} -gt 0 ]; then
    echo "convert.sh: outputs differ from the source: ${results[*]}" >&2
    exit 1
fi
