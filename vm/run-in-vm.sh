#!/usr/bin/env bash
# Runs test binaries inside a qemu VM that boots Debian's own kernel, for
# tests that need kernel features the host lacks (ipvlan, dummy links).
# Recipe and measurements: qemu TCG (nested KVM hangs here), Debian's
# kernel unpacked from its .deb, a busybox initramfs; a run takes about
# 4 s plus the tests once the kernel is cached.
#
# usage: vm/run-in-vm.sh [OPTION]... -- BINARY [ARGS...] [--- BINARY [ARGS...]]...
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
# After each binary the VM prints one line
#     HULK-VM-TEST i/n pass (TIME): BINARY ARGS...
#     HULK-VM-TEST i/n FAIL (exit N | killed by signal N, TIME): BINARY ARGS...
# and at the end one line
#     HULK-VM-RESULT: pass (n of n passed) run=TOKEN
#     HULK-VM-RESULT: fail (k of n failed) run=TOKEN
# (TOKEN is random per run so that test output cannot fake a verdict).
#
# Exit status: 0 when every binary exited 0; 1 when one failed or a
# required module did not load; 2 when the VM gave no verdict (boot
# failure, kernel panic, timeout) or this script could not set it up.
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
set -euo pipefail
# set -e inside $(...) too, so that die and failures there stop the script.
shopt -s inherit_errexit

prog=run-in-vm
# modinfo and depmod live in /sbin, which a non-root PATH may lack.
PATH=$PATH:/usr/sbin:/sbin

die() { echo "$prog: error: $*" >&2; exit 2; }
note() { echo "$prog: $*" >&2; }
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

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
(($#)) || die "no binary to run: $prog [OPTION]... -- BINARY [ARGS...] [--- BINARY [ARGS...]]..."

# --- host packages -----------------------------------------------------------

apt_updated=
apt_update_once() {
    [[ -n $apt_updated ]] && return 0
    apt_updated=1
    note "apt-get update"
    # stderr: some callers' stdout is a result.
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
}

# Installs the packages providing the commands that are missing, as
# "command:package" pairs; `apt-get update` only when something is missing.
ensure_commands() {
    local pair missing=()
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
    done
    ((${#missing[@]})) || return 0
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
    ((EUID == 0)) || die "missing ${missing[*]}: install them (apt-get install ${missing[*]}) or run as root"
    apt_update_once || die "apt-get update failed (offline?); cannot install ${missing[*]}"
    note "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || die "apt-get install ${missing[*]} failed"
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null || die "${pair%%:*} still missing after installing ${pair#*:}"
    done
}

ensure_commands qemu-system-x86_64:qemu-system-x86 busybox:busybox-static cpio:cpio \
    modinfo:kmod depmod:kmod gzip:gzip timeout:coreutils flock:util-linux

# --- kernel --------------------------------------------------------------------

# The kernel package linux-image-amd64 currently points at (Debian 12:
# linux-image-6.1.0-N-amd64). N moves with Debian's ABI bumps, so never
# hard-code it. Prints nothing when apt has no package lists.
named_kernel_package() {
    if [[ -n ${HULK_VM_KERNEL_PACKAGE:-} ]]; then
        echo "$HULK_VM_KERNEL_PACKAGE"
        return
    fi
    # apt-cache takes most of a second; its answer only changes with the
    # package lists or apt's configuration, so remember it against their
    # modification times.
    local key memo=$cache/kernel-package package
    key=$(stat -c %Y.%Z /var/lib/apt/lists /etc/apt /etc/apt/sources.list.d /etc/apt/preferences.d \
        2>/dev/null | tr '\n' ,) || true
    if [[ -f $memo ]] && read -r memo_key package <"$memo" && [[ $memo_key == "$key" && -n $package ]]; then
        echo "$package"
        return
    fi
    package=$(apt-cache depends linux-image-amd64 2>/dev/null \
        | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ {print $2; exit}') || true
    if [[ -n $package ]] && mkdir -p "$cache" 2>/dev/null; then
        if ! { echo "$key $package" >"$memo.$$" && mv "$memo.$$" "$memo"; }; then
            rm -f "$memo.$$"
        fi
    fi
    echo "$package"
}

# Complete trees only (a download is unpacked under a .partial name).
newest_cached_tree() {
    local boot
    # The glob would sort 6.1.0-9 after 6.1.0-56: let sort -V decide.
    boot=$(compgen -G "$cache/linux-image-*/boot" | sort -V | tail -n 1) || true
    [[ -z $boot ]] || echo "${boot%/boot}"
}

download_kernel() { # package tree; fails quietly so the caller can retry
    local package=$1 tree=$2 download deb
    download=$(mktemp -d "${TMPDIR:-/tmp}/hulk-vm-deb.XXXXXX")
    # apt-get download hands the file to the _apt user to write.
    chmod 0777 "$download"
    note "fetching $package"
    if ! (cd "$download" && apt-get download -qq "$package" >&2); then
        rm -rf "$download"
        return 1
    fi
    deb=$(find "$download" -name '*.deb' -print -quit)
    rm -rf "$tree.partial"
    # (set -e does not apply here: the caller tests our status.)
    if [[ -z $deb ]] || ! dpkg -x "$deb" "$tree.partial"; then
        rm -rf "$download" "$tree.partial"
        return 1
    fi
    rm -rf "$download"
    # A tree only appears under its final name once complete.
    rm -rf "$tree"
    mv "$tree.partial" "$tree"
}

# Prints the unpacked kernel tree to use, fetching it when needed. A cached
# tree for the named package is used without touching the network.
kernel_tree() {
    local package tree fallback
    package=$(named_kernel_package)
    if [[ -z $package ]]; then
        fallback=$(newest_cached_tree)
        if [[ -n $fallback ]]; then
            # No package lists (a fresh or offline machine): the cache will do.
            echo "$fallback"
            return
        fi
        apt_update_once || die "apt-get update failed (offline?) and no kernel is cached in $cache"
        package=$(named_kernel_package)
        [[ -n $package ]] || die "apt cannot name the kernel linux-image-amd64 depends on (is this Debian?)"
    fi
    tree=$cache/$package
    [[ -d $tree/boot ]] && { echo "$tree"; return; }

    mkdir -p "$cache"
    # One download at a time when several runs start on a cold cache.
    local lock
    exec {lock}>"$cache/.lock"
    flock "$lock"
    if [[ ! -d $tree/boot ]] && ! download_kernel "$package" "$tree"; then
        # Stale package lists name a kernel the mirror no longer has:
        # refresh them once and ask again.
        apt_update_once || true
        local wanted=$package
        package=$(named_kernel_package)
        tree=$cache/$package
        if [[ -z $package ]] || { [[ ! -d $tree/boot ]] && ! download_kernel "$package" "$tree"; }; then
            # Offline, say: an older cached kernel beats no test run.
            fallback=$(newest_cached_tree)
            [[ -n $fallback ]] || die "cannot fetch ${package:-$wanted} (apt-get download failed) and no kernel is cached in $cache"
            note "warning: cannot fetch ${package:-$wanted}; using the cached $(basename "$fallback")"
            tree=$fallback
        fi
    fi
    # (The lock goes with this subshell.)
    echo "$tree"
}

tree=$(kernel_tree)
kernel=$(find "$tree/boot" -maxdepth 1 -name 'vmlinuz-*' -print -quit)
[[ -n $kernel ]] || die "no boot/vmlinuz-* in $tree (remove it to fetch it again)"
kernel_version=${kernel##*/vmlinuz-}
module_root=$tree/lib/modules/$kernel_version
[[ -d $module_root ]] || die "no lib/modules/$kernel_version in $tree (remove it to fetch it again)"

# qemu can start an uncompressed ELF vmlinux at its PVH entry point, which
# skips the bzImage's self-decompression (xz, under TCG): boots take about
# half as long. Made once per cached kernel; prints nothing (use vmlinuz)
# when the kernel has no PVH entry or cannot be unpacked here.
pvh_kernel() {
    local config=$tree/boot/config-$kernel_version vmlinux=$tree/boot/vmlinux-$kernel_version
    local magic decompress offset partial
    [[ ${HULK_VM_PVH:-1} != 0 ]] && grep -qx 'CONFIG_PVH=y' "$config" 2>/dev/null || return 0
    [[ -s $vmlinux ]] && { echo "$vmlinux"; return 0; }
    if grep -qx 'CONFIG_KERNEL_XZ=y' "$config"; then
        magic='\xfd7zXZ\x00' decompress=(xz -dcq --single-stream)
    elif grep -qx 'CONFIG_KERNEL_ZSTD=y' "$config"; then
        magic='\x28\xb5\x2f\xfd' decompress=(zstd -dcq)
    elif grep -qx 'CONFIG_KERNEL_GZIP=y' "$config"; then
        magic='\x1f\x8b\x08' decompress=(gzip -dcq)
    else
        return 0
    fi
    command -v "${decompress[0]}" >/dev/null || return 0
    # The compressed payload starts at the first occurrence of its magic.
    offset=$(LC_ALL=C grep -obUaP -m 1 "$magic" "$kernel" 2>/dev/null | awk -F: 'NR == 1 {print $1}') || true
    [[ -n $offset ]] || return 0
    partial=$vmlinux.partial.$$
    # Trailing data after the payload makes some decompressors complain.
    tail -c +"$((offset + 1))" "$kernel" | "${decompress[@]}" >"$partial" 2>/dev/null || true
    if [[ $(head -c 4 "$partial" | od -An -c | tr -d ' ') == 177ELF ]] && mv "$partial" "$vmlinux"; then
        echo "$vmlinux"
    else
        rm -f "$partial"
    fi
}
vmlinux=$(pvh_kernel)

# --- initramfs tree --------------------------------------------------------

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
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,run,tmp,etc,root,modules,tests}
mkdir -p "$root/var"
ln -s ../run "$root/var/run"

# Copies an executable or library to DEST inside the VM and the shared
# libraries it needs (ldd lists them all, transitively, and the dynamic
# loader) at the paths ldd reports, where the loader's default search path
# (/lib/x86_64-linux-gnu, /usr/lib/x86_64-linux-gnu) finds them.
copy_with_libraries() {
    local source=$1 destination=$2 line library
    mkdir -p "$root${destination%/*}"
    # rm first: DEST may be a symlink to busybox, which cp would overwrite.
    rm -f "$root$destination"
    cp -L "$source" "$root$destination"
    # ldd prints "name => /path (addr)", "/lib64/ld-linux-x86-64.so.2 (addr)",
    # "name => not found", or "not a dynamic executable" (static binaries,
    # scripts).
    while IFS= read -r line; do
        case $line in
            *"=> not found"*)
                note "warning: $source needs ${line%% =>*}, which the host lacks"
                continue ;;
        esac
        library=$(grep -oE '/[^ ]+' <<<"$line" | head -n 1) || continue
        [[ -e $root$library ]] && continue
        mkdir -p "$root${library%/*}"
        cp -L "$library" "$root$library"
    done < <(ldd "$source" 2>/dev/null || true)
}

# Scripts need their interpreter: busybox's sh/ash/env are there; anything
# else (bash) is copied from the host when it exists.
copy_interpreter() {
    local source=$1 first interpreter
    [[ $(head -c 2 "$source") == '#!' ]] || return 0
    IFS= read -r first <"$source" || true
    read -r interpreter _ <<<"${first#'#!'}"
    case ${interpreter##*/} in
        sh | ash | env | busybox) return 0 ;;
    esac
    if [[ -x $interpreter ]]; then
        [[ -e $root$interpreter ]] || copy_with_libraries "$interpreter" "$interpreter"
    else
        note "warning: $source wants $interpreter, which is not in the VM"
    fi
}

# Tools first, so that busybox's applets only fill the gaps (see /init).
tool_paths=()
for tool in "${tools[@]}"; do
    path=$tool
    [[ $path == */* ]] || path=$(command -v "$tool") || die "--tool $tool: not found in PATH"
    [[ $path == /* ]] || die "--tool $tool: give an absolute path"
    [[ -f $path && -x $path ]] || die "--tool $path: not an executable file"
    copy_with_libraries "$path" "$path"
    copy_interpreter "$path"
    tool_paths+=("$path")
done

for file in "${files[@]}"; do
    [[ $file == *:* ]] || die "--file $file: expected SRC:DEST"
    source_path=${file%%:*} destination=${file#*:}
    [[ $destination == /* ]] || die "--file $file: DEST must be absolute"
    [[ -e $source_path ]] || die "--file $file: $source_path does not exist"
    if [[ -d $source_path ]]; then
        mkdir -p "$root$destination"
        cp -RL "$source_path/." "$root$destination/"
    else
        [[ $destination == */ ]] && destination=$destination${source_path##*/}
        if [[ -x $source_path ]]; then
            copy_with_libraries "$source_path" "$destination"
        else
            mkdir -p "$root${destination%/*}"
            rm -f "$root$destination"
            cp -L "$source_path" "$root$destination"
        fi
    fi
done

# Busybox at /bin/busybox; /init links its applets where busybox puts
# them (busybox --install -s, which leaves existing files alone): a symlink
# command per applet here would cost more than half a second.
busybox=$(command -v busybox)
copy_with_libraries "$busybox" /bin/busybox # no libraries when static
declare -A applet_path=()
while IFS= read -r applet; do
    applet_path[${applet##*/}]=/$applet
done < <("$root/bin/busybox" --list-full)
[[ -n ${applet_path[sh]:-} ]] || die "$busybox has no sh applet"

# A tool must not be shadowed by an applet in a directory earlier on the
# VM's PATH (busybox puts env in /usr/bin, ip in /sbin): make that applet's
# path a link to the tool.
vm_path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
IFS=: read -ra vm_path_directories <<<"$vm_path"
path_rank() {
    local rank=0 directory
    for directory in "${vm_path_directories[@]}"; do
        [[ $directory == "$1" ]] && break
        rank=$((rank + 1))
    done
    echo "$rank"
}
for path in "${tool_paths[@]}"; do
    applet=${applet_path[${path##*/}]:-}
    [[ -n $applet && $applet != "$path" ]] || continue
    if (($(path_rank "${applet%/*}") < $(path_rank "${path%/*}"))); then
        mkdir -p "$root${applet%/*}"
        ln -sfn "$path" "$root$applet"
    fi
done

# Debian's busybox-static is built to prefer its own applets to PATH in
# its shell, so `ip` in a script would be busybox's ip even with
# --tool /usr/sbin/ip. dash (essential on Debian) searches PATH: make it
# /bin/sh when the host has it.
if dash=$(command -v dash); then
    copy_with_libraries "$dash" /bin/sh
else
    note "warning: no dash on the host; /bin/sh is busybox's, which runs its applets before PATH"
    ln -s busybox "$root/bin/sh"
fi

# Small /etc so that tools asking for users, hosts or protocol names
# (iptables -p tcp) find them.
echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
echo 'root:x:0:' >"$root/etc/group"
printf '127.0.0.1 localhost hulk-vm\n::1 localhost\n' >"$root/etc/hosts"
for etc in protocols services ethertypes; do
    if [[ -f /etc/$etc ]]; then cp -L "/etc/$etc" "$root/etc/$etc"; fi
done

# --- modules -------------------------------------------------------------

# Module file names may use - where module names use _ (crc32c-intel.ko is
# crc32c_intel), so index the files by their module name.
declare -A module_file=() builtin_module=() module_seen=()
while IFS= read -r -d '' path; do
    name=${path##*/}
    name=${name%%.ko*}
    module_file[${name//-/_}]=$path
done < <(find "$module_root/kernel" -type f \( -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz' \) -print0)
if [[ -f $module_root/modules.builtin ]]; then
    while IFS= read -r path; do
        name=${path##*/}
        name=${name%%.ko*}
        builtin_module[${name//-/_}]=1
    done <"$module_root/modules.builtin"
fi

# Names the modules providing an alias (softdeps name aliases such as
# crc32c). modules.alias is made once per cached kernel by depmod.
alias_providers() {
    local alias=$1
    if [[ ! -f $module_root/modules.alias ]]; then
        # Under the cache's lock: concurrent depmods share temporary files.
        flock "$cache/.lock" depmod -b "$tree" "$kernel_version" 2>/dev/null \
            || { note "warning: depmod failed, cannot resolve alias $alias"; return 0; }
    fi
    awk -v a="$alias" '$1 == "alias" && $2 == a {print $3}' "$module_root/modules.alias"
}

# Puts module NAME into the initramfs after its dependencies and appends
# it to the load order; KIND is "required" (the run fails when it does not
# load) or "optional" (soft dependencies: some need CPU features). Named
# modules are required even when something else pulls them in first.
declare -A module_named=()
for module in "${modules[@]}"; do module_named[${module//-/_}]=1; done
: >"$root/modules/order"
add_module() {
    local name=${1//-/_} kind=$2 path file dependency word when provider providers
    [[ -n ${module_seen[$name]:-} ]] && return 0
    module_seen[$name]=1
    [[ -n ${module_named[$name]:-} ]] && kind=required
    path=${module_file[$name]:-}
    if [[ -z $path ]]; then
        if [[ -n ${builtin_module[$name]:-} ]]; then
            return 0 # built into the kernel: nothing to load
        fi
        mapfile -t providers < <(alias_providers "$1")
        # Several providers (crc32c: crc32c_generic and crc32c_intel, which
        # needs SSE 4.2) are each optional.
        ((${#providers[@]} > 1)) && kind=optional
        if ((${#providers[@]})); then
            for provider in "${providers[@]}"; do add_module "$provider" "$kind"; done
            return 0
        fi
        [[ $kind == optional ]] && { note "note: no module provides $1 (optional)"; return 0; }
        die "kernel module $1 is neither in $module_root nor built in"
    fi
    # Decompress on the host: busybox insmod may not read .ko.xz/.ko.zst,
    # and modinfo then reads the plain file too.
    file=$root/modules/$name.ko
    case $path in
        *.ko) cp "$path" "$file" ;;
        *.ko.xz) ensure_commands xz:xz-utils; xz -dc "$path" >"$file" ;;
        *.ko.zst) ensure_commands zstd:zstd; zstd -qdc "$path" >"$file" ;;
        *.ko.gz) gzip -dc "$path" >"$file" ;;
    esac
    for dependency in $(modinfo -F depends "$file" | tr ',' ' '); do
        add_module "$dependency" "$kind"
    done
    # softdep reads "pre: a b post: c"; pre ones load before this module.
    local post=()
    when=
    for word in $(modinfo -F softdep "$file"); do
        case $word in
            pre:) when=pre ;;
            post:) when=post ;;
            *) if [[ $when == pre ]]; then add_module "$word" optional; else post+=("$word"); fi ;;
        esac
    done
    echo "$name $kind" >>"$root/modules/order"
    for word in "${post[@]}"; do add_module "$word" optional; done
}
for module in "${modules[@]}"; do
    add_module "$module" required
done

# --- binaries ----------------------------------------------------------------

# Single-quotes a word for /bin/sh.
sh_quote() { printf "'%s'" "${1//\'/\'\\\'\'}"; }

declare -A binary_inside=()
count=0
while (($#)); do
    binary=$1
    shift
    arguments=()
    while (($#)) && [[ $1 != --- ]]; do
        arguments+=("$1")
        shift
    done
    (($#)) && shift # the ---
    if [[ $binary != */* ]] && command -v "$binary" >/dev/null; then
        binary=$(command -v "$binary")
    fi
    [[ -f $binary && -x $binary ]] || die "$binary is not an executable file"
    count=$((count + 1))
    test_dir=$root/tests/$(printf '%03d' "$count")
    mkdir -p "$test_dir"
    # Each binary once, in its own directory, under its own name (argv[0]).
    real=$(realpath "$binary")
    if [[ -z ${binary_inside[$real]:-} ]]; then
        binary_inside[$real]=/tests/$(printf '%03d' "$count")/${binary##*/}
        copy_with_libraries "$binary" "${binary_inside[$real]}"
        copy_interpreter "$binary"
    fi
    {
        echo '#!/bin/sh'
        printf 'exec %s' "$(sh_quote "${binary_inside[$real]}")"
        for argument in "${arguments[@]}"; do printf ' %s' "$(sh_quote "$argument")"; done
        echo
    } >"$test_dir/run"
    chmod +x "$test_dir/run"
    # What the result line calls it: the host command line.
    printf '%q' "$binary" >"$test_dir/label"
    for argument in "${arguments[@]}"; do printf ' %q' "$argument"; done >>"$test_dir/label"
done

for setting in "${environment[@]}"; do
    [[ $setting =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env $setting: expected KEY=VALUE"
    printf 'export %s=%s\n' "${setting%%=*}" "$(sh_quote "${setting#*=}")"
done >"$root/tests/environment"

# /init mounts tmpfs on /tmp and /run, which would hide what a --file or
# --tool put there: park it and let /init move it back.
for directory in tmp run; do
    if [[ -n $(ls -A "$root/$directory") ]]; then
        mkdir -p "$root/.hulk-stage"
        mv "$root/$directory" "$root/.hulk-stage/$directory"
        mkdir "$root/$directory"
    fi
done

token=$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')

# --- /init ---------------------------------------------------------------------

cat >"$root/init" <<INIT
#!/bin/sh
# Made by vm/run-in-vm.sh: sets up the VM, loads the modules, runs the
# tests in /tests/NNN/run and prints the verdict, then powers off.
export PATH=$vm_path HOME=/root TERM=dumb HULK_IN_VM=1
count=$count
token=$token
INIT
cat >>"$root/init" <<'INIT'
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
i=0
failed=0
for run in /tests/[0-9][0-9][0-9]/run; do
    i=$((i + 1))
    label=$(cat "${run%/run}/label")
    echo "HULK-VM: ($i/$count) running $label"
    start=$(uptime_cs)
    (cd /tmp && exec "$run") </dev/null
    status=$?
    end=$(uptime_cs)
    took=$(((end - start) / 100)).$(printf '%02d' $(((end - start) % 100)))s
    if [ "$status" -eq 0 ]; then
        echo "HULK-VM-TEST $i/$count pass ($took): $label"
    else
        if [ "$status" -gt 128 ]; then why="killed by signal $((status - 128))"; else why="exit $status"; fi
        echo "HULK-VM-TEST $i/$count FAIL ($why, $took): $label"
        failed=$((failed + 1))
    fi
done

if [ -n "$missing_modules" ]; then
    echo "HULK-VM-RESULT: fail (modules did not load:$missing_modules; $failed of $count failed) run=$token"
elif [ "$failed" -eq 0 ]; then
    echo "HULK-VM-RESULT: pass ($count of $count passed) run=$token"
else
    echo "HULK-VM-RESULT: fail ($failed of $count failed) run=$token"
fi
# Let the serial port drain before the power goes.
sleep 0.1
poweroff -f
INIT
chmod +x "$root/init"

# --- boot ----------------------------------------------------------------------

# Owned by root inside. gzip -1: the guest unpacks it under emulation,
# where stronger compression only costs time; HULK_VM_GZIP=0 skips gzip,
# which saves about 1.4 s per 60 MB of test binaries (host and guest).
if [[ ${HULK_VM_GZIP:-1} == 0 ]]; then
    initrd=$work/initrd.cpio
    (cd "$root" && find . -print0 | cpio --null -o -H newc -R 0:0 --quiet) >"$initrd"
else
    initrd=$work/initrd.gz
    (cd "$root" && find . -print0 | cpio --null -o -H newc -R 0:0 --quiet) | gzip -1 >"$initrd"
fi

# The initramfs lives in guest RAM twice while it is unpacked (the archive
# and the files): make room when the tests are big.
unpacked_mib=$(($(du -sk --apparent-size "$root" | cut -f1) / 1024))
needed_mib=$((unpacked_mib * 2 + 384))
if ((needed_mib > memory)); then
    if [[ -z ${HULK_VM_MEM:-} ]]; then
        note "raising guest memory to $needed_mib MiB for a ${unpacked_mib} MiB initramfs"
        memory=$needed_mib
    else
        note "warning: HULK_VM_MEM=$memory MiB may be too small for a ${unpacked_mib} MiB initramfs"
    fi
fi

# Boots KERNEL; the serial console goes to our stdout and $console.
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

note "booting Debian $kernel_version ($cpus vCPUs, $memory MiB) for $count test binaries, timeout ${timeout_seconds}s"
console=$work/console
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

verdict=$(grep -a -o "HULK-VM-RESULT: .* run=$token" "$console" | tail -n 1 || true)
case $verdict in
    "HULK-VM-RESULT: pass"*)
        note "${verdict% run=*}"
        exit 0 ;;
    "HULK-VM-RESULT: fail"*)
        grep -a -o 'HULK-VM-TEST [0-9]*/[0-9]* FAIL.*' "$console" >&2 || true
        note "${verdict% run=*}"
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
exit 2
