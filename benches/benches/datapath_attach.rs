//! Attach and detach latency of the datapath over N pods, next to Debian's
//! reference CNI plugin doing the same work (an L2 slave of the same
//! parent with a static address and a default route) in the same kernel.
//!
//! Needs root. `scripts/vm-bench` runs it with ipvlan inside the test VM;
//! on the host (no ipvlan) run it with `HULK_BENCH_KIND=macvlan`.
//! `HULK_BENCH_PODS` sets N (default 200). It prints medians and p99s.

#![allow(missing_docs)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hulk_netns::rtnetlink::LinkVeth;
use hulk_netns::{
    Datapath, IpVlanFlag, IpVlanMode, MacVlanMode, NetlinkKernel, NetlinkWorker, PodNetwork,
    SlaveKind, create_named_netns, delete_named_netns, run_blocking_in,
};

const GATEWAY_MAC: hulk_ipam::MacAddr = hulk_ipam::MacAddr([0x02, 0, 0x0a, 0x32, 0, 1]);

struct Figures {
    samples: Vec<Duration>,
}

impl Figures {
    fn percentile(&self, fraction: f64) -> Duration {
        let mut sorted = self.samples.clone();
        sorted.sort();
        let rank = ((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1]
    }

    fn row(&self, what: &str) -> String {
        format!(
            "| {what} | {} | {:.2} | {:.2} |",
            self.samples.len(),
            self.percentile(0.5).as_secs_f64() * 1000.0,
            self.percentile(0.99).as_secs_f64() * 1000.0
        )
    }
}

fn pod_names(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|index| format!("{prefix}{index}")).collect()
}

fn netns_path(name: &str) -> PathBuf {
    Path::new(hulk_netns::NETNS_RUN_DIR).join(name)
}

fn address(network: u8, index: usize) -> String {
    format!("10.{network}.{}.{}", index / 250, index % 250 + 2)
}

/// Runs the reference plugin once, as a runtime would, from inside the node.
fn reference_plugin(
    node: &hulk_netns::Netns,
    plugin: &str,
    command: &str,
    pod: &str,
    config: &str,
) -> Duration {
    let (plugin, command, pod, config) = (
        plugin.to_owned(),
        command.to_owned(),
        pod.to_owned(),
        config.to_owned(),
    );
    run_blocking_in(node, move || {
        let started = Instant::now();
        let mut child = Command::new(format!("/usr/lib/cni/{plugin}"))
            .env("CNI_COMMAND", &command)
            .env("CNI_CONTAINERID", &pod)
            .env("CNI_NETNS", netns_path(&pod))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/usr/lib/cni")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("reference plugin starts");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(config.as_bytes())
            .expect("config written");
        let output = child.wait_with_output().expect("reference plugin ends");
        let elapsed = started.elapsed();
        assert!(
            output.status.success(),
            "{plugin} {command}: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        elapsed
    })
    .expect("enter node")
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    if std::env::args().any(|argument| argument == "--list") {
        return; // `cargo bench -- --list` and test harness probes.
    }
    let pods: usize = std::env::var("HULK_BENCH_PODS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(200);
    let macvlan = std::env::var("HULK_BENCH_KIND").as_deref() == Ok("macvlan");
    let (kind, plugin, mode_field) = if macvlan {
        (
            SlaveKind::MacVlan {
                mode: MacVlanMode::Bridge,
            },
            "macvlan",
            "bridge",
        )
    } else {
        (
            SlaveKind::IpVlan {
                mode: IpVlanMode::L2,
                flag: IpVlanFlag::Bridge,
            },
            "ipvlan",
            "l2",
        )
    };

    let _ = delete_named_netns("hulkbench-node");
    let node = create_named_netns("hulkbench-node").expect("node namespace");
    NetlinkWorker::spawn_in(node.try_clone().expect("clone"))
        .expect("node worker")
        .run(|handle| async move {
            handle
                .link()
                .add(LinkVeth::new("vpc0", "vpc0peer").build())
                .execute()
                .await?;
            for name in ["vpc0", "vpc0peer"] {
                let link = hulk_netns::link_by_name(&handle, name)
                    .await
                    .ok()
                    .flatten()
                    .expect("veth");
                handle
                    .link()
                    .set(
                        hulk_netns::rtnetlink::LinkUnspec::new_with_index(link.header.index)
                            .up()
                            .build(),
                    )
                    .execute()
                    .await?;
            }
            Ok::<_, hulk_netns::rtnetlink::Error>(())
        })
        .await
        .expect("worker")
        .expect("parent link");
    let datapath =
        Datapath::new(NetlinkKernel::with_host(node.try_clone().expect("clone")).expect("kernel"));

    let ours = pod_names("hulkbench-a", pods);
    let theirs = pod_names("hulkbench-b", pods);
    for name in ours.iter().chain(&theirs) {
        let _ = delete_named_netns(name);
        create_named_netns(name).expect("pod namespace");
    }

    let mut attach = Figures {
        samples: Vec::new(),
    };
    let mut detach = Figures {
        samples: Vec::new(),
    };
    for (index, pod) in ours.iter().enumerate() {
        let spec = PodNetwork {
            parent: "vpc0".into(),
            kind,
            ifname: "eth0".into(),
            address: format!("{}/16", address(50, index))
                .parse()
                .expect("address"),
            gateway: "10.50.0.1".parse().expect("gateway"),
            gateway_mac: Some(GATEWAY_MAC),
            mac: None,
            mtu: None,
            service_path: None,
        };
        let started = Instant::now();
        datapath
            .attach(&netns_path(pod), &spec)
            .await
            .expect("attach");
        attach.samples.push(started.elapsed());
    }
    for pod in &ours {
        let started = Instant::now();
        datapath
            .detach(Some(&netns_path(pod)), "eth0", None, None)
            .await
            .expect("detach");
        detach.samples.push(started.elapsed());
    }

    let mut reference_add = Figures {
        samples: Vec::new(),
    };
    let mut reference_del = Figures {
        samples: Vec::new(),
    };
    let config = |index: usize| {
        format!(
            r#"{{"cniVersion":"1.0.0","name":"bench","type":"{plugin}","master":"vpc0","mode":"{mode_field}",
               "ipam":{{"type":"static","addresses":[{{"address":"{}/16","gateway":"10.51.0.1"}}],
                        "routes":[{{"dst":"0.0.0.0/0"}}]}}}}"#,
            address(51, index)
        )
    };
    for (index, pod) in theirs.iter().enumerate() {
        reference_add
            .samples
            .push(reference_plugin(&node, plugin, "ADD", pod, &config(index)));
    }
    for (index, pod) in theirs.iter().enumerate() {
        reference_del
            .samples
            .push(reference_plugin(&node, plugin, "DEL", pod, &config(index)));
    }

    for name in ours
        .iter()
        .chain(&theirs)
        .map(String::as_str)
        .chain(["hulkbench-node"])
    {
        let _ = delete_named_netns(name);
    }

    println!("\n{plugin} attach/detach over {pods} pods (milliseconds)\n");
    println!("| what | pods | median | p99 |\n|---|---|---|---|");
    println!("{}", attach.row("hulk-netns attach (in process)"));
    println!("{}", detach.row("hulk-netns detach (in process)"));
    println!(
        "{}",
        reference_add.row(&format!("reference {plugin}+static ADD (exec)"))
    );
    println!(
        "{}",
        reference_del.row(&format!("reference {plugin}+static DEL (exec)"))
    );
}
