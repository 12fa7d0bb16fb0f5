"""libcni 1.1.2 (what containerd 1.6 and podman 4.3 link) driving our plugin
and, on the same shapes, the reference macvlan + host-local: every
cniVersion libcni accepts, alone and chained into tuning, portmap and
bandwidth. ADD, CHECK, DEL (twice, as runtimes repeat it), and nothing
left: no link in the pod namespace but lo, no address held by the agent,
no host-local lease, no portmap rule.
"""

import json
import os

from harness import (
    OURS_PREFIX,
    REF_PREFIX,
    Failure,
    check,
    in_node,
    netns_addresses,
    netns_links,
    netns_mac,
    run,
    wait_until,
    write_json,
)

VERSIONS = [
    ("0.3.1", None),
    ("0.4.0", None),
    ("1.0.0", None),
    ("1.0.0", ["1.0.0", "1.1.0"]),
]

TUNING = {"type": "tuning", "sysctl": {"net.ipv4.conf.eth0.arp_notify": "1"}}
PORTMAP = {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True}
BANDWIDTH = {
    "type": "bandwidth",
    "ingressRate": 8000000,
    "ingressBurst": 80000,
    "egressRate": 8000000,
    "egressBurst": 80000,
}
CHAINS = {"alone": [], "tuning": [TUNING], "portmap": [PORTMAP], "bandwidth": [BANDWIDTH]}


class Libcni:
    """The Go client (tests/runtimes/libcni), run in the node's namespace."""

    def __init__(self, binary, node, work):
        self.binary = binary
        self.node = node
        self.cache = os.path.join(work, "libcni-cache")
        os.makedirs(self.cache, exist_ok=True)

    def command(self, action, conflist, container, netns, args=(), caps=None, extra=()):
        command = [
            self.binary,
            "-conflist", conflist,
            "-path", self.node.plugin_dir,
            "-cachedir", self.cache,
            "-id", container,
            "-netns", netns,
            *extra,
        ]
        for arg in args:
            command += ["-arg", arg]
        if caps is not None:
            command += ["-cap", json.dumps(caps)]
        return in_node([*command, action])

    def call(self, action, conflist, container, netns, args=(), caps=None):
        """(ok, stdout, stderr)."""
        rc, out, err = run(self.command(action, conflist, container, netns, args, caps), check_rc=False)
        return rc == 0, out, err.strip()


def k8s_args(container, pod):
    # What containerd 1.6's CRI passes.
    return [
        "IgnoreUnknown=1",
        "K8S_POD_NAMESPACE=hkrt",
        f"K8S_POD_NAME={pod}",
        f"K8S_POD_INFRA_CONTAINER_ID={container}",
        f"K8S_POD_UID=uid-{pod}",
    ]


def nat_rules():
    _, out, _ = run(in_node(["iptables-save", "-t", "nat"]), check_rc=False)
    return out


def attempt(node, client, work, which, version, versions, chain, index):
    """One ADD/CHECK/DEL/DEL round: the outcome and the problems seen."""
    netns = f"hkrt-lc-{which}-{index}"
    netns_path = f"/run/netns/{netns}"
    container = f"hkrt-lc-{which}-{index}"
    prefix = OURS_PREFIX if which == "ours" else REF_PREFIX
    conf = node.conflist(which, version, CHAINS[chain], versions)
    conflist = write_json(os.path.join(work, f"{container}.conflist"), conf)
    caps = None
    if chain == "portmap":
        caps = {"portMappings": [{"hostPort": 18000 + index, "containerPort": 80, "protocol": "tcp"}]}
    args = k8s_args(container, f"pod-{index}")
    outcome = {}
    problems = []
    run(["ip", "netns", "add", netns])
    try:
        ok, out, err = client.call("add", conflist, container, netns_path, args, caps)
        outcome["add"] = "ok" if ok else "failed"
        if not ok:
            outcome["add_error"] = err
        address = None
        if ok:
            result = json.loads(out)
            ips = result.get("ips") or []
            address = ips[0]["address"].split("/")[0] if ips else None
            if not address or not address.startswith(prefix):
                problems.append(f"ADD result without an address in {prefix}0/24: {result}")
            elif not any(a.startswith(address + "/") for a in netns_addresses(netns)):
                problems.append(f"{address} not on eth0 in the pod: {netns_addresses(netns)}")
            sandboxes = [i for i in result.get("interfaces", []) if i.get("sandbox")]
            if not sandboxes or sandboxes[0].get("sandbox") != netns_path:
                problems.append(f"result interfaces without sandbox {netns_path}: {result.get('interfaces')}")
            elif sandboxes[0].get("mac") != netns_mac(netns):
                problems.append(f"result MAC {sandboxes[0].get('mac')} is not eth0's {netns_mac(netns)}")
            if which == "ours" and address:
                owner = node.held().get(address)
                if not owner or owner.get("container_id") != container:
                    problems.append(f"the agent does not hold {address} for {container}: {owner}")
            if chain == "tuning":
                _, value, _ = run(
                    ["ip", "netns", "exec", netns, "sysctl", "-n", "net.ipv4.conf.eth0.arp_notify"],
                    check_rc=False,
                )
                if value.strip() != "1":
                    problems.append(f"tuning's sysctl not applied: {value.strip()!r}")
            if chain == "portmap" and f"{address}:80" not in nat_rules():
                problems.append(f"no portmap DNAT to {address}:80")
        if ok:
            ok_check, _, err_check = client.call("check", conflist, container, netns_path, args, caps)
            if ok_check:
                outcome["check"] = "ok"
            elif "does not support the CHECK command" in err_check:
                outcome["check"] = "n/a (libcni: no CHECK before 0.4.0)"
            else:
                outcome["check"] = "failed"
                outcome["check_error"] = err_check
        for attempt_no in (1, 2):
            ok_del, _, err_del = client.call("del", conflist, container, netns_path, args, caps)
            outcome[f"del{attempt_no}"] = "ok" if ok_del else "failed"
            if not ok_del:
                outcome[f"del{attempt_no}_error"] = err_del
        links = netns_links(netns)
        left = []
        if links != ["lo"]:
            left.append(f"links in the pod: {links}")
        if which == "ours":
            held = {a: o for a, o in node.held().items() if o.get("container_id") == container}
            attached = [a for a in node.attachments() if a["owner"]["container_id"] == container]
            if held:
                left.append(f"addresses held: {held}")
            if attached:
                left.append(f"attachments: {attached}")
        else:
            leases = node.host_local_leases()
            if leases:
                left.append(f"host-local leases: {leases}")
        if address and f"{address}:80" in nat_rules():
            left.append(f"portmap DNAT to {address}:80")
        outcome["left"] = "; ".join(left) or "nothing"
    finally:
        run(["ip", "netns", "del", netns], check_rc=False)
    return outcome, problems


def summary(outcome):
    keys = ("add", "check", "del1", "del2", "left")
    return ", ".join(f"{k}={outcome[k]}" for k in keys if k in outcome)


def comparable(outcome):
    return tuple(outcome.get(k) for k in ("add", "check", "del1", "del2")) + (outcome["left"] == "nothing",)


def matrix(report, node, client, work):
    index = 0
    for version, versions in VERSIONS:
        label = version + ("+cniVersions[1.0.0,1.1.0]" if versions else "")
        for chain in CHAINS:
            index += 1
            name = f"libcni {label} {chain}"
            with report.case(f"{name}: ours behaves as the reference macvlan+host-local"):
                ours, ours_problems = attempt(node, client, work, "ours", version, versions, chain, index)
                ref, ref_problems = attempt(node, client, work, "ref", version, versions, chain, index)
                report.note(f"ours: {summary(ours)}")
                report.note(f"ref:  {summary(ref)}")
                for key in ("add_error", "check_error", "del1_error"):
                    if key in ours or key in ref:
                        report.note(f"{key}: ours={ours.get(key)!r} ref={ref.get(key)!r}")
                check(not ours_problems, f"ours: {ours_problems}")
                check(not ref_problems, f"reference: {ref_problems}")
                check(comparable(ours) == comparable(ref), f"ours ({summary(ours)}) != reference ({summary(ref)})")
                check(ours["left"] == "nothing", f"ours left {ours['left']}")
                if chain == "bandwidth":
                    # bandwidth shapes the host side of a veth pair: macvlan
                    # (ours and the reference) has none, so ADD fails for both.
                    check(ours["add"] == "failed", f"bandwidth accepted a macvlan pod: {summary(ours)}")
                    check("no veth peer" in ours.get("add_error", ""), ours.get("add_error"))
                    continue
                check(ours["add"] == "ok" and ours["del1"] == "ok" and ours["del2"] == "ok", summary(ours))
                if version == "0.3.1":
                    check(ours["check"] == "n/a (libcni: no CHECK before 0.4.0)", summary(ours))
                elif chain == "portmap":
                    # portmap 1.1.1's CHECK looks for an IPv6 DNAT chain that
                    # its ADD never made for an IPv4-only pod: it fails for
                    # any IPv4 pod, the reference's too.
                    check(
                        ours["check"] == "ok" or "could not check ipv6 dnat" in ours.get("check_error", ""),
                        summary(ours),
                    )
                else:
                    check(ours["check"] == "ok", summary(ours))


def version_1_1_0(report, node, client, work):
    """libcni 1.1.2 knows no 1.1.0 result: what becomes of the address."""
    args = k8s_args("hkrt-lc-110", "pod-110")
    for which in ("ours", "ref"):
        conflist = write_json(os.path.join(work, f"hkrt-110-{which}.conflist"), node.conflist(which, "1.1.0"))
        netns = f"hkrt-lc-110-{which}"
        container = f"hkrt-lc-110-{which}"
        run(["ip", "netns", "add", netns])
        try:
            ok, out, err = client.call("add", conflist, container, f"/run/netns/{netns}", args)
            if which == "ref":
                with report.case("libcni 1.1.0 reference macvlan: refused before doing anything"):
                    report.note(f"ADD ok={ok}: {err or out.strip()}")
                    check(not ok, "the reference plugins 1.1.1 accepted cniVersion 1.1.0")
                    check(netns_links(netns) == ["lo"], f"left {netns_links(netns)}")
                    check(not node.host_local_leases(), f"left {node.host_local_leases()}")
                continue
            with report.case("libcni 1.1.0 ours: ADD rejected by libcni after the plugin ran (expected)"):
                report.note(f"ADD ok={ok}: {err or out.strip()}")
                check(not ok, "libcni 1.1.2 accepted a 1.1.0 result")
                check("1.1.0" in err, f"not a version refusal: {err}")
                held = {a: o for a, o in node.held().items() if o.get("container_id") == container}
                report.note(f"after the refused ADD: eth0 {netns_addresses(netns)}, agent holds {held}")
                check(len(held) == 1, f"expected the plugin's address to be held until DEL: {held}")
            with report.case("libcni 1.1.0 ours: the runtime's DEL after the refused ADD frees the address"):
                ok_del, _, err_del = client.call("del", conflist, container, f"/run/netns/{netns}", args)
                check(ok_del, f"DEL failed: {err_del}")
                check(netns_links(netns) == ["lo"], f"left {netns_links(netns)}")
                held = {a: o for a, o in node.held().items() if o.get("container_id") == container}
                check(not held, f"still held: {held}")
            with report.case("libcni 1.1.0 ours: no DEL ever, sandbox removed: the liveness pass frees the address"):
                ok, _, err = client.call("add", conflist, container + "-b", f"/run/netns/{netns}", args)
                check(not ok, "accepted")
                held = {a: o for a, o in node.held().items() if o.get("container_id") == container + "-b"}
                check(len(held) == 1, f"not held after the refused ADD: {held}")
                run(["ip", "netns", "del", netns])

                def released():
                    return not any(o.get("container_id") == container + "-b" for o in node.held().values())

                wait_until(released, 15, 0.2, "the liveness pass to free the address of a removed sandbox")
        finally:
            run(["ip", "netns", "del", netns], check_rc=False)


def bench(report, node, client, work, samples):
    """ADD and DEL timed around libcni's calls, ours vs the reference."""
    rows = []
    for which, label in (("ours", "hulk-vpc-cni -> hulk-agent"), ("ref", "reference macvlan + host-local")):
        conflist = write_json(os.path.join(work, f"bench-{which}.conflist"), node.conflist(which, "1.0.0"))
        netns = f"hkrt-lc-bench-{which}"
        run(["ip", "netns", "add", netns])
        try:
            command = client.command(
                "bench", conflist, f"hkrt-bench-{which}", f"/run/netns/{netns}",
                k8s_args(f"hkrt-bench-{which}", "bench"), extra=["-n", str(samples)],
            )
            _, out, _ = run(command, timeout=300)
            timings = json.loads(out)
            rows.append(("libcni 1.1.2", label, timings["add_ms"], timings["del_ms"], "AddNetworkList / DelNetworkList"))
        finally:
            run(["ip", "netns", "del", netns], check_rc=False)
    return rows


def main(report, node, work, client_binary, samples):
    client = Libcni(client_binary, node, work)
    matrix(report, node, client, work)
    version_1_1_0(report, node, client, work)
    with report.case("libcni: nothing held by the agent after the matrix"):
        node.wait_nothing_held(10)
    rows = []
    if samples:
        with report.case(f"libcni latency ({samples} samples each)"):
            rows = bench(report, node, client, work, samples)
            if node.leftovers():
                raise Failure(node.leftovers())
    return rows
