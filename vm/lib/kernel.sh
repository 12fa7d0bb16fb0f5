# shellcheck shell=bash
# The guest kernel: Debian's, fetched with apt-get download and unpacked
# into a cache, never installed; sourced by vm/run-in-vm.sh.
#
# Reads: cache (the cache directory). Needs vm/lib/host.sh.
# use_kernel sets: tree (the unpacked package), kernel (its vmlinuz),
# kernel_version, module_root (its lib/modules/VERSION) and vmlinux (the
# PVH-bootable ELF kernel, or empty to boot $kernel).
# The variables it reads are vm/run-in-vm.sh's, which shellcheck cannot see here:
# shellcheck disable=SC2154

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

# Finds or fetches the kernel and sets the variables named at the top.
use_kernel() {
    tree=$(kernel_tree)
    kernel=$(find "$tree/boot" -maxdepth 1 -name 'vmlinuz-*' -print -quit)
    [[ -n $kernel ]] || die "no boot/vmlinuz-* in $tree (remove it to fetch it again)"
    kernel_version=${kernel##*/vmlinuz-}
    module_root=$tree/lib/modules/$kernel_version
    [[ -d $module_root ]] || die "no lib/modules/$kernel_version in $tree (remove it to fetch it again)"
    vmlinux=$(pvh_kernel)
}
