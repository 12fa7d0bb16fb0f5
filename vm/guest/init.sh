#!/bin/sh
# The VM's /init, put there by vm/run-in-vm.sh: sets up the VM, loads the
# modules, runs the tests and prints their verdicts, then powers off.
# POSIX sh: it runs under the host's dash, or else busybox's ash.
#
# What vm/run-in-vm.sh leaves in the initramfs for it:
#   /tests/config       sets vm_path (PATH), count (test binaries), token
#   /tests/environment  the --env settings, for the tests
#   /modules/order      "MODULE required|optional" lines in load order
#   /tests/NNN/run      execs test binary NNN with its arguments and "$@"
#   /tests/NNN/label    its command line on the host
#   /tests/NNN/name     what its verdicts call it
#   /tests/NNN/libtest  present when it is a libtest harness (cargo test)
#   /tests/NNN/exact    present when its arguments include --exact
#
# A libtest harness gets one verdict per test: its tests are listed
# (--list, with its own arguments, so that filters and --include-ignored
# apply), and each one that is not ignored runs in a process of its own,
# with those arguments, TEST as an exact filter and the others skipped;
# the exit status is the verdict.
# Any other binary gets one verdict, by its exit status. The verdict
# lines, ending in the run's token so that test output cannot fake one:
#   HULK-VM-TEST PASS|FAIL|SKIP NAME::TEST (DETAIL) run=TOKEN   a libtest test
#   HULK-VM-TEST PASS|FAIL NAME (DETAIL) run=TOKEN              a binary
# and at the end one of
#   HULK-VM-RESULT: pass (P of N passed[, K skipped]) run=TOKEN
#   HULK-VM-RESULT: fail (F of N failed: NAME...) run=TOKEN
#   HULK-VM-RESULT: fail (modules did not load: M...; F of N failed[: NAME...]) run=TOKEN

# First: the PATH for what follows.
vm_path='' count='' token=''
# shellcheck source=/dev/null
. /tests/config
export PATH="$vm_path" HOME=/root TERM=dumb HULK_IN_VM=1

/bin/busybox mount -t proc proc /proc
# Needs /proc to name itself as the links' target.
/bin/busybox --install -s
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# The kernel opens the console before /init runs; if that failed (no
# /dev/console in the initramfs), output would vanish: reopen it.
exec </dev/console >/dev/console 2>&1
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
# The tmpfs mounts hide what a --file or --tool put in /tmp or /run:
# vm/run-in-vm.sh parked it in /.hulk-stage.
for directory in tmp run; do
    if [ -d /.hulk-stage/$directory ]; then
        cp -a /.hulk-stage/$directory/. /$directory/ && rm -rf /.hulk-stage/$directory
    fi
done
mkdir -p /run/netns /sys/fs/cgroup
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
hostname hulk-vm
ip link set lo up

missing_modules=
while read -r module kind; do
    [ -d "/sys/module/$module" ] && continue
    insmod "/modules/$module.ko" || true
    if [ ! -d "/sys/module/$module" ]; then
        if [ "$kind" = required ]; then
            echo "HULK-VM: module $module did not load"
            missing_modules="$missing_modules $module"
        else
            echo "HULK-VM: optional module $module did not load"
        fi
    fi
done </modules/order
# shellcheck source=/dev/null
. /tests/environment

# Centiseconds since boot; the 1 prefix keeps "08" from reading as octal.
uptime_cs() { read -r up _ </proc/uptime; echo $((${up%.*} * 100 + 1${up#*.} - 100)); }
# Seconds since START (centiseconds since boot), as "1.23s".
took() {
    now=$(uptime_cs)
    echo "$(((now - $1) / 100)).$(printf '%02d' $(((now - $1) % 100)))s"
}
# How a process with exit status STATUS ended.
ending() {
    if [ "$1" -gt 128 ]; then echo "killed by signal $(($1 - 128))"; else echo "exit $1"; fi
}

tests=0
skipped=0
failed=0
failed_names=
# verdict PASS|FAIL|SKIP NAME DETAIL
verdict() {
    echo "HULK-VM-TEST $1 $2 ($3) run=$token"
    tests=$((tests + 1))
    case $1 in
        FAIL)
            failed=$((failed + 1))
            failed_names="$failed_names $2"
            ;;
        SKIP) skipped=$((skipped + 1)) ;;
    esac
}

# run_binary DIR NAME: one verdict, by the exit status.
run_binary() {
    start=$(uptime_cs)
    (cd /tmp && exec "$1/run") </dev/null
    status=$?
    if [ "$status" -eq 0 ]; then
        verdict PASS "$2" "$(took "$start")"
    else
        verdict FAIL "$2" "$(ending "$status"), $(took "$start")"
    fi
}

# run_libtest DIR NAME: one verdict per test (see the top).
run_libtest() {
    dir=$1 binary=$2
    (cd /tmp && exec "$dir/run" --list --format terse) </dev/null >"$dir/list"
    status=$?
    if [ "$status" -ne 0 ]; then
        verdict FAIL "$binary" "cannot list its tests: $(ending "$status")"
        return
    fi
    sed -n 's/: test$//p' "$dir/list" >"$dir/tests"
    if [ ! -s "$dir/tests" ]; then
        verdict FAIL "$binary" "its arguments select no test"
        return
    fi
    # Its ignored tests, to skip. libtest refuses --ignored next to
    # --include-ignored, which is then among its arguments: none.
    : >"$dir/ignored"
    if (cd /tmp && exec "$dir/run" --list --format terse --ignored) </dev/null >"$dir/list" 2>/dev/null; then
        sed -n 's/: test$//p' "$dir/list" >"$dir/ignored"
    fi
    while read -r test; do
        if grep -qxF -e "$test" "$dir/ignored"; then
            verdict SKIP "$binary::$test" ignored
            continue
        fi
        # TEST as an exact filter, and every other listed test skipped: the
        # filters among its arguments (made exact too) can only add listed
        # tests. libtest refuses a second --exact.
        set --
        [ -e "$dir/exact" ] || set -- --exact
        while read -r other; do
            [ "$other" = "$test" ] || set -- "$@" --skip "$other"
        done <"$dir/tests"
        set -- "$@" "$test"
        # The verdict must be TEST's own.
        (cd /tmp && exec "$dir/run" --list --format terse "$@") </dev/null >"$dir/list"
        if [ "$(sed -n 's/: test$//p' "$dir/list")" != "$test" ]; then
            verdict FAIL "$binary::$test" "cannot select it alone"
            continue
        fi
        echo "HULK-VM: running $binary::$test"
        start=$(uptime_cs)
        (cd /tmp && exec "$dir/run" "$@") </dev/null
        status=$?
        if [ "$status" -eq 0 ]; then
            verdict PASS "$binary::$test" "$(took "$start")"
        else
            verdict FAIL "$binary::$test" "$(ending "$status"), $(took "$start")"
        fi
    done <"$dir/tests"
}

i=0
for directory in /tests/[0-9][0-9][0-9]; do
    i=$((i + 1))
    name=$(cat "$directory/name")
    echo "HULK-VM: ($i/$count) running $(cat "$directory/label")"
    if [ -e "$directory/libtest" ]; then
        run_libtest "$directory" "$name"
    else
        run_binary "$directory" "$name"
    fi
done

if [ "$skipped" -gt 0 ]; then skips=", $skipped skipped"; else skips=; fi
if [ -n "$missing_modules" ]; then
    echo "HULK-VM-RESULT: fail (modules did not load:$missing_modules; $failed of $tests failed${failed_names:+:$failed_names}) run=$token"
elif [ "$failed" -eq 0 ]; then
    echo "HULK-VM-RESULT: pass ($((tests - skipped)) of $tests passed$skips) run=$token"
else
    echo "HULK-VM-RESULT: fail ($failed of $tests failed:$failed_names) run=$token"
fi
# Let the serial port drain before the power goes.
sleep 0.1
poweroff -f
