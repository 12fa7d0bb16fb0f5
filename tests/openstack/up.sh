#!/usr/bin/env bash
# Starts a real Neutron API (noauth, SQLite, ML2 with a no-op binding driver,
# port security, the QoS, router and trunk service plugins) and a real
# Keystone on loopback, installed from PyPI, for the hulk-openstack
# integration tests.
#
# usage: tests/openstack/up.sh STATE_DIR
# Writes STATE_DIR/env (NEUTRON_URL, KEYSTONE_URL, credentials, PIDs) and
# returns once both answer. tests/openstack/down.sh STATE_DIR stops them.
# Virtualenvs are cached in ${HULK_OPENSTACK_CACHE:-~/.cache/hulk-vpc/openstack}.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
state=$(mkdir -p "$1" && cd "$1" && pwd)
cache=${HULK_OPENSTACK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hulk-vpc/openstack}
neutron_port=${NEUTRON_PORT:-19696}
keystone_port=${KEYSTONE_PORT:-15000}
mkdir -p "$cache"

python=${PYTHON:-python3}
venv() { # name, packages...
    local dir=$cache/$1
    shift
    if [[ ! -x $dir/bin/gunicorn ]]; then
        rm -rf "$dir"
        "$python" -m venv "$dir"
        "$dir/bin/pip" install -q --upgrade pip
        "$dir/bin/pip" install -q -c "$here/requirements-frozen.txt" "$@"
    fi
}
# pip builds a local package in its source folder: build a copy, so the
# checkout stays clean.
noopmech=$(mktemp -d)
trap 'rm -rf "$noopmech"' EXIT
cp -r "$here/noopmech" "$noopmech/"
venv neutron-venv neutron==29.0.0 gunicorn "$noopmech/noopmech"
venv keystone-venv keystone==30.0.0 gunicorn

# Neutron: configuration, schema built from the models (migrations do not
# run on SQLite), one worker and one thread (SQLite takes one writer).
mkdir -p "$state/neutron/etc" "$state/neutron/state/lock"
cp "$cache/neutron-venv/etc/neutron/api-paste.ini" "$state/neutron/etc/"
cp "$here/neutron_api_wsgi.py" "$state/neutron/"
cat >"$state/neutron/etc/neutron.conf" <<CONF
[DEFAULT]
core_plugin = ml2
service_plugins = qos,router,trunk
# Nested mode keeps every address a VM node holds as a pair on its port;
# Neutron's default of 10 is too few for a node's pool.
max_allowed_address_pair = 128
auth_strategy = noauth
transport_url = fake://
state_path = $state/neutron/state
notify_nova_on_port_status_changes = false
notify_nova_on_port_data_changes = false
dhcp_agent_notification = false
allow_overlapping_ips = true
debug = false
use_stderr = true

[database]
connection = sqlite:///$state/neutron/neutron.db
sqlite_fk = true

[oslo_concurrency]
lock_path = $state/neutron/state/lock

[ml2]
type_drivers = flat,vlan,local
project_network_types = local
mechanism_drivers = noop_bind,openvswitch
extension_drivers = port_security,qos,tag_ports_during_bulk_creation

[ml2_type_flat]
flat_networks = *

# The tests create many networks and security groups on one server.
[quotas]
quota_network = -1
quota_subnet = -1
quota_port = -1
quota_security_group = -1
quota_security_group_rule = -1
# Floating IP tests: a router per VPC, a floating IP per pod.
quota_router = -1
quota_floatingip = -1
CONF
rm -f "$state/neutron/neutron.db"
"$cache/neutron-venv/bin/python" -W ignore "$here/init_db.py" "sqlite:///$state/neutron/neutron.db"
NEUTRON_CONF=$state/neutron/etc/neutron.conf PYTHONWARNINGS=ignore \
    "$cache/neutron-venv/bin/gunicorn" --bind "127.0.0.1:$neutron_port" --workers 1 --threads 1 \
    --timeout 120 --chdir "$state/neutron" neutron_api_wsgi:application \
    >"$state/neutron.log" 2>&1 &
neutron_pid=$!

# Keystone: fernet tokens with a short lifetime so the tests see refreshes.
mkdir -p "$state/keystone/etc" "$state/keystone/ks"
sed "s|ROOT|$state/keystone|g" "$here/keystone.conf" >"$state/keystone/etc/keystone.conf"
printf '\n[token]\nexpiration = 600\n' >>"$state/keystone/etc/keystone.conf"
sed "s|ROOT/etc|$state/keystone/etc|" "$here/keystone_wsgi.py" >"$state/keystone/keystone_wsgi.py"
km=("$cache/keystone-venv/bin/keystone-manage" --config-file "$state/keystone/etc/keystone.conf")
rm -f "$state/keystone/keystone.db"
"${km[@]}" db_sync >/dev/null 2>&1
"${km[@]}" fernet_setup --keystone-user root --keystone-group root >/dev/null 2>&1
"${km[@]}" credential_setup --keystone-user root --keystone-group root >/dev/null 2>&1
"${km[@]}" bootstrap --bootstrap-password secret --bootstrap-region-id RegionOne \
    --bootstrap-admin-url "http://127.0.0.1:$keystone_port/v3/" \
    --bootstrap-internal-url "http://127.0.0.1:$keystone_port/v3/" \
    --bootstrap-public-url "http://127.0.0.1:$keystone_port/v3/" >/dev/null 2>&1
"$cache/keystone-venv/bin/gunicorn" --bind "127.0.0.1:$keystone_port" --workers 1 \
    --chdir "$state/keystone" keystone_wsgi:application >"$state/keystone.log" 2>&1 &
keystone_pid=$!

cat >"$state/env" <<ENV
NEUTRON_URL=http://127.0.0.1:$neutron_port
KEYSTONE_URL=http://127.0.0.1:$keystone_port/v3
OS_USERNAME=admin
OS_PASSWORD=secret
OS_PROJECT_NAME=admin
NEUTRON_PID=$neutron_pid
KEYSTONE_PID=$keystone_pid
ENV

wait_for() { # url, what, pid
    for _ in $(seq 1 120); do
        curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
        kill -0 "$3" 2>/dev/null || { echo "up.sh: $2 died; see $state/$2.log" >&2; tail -20 "$state/$2.log" >&2; exit 1; }
        sleep 0.5
    done
    echo "up.sh: $2 did not answer in 60 s" >&2
    exit 1
}
wait_for "http://127.0.0.1:$neutron_port/v2.0/networks" neutron "$neutron_pid"
wait_for "http://127.0.0.1:$keystone_port/v3" keystone "$keystone_pid"

# Register Neutron in Keystone's catalog, as a real cloud has it.
token=$(curl -fsS -D - -o /dev/null -H 'Content-Type: application/json' \
    -d '{"auth":{"identity":{"methods":["password"],"password":{"user":{"name":"admin","domain":{"id":"default"},"password":"secret"}}},"scope":{"project":{"name":"admin","domain":{"id":"default"}}}}}' \
    "http://127.0.0.1:$keystone_port/v3/auth/tokens" | awk 'tolower($1)=="x-subject-token:" {print $2}' | tr -d '\r')
service=$(curl -fsS -H "X-Auth-Token: $token" -H 'Content-Type: application/json' \
    -d '{"service":{"type":"network","name":"neutron"}}' "http://127.0.0.1:$keystone_port/v3/services" \
    | "$python" -c 'import json,sys; print(json.load(sys.stdin)["service"]["id"])')
for interface in public internal admin; do
    curl -fsS -o /dev/null -H "X-Auth-Token: $token" -H 'Content-Type: application/json' \
        -d "{\"endpoint\":{\"service_id\":\"$service\",\"interface\":\"$interface\",\"region_id\":\"RegionOne\",\"url\":\"http://127.0.0.1:$neutron_port\"}}" \
        "http://127.0.0.1:$keystone_port/v3/endpoints"
done
echo "up.sh: neutron (pid $neutron_pid) and keystone (pid $keystone_pid) are ready; env in $state/env"
