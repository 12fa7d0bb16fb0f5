# shellcheck shell=bash
# The guest's initramfs: busybox and dash, the tools and files the tests
# want with their shared libraries, the test binaries and the runner
# (vm/guest/init.sh as /init), packed as a cpio archive; sourced by
# vm/run-in-vm.sh, which calls these functions in the order they appear
# here (add_modules of vm/lib/modules.sh anywhere after new_tree).
#
# Reads: work (a scratch directory), root (the tree to fill, in it) and
# vm_dir (vm/, for the runner). Needs vm/lib/host.sh.
# The variables it reads are vm/run-in-vm.sh's, which shellcheck cannot see here:
# shellcheck disable=SC2154

# Makes the tree's skeleton at $root.
new_tree() {
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,run,tmp,etc,root,modules,tests}
    mkdir -p "$root/var"
    ln -s ../run "$root/var/run"
}

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

# add_tools PATH...: the --tool executables, at their host paths; sets
# tool_paths. Tools come first, so that busybox's applets only fill the
# gaps (see add_userland).
add_tools() {
    local tool path
    tool_paths=()
    for tool in "$@"; do
        path=$tool
        [[ $path == */* ]] || path=$(command -v "$tool") || die "--tool $tool: not found in PATH"
        [[ $path == /* ]] || die "--tool $tool: give an absolute path"
        [[ -f $path && -x $path ]] || die "--tool $path: not an executable file"
        copy_with_libraries "$path" "$path"
        copy_interpreter "$path"
        tool_paths+=("$path")
    done
}

# add_files SRC:DEST...: the --file files and directories.
add_files() {
    local file source_path destination
    for file in "$@"; do
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
}

# The guest's PATH. A tool must not be shadowed by a busybox applet in a
# directory earlier on it (busybox puts env in /usr/bin, ip in /sbin).
vm_path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# Prints the place of DIRECTORY on the guest's PATH (0 first; past the end
# when absent).
path_rank() {
    local rank=0 directory directories
    IFS=: read -ra directories <<<"$vm_path"
    for directory in "${directories[@]}"; do
        [[ $directory == "$1" ]] && break
        rank=$((rank + 1))
    done
    echo "$rank"
}

# Busybox at /bin/busybox; /init links its applets where busybox puts
# them (busybox --install -s, which leaves existing files alone): a symlink
# command per applet here would cost more than half a second. An applet
# that would shadow a tool (tool_paths, from add_tools) becomes a link to
# the tool. /bin/sh is the host's dash.
add_userland() {
    local busybox applet path dash
    local -A applet_path=()
    busybox=$(command -v busybox)
    copy_with_libraries "$busybox" /bin/busybox # no libraries when static
    while IFS= read -r applet; do
        applet_path[${applet##*/}]=/$applet
    done < <("$root/bin/busybox" --list-full)
    [[ -n ${applet_path[sh]:-} ]] || die "$busybox has no sh applet"

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
}

# Small /etc so that tools asking for users, hosts or protocol names
# (iptables -p tcp) find them.
add_etc() {
    local etc
    echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
    echo 'root:x:0:' >"$root/etc/group"
    printf '127.0.0.1 localhost hulk-vm\n::1 localhost\n' >"$root/etc/hosts"
    for etc in protocols services ethertypes; do
        if [[ -f /etc/$etc ]]; then cp -L "/etc/$etc" "$root/etc/$etc"; fi
    done
}

# Single-quotes a word for /bin/sh.
sh_quote() { printf "'%s'" "${1//\'/\'\\\'\'}"; }

# What verdicts call a binary: its file name, without the hash cargo
# appends to test and bench executables (vm_e2e-0123456789abcdef).
test_name() {
    local name=${1##*/}
    [[ $name =~ ^(.+)-[0-9a-f]{16}$ ]] && name=${BASH_REMATCH[1]}
    echo "$name"
}

# add_tests [--libtest] BINARY [ARGS...] [--- [--libtest] BINARY [ARGS...]]...
# Puts each binary into /tests/NNN (see vm/guest/init.sh for the files
# there); sets count.
add_tests() {
    local binary real test_dir argument libtest arguments
    local -A binary_inside=()
    count=0
    while (($#)); do
        libtest=
        if [[ $1 == --libtest ]]; then
            libtest=1
            shift
            (($#)) || die "--libtest needs a binary after it"
        fi
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
            # The runner's own arguments for a libtest harness (--list, --exact).
            echo ' "$@"'
        } >"$test_dir/run"
        chmod +x "$test_dir/run"
        # What the running line calls it: the host command line.
        printf '%q' "$binary" >"$test_dir/label"
        for argument in "${arguments[@]}"; do printf ' %q' "$argument"; done >>"$test_dir/label"
        test_name "$binary" >"$test_dir/name"
        if [[ -n $libtest ]]; then
            : >"$test_dir/libtest"
            # The runner selects each test with --exact, which libtest
            # refuses to be given twice.
            for argument in "${arguments[@]}"; do
                if [[ $argument == --exact ]]; then : >"$test_dir/exact"; fi
            done
        fi
    done
}

# add_environment KEY=VALUE...: the --env settings, for /init to source.
add_environment() {
    local setting
    for setting in "$@"; do
        [[ $setting =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env $setting: expected KEY=VALUE"
        printf 'export %s=%s\n' "${setting%%=*}" "$(sh_quote "${setting#*=}")"
    done >"$root/tests/environment"
}

# add_init TOKEN: the runner as /init, and its settings. TOKEN marks the
# run's verdict lines (random per run, so that test output cannot fake one).
add_init() {
    cp "$vm_dir/guest/init.sh" "$root/init"
    chmod 0755 "$root/init"
    printf 'vm_path=%s\ncount=%s\ntoken=%s\n' "$(sh_quote "$vm_path")" "$count" "$1" >"$root/tests/config"
    # /init mounts tmpfs on /tmp and /run, which would hide what a --file
    # or --tool put there: park it and let /init move it back.
    local directory
    for directory in tmp run; do
        if [[ -n $(ls -A "$root/$directory") ]]; then
            mkdir -p "$root/.hulk-stage"
            mv "$root/$directory" "$root/.hulk-stage/$directory"
            mkdir "$root/$directory"
        fi
    done
}

# Packs the tree as $work/initrd.gz (or .cpio) and sets initrd and
# unpacked_mib (the tree's size). Owned by root inside. gzip -1: the guest
# unpacks it under emulation, where stronger compression only costs time;
# HULK_VM_GZIP=0 skips gzip, which saves about 1.4 s per 60 MB of test
# binaries (host and guest).
pack_initramfs() {
    if [[ ${HULK_VM_GZIP:-1} == 0 ]]; then
        initrd=$work/initrd.cpio
        (cd "$root" && find . -print0 | cpio --null -o -H newc -R 0:0 --quiet) >"$initrd"
    else
        initrd=$work/initrd.gz
        (cd "$root" && find . -print0 | cpio --null -o -H newc -R 0:0 --quiet) | gzip -1 >"$initrd"
    fi
    # shellcheck disable=SC2034 # vm/run-in-vm.sh sizes the guest's memory by it
    unpacked_mib=$(($(du -sk --apparent-size "$root" | cut -f1) / 1024))
}
