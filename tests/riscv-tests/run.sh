#!/usr/bin/env bash
# The official riscv-tests (https://github.com/riscv-software-src/riscv-tests), fetched at a
# pinned commit (with its env submodule at the commit it pins), built unmodified with Debian's
# riscv64-linux-gnu-gcc, and every test run on both engines (machine-server with
# "firmware": "none": the ELF's tohost symbol places the HTIF, as on Spike).
#
# Usage: tests/riscv-tests/run.sh MACHINE_SERVER [WORK_DIR]
# Exit status: 0 every test passed on both engines; 1 a failure (or fewer tests than expected
# were built); 77 skipped, with the reason on the last line (the sources could not be fetched,
# e.g. no network, or the cross compiler is missing). A copy built once is kept in WORK_DIR
# (default $TMPDIR/machine-server-riscv-tests) and reused without the network.
# Environment:
#   RISCV_TESTS_URL, RISCV_TEST_ENV_URL  where to fetch from (default: GitHub), e.g. a local mirror
#   RISCV_TESTS_JOBS                     parallel runs and make jobs (default 2)
set -uo pipefail

SERVER=${1:?usage: run.sh MACHINE_SERVER [WORK_DIR]}
WORK=${2:-${TMPDIR:-/tmp}/machine-server-riscv-tests}
TESTS_URL=${RISCV_TESTS_URL:-https://github.com/riscv-software-src/riscv-tests}
ENV_URL=${RISCV_TEST_ENV_URL:-https://github.com/riscv/riscv-test-env}
TESTS_COMMIT=34e6b6d1e7936b526075432fb730d89148623484
ENV_COMMIT=6de71edb142be36319e380ce782c3d1830c65d68
SUITES="rv64ui rv64um rv64ua rv64uf rv64ud rv64uc rv64si rv64mi rv64uzba rv64uzbb rv64uzbc rv64uzbs rv64uzfh rv64mzicbo rv64ssvnapot"
EXPECTED=354   # p and v tests of $SUITES at $TESTS_COMMIT
JOBS=${RISCV_TESTS_JOBS:-2}
PREFIX=riscv64-linux-gnu-
GCC_OPTS="-static -mcmodel=medany -fvisibility=hidden -nostdlib -nostartfiles -fno-pic -no-pie"

skip() { echo "riscv-tests: SKIPPED: $*"; exit 77; }
start=$SECONDS
command -v ${PREFIX}gcc >/dev/null || skip "${PREFIX}gcc is not installed (scripts/deps installs gcc-riscv64-linux-gnu)"
command -v make >/dev/null || skip "make is not installed (scripts/deps installs it)"
SERVER=$(cd "$(dirname "$SERVER")" && pwd)/$(basename "$SERVER")
[ -x "$SERVER" ] || { echo "riscv-tests: $SERVER is not an executable"; exit 1; }

mkdir -p "$WORK" && WORK=$(cd "$WORK" && pwd) || { echo "riscv-tests: cannot use $WORK"; exit 1; }
SRC=$WORK/${TESTS_COMMIT:0:12}
export GIT_TERMINAL_PROMPT=0

# fetch URL COMMIT DIR: a shallow fetch of the commit (GitHub serves any commit), else the
# default branch's history (a local mirror), then a checkout of the commit.
fetch() {
    rm -rf "$3" && mkdir -p "$3" && git -C "$3" init -q || return 1
    timeout 120 git -C "$3" fetch -q --depth 1 "$1" "$2" 2>/dev/null ||
        timeout 300 git -C "$3" fetch -q "$1" 2>/dev/null || return 1
    git -C "$3" -c advice.detachedHead=false checkout -q "$2"
}

if [ ! -f "$SRC/.built" ]; then
    fetch "$TESTS_URL" "$TESTS_COMMIT" "$SRC" ||
        skip "could not fetch $TESTS_URL at ${TESTS_COMMIT:0:7} (network unreachable?)"
    rm -rf "$SRC/env"
    fetch "$ENV_URL" "$ENV_COMMIT" "$SRC/env" ||
        skip "could not fetch $ENV_URL at ${ENV_COMMIT:0:7} (network unreachable?)"
    # The binaries only (the suites' own targets also disassemble every test).
    names=$(make -s -C "$SRC/isa" RISCV_PREFIX=$PREFIX --eval 'print-%: ; @echo $($*)' \
            $(for s in $SUITES; do echo "print-${s}_p_tests print-${s}_v_tests"; done))
    # shellcheck disable=SC2086  # a list of targets
    if ! make -s -C "$SRC/isa" -j"$JOBS" RISCV_PREFIX=$PREFIX RISCV_GCC_OPTS="$GCC_OPTS" $names >"$WORK/build.log" 2>&1; then
        tail -30 "$WORK/build.log"
        echo "riscv-tests: the build failed (log: $WORK/build.log)"
        exit 1
    fi
    echo $names > "$SRC/.built"
    echo "riscv-tests: fetched and built in $((SECONDS - start))s"
fi
read -r -a tests < "$SRC/.built"
if [ ${#tests[@]} -ne $EXPECTED ]; then
    echo "riscv-tests: ${#tests[@]} tests built, expected $EXPECTED"
    exit 1
fi

# run_one ENGINE TEST: prints "ENGINE TEST exit-status".
run_one() {
    local cfg rc
    cfg=$(mktemp)
    printf '{"version": 2, "machine": "virt", "memory": "64M", "firmware": "none", "kernel": "%s", "accel": {"engine": "%s"}, "serial": {"backend": "none"}}' \
        "$SRC/isa/$2" "$1" > "$cfg"
    timeout 60 "$SERVER" --config "$cfg" >/dev/null 2>&1
    rc=$?
    rm -f "$cfg"
    echo "$1 $2 $rc"
}
export -f run_one
export SERVER SRC
results=$(for e in jit interpreter; do for t in "${tests[@]}"; do echo "$e $t"; done; done |
          xargs -P "$JOBS" -n 2 bash -c 'run_one "$0" "$1"')
status=0
for e in jit interpreter; do
    passed=$(grep -c "^$e .* 0$" <<< "$results")
    echo "riscv-tests: $passed of ${#tests[@]} pass on the $e"
    [ "$passed" -eq ${#tests[@]} ] || status=1
done
grep -v ' 0$' <<< "$results" | sed 's/^/riscv-tests: FAILED (engine, test, exit status): /'
echo "riscv-tests: riscv-tests ${TESTS_COMMIT:0:7} (env ${ENV_COMMIT:0:7}), $((SECONDS - start))s in all"
exit $status
