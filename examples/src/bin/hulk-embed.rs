//! What a serverless runtime copies to give its sandboxes VPC addresses
//! without CNI or a node daemon: an in-process warm pool and the datapath
//! library. For each function: create a network namespace, take a lease,
//! attach an ipvlan slave, run, detach, release.
//!
//! By default it builds its own sandbox "node" namespace with a veth as
//! the VPC-facing parent, so it never touches the host's network; a runtime
//! passes `--node-netns` and `--parent` for the real ones (and a Neutron or
//! UltrON backend instead of the mock).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use hulk_ipam::{MemoryBackend, Owner, PoolKey};
use hulk_netns::rtnetlink::{LinkUnspec, LinkVeth};
use hulk_netns::{
    Datapath, IpVlanFlag, IpVlanMode, MacVlanMode, NETNS_RUN_DIR, NetlinkKernel, NetlinkWorker,
    Netns, PodNetwork, SlaveKind, create_named_netns, delete_named_netns, link_by_name,
    run_blocking_in,
};
use hulk_pool::{MemoryStore, PoolConfig, PoolManager, SystemClock};
use ipnet::IpNet;

#[derive(Clone, Copy, ValueEnum)]
enum Kind {
    Ipvlan,
    Macvlan,
}

/// Run functions in their own network namespaces with VPC addresses.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// How many functions to run, one after the other.
    #[arg(long, default_value_t = 3)]
    functions: usize,
    /// Slave kind (macvlan where the kernel lacks ipvlan).
    #[arg(long, value_enum, default_value = "ipvlan")]
    kind: Kind,
    /// The namespace holding the parent; default: a sandbox made here.
    #[arg(long)]
    node_netns: Option<PathBuf>,
    /// The VPC-facing parent interface.
    #[arg(long, default_value = "vpc0")]
    parent: String,
    /// The subnet the mock backend hands out.
    #[arg(long, default_value = "10.77.0.0/24")]
    subnet: IpNet,
}

type Failure = Box<dyn std::error::Error>;

const SANDBOX_NODE: &str = "hulk-embed-node";

/// A node namespace with a veth pair whose end `parent` plays the VPC NIC.
async fn sandbox_node(parent: &str) -> Result<Netns, Failure> {
    let _ = delete_named_netns(SANDBOX_NODE);
    let node = create_named_netns(SANDBOX_NODE)?;
    let parent = parent.to_owned();
    NetlinkWorker::spawn_in(node.try_clone()?)?
        .run(move |handle| async move {
            let peer = format!("{parent}-peer");
            handle
                .link()
                .add(LinkVeth::new(&parent, &peer).build())
                .execute()
                .await?;
            for name in [parent, peer] {
                if let Some(link) = link_by_name(&handle, &name).await? {
                    let up = LinkUnspec::new_with_index(link.header.index).up().build();
                    handle.link().set(up).execute().await?;
                }
            }
            Ok::<_, hulk_netns::NetnsError>(())
        })
        .await??;
    Ok(node)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Failure> {
    let args = Args::parse();
    let kind = match args.kind {
        Kind::Ipvlan => SlaveKind::IpVlan {
            mode: IpVlanMode::L2,
            flag: IpVlanFlag::Bridge,
        },
        Kind::Macvlan => SlaveKind::MacVlan {
            mode: MacVlanMode::Bridge,
        },
    };
    let node = match &args.node_netns {
        Some(path) => Netns::open(path)?,
        None => sandbox_node(&args.parent).await?,
    };
    let datapath = Datapath::new(NetlinkKernel::with_host(node)?);
    let pools = PoolManager::open(
        Arc::new(MemoryBackend::new(args.subnet)),
        Arc::new(MemoryStore::default()),
        Arc::new(SystemClock),
        "embed-node",
        PoolConfig {
            warm_up: 4,
            ..PoolConfig::default()
        },
    )
    .await?;
    let key = PoolKey::new("vpc", args.subnet.to_string(), ["default"], None);
    pools.warm_up(&key).await?;
    // The refiller keeps idle addresses ready while functions come and go.
    let stop_refiller = tokio_util::sync::CancellationToken::new();
    let refiller = tokio::spawn(
        pools
            .clone()
            .run_refiller(key.clone(), stop_refiller.clone()),
    );

    for number in 0..args.functions {
        let name = format!("hulk-fn-{number}");
        let _ = delete_named_netns(&name);
        let sandbox = create_named_netns(&name)?;
        let path = Path::new(NETNS_RUN_DIR).join(&name);
        let owner = Owner {
            container_id: name.clone(),
            ifname: "eth0".into(),
            pod: None,
            cni_network: None,
            pod_uid: None,
        };

        let started = Instant::now();
        let lease = pools.assign(&key, &owner).await?;
        let gateway = lease.gateway.ok_or("the lease has no gateway")?;
        let network = PodNetwork {
            parent: args.parent.clone(),
            kind,
            ifname: "eth0".into(),
            address: lease.address,
            gateway,
            gateway_mac: lease.gateway_mac,
            mac: None,
            mtu: lease.mtu,
            service_path: None,
        };
        datapath.attach(&path, &network).await?;
        let ready = started.elapsed();

        // The function: here, a socket bound to its VPC address.
        let address = lease.address.addr();
        let bound = run_blocking_in(&sandbox, move || std::net::TcpListener::bind((address, 0)))??;
        println!(
            "function {number}: {} on eth0 in {} (lease + attach {:.1} ms), listening on {}",
            lease.address,
            path.display(),
            ready.as_secs_f64() * 1000.0,
            bound.local_addr()?
        );
        drop(bound);

        datapath.detach(Some(&path), "eth0", None, None).await?;
        pools.release(&key, &owner).await?;
        delete_named_netns(&name)?;
    }
    stop_refiller.cancel();
    refiller.await?;
    if args.node_netns.is_none() {
        delete_named_netns(SANDBOX_NODE)?;
    }
    let stats = pools.stats(&key);
    println!(
        "done: {} assigned, {} addresses held (idle or cooling down)",
        stats.assigned,
        stats.idle + stats.cooldown
    );
    Ok(())
}
