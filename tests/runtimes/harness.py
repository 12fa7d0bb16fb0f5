"""What the real-runtime tests share: PASS/FAIL reporting, the node (a
network namespace of its own with a veth `eth1` as the macvlan parent), the
agent and the fake cloud IPAM service it takes addresses from, hulkctl, the
pod namespaces' state, conflists for ours and the reference plugins, and
latency statistics.

The runtimes (the libcni client, podman, containerd) run in the node's
network namespace (`nsenter --net`, the mount namespace stays the host's),
so every plugin they exec (ours, the reference macvlan, tuning, portmap's
iptables rules, bandwidth's ifb) works there and the host's own network is
never touched.
"""

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import time
import traceback

NODE_NETNS = "hkrt-node"
NODE_NETNS_PATH = f"/run/netns/{NODE_NETNS}"
# Ours: the agent's subnet (served by hulk-ultron-fake). The reference
# macvlan + host-local: another subnet on the same parent.
OURS_SUBNET = "10.81.0.0/24"
OURS_PREFIX = "10.81.0."
NODE_ADDRESS = "10.81.0.250/24"
REF_SUBNET = "10.82.0.0/24"
REF_PREFIX = "10.82.0."
OURS_NET = "hkrt-vpc"
REF_NET = "hkrt-ref"
ULTRON_TOKEN = "hkrt-token"


class Failure(Exception):
    """A check that did not hold."""


def check(condition, message):
    if not condition:
        raise Failure(message)


class Report:
    """PASS/FAIL/SKIP lines, and the counts at the end."""

    def __init__(self):
        self.passed = 0
        self.failed = 0
        self.skipped = 0
        self.failures = []
        self._notes = None

    def ok(self, name, detail=""):
        self.passed += 1
        print(f"PASS {name}" + (f" ({detail})" if detail else ""), flush=True)

    def fail(self, name, detail):
        self.failed += 1
        self.failures.append(name)
        print(f"FAIL {name}: {detail}", flush=True)

    def skip(self, name, reason):
        self.skipped += 1
        print(f"SKIP {name}: {reason}", flush=True)

    def note(self, text):
        """A detail line; within a case, printed under its PASS/FAIL line."""
        if self._notes is not None:
            self._notes.append(text)
        else:
            print(f"     {text}", flush=True)

    @contextlib.contextmanager
    def case(self, name):
        """Runs the block as one test: PASS unless it raises."""
        started = time.monotonic()
        self._notes = []
        trace = None
        try:
            yield
        except Failure as error:
            self.fail(name, str(error))
        except Exception as error:  # a broken step is a failed test
            self.fail(name, f"{type(error).__name__}: {error}")
            trace = traceback.format_exc()
        else:
            self.ok(name, f"{time.monotonic() - started:.1f}s")
        finally:
            notes, self._notes = self._notes, None
            for text in notes:
                print(f"     {text}", flush=True)
            if trace:
                print(trace, flush=True)

    def summary(self):
        line = f"{self.passed} passed, {self.failed} failed, {self.skipped} skipped"
        print(f"\nruntime-tests: {line}", flush=True)
        for name in self.failures:
            print(f"  failed: {name}", flush=True)
        return self.failed == 0


def run(args, check_rc=True, timeout=120, env=None, input=None):
    """Runs `args`: (returncode, stdout, stderr) as text."""
    completed = subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        input=input,
    )
    if check_rc and completed.returncode != 0:
        raise Failure(
            f"{' '.join(map(str, args))} exited {completed.returncode}: "
            f"{completed.stderr.strip() or completed.stdout.strip()}"
        )
    return completed.returncode, completed.stdout, completed.stderr


def in_node(args):
    """`args` run in the node's network namespace."""
    return ["nsenter", f"--net={NODE_NETNS_PATH}", *args]


def wait_until(predicate, timeout, interval=0.2, what="condition"):
    """Polls `predicate` until it returns something truthy; returns it."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise Failure(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def netns_links(name):
    """Link names in named namespace `name` (None if it is gone)."""
    rc, out, _ = run(["ip", "-n", name, "-j", "link"], check_rc=False)
    if rc != 0:
        return None
    return [link["ifname"] for link in json.loads(out or "[]")]


def netns_addresses(name, ifname="eth0"):
    """IPv4 addresses (with prefix) of `ifname` in named namespace `name`."""
    rc, out, _ = run(["ip", "-n", name, "-j", "-4", "addr", "show", "dev", ifname], check_rc=False)
    if rc != 0:
        return []
    return [
        f"{info['local']}/{info['prefixlen']}"
        for link in json.loads(out or "[]")
        for info in link.get("addr_info", [])
    ]


def netns_mac(name, ifname="eth0"):
    rc, out, _ = run(["ip", "-n", name, "-j", "link", "show", "dev", ifname], check_rc=False)
    if rc != 0:
        return None
    links = json.loads(out or "[]")
    return links[0]["address"] if links else None


def named_netns():
    try:
        return set(os.listdir("/run/netns"))
    except FileNotFoundError:
        return set()


def percentile(samples, fraction):
    """Nearest-rank percentile (p99 of 20 samples is the largest)."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def median(samples):
    ordered = sorted(samples)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


class Node:
    """The node: its namespace with `eth1`, hulk-ultron-fake as the cloud,
    and hulk-agent in that namespace (node_netns), from `bin_dir`."""

    def __init__(self, work, bin_dir, report):
        self.work = work
        self.bin_dir = bin_dir
        self.report = report
        self.dir = os.path.join(work, "node")
        os.makedirs(self.dir, exist_ok=True)
        self.agent = None
        self.fake = None
        self.agent_starts = 0
        self.plugin_dir = os.path.join(work, "cni-bin")
        self.socket = os.path.join(self.dir, "agent.sock")
        self.rescue = os.path.join(self.dir, "rescue.sock")
        self.pending = os.path.join(self.dir, "pending-dels")
        self.host_local = os.path.join(self.dir, "host-local")
        self.plugin_log = os.path.join(self.dir, "plugin.log")

    # --- setup and teardown -------------------------------------------------

    def setup(self):
        run(["ip", "netns", "del", NODE_NETNS], check_rc=False)
        run(["ip", "netns", "add", NODE_NETNS])
        run(["ip", "-n", NODE_NETNS, "link", "set", "lo", "up"])
        run(["ip", "-n", NODE_NETNS, "link", "add", "eth1", "type", "veth", "peer", "name", "eth1-peer"])
        for link in ("eth1", "eth1-peer"):
            run(["ip", "-n", NODE_NETNS, "link", "set", link, "up"])
        # One plugin directory for every caller: ours and the reference
        # plugins (containerd 1.6 takes a single bin_dir).
        os.makedirs(self.plugin_dir, exist_ok=True)
        os.symlink(os.path.join(self.bin_dir, "hulk-vpc-cni"), os.path.join(self.plugin_dir, "hulk-vpc-cni"))
        for plugin in os.listdir("/usr/lib/cni"):
            os.symlink(os.path.join("/usr/lib/cni", plugin), os.path.join(self.plugin_dir, plugin))
        self.start_fake()
        self.start_agent()

    def start_fake(self):
        port = free_port()
        log = open(os.path.join(self.dir, "ultron-fake.log"), "ab")
        self.fake = subprocess.Popen(
            [
                os.path.join(self.bin_dir, "hulk-ultron-fake"),
                "--listen", f"127.0.0.1:{port}",
                "--subnet", OURS_SUBNET,
                "--latency-ms", "0",
            ],
            env={**os.environ, "HULK_ULTRON_TOKEN": ULTRON_TOKEN},
            stdout=log,
            stderr=log,
        )
        self.fake_port = port
        self._pid_file("fake", self.fake.pid)
        wait_until(lambda: self._connects(port), 20, 0.05, "hulk-ultron-fake")
        with open(os.path.join(self.dir, "token"), "w") as token:
            token.write(ULTRON_TOKEN)

    def _pid_file(self, name, pid):
        # For scripts/runtime-tests' trap, should this process die first.
        with open(os.path.join(self.work, f"{name}.pid"), "w") as out:
            out.write(str(pid))

    @staticmethod
    def _connects(port):
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    def agent_config(self):
        path = os.path.join(self.dir, "agent.toml")
        with open(path, "w") as config:
            config.write(
                f"""
node_name = "hkrt-node"
socket = "{self.socket}"
rescue_socket = "{self.rescue}"
state_file = "{self.dir}/pool.redb"
node_netns = "{NODE_NETNS_PATH}"
gc_interval_seconds = 1
pending_del_dir = "{self.pending}"
[network]
parent = "eth1"
kind = "macvlan"
node_address = "{NODE_ADDRESS}"
service_cidrs = ["10.96.0.0/12"]
[default_pool]
network = "vpc"
subnet = "subnet-rt"
[pool]
warm_up = 8
min_idle = 4
max_idle = 32
batch = 8
reuse_cooldown_seconds = 0
[backend]
type = "ultron"
url = "http://127.0.0.1:{self.fake_port}"
token_file = "{self.dir}/token"
cluster = "hkrt"
"""
            )
        return path

    def start_agent(self):
        config = self.agent_config()
        log = open(os.path.join(self.dir, "agent.log"), "ab")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)
        self.agent = subprocess.Popen(
            [os.path.join(self.bin_dir, "hulk-agent"), "--config", config],
            stdout=log,
            stderr=log,
        )
        self.agent_starts += 1
        self._pid_file("agent", self.agent.pid)
        agent = self.agent

        def up():
            check(agent.poll() is None, f"the agent exited ({agent.returncode}); see {self.dir}/agent.log")
            return os.path.exists(self.socket) and os.path.exists(self.rescue)

        wait_until(up, 30, 0.05, "the agent's sockets")

    def kill_agent(self):
        """SIGKILL: no cleanup at all, as a crash or an OOM kill."""
        if self.agent and self.agent.poll() is None:
            self.agent.send_signal(signal.SIGKILL)
            self.agent.wait()

    def stop(self):
        if self.agent and self.agent.poll() is None:
            self.agent.terminate()
            try:
                self.agent.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.agent.kill()
                self.agent.wait()
        if self.fake and self.fake.poll() is None:
            self.fake.kill()
            self.fake.wait()
        run(["ip", "netns", "del", NODE_NETNS], check_rc=False)

    # --- what the agent holds ----------------------------------------------

    def hulkctl(self, *args):
        rc, out, err = run(
            [os.path.join(self.bin_dir, "hulkctl"), "--socket", self.rescue, "--json", *args],
            check_rc=False,
        )
        if rc != 0:
            raise Failure(f"hulkctl {' '.join(args)} exited {rc}: {err.strip() or out.strip()}")
        return json.loads(out)

    def held(self):
        """{address: owner} of every address assigned to a pod."""
        held = {}
        for record in self.hulkctl("leases")["leases"]:
            state = record["state"]
            if isinstance(state, dict) and "Assigned" in state:
                held[record["lease"]["address"].split("/")[0]] = state["Assigned"]
        return held

    def attachments(self):
        return self.hulkctl("attachments")["attachments"]

    def leftovers(self):
        """What the agent still holds for pods: '' when nothing."""
        held = self.held()
        attachments = self.attachments()
        notes = os.listdir(self.pending) if os.path.isdir(self.pending) else []
        parts = []
        if held:
            parts.append(f"addresses held: {held}")
        if attachments:
            parts.append(f"attachments: {[a['owner'] for a in attachments]}")
        if notes:
            parts.append(f"DEL notes not replayed: {notes}")
        return "; ".join(parts)

    def wait_nothing_held(self, timeout=20):
        """Waits for the liveness pass / note replay to leave nothing held."""
        deadline = time.monotonic() + timeout
        while True:
            left = self.leftovers()
            if not left:
                return
            if time.monotonic() > deadline:
                raise Failure(f"after {timeout}s: {left}")
            time.sleep(0.3)

    def host_local_leases(self):
        """host-local's lease files (addresses) left in its data dir."""
        leases = []
        for network in os.listdir(self.host_local) if os.path.isdir(self.host_local) else []:
            for name in os.listdir(os.path.join(self.host_local, network)):
                if name != "lock" and not name.startswith("last_reserved_ip"):
                    leases.append(f"{network}/{name}")
        return leases

    # --- network configurations --------------------------------------------

    def ours_plugin(self, **extra):
        return {
            "type": "hulk-vpc-cni",
            "agentSocket": self.socket,
            "agentTimeoutSeconds": 10,
            "pendingDelDir": self.pending,
            "logFile": self.plugin_log,
            "logLevel": "info",
            **extra,
        }

    def ref_plugin(self, subnet=REF_SUBNET):
        gateway = subnet.rsplit(".", 1)[0] + ".1"
        return {
            "type": "macvlan",
            "master": "eth1",
            "mode": "bridge",
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": subnet, "gateway": gateway}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": self.host_local,
            },
        }

    def conflist(self, which, version, chain=(), versions=None, name=None):
        plugin = self.ours_plugin() if which == "ours" else self.ref_plugin()
        conf = {
            "cniVersion": version,
            "name": name or (OURS_NET if which == "ours" else REF_NET),
            "plugins": [plugin, *chain],
        }
        if versions:
            conf["cniVersions"] = versions
        return conf


def write_json(path, value):
    with open(path, "w") as out:
        json.dump(value, out, indent=2)
    return path


def latency_table(rows):
    """rows: (caller, plugin, add samples ms, del samples ms, add label, del label)."""
    lines = [
        "| caller | plugin | n | ADD p50 ms | ADD p99 ms | DEL p50 ms | DEL p99 ms | timed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for caller, plugin, adds, dels, timed in rows:
        lines.append(
            f"| {caller} | {plugin} | {len(adds)} | {median(adds):.0f} | {percentile(adds, 0.99):.0f} "
            f"| {median(dels):.0f} | {percentile(dels, 0.99):.0f} | {timed} |"
        )
    return "\n".join(lines)
