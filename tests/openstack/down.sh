#!/usr/bin/env bash
# Stops what tests/openstack/up.sh STATE_DIR started.
set -uo pipefail
env_file=$1/env
[[ -f $env_file ]] || exit 0
# shellcheck disable=SC1090
source "$env_file"
for pid in "${NEUTRON_PID:-}" "${KEYSTONE_PID:-}"; do
    [[ -n $pid ]] && kill "$pid" 2>/dev/null
done
exit 0
