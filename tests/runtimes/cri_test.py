"""containerd 1.6's CRI plugin driven as the kubelet drives it, over gRPC
from stubs generated (python3-grpc-tools) from tests/runtimes/cri/api.proto:
RunPodSandbox, PodSandboxStatus, StopPodSandbox (twice), RemovePodSandbox
(twice); 20 sandboxes at once; the agent SIGKILLed during StopPodSandbox;
K8S_POD_NAMESPACE/NAME/UID reaching the agent; Run/Stop latency of ours vs
the reference macvlan + host-local.

containerd runs as a private instance (its own root, state, sockets, runc
root and configuration in the work directory) in the node's network
namespace; the sandbox image is imported from a busybox-static rootfs.
"""

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time

import podman_test
from harness import (
    NODE_NETNS_PATH,
    OURS_NET,
    OURS_PREFIX,
    REF_PREFIX,
    Failure,
    check,
    named_netns,
    netns_addresses,
    run,
    wait_until,
    write_json,
)

HERE = os.path.dirname(os.path.abspath(__file__))
PAUSE_IMAGE = "localhost/hkrt-pause:1"


def cri_dir(work):
    return os.path.join(work, "containerd")


def generate_stubs(work):
    """api_pb2 / api_pb2_grpc from the vendored proto, importable."""
    out = os.path.join(work, "cri-stubs")
    os.makedirs(out, exist_ok=True)
    subprocess.run(
        [
            "/usr/bin/python3", "-m", "grpc_tools.protoc",
            "-I", os.path.join(HERE, "cri"),
            f"--python_out={out}", f"--grpc_python_out={out}",
            "api.proto",
        ],
        check=True,
    )
    sys.path.insert(0, out)
    import api_pb2
    import api_pb2_grpc

    return api_pb2, api_pb2_grpc


class Containerd:
    def __init__(self, work, node):
        self.work = work
        self.node = node
        self.dir = cri_dir(work)
        self.socket = os.path.join(self.dir, "containerd.sock")
        self.conf_dir = os.path.join(self.dir, "cni")
        self.process = None

    def configure(self):
        for sub in ("root", "state", "cni", "logs", "opt", "runc"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        self.use("ours")
        path = os.path.join(self.dir, "config.toml")
        d = self.dir
        with open(path, "w") as config:
            config.write(
                f"""
version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = [
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
]

[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[debug]
  address = "{d}/debug.sock"
  level = "info"
[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  disable_apparmor = true
  restrict_oom_score_adj = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{d}/runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{self.node.plugin_dir}"
    conf_dir = "{self.conf_dir}"
    max_conf_num = 1
"""
            )
        return path

    def use(self, which, version="1.0.0"):
        """The one network the CRI plugin uses: ours or the reference."""
        for name in os.listdir(self.conf_dir):
            os.unlink(os.path.join(self.conf_dir, name))
        conf = self.node.conflist(which, version)
        write_json(os.path.join(self.conf_dir, f"10-{conf['name']}.conflist"), conf)

    def start(self):
        config = self.configure()
        log = open(os.path.join(self.dir, "containerd.log"), "ab")
        self.process = subprocess.Popen(
            ["nsenter", f"--net={NODE_NETNS_PATH}", "containerd", "--config", config],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        with open(os.path.join(self.work, "containerd.pid"), "w") as pid:
            pid.write(str(self.process.pid))
        process = self.process

        def up():
            check(process.poll() is None, f"containerd exited; see {self.dir}/containerd.log")
            return os.path.exists(self.socket)

        wait_until(up, 30, 0.1, "containerd's socket")

    def ctr(self, *args, timeout=120):
        return run(["ctr", "-a", self.socket, "-n", "k8s.io", *args], timeout=timeout)

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def cleanup(work):
    """Removes the sandboxes (their shims), stops containerd: after a crash too."""
    directory = cri_dir(work)
    socket_path = os.path.join(directory, "containerd.sock")
    pid_file = os.path.join(work, "containerd.pid")
    if os.path.exists(socket_path):
        _, out, _ = run(["ctr", "-a", socket_path, "-n", "k8s.io", "tasks", "ls", "-q"], check_rc=False, timeout=30)
        for task in out.split():
            run(["ctr", "-a", socket_path, "-n", "k8s.io", "tasks", "kill", "-s", "SIGKILL", task], check_rc=False, timeout=30)
    # The shims' pids are in containerd's state directory.
    shims = []
    for root, _, files in os.walk(os.path.join(directory, "state")):
        for name in ("shim.pid", "init.pid"):
            if name in files:
                try:
                    shims.append(int(open(os.path.join(root, name)).read().strip()))
                except ValueError:
                    pass
    if os.path.exists(pid_file):
        terminate(int(open(pid_file).read()))
    for pid in shims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # containerd's sandbox namespaces: cni-* pinned under /run/netns.
    listed = os.path.join(directory, "netns.list")
    if os.path.exists(listed):
        for name in open(listed).read().split():
            run(["ip", "netns", "del", name], check_rc=False)


def terminate(pid, grace=15):
    """SIGTERM, then SIGKILL if `pid` is still there after `grace` seconds."""
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z":
                return
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, FileNotFoundError):
        pass


class Cri:
    """The kubelet's side of the CRI, for sandboxes."""

    def __init__(self, containerd, api, api_grpc):
        import grpc

        self.grpc = grpc
        self.api = api
        self.containerd = containerd
        self.channel = grpc.insecure_channel(f"unix://{containerd.socket}")
        self.stub = api_grpc.RuntimeServiceStub(self.channel)

    def version(self):
        return self.stub.Version(self.api.VersionRequest(version="v1"), timeout=10)

    def run_sandbox(self, name, uid, namespace="hkrt"):
        api = self.api
        config = api.PodSandboxConfig(
            metadata=api.PodSandboxMetadata(name=name, uid=uid, namespace=namespace, attempt=0),
            hostname=name,
            log_directory=os.path.join(self.containerd.dir, "logs", uid),
            labels={"hkrt": "1"},
            linux=api.LinuxPodSandboxConfig(
                security_context=api.LinuxSandboxSecurityContext(
                    namespace_options=api.NamespaceOption(network=api.POD, pid=api.CONTAINER, ipc=api.POD)
                )
            ),
        )
        reply = self.stub.RunPodSandbox(api.RunPodSandboxRequest(config=config), timeout=120)
        return reply.pod_sandbox_id

    def status(self, sandbox):
        reply = self.stub.PodSandboxStatus(self.api.PodSandboxStatusRequest(pod_sandbox_id=sandbox, verbose=True), timeout=30)
        info = json.loads(reply.info.get("info", "{}"))
        netns = None
        for namespace in info.get("runtimeSpec", {}).get("linux", {}).get("namespaces", []):
            if namespace.get("type") == "network":
                netns = namespace.get("path")
        return reply.status, netns

    def stop(self, sandbox):
        self.stub.StopPodSandbox(self.api.StopPodSandboxRequest(pod_sandbox_id=sandbox), timeout=120)

    def remove(self, sandbox):
        self.stub.RemovePodSandbox(self.api.RemovePodSandboxRequest(pod_sandbox_id=sandbox), timeout=120)


def record_netns(containerd, netns):
    """Notes a sandbox's namespace for cleanup() should a run be cut short."""
    if netns:
        with open(os.path.join(containerd.dir, "netns.list"), "a") as listed:
            listed.write(os.path.basename(netns) + "\n")


def one_sandbox(report, node, cri, containerd):
    name, uid = "web-0", "0f5e1c2a-1111-4a4a-9d9d-000000000001"
    with report.case("CRI: RunPodSandbox + PodSandboxStatus: READY with one of our addresses, on eth0"):
        sandbox = cri.run_sandbox(name, uid)
        status, netns = cri.status(sandbox)
        record_netns(containerd, netns)
        ip = status.network.ip
        check(status.state == cri.api.SANDBOX_READY, f"state {status.state}")
        check(ip.startswith(OURS_PREFIX), f"sandbox IP {ip!r} is not ours")
        check(netns and any(a.startswith(ip + "/") for a in netns_addresses(os.path.basename(netns))),
              f"eth0 in {netns}: {netns_addresses(os.path.basename(netns or ''))}")
    with report.case("CRI: K8S_POD_NAMESPACE/NAME/UID reach the agent (hulkctl attachments)"):
        records = [a for a in node.attachments() if a["owner"]["container_id"] == sandbox]
        check(len(records) == 1, f"attachments for {sandbox}: {records}")
        owner = records[0]["owner"]
        check(owner.get("pod") == f"hkrt/{name}", f"pod {owner.get('pod')!r}")
        check(owner.get("pod_uid") == uid, f"pod_uid {owner.get('pod_uid')!r}")
        check(owner.get("cni_network") == OURS_NET, f"cni_network {owner.get('cni_network')!r}")
    with report.case("CRI: StopPodSandbox twice releases the address and the namespace"):
        cri.stop(sandbox)
        check(ip not in node.held(), f"{ip} still held after StopPodSandbox")
        check(not os.path.exists(netns), f"{netns} still there")
        cri.stop(sandbox)
        status, _ = cri.status(sandbox)
        check(status.state == cri.api.SANDBOX_NOTREADY, f"state {status.state}")
    with report.case("CRI: RemovePodSandbox twice; nothing left"):
        cri.remove(sandbox)
        cri.remove(sandbox)
        try:
            cri.status(sandbox)
            raise Failure("the sandbox is still known")
        except cri.grpc.RpcError as error:
            check(error.code() == cri.grpc.StatusCode.NOT_FOUND, f"status after remove: {error.code()}")
        check(not node.leftovers(), node.leftovers())


def many(report, node, cri, containerd, count=20):
    with report.case(f"CRI: {count} sandboxes at once: {count} distinct addresses of ours, each held for its sandbox"):
        def start(i):
            sandbox = cri.run_sandbox(f"par-{i}", f"uid-par-{i}")
            status, netns = cri.status(sandbox)
            record_netns(containerd, netns)
            return sandbox, status.network.ip

        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(max_workers=count) as pool:
            sandboxes = list(pool.map(start, range(count)))
        report.note(f"{count} RunPodSandbox in {time.monotonic() - started:.1f}s")
        ips = [ip for _, ip in sandboxes]
        check(all(ip.startswith(OURS_PREFIX) for ip in ips), f"addresses {ips}")
        check(len(set(ips)) == count, f"shared addresses: {sorted(ips)}")
        held = node.held()
        for sandbox, ip in sandboxes:
            check(held.get(ip, {}).get("container_id") == sandbox, f"{ip} held for {held.get(ip)}")
    with report.case(f"CRI: {count} sandboxes stopped and removed at once leave nothing held"):
        def finish(entry):
            cri.stop(entry[0])
            cri.remove(entry[0])

        with concurrent.futures.ThreadPoolExecutor(max_workers=count) as pool:
            list(pool.map(finish, sandboxes))
        check(not node.leftovers(), node.leftovers())


def agent_killed_during_stop(report, node, cri, containerd, count=6):
    with report.case("CRI: the agent SIGKILLed during StopPodSandbox; Stop/Remove again leave nothing held"):
        sandboxes = []
        for i in range(count):
            sandbox = cri.run_sandbox(f"kill-{i}", f"uid-kill-{i}")
            sandboxes.append((sandbox, *cri.status(sandbox)))
            record_netns(containerd, sandboxes[-1][2])

        def chaos():
            time.sleep(0.25)
            node.kill_agent()
            time.sleep(1.5)
            node.start_agent()

        def stop(indexed):
            # Spread: the first Stops reach the agent, the others do not.
            index, entry = indexed
            time.sleep(index * 0.1)
            try:
                cri.stop(entry[0])
                return "ok"
            except cri.grpc.RpcError as error:
                return f"{error.code().name}: {error.details()[:160]}"

        notes_before = sum(1 for line in open(node.plugin_log) if "noted the DEL" in line)
        killer = threading.Thread(target=chaos)
        killer.start()
        with concurrent.futures.ThreadPoolExecutor(max_workers=count) as pool:
            outcomes = list(pool.map(stop, enumerate(sandboxes)))
        killer.join()
        notes = sum(1 for line in open(node.plugin_log) if "noted the DEL" in line) - notes_before
        report.note(f"first StopPodSandbox: {outcomes}; {notes} DELs noted for the agent while it was down")
        # The kubelet stops again, then removes (twice here).
        for entry in sandboxes:
            cri.stop(entry[0])
            cri.remove(entry[0])
            cri.remove(entry[0])
        for _, _, netns in sandboxes:
            check(not netns or not os.path.exists(netns), f"{netns} left")
        node.wait_nothing_held(20)

    with report.case("CRI: a DEL that fails (agent down, no room for its note) fails StopPodSandbox; "
                     "containerd's next Stop retries it and nothing is left"):
        sandboxes = []
        for i in range(3):
            sandbox = cri.run_sandbox(f"retry-{i}", f"uid-retry-{i}")
            status, netns = cri.status(sandbox)
            record_netns(containerd, netns)
            sandboxes.append((sandbox, status.network.ip, netns))
        node.kill_agent()
        # The plugin's pendingDelDir cannot be created: DEL must fail (106)
        # rather than succeed without the note.
        saved = node.pending + ".saved"
        os.rename(node.pending, saved)
        open(node.pending, "w").close()
        try:
            outcomes = []
            for sandbox, _, _ in sandboxes:
                try:
                    cri.stop(sandbox)
                    outcomes.append("ok")
                except cri.grpc.RpcError as error:
                    outcomes.append(error.details())
            report.note(f"StopPodSandbox with the agent down and no note possible: {outcomes[0][:300]}")
            check(all(o != "ok" for o in outcomes), f"Stop succeeded without the agent or a note: {outcomes}")
            for _, _, netns in sandboxes:
                check(os.path.exists(netns), f"containerd dropped {netns} after a failed DEL")
        finally:
            os.unlink(node.pending)
            os.rename(saved, node.pending)
            node.start_agent()
        held = node.held()
        check(all(ip in held for _, ip, _ in sandboxes), f"addresses released without a DEL: {held}")
        for sandbox, _, _ in sandboxes:
            cri.stop(sandbox)
            cri.remove(sandbox)
        for _, _, netns in sandboxes:
            check(not os.path.exists(netns), f"{netns} left")
        check(not node.leftovers(), node.leftovers())


def version_1_1_0(report, node, cri, containerd):
    with report.case("CRI, cniVersion 1.1.0 (expected failure): RunPodSandbox fails; containerd's "
                     "teardown DEL returns the address"):
        containerd.use("ours", "1.1.0")
        seen = {}

        def refused():
            try:
                sandbox = cri.run_sandbox("v110", "uid-v110")
            except cri.grpc.RpcError as error:
                seen["error"] = error.details()
                return True
            # containerd has not reloaded the configuration yet.
            status, netns = cri.status(sandbox)
            record_netns(containerd, netns)
            cri.stop(sandbox)
            cri.remove(sandbox)
            return False

        try:
            wait_until(refused, 30, 0.5, "containerd to load the 1.1.0 configuration")
        finally:
            containerd.use("ours")
        report.note(f"RunPodSandbox: {seen['error'][:300]}")
        check("1.1.0" in seen["error"], seen["error"])
        right_after = {a: o["container_id"][:12] for a, o in node.held().items() if o.get("pod") == "hkrt/v110"}
        report.note(f"held right after the failed RunPodSandbox: {right_after or 'nothing'}")
        node.wait_nothing_held(15)


def bench(report, node, cri, containerd, samples):
    rows = []
    for which, prefix, label in (("ours", OURS_PREFIX, "hulk-vpc-cni -> hulk-agent"),
                                 ("ref", REF_PREFIX, "reference macvlan + host-local")):
        containerd.use(which)

        def switched():
            sandbox = cri.run_sandbox("probe", "uid-probe")
            status, netns = cri.status(sandbox)
            record_netns(containerd, netns)
            cri.stop(sandbox)
            cri.remove(sandbox)
            return status.network.ip.startswith(prefix)

        wait_until(switched, 30, 0.5, f"containerd to load the {which} network")
        runs, stops = [], []
        for i in range(samples):
            started = time.monotonic()
            sandbox = cri.run_sandbox(f"bench-{i}", f"uid-bench-{i}")
            runs.append((time.monotonic() - started) * 1000)
            status, netns = cri.status(sandbox)
            record_netns(containerd, netns)
            check(status.network.ip.startswith(prefix), f"bench sandbox got {status.network.ip}")
            started = time.monotonic()
            cri.stop(sandbox)
            stops.append((time.monotonic() - started) * 1000)
            cri.remove(sandbox)
        rows.append(("containerd 1.6 CRI", label, runs, stops, "RunPodSandbox / StopPodSandbox"))
    containerd.use("ours")
    return rows


def main(report, node, work, samples):
    rows = []
    containerd = Containerd(work, node)
    with report.case("CRI: private containerd up, sandbox image imported from a busybox-static rootfs"):
        api, api_grpc = generate_stubs(work)
        # The image: podman import of the rootfs, podman save, ctr import.
        podman_test.configure(work, node)
        podman = podman_test.Podman(work)
        rootfs = os.path.join(work, "rootfs.tar")
        if not os.path.exists(rootfs):
            podman_test.busybox_rootfs(rootfs)
        podman("import", "--change", 'CMD ["/bin/sleep", "2147483647"]', rootfs, PAUSE_IMAGE)
        archive = os.path.join(work, "pause.tar")
        if os.path.exists(archive):
            os.unlink(archive)
        podman("save", "--format", "docker-archive", "-o", archive, PAUSE_IMAGE)
        containerd.start()
        containerd.ctr("images", "import", archive)
        cri = Cri(containerd, api, api_grpc)
        version = wait_until(lambda: _try(cri.version), 30, 0.2, "the CRI to answer")
        report.note(f"{version.runtime_name} {version.runtime_version}, CRI {version.runtime_api_version}")
    if report.failures and report.failures[-1].startswith("CRI: private"):
        containerd.stop()
        return rows
    try:
        before = {n for n in named_netns() if n.startswith("cni-")}
        one_sandbox(report, node, cri, containerd)
        many(report, node, cri, containerd)
        agent_killed_during_stop(report, node, cri, containerd)
        version_1_1_0(report, node, cri, containerd)
        if samples:
            with report.case(f"CRI latency ({samples} samples each)"):
                rows = bench(report, node, cri, containerd, samples)
                check(not node.leftovers(), node.leftovers())
        with report.case("CRI: no sandbox namespace left"):
            left = {n for n in named_netns() if n.startswith("cni-")} - before
            check(not left, f"left: {left}")
    finally:
        cleanup(work)
        containerd.stop()
    return rows


def _try(call):
    try:
        return call()
    except Exception:
        return None
