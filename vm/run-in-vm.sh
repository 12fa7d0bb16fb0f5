#!/usr/bin/env bash
# Runs test binaries inside a qemu VM that boots Debian's own kernel, for
# tests that need kernel features the host lacks (ipvlan, dummy links).
# Recipe and measurements: qemu TCG (nested KVM hangs here), Debian's
# kernel unpacked from its .deb, a busybox initramfs; a run takes about
# 4 s plus the tests once the kernel is cached.
#
# usage: vm/run-in-vm.sh [OPTION]... -- [--libtest] BINARY [ARGS...] [--- [--libtest] BINARY [ARGS...]]...
#
#   --module NAME   also load kernel module NAME (ipvlan, dummy, veth and
#                   macvlan always are). Its dependencies (modinfo depends)
#                   are loaded first; its soft dependencies (modinfo
#                   softdep, e.g. libcrc32c's crc32c) are tried as well.
#   --tool PATH     copy a host executable and its shared libraries into
#                   the VM at the same path (e.g. /usr/sbin/ip,
#                   /usr/sbin/iptables, /usr/sbin/nft). A bare name is
#                   looked up in PATH. Tools come before busybox's applets
#                   of the same name in the VM's PATH.
#   --file SRC:DEST copy a file (and, for an executable, its libraries) or
#                   a directory's contents into the VM at DEST (absolute;
#                   a DEST ending in / means DEST/basename(SRC)), e.g.
#                   --file /usr/lib/cni:/opt/cni/bin
#   --env KEY=VALUE set an environment variable for the binaries
#   -h, --help      print this text
#
# Each BINARY (a host executable, or a script for /bin/sh, which is the
# host's dash, or else busybox's ash) is copied into the VM, as
# /tests/NNN/NAME, with its libraries. They run in turn as root, in /tmp,
# with stdin from /dev/null, HULK_IN_VM=1 in the environment and their
# output on the serial console, which this script copies to its stdout.
#
# --libtest marks BINARY as a libtest harness (a `cargo test` executable):
# it gets a verdict per test. Its tests are listed with its ARGS (--list),
# then each runs in a process of its own, with ARGS, TEST as an exact
# filter and the others skipped (ignored ones are not run). Any other
# binary gets one verdict, by its exit status. The VM prints each verdict as it comes, as
#     HULK-VM-TEST PASS|FAIL|SKIP NAME::TEST (TIME | WHY) run=TOKEN
#     HULK-VM-TEST PASS|FAIL NAME (TIME | WHY) run=TOKEN
# (NAME: the binary's file name without cargo's hash), and at the end
#     HULK-VM-RESULT: pass (n of n passed[, k skipped]) run=TOKEN
#     HULK-VM-RESULT: fail (k of n failed: NAME::TEST...) run=TOKEN
# (TOKEN is random per run so that test output cannot fake a verdict).
# This script then repeats the verdicts on stderr and names the failed
# tests. vm/guest/init.sh is the VM's side.
#
# Exit status: 0 when every test passed; 1 when one failed or a required
# module did not load; 2 when the VM gave no verdict (boot failure, kernel
# panic, timeout) or this script could not set it up.
#
# Environment:
#   HULK_VM_TIMEOUT  seconds before qemu is killed (default 900)
#   HULK_VM_MEM      guest memory in MiB (default 1024, raised when the
#                    initramfs would not fit and HULK_VM_MEM is unset)
#   HULK_VM_CPUS     guest vCPUs (default 2)
#   HULK_VM_CACHE    kernel cache (default ~/.cache/hulk-vpc/vm, or
#                    $XDG_CACHE_HOME/hulk-vpc/vm)
#   HULK_VM_KERNEL_PACKAGE  pin the kernel package (default: the one
#                    linux-image-amd64 depends on)
#   HULK_VM_APPEND   extra kernel command line (e.g. loglevel=7)
#   HULK_VM_KEEP     when set, keep the initramfs tree and console log
#   HULK_VM_GZIP=0   leave the initramfs uncompressed (faster for big tests)
#   HULK_VM_PVH=0    boot the compressed vmlinuz instead of the vmlinux
#                    unpacked from it (PVH entry; boots twice as fast)
#
# Needs (installed with apt-get when missing; root for that): qemu-system-x86,
# busybox-static, cpio, kmod, and network once to fetch the kernel.
#
# The jobs are in vm/lib: host.sh (messages, host packages), kernel.sh
# (the guest kernel), initramfs.sh and modules.sh (the guest's files),
# boot.sh (qemu, and the verdict).
set -euo pipefail
# set -e inside $(...) too, so that die and failures there stop the script.
shopt -s inherit_errexit

prog=run-in-vm
vm_dir=$(dirname "$(realpath "${BASH_SOURCE[0]}")")
# modinfo and depmod live in /sbin, which a non-root PATH may lack.
PATH=$PATH:/usr/sbin:/sbin

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

# shellcheck source-path=SCRIPTDIR source=lib/host.sh
source "$vm_dir/lib/host.sh"
# shellcheck source-path=SCRIPTDIR source=lib/kernel.sh
source "$vm_dir/lib/kernel.sh"
# shellcheck source-path=SCRIPTDIR source=lib/modules.sh
source "$vm_dir/lib/modules.sh"
# shellcheck source-path=SCRIPTDIR source=lib/initramfs.sh
source "$vm_dir/lib/initramfs.sh"
# shellcheck source-path=SCRIPTDIR source=lib/boot.sh
source "$vm_dir/lib/boot.sh"

cache=${HULK_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hulk-vpc/vm}
timeout_seconds=${HULK_VM_TIMEOUT:-900}
memory=${HULK_VM_MEM:-1024}
cpus=${HULK_VM_CPUS:-2}
[[ $timeout_seconds =~ ^[1-9][0-9]*$ ]] || die "HULK_VM_TIMEOUT must be a number of seconds, not '$timeout_seconds'"
[[ $memory =~ ^[1-9][0-9]*$ ]] || die "HULK_VM_MEM must be a number of MiB, not '$memory'"
[[ $cpus =~ ^[1-9][0-9]*$ ]] || die "HULK_VM_CPUS must be a number, not '$cpus'"

# The modules every test here may need: ipvlan is the reason for the VM,
# dummy links are parents, veth and macvlan for comparisons.
modules=(ipvlan dummy veth macvlan)
tools=()
files=()
environment=()
while (($#)); do
    case $1 in
        --module | --tool | --file | --env)
            (($# >= 2)) || die "$1 needs an argument (see --help)" ;;&
        --module) modules+=("$2"); shift 2 ;;
        --tool) tools+=("$2"); shift 2 ;;
        --file) files+=("$2"); shift 2 ;;
        --env) environment+=("$2"); shift 2 ;;
        -h | --help) usage; exit 0 ;;
        --) shift; break ;;
        *) die "unknown option '$1' (the binaries come after --; see --help)" ;;
    esac
done
(($#)) || die "no binary to run: $prog [OPTION]... -- [--libtest] BINARY [ARGS...] [--- ...]... (see --help)"

ensure_commands qemu-system-x86_64:qemu-system-x86 busybox:busybox-static cpio:cpio \
    modinfo:kmod depmod:kmod gzip:gzip timeout:coreutils flock:util-linux

use_kernel

work=$(mktemp -d "${TMPDIR:-/tmp}/hulk-vm.XXXXXX")
if [[ -n ${HULK_VM_KEEP:-} ]]; then
    note "keeping the initramfs tree and console log in $work"
else
    trap 'rm -rf "$work"' EXIT
fi
# Make sure the EXIT trap (cleanup) runs on Ctrl-C and kill too.
trap 'exit 130' INT
trap 'exit 143' TERM
root=$work/root
console=$work/console

new_tree
add_tools "${tools[@]}"
add_files "${files[@]}"
add_userland
add_etc
add_modules "${modules[@]}"
add_tests "$@"
add_environment "${environment[@]}"
token=$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')
add_init "$token"
pack_initramfs

# The initramfs lives in guest RAM twice while it is unpacked (the archive
# and the files): make room when the tests are big.
needed_mib=$((unpacked_mib * 2 + 384))
if ((needed_mib > memory)); then
    if [[ -z ${HULK_VM_MEM:-} ]]; then
        note "raising guest memory to $needed_mib MiB for a ${unpacked_mib} MiB initramfs"
        memory=$needed_mib
    else
        note "warning: HULK_VM_MEM=$memory MiB may be too small for a ${unpacked_mib} MiB initramfs"
    fi
fi

note "booting Debian $kernel_version ($cpus vCPUs, $memory MiB) for $count test binaries, timeout ${timeout_seconds}s"
boot_guest "$kernel" "$vmlinux"
report_verdict "$token"
