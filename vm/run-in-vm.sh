#!/usr/bin/env bash
# Runs test binaries inside a qemu VM that boots Debian's own kernel, for
# tests that need kernel features the host lacks (ipvlan, dummy links).
#
# usage: vm/run-in-vm.sh [--module NAME]... [--tool /abs/path]... [--file SRC:DEST]...
#                        -- BINARY [ARGS...] [--- BINARY [ARGS...]]...
#
#   --module NAME   also load kernel module NAME (ipvlan, dummy, veth and
#                   macvlan always are); hard dependencies are loaded first,
#                   soft ones (modinfo's softdep) must be named before it
#   --tool PATH     copy a host executable and its libraries into the VM, at
#                   the same path (e.g. /usr/sbin/ip, /usr/sbin/iptables)
#   --env KEY=VALUE set an environment variable for the binaries
#   --file SRC:DEST copy a file (with its libraries) or a directory into the
#                   VM at DEST (e.g. a CNI plugin, iptables' extensions)
#
# Each BINARY runs as root in turn, its output on the console (this
# script's stdout). Exit status: 0 when every binary exited 0; 1 when one
# failed; 2 when the VM gave no verdict (boot failure, panic, timeout).
#
# Environment: HULK_VM_CACHE (kernel cache; default ~/.cache/hulk-vpc/vm),
# HULK_VM_TIMEOUT (seconds, default 900), HULK_VM_MEM (MiB, default 1024),
# HULK_VM_CPUS (default 2).
set -euo pipefail

cache=${HULK_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hulk-vpc/vm}
timeout_seconds=${HULK_VM_TIMEOUT:-900}
memory=${HULK_VM_MEM:-1024}
cpus=${HULK_VM_CPUS:-2}

die() { echo "run-in-vm: $*" >&2; exit 2; }

modules=(ipvlan dummy veth macvlan)
tools=()
files=()
environment=()
while (($#)); do
    case $1 in
        --module) modules+=("$2"); shift 2 ;;
        --tool) tools+=("$2"); shift 2 ;;
        --file) files+=("$2"); shift 2 ;;
        --env) environment+=("$2"); shift 2 ;;
        --) shift; break ;;
        *) die "unknown option $1 (see the usage at the top of $0)" ;;
    esac
done
(($#)) || die "no binary to run (see the usage at the top of $0)"

ensure_packages() {
    local missing=() package
    for package in qemu-system-x86 busybox-static cpio kmod; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$package")
    done
    if ((${#missing[@]})); then
        echo "run-in-vm: installing ${missing[*]}" >&2
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    fi
}

# Debian's kernel, unpacked (not installed) into the cache. The package
# name moves with Debian's ABI bumps, so ask apt which one is current and
# fall back to whatever is cached when apt cannot tell.
current_kernel_package() {
    apt-cache depends linux-image-amd64 2>/dev/null \
        | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
}

kernel_tree() {
    local package tree
    package=$(current_kernel_package)
    if [[ -z $package ]] && ! compgen -G "$cache/linux-image-*" >/dev/null; then
        # A machine whose package lists were never fetched.
        DEBIAN_FRONTEND=noninteractive apt-get update -qq || true
        package=$(current_kernel_package)
    fi
    if [[ -z $package ]]; then
        tree=$(find "$cache" -maxdepth 1 -type d -name 'linux-image-*' 2>/dev/null | sort | tail -n 1)
        [[ -n $tree ]] || die "cannot tell which Debian kernel to use (apt-get update?)"
        echo "$tree"
        return
    fi
    tree=$cache/$package
    if [[ ! -d $tree/boot ]]; then
        mkdir -p "$cache"
        local download
        download=$(mktemp -d)
        chmod a+rwx "$download" # apt-get download hands the file to the _apt user
        echo "run-in-vm: fetching $package" >&2
        # Stale package lists name a kernel the mirror no longer has:
        # refresh them once and ask again.
        if ! (cd "$download" && apt-get download -qq "$package"); then
            DEBIAN_FRONTEND=noninteractive apt-get update -qq
            package=$(current_kernel_package)
            tree=$cache/$package
            (cd "$download" && apt-get download -qq "$package") \
                || die "apt-get download $package failed"
        fi
        rm -rf "$tree.partial"
        dpkg -x "$download"/*.deb "$tree.partial"
        mv "$tree.partial" "$tree"
        rm -rf "$download"
    fi
    echo "$tree"
}

# Prints a module's path and, before it, its dependencies' (depth first).
resolve_module() {
    local name=$1 path dependency
    [[ -n ${seen_modules[$name]:-} ]] && return
    seen_modules[$name]=1
    path=$(find "$module_root" -name "$name.ko" -o -name "$name.ko.xz" -o -name "$name.ko.zst" \
        | head -n 1)
    [[ -n $path ]] || die "kernel module $name not found under $module_root"
    for dependency in $(modinfo -F depends "$path" | tr ',' ' '); do
        resolve_module "$dependency"
    done
    echo "$path"
}

copy_with_libraries() {
    local source=$1 destination=$2 library
    mkdir -p "$root$(dirname "$destination")"
    cp -L "$source" "$root$destination"
    # ldd prints "name => /path (addr)" for libraries and "/path (addr)" for
    # the loader; static binaries print neither.
    while read -r library; do
        [[ -e $root$library ]] && continue
        mkdir -p "$root$(dirname "$library")"
        cp -L "$library" "$root$library"
    done < <(ldd "$source" 2>/dev/null | grep -oE '/[^ ]+' || true)
}

ensure_packages
tree=$(kernel_tree)
kernel=$(find "$tree/boot" -name 'vmlinuz-*' | head -n 1)
module_root=$(find "$tree/lib/modules" -mindepth 1 -maxdepth 1 -type d | head -n 1)
[[ -n $kernel && -n $module_root ]] || die "incomplete kernel tree in $tree"

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,proc,sys,dev,run,tmp,etc,modules,tests,var}
ln -s ../run "$root/var/run"

cp /bin/busybox "$root/bin/busybox"
for applet in sh mount mkdir insmod poweroff cat echo ip ping sleep ls; do
    ln -s busybox "$root/bin/$applet"
done

declare -A seen_modules=()
: >"$root/modules/order"
for module in "${modules[@]}"; do
    # resolve_module runs in a subshell here, so it cannot remember what
    # earlier modules pulled in: skip repeats when writing the load order.
    while read -r path; do
        name=$(basename "$path")
        grep -qx "${name%.ko*}.ko" "$root/modules/order" && continue
        case $name in
            *.xz) xz -dc "$path" >"$root/modules/${name%.xz}"; name=${name%.xz} ;;
            *.zst) zstd -qdc "$path" >"$root/modules/${name%.zst}"; name=${name%.zst} ;;
            *) cp "$path" "$root/modules/$name" ;;
        esac
        echo "$name" >>"$root/modules/order"
    done < <(resolve_module "$module")
done

for tool in "${tools[@]}"; do
    copy_with_libraries "$tool" "$tool"
done
for file in "${files[@]}"; do
    source_path=${file%%:*} destination=${file#*:}
    if [[ -d $source_path ]]; then
        mkdir -p "$root$(dirname "$destination")"
        cp -rL "$source_path" "$root$destination"
    else
        copy_with_libraries "$source_path" "$destination"
    fi
done

# Each test becomes a line of the run list: the binary's path inside the VM
# and its arguments, shell-quoted.
count=0
run_list=$root/tests/run-list
: >"$run_list"
while (($#)); do
    binary=$1
    shift
    arguments=()
    while (($#)) && [[ $1 != --- ]]; do
        arguments+=("$1")
        shift
    done
    (($#)) && shift
    [[ -x $binary ]] || die "$binary is not an executable file"
    count=$((count + 1))
    inside=/tests/$count-$(basename "$binary")
    copy_with_libraries "$binary" "$inside"
    printf '%q ' "$inside" "${arguments[@]}" >>"$run_list"
    echo >>"$run_list"
done

for setting in "${environment[@]}"; do
    printf 'export %q\n' "$setting"
done >"$root/tests/environment"

cat >"$root/init" <<'INIT'
#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/tmp HULK_IN_VM=1 RUST_BACKTRACE=0
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs run /run
mount -t tmpfs tmp /tmp
mkdir -p /run/netns
ip link set lo up
. /tests/environment
while read -r module; do
    insmod "/modules/$module" || echo "HULK-VM: insmod $module failed"
done </modules/order
total=0
failed=0
while read -r line; do
    total=$((total + 1))
    echo "HULK-VM: running $line"
    if eval "$line"; then
        echo "HULK-VM-TEST: pass $line"
    else
        echo "HULK-VM-TEST: FAIL (exit $?) $line"
        failed=$((failed + 1))
    fi
done </tests/run-list
if [ "$failed" -eq 0 ]; then
    echo "HULK-VM-RESULT: pass ($total of $total passed)"
else
    echo "HULK-VM-RESULT: fail ($failed of $total failed)"
fi
poweroff -f
INIT
chmod +x "$root/init"

initrd=$root.initrd.gz
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$initrd"
trap 'rm -rf "$root" "$initrd"' EXIT

echo "run-in-vm: booting $(basename "$kernel") with $count test binaries" >&2
console=$root.console
set +e
timeout --foreground "$timeout_seconds" qemu-system-x86_64 \
    -accel tcg -cpu max -m "$memory" -smp "$cpus" \
    -kernel "$kernel" -initrd "$initrd" \
    -append "console=ttyS0 panic=-1 quiet loglevel=3" \
    -nographic -no-reboot -nic none </dev/null | tee "$console"
set -e
trap 'rm -rf "$root" "$initrd" "$console"' EXIT

verdict=$(tr -d '\r' <"$console" | grep -a '^HULK-VM-RESULT:' | tail -n 1 || true)
case $verdict in
    "HULK-VM-RESULT: pass"*) exit 0 ;;
    "HULK-VM-RESULT: fail"*) echo "run-in-vm: $verdict" >&2; exit 1 ;;
    *) echo "run-in-vm: the VM gave no verdict (boot failure, panic or timeout after ${timeout_seconds}s)" >&2; exit 2 ;;
esac
