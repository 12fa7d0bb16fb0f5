# shellcheck shell=bash
# vm/run-in-vm.sh's messages and host packages; sourced by it.
#
# Reads: prog (the name messages start with).
# The variables it reads are vm/run-in-vm.sh's, which shellcheck cannot see here:
# shellcheck disable=SC2154

die() { echo "$prog: error: $*" >&2; exit 2; }
note() { echo "$prog: $*" >&2; }

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
