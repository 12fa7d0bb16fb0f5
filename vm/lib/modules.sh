# shellcheck shell=bash
# Kernel modules for the guest, with their dependencies, decompressed into
# the initramfs; sourced by vm/run-in-vm.sh.
#
# Reads: tree, kernel_version, module_root (vm/lib/kernel.sh), cache, root
# (the initramfs tree). Needs vm/lib/host.sh.
# add_modules NAME... writes $root/modules/NAME.ko and $root/modules/order,
# lines "NAME required|optional" in load order, for the guest's /init.
# The variables it reads are vm/run-in-vm.sh's, which shellcheck cannot see here:
# shellcheck disable=SC2154

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

# Puts the named modules (required) and what they need into the initramfs.
add_modules() {
    declare -gA module_file=() builtin_module=() module_seen=() module_named=()
    local path name module
    # Module file names may use - where module names use _ (crc32c-intel.ko
    # is crc32c_intel), so index the files by their module name.
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
    for module in "$@"; do module_named[${module//-/_}]=1; done
    mkdir -p "$root/modules"
    : >"$root/modules/order"
    for module in "$@"; do
        add_module "$module" required
    done
}
