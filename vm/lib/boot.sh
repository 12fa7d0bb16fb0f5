# shellcheck shell=bash
# Boots the guest under qemu, copies its serial console to stdout, and
# turns what the runner (vm/guest/init.sh) printed into the exit status;
# sourced by vm/run-in-vm.sh.
#
# Reads: initrd, memory, cpus, timeout_seconds, console (where the console
# log goes). Needs vm/lib/host.sh.
# The variables it reads are vm/run-in-vm.sh's, which shellcheck cannot see here:
# shellcheck disable=SC2154

# Boots KERNEL; the serial console goes to our stdout and $console.
# Returns qemu's status (timeout's: 124 or 137 when it killed qemu).
boot() {
    local qemu=(qemu-system-x86_64
        -accel tcg -cpu max -m "$memory" -smp "$cpus"
        -kernel "$1" -initrd "$initrd"
        -append "console=ttyS0 panic=-1 quiet loglevel=3 ${HULK_VM_APPEND:-}"
        -nographic -no-reboot -nic none)
    # qboot starts the kernel faster than SeaBIOS and prints nothing.
    local qboot=/usr/share/qemu/qboot.rom
    [[ -r $qboot ]] && qemu+=(-bios "$qboot")
    # --foreground keeps qemu in our process group so Ctrl-C reaches it;
    # -k kills it should it ignore the TERM. sed drops the serial line's
    # CRs, firmware screen resets and the kernel's last words, unbuffered
    # so that output shows as it comes.
    timeout --foreground -k 10 "$timeout_seconds" "${qemu[@]}" </dev/null \
        | sed -u -e 's/\r$//' -e 's/\x1bc//g; s/\x1b\[?7l//g; s/\x1b\[2J//g' \
            -e '/^\[ *[0-9.]*\] reboot: Power down$/d' \
        | tee -p "$console"
    return "${PIPESTATUS[0]}"
}

# boot_guest KERNEL VMLINUX: boots VMLINUX (PVH) when given, else or when
# qemu refuses it, KERNEL; sets qemu_status.
boot_guest() {
    local kernel=$1 vmlinux=$2
    qemu_status=0
    boot "${vmlinux:-$kernel}" || qemu_status=$?
    if [[ -n $vmlinux && ! -s $console ]] && ((qemu_status != 124 && qemu_status != 137)); then
        # qemu refused the ELF kernel before the guest said anything.
        note "warning: qemu cannot boot $vmlinux (PVH); booting $(basename "$kernel") instead"
        # The next run unpacks it again.
        rm -f "$vmlinux"
        qemu_status=0
        boot "$kernel" || qemu_status=$?
    fi
}

# report_verdict TOKEN: reads $console; repeats the run's per-test verdicts on
# stderr, names the failed tests, and exits 0 (all passed), 1 (a test
# failed or a required module did not load) or 2 (no verdict: boot failure,
# kernel panic, timeout).
report_verdict() {
    local token=$1 result line failed=()
    # Only lines bearing the token: test output cannot add a verdict.
    # Those of a run that timed out say how far it got.
    while IFS= read -r line; do
        line=${line#HULK-VM-TEST }
        line=${line% run="$token"}
        note "$line"
        if [[ $line == FAIL\ * ]]; then
            line=${line#FAIL }
            failed+=("${line%% *}")
        fi
    done < <(grep -a -o "HULK-VM-TEST [A-Z]* .* run=$token" "$console" || true)
    result=$(grep -a -o "HULK-VM-RESULT: .* run=$token" "$console" | tail -n 1 || true)
    case $result in
        "HULK-VM-RESULT: pass"*)
            note "${result% run=*}"
            exit 0 ;;
        "HULK-VM-RESULT: fail"*)
            note "${result% run=*}"
            if ((${#failed[@]})); then note "failed: ${failed[*]}"; fi
            exit 1 ;;
    esac
    if ((qemu_status == 124 || qemu_status == 137)); then
        note "error: no verdict: the VM timed out after ${timeout_seconds}s (HULK_VM_TIMEOUT)"
    elif grep -aq 'Kernel panic' "$console"; then
        note "error: no verdict: the guest kernel panicked (see above)"
    elif ((qemu_status != 0)); then
        note "error: no verdict: qemu exited with status $qemu_status"
    else
        note "error: no verdict: the VM stopped before /init reported (see above)"
    fi
    if ((${#failed[@]})); then note "failed before that: ${failed[*]}"; fi
    exit 2
}
