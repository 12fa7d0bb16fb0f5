//! A small VPC built from namespaces, for datapath tests on a real kernel:
//! a bridge in a "gateway" namespace is the VPC subnet and its router;
//! each "node" namespace has a parent interface (a veth into the bridge)
//! and a host-side slave; pods are named namespaces attached through
//! [`Datapath`].

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use hulk_netns::rtnetlink::{LinkBridge, LinkUnspec, LinkVeth};
use hulk_netns::{
    Datapath, MacAddr, NetlinkKernel, NetlinkWorker, Netns, NodeNetwork, PodNetwork, SlaveKind,
    create_named_netns, delete_named_netns, link_by_name, run_blocking_in,
};
use std::os::fd::{AsFd, AsRawFd};

pub const GATEWAY: &str = "10.40.0.1";
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
pub const GATEWAY_MAC: MacAddr = MacAddr([0x02, 0x00, 0x0a, 0x28, 0x00, 0x01]);

/// A named namespace deleted on drop.
pub struct Namespace {
    pub name: String,
    pub netns: Netns,
}

impl Namespace {
    pub fn create(name: String) -> Namespace {
        let _ = delete_named_netns(&name);
        let netns = create_named_netns(&name).expect("create namespace");
        Namespace { name, netns }
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(hulk_netns::NETNS_RUN_DIR).join(&self.name)
    }

    pub fn worker(&self) -> NetlinkWorker {
        NetlinkWorker::spawn_in(self.netns.try_clone().expect("clone")).expect("worker")
    }

    /// Runs a command inside the namespace and returns its stdout.
    pub fn exec(&self, program: &str, args: &[&str]) -> String {
        let (program, args) = (
            program.to_owned(),
            args.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        );
        let output = run_blocking_in(&self.netns, move || {
            std::process::Command::new(&program).args(&args).output()
        })
        .expect("enter namespace")
        .expect("run command");
        assert!(
            output.status.success(),
            "{}: {}",
            self.name,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = delete_named_netns(&self.name);
    }
}

pub struct Node {
    pub namespace: Namespace,
    pub datapath: Datapath<NetlinkKernel>,
    pub network: NodeNetwork,
}

pub struct Pod {
    pub namespace: Namespace,
    pub address: IpAddr,
    pub spec: PodNetwork,
}

pub struct Vpc {
    pub gateway: Namespace,
    pub nodes: Vec<Node>,
    pub prefix: String,
}

/// Unique per process so parallel runs of different test binaries do not clash.
pub fn prefix(test: &str) -> String {
    format!("hk{}{}", std::process::id() % 100_000, test)
}

impl Vpc {
    /// A gateway with the subnet's bridge and `nodes` nodes, each with its
    /// host-side slave of `kind`.
    pub async fn build(test: &str, kind: SlaveKind, nodes: usize) -> Vpc {
        let prefix = prefix(test);
        let gateway = Namespace::create(format!("{prefix}-gw"));
        let gw = gateway.worker();
        gw.run(|handle| async move {
            // A fixed MAC: a bridge without one takes its lowest port's,
            // which would make the pods' static gateway entry stale.
            let bridge = LinkBridge::new("vpc")
                .address(GATEWAY_MAC.0.to_vec())
                .up()
                .build();
            handle.link().add(bridge).execute().await?;
            let bridge = link_by_name(&handle, "vpc").await?.expect("bridge");
            handle
                .address()
                .add(bridge.header.index, GATEWAY.parse().expect("ip"), 24)
                .execute()
                .await?;
            Ok::<_, hulk_netns::NetnsError>(())
        })
        .await
        .expect("gateway worker")
        .expect("gateway bridge");
        let mut built = Vec::new();
        for number in 1..=nodes {
            let namespace = Namespace::create(format!("{prefix}-n{number}"));
            let gw_fd = gateway.netns.as_fd().as_raw_fd();
            let port = format!("n{number}");
            namespace
                .worker()
                .run(move |handle| async move {
                    handle
                        .link()
                        .add(LinkVeth::new("eth1", &port).build())
                        .execute()
                        .await?;
                    let peer = link_by_name(&handle, &port).await?.expect("peer");
                    handle
                        .link()
                        .set(
                            LinkUnspec::new_with_index(peer.header.index)
                                .setns_by_fd(gw_fd)
                                .build(),
                        )
                        .execute()
                        .await?;
                    let eth1 = link_by_name(&handle, "eth1").await?.expect("eth1");
                    handle
                        .link()
                        .set(LinkUnspec::new_with_index(eth1.header.index).up().build())
                        .execute()
                        .await?;
                    Ok::<_, hulk_netns::NetnsError>(())
                })
                .await
                .expect("node worker")
                .expect("node parent");
            let port = format!("n{number}");
            gw.run(move |handle| async move {
                let bridge = link_by_name(&handle, "vpc").await?.expect("bridge");
                let peer = link_by_name(&handle, &port)
                    .await?
                    .expect("peer in gateway");
                handle
                    .link()
                    .set(
                        LinkUnspec::new_with_index(peer.header.index)
                            .controller(bridge.header.index)
                            .up()
                            .build(),
                    )
                    .execute()
                    .await?;
                Ok::<_, hulk_netns::NetnsError>(())
            })
            .await
            .expect("gateway worker")
            .expect("bridge port");
            let network = NodeNetwork {
                parent: "eth1".into(),
                kind,
                host_link: "hulk0".into(),
                node_address: format!("10.40.0.{}/24", 250 + number).parse().expect("ip"),
                service_cidrs: vec![SERVICE_CIDR.parse().expect("cidr")],
            };
            let datapath = Datapath::new(
                NetlinkKernel::with_host(namespace.netns.try_clone().expect("clone"))
                    .expect("kernel"),
            );
            datapath
                .ensure_host_slave(&network)
                .await
                .expect("host slave");
            built.push(Node {
                namespace,
                datapath,
                network,
            });
        }
        Vpc {
            gateway,
            nodes: built,
            prefix,
        }
    }

    /// The pod spec for pod `number` (1-based) on `node` (0-based).
    pub fn pod_spec(&self, node: usize, number: usize) -> PodNetwork {
        let node_ref = &self.nodes[node];
        PodNetwork {
            parent: node_ref.network.parent.clone(),
            kind: node_ref.network.kind,
            ifname: "eth0".into(),
            address: format!("10.40.0.{}/24", 10 * (node + 1) + number)
                .parse()
                .expect("ip"),
            gateway: GATEWAY.parse().expect("ip"),
            gateway_mac: Some(GATEWAY_MAC),
            mac: None,
            mtu: None,
            service_path: Some(node_ref.network.service_path()),
        }
    }

    /// Creates pod `number` on `node` and attaches it.
    pub async fn add_pod(&self, node: usize, number: usize) -> Pod {
        let namespace = Namespace::create(format!("{}-n{}p{number}", self.prefix, node + 1));
        let spec = self.pod_spec(node, number);
        self.nodes[node]
            .datapath
            .attach(&namespace.path(), &spec)
            .await
            .expect("attach");
        Pod {
            namespace,
            address: spec.address.addr(),
            spec,
        }
    }
}

/// Listens on `port` inside `namespace`, answering each connection with
/// `identity`, until the process ends.
pub fn serve(namespace: &Namespace, port: u16, identity: &str) {
    let listener = run_blocking_in(&namespace.netns, move || {
        TcpListener::bind(("0.0.0.0", port))
    })
    .expect("enter namespace")
    .expect("bind");
    let identity = identity.to_owned();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut stream = stream;
            let _ = stream.write_all(identity.as_bytes());
        }
    });
}

/// Connects from inside `namespace` and returns what the server said.
pub fn fetch(namespace: &Namespace, address: &str, port: u16) -> Result<String, String> {
    let target = SocketAddr::new(address.parse().expect("ip"), port);
    run_blocking_in(&namespace.netns, move || {
        let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(3))
            .map_err(|error| format!("connect {target}: {error}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .map_err(|error| error.to_string())?;
        let mut reply = String::new();
        stream
            .read_to_string(&mut reply)
            .map_err(|error| format!("read from {target}: {error}"))?;
        Ok(reply)
    })
    .expect("enter namespace")
}

/// Pods on two nodes reach each other, the gateway, their node, and a
/// ClusterIP DNATed (as kube-proxy would) to a pod on the other node.
pub async fn traffic_scenario(test: &str, kind: SlaveKind) {
    let vpc = Vpc::build(test, kind, 2).await;
    let a = vpc.add_pod(0, 1).await;
    let b = vpc.add_pod(0, 2).await;
    let c = vpc.add_pod(1, 1).await;
    for (node, pod) in [(0, &a), (0, &b), (1, &c)] {
        vpc.nodes[node]
            .datapath
            .check(&pod.namespace.path(), &pod.spec)
            .await
            .expect("check after add");
    }
    serve(&a.namespace, 8080, "pod-a");
    serve(&b.namespace, 8080, "pod-b");
    serve(&c.namespace, 8080, "pod-c");
    serve(&vpc.gateway, 8080, "gateway");
    serve(&vpc.nodes[0].namespace, 8081, "node-1");

    let to = |pod: &Pod| pod.address.to_string();
    assert_eq!(
        fetch(&a.namespace, &to(&b), 8080),
        Ok("pod-b".into()),
        "same node"
    );
    assert_eq!(
        fetch(&a.namespace, &to(&c), 8080),
        Ok("pod-c".into()),
        "across nodes"
    );
    assert_eq!(
        fetch(&a.namespace, GATEWAY, 8080),
        Ok("gateway".into()),
        "pod -> gateway"
    );
    assert_eq!(
        fetch(&vpc.nodes[0].namespace, &to(&a), 8080),
        Ok("pod-a".into()),
        "host -> local pod (kubelet probe)"
    );
    assert_eq!(
        fetch(&a.namespace, "10.40.0.251", 8081),
        Ok("node-1".into()),
        "pod -> node"
    );

    // kube-proxy's part, by hand: a ClusterIP DNATed to the pod on the
    // other node, with masquerade-all so replies come back through node 1.
    let node1 = &vpc.nodes[0].namespace;
    let backend = format!("{}:8080", c.address);
    node1.exec(
        "iptables",
        &[
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-d",
            "10.96.0.10/32",
            "-p",
            "tcp",
            "--dport",
            "80",
            "-j",
            "DNAT",
            "--to-destination",
            &backend,
        ],
    );
    node1.exec(
        "iptables",
        &[
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-d",
            "10.40.0.0/24",
            "-j",
            "MASQUERADE",
        ],
    );
    assert_eq!(
        fetch(&a.namespace, "10.96.0.10", 80),
        Ok("pod-c".into()),
        "pod -> ClusterIP"
    );
}

/// DEL removes a pod (twice, idempotently); after a simulated reboot of
/// the node's network state, restore brings back what live pods need.
pub async fn restore_scenario(test: &str, kind: SlaveKind) {
    use hulk_netns::Kernel;
    let vpc = Vpc::build(test, kind, 1).await;
    let node = &vpc.nodes[0];
    let a = vpc.add_pod(0, 1).await;
    let b = vpc.add_pod(0, 2).await;
    serve(&a.namespace, 8080, "pod-a");
    assert!(fetch(&node.namespace, &a.address.to_string(), 8080).is_ok());

    let path = node.network.service_path();
    for _ in 0..2 {
        node.datapath
            .detach(
                Some(&b.namespace.path()),
                "eth0",
                Some(b.address),
                Some(&path),
            )
            .await
            .expect("detach is idempotent");
    }
    assert!(
        node.datapath
            .check(&b.namespace.path(), &b.spec)
            .await
            .is_err()
    );

    let kernel = node.datapath.kernel();
    assert!(
        kernel
            .delete_link(kernel.host(), "hulk0")
            .await
            .expect("delete")
    );
    assert!(fetch(&node.namespace, &a.address.to_string(), 8080).is_err());
    let report = node
        .datapath
        .restore_node(&node.network, &[a.address])
        .await
        .expect("restore");
    assert_eq!(report.routes_installed, 1);
    assert_eq!(
        fetch(&node.namespace, &a.address.to_string(), 8080),
        Ok("pod-a".into())
    );
    node.datapath
        .check(&a.namespace.path(), &a.spec)
        .await
        .expect("check after restore");
}
