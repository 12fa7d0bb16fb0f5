"""Runs the real-runtime tests (scripts/runtime-tests is the entry point).

    run.py --bin-dir target/release [--only libcni,podman,cri] [--samples N]
    run.py --cleanup WORK      (what the trap in scripts/runtime-tests runs)

Needs root; everything lives in a work directory and in namespaces named
hkrt-*, removed at the end even on failure.
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
from harness import Node, Report, latency_table, run  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def build_libcni_client(work):
    """The Go client, in GOPATH mode against Debian's libcni sources."""
    gopath = os.path.join(work, "gopath")
    os.makedirs(gopath, exist_ok=True)
    binary = os.path.join(work, "hulk-libcni")
    env = {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": f"/usr/share/gocode:{gopath}",
        "GOFLAGS": "",
    }
    if "HOME" not in os.environ and "GOCACHE" not in os.environ:
        env["GOCACHE"] = os.path.join(gopath, "cache")
    subprocess.run(
        ["go", "build", "-o", binary, "."],
        cwd=os.path.join(HERE, "libcni"),
        env=env,
        check=True,
    )
    return binary


def cleanup(work):
    """Removes what a run left, even one that was killed: containerd and
    podman's containers (by the pid files and the private storage in WORK),
    mounts under WORK, the hkrt-* namespaces, then WORK itself."""
    # Lazy imports: cleanup must work even if a suite module is broken.
    for module in ("cri_test", "podman_test"):
        try:
            __import__(module).cleanup(work)
        except Exception as error:  # keep cleaning
            print(f"cleanup: {module}: {error}", file=sys.stderr)
    for name in ("agent", "fake"):
        pid_file = os.path.join(work, f"{name}.pid")
        if os.path.exists(pid_file):
            try:
                os.kill(int(open(pid_file).read()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
    unmount_under(work)
    for name in sorted(harness.named_netns()):
        if name.startswith("hkrt-"):
            run(["ip", "netns", "del", name], check_rc=False)
    if os.path.isdir(work) and not os.path.exists(os.path.join(work, "keep")):
        shutil.rmtree(work, ignore_errors=True)


def unmount_under(work):
    """Unmounts everything mounted under WORK, deepest first."""
    real = os.path.realpath(work)
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1].replace("\\040", " ") for line in mounts]
    for point in sorted((p for p in points if p == real or p.startswith(real + "/")), key=len, reverse=True):
        run(["umount", "-l", point], check_rc=False)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin-dir")
    parser.add_argument("--work")
    parser.add_argument("--only", default="libcni,podman,cri")
    parser.add_argument("--samples", type=int, default=20, help="latency samples per caller and plugin (0: none)")
    parser.add_argument("--cleanup", metavar="WORK")
    parser.add_argument("--keep", action="store_true", help="leave WORK in place (logs) at the end")
    options = parser.parse_args()
    if options.cleanup:
        cleanup(options.cleanup)
        return 0
    if os.geteuid() != 0:
        print("runtime-tests: needs root (namespaces, containerd, podman)", file=sys.stderr)
        return 2
    work = options.work or tempfile.mkdtemp(prefix="hulk-rt-")
    os.makedirs(work, exist_ok=True)
    bin_dir = os.path.abspath(options.bin_dir)
    suites = options.only.split(",")
    # SIGTERM (a CI timeout) unwinds like an exception, so cleanup runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    report = Report()
    node = Node(work, bin_dir, report)
    rows = []
    started = time.monotonic()
    try:
        with report.case("setup: node namespace, hulk-ultron-fake and hulk-agent (macvlan on eth1)"):
            node.setup()
        if report.failed:
            return 1
        if "libcni" in suites:
            import libcni_test

            suite_started = time.monotonic()
            client = build_libcni_client(work)
            rows += libcni_test.main(report, node, work, client, options.samples)
            print(f"-- libcni: {time.monotonic() - suite_started:.0f}s", flush=True)
        if "podman" in suites:
            import podman_test

            suite_started = time.monotonic()
            rows += podman_test.main(report, node, work, options.samples)
            print(f"-- podman: {time.monotonic() - suite_started:.0f}s", flush=True)
        if "cri" in suites:
            import cri_test

            suite_started = time.monotonic()
            rows += cri_test.main(report, node, work, options.samples)
            print(f"-- containerd CRI: {time.monotonic() - suite_started:.0f}s", flush=True)
        if rows:
            print(f"\nLatency (ms; {os.path.basename(bin_dir.rstrip('/'))} builds; nearest-rank p99):", flush=True)
            print(latency_table(rows), flush=True)
    finally:
        node.stop()
        if options.keep:
            open(os.path.join(work, "keep"), "w").close()
            print(f"runtime-tests: logs kept in {work}", flush=True)
        cleanup(work)
    print(f"runtime-tests: {time.monotonic() - started:.0f}s", flush=True)
    return 0 if report.summary() else 1


if __name__ == "__main__":
    sys.exit(main())
