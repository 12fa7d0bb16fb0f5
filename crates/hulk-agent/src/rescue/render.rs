//! The human form of the rescue API's replies.

use std::fmt::Write as _;

use hulk_ipam::Owner;
use hulk_node::attachments::Phase;
use hulk_pool::AddressState;

use super::RescueReply;

/// An owner as `container/ifname (pod, network)`: without Kubernetes
/// (podman, plain containerd) the runtime sends no pod name, and the CNI
/// network is what tells the attachments apart.
fn owner_text(owner: &Owner) -> String {
    let mut about = Vec::new();
    if let Some(pod) = &owner.pod {
        about.push(format!("pod {pod}"));
    }
    if let Some(network) = &owner.cni_network {
        about.push(format!("network {network}"));
    }
    if about.is_empty() {
        about.push("no pod name".to_owned());
    }
    format!(
        "{}/{} ({})",
        owner.container_id,
        owner.ifname,
        about.join(", ")
    )
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

impl RescueReply {
    /// The reply as an operator reads it (what `hulkctl` prints without
    /// `--json`): one fact per line, times relative to `now_ms`
    /// (milliseconds since the Unix epoch).
    pub fn render(&self, now_ms: u64) -> String {
        render(self, now_ms)
    }
}

/// Writing to a String cannot fail: the results are ignored.
fn render(reply: &RescueReply, now_ms: u64) -> String {
    let mut out = String::new();
    match reply {
        RescueReply::Status(status) => {
            let _ = writeln!(out, "node      {}", status.node);
            let _ = writeln!(out, "backend   {}", status.backend);
            let _ = writeln!(out, "assigned  {}", status.assigned);
            let _ = writeln!(out, "degraded  {}", list(&status.degraded));
            let _ = writeln!(out, "draining  {}", list(&status.draining));
            let health = if status.datapath_healthy {
                "healthy"
            } else {
                "needs repair (hulkctl node; hulkctl reapply)"
            };
            let _ = writeln!(out, "datapath  {health}");
        }
        RescueReply::Pools { pools } => {
            let _ = writeln!(
                out,
                "{:<20} {:<16} {:<24} {:<10} {:>5} {:>8} {:>8} {:>9} {:>9}  state",
                "SUBNET",
                "NETWORK",
                "SECURITY GROUPS",
                "QOS",
                "IDLE",
                "ASSIGNED",
                "COOLDOWN",
                "RELEASING",
                "IN-FLIGHT"
            );
            for pool in pools {
                let (key, stats) = (&pool.key, &pool.stats);
                let mut state = match (&stats.degraded_reason, stats.draining) {
                    (_, true) => "draining".to_owned(),
                    (Some(reason), false) => format!("degraded: {reason}"),
                    (None, false) => "ok".to_owned(),
                };
                if stats.lost > 0 {
                    let _ = write!(
                        state,
                        "; {} assigned addresses LOST (the cloud took them back: \
                         see hulkctl leases)",
                        stats.lost
                    );
                }
                let _ = writeln!(
                    out,
                    "{:<20} {:<16} {:<24} {:<10} {:>5} {:>8} {:>8} {:>9} {:>9}  {state}",
                    key.subnet,
                    key.network,
                    key.security_groups.join(","),
                    key.qos_policy.as_deref().unwrap_or("-"),
                    stats.idle,
                    stats.assigned,
                    stats.cooldown,
                    stats.releasing,
                    stats.in_flight
                );
            }
        }
        RescueReply::Leases { leases } => {
            let _ = writeln!(
                out,
                "{:<20} {:<20} {:<38} state",
                "ADDRESS", "SUBNET", "LEASE"
            );
            for record in leases {
                let state = match &record.state {
                    AddressState::Idle => "idle".to_owned(),
                    AddressState::Assigned(owner) => format!("assigned to {}", owner_text(owner)),
                    // The agent's clock is this node's clock.
                    AddressState::Cooldown { until_ms } => format!(
                        "cooldown, {} s left",
                        until_ms.saturating_sub(now_ms).div_ceil(1000)
                    ),
                    AddressState::Releasing => "releasing".to_owned(),
                };
                let state = if record.lost {
                    format!(
                        "{state}; LOST: the cloud no longer has it and may have given it to \
                         another node (recreate the pod)"
                    )
                } else {
                    state
                };
                let _ = writeln!(
                    out,
                    "{:<20} {:<20} {:<38} {state}",
                    record.lease.address.to_string(),
                    record.key.subnet,
                    record.lease.id
                );
            }
        }
        RescueReply::Attachments { attachments } => {
            let _ = writeln!(
                out,
                "{:<40} {:<8} {:<20} {:<40} holder",
                "ATTACHMENT", "PHASE", "ADDRESS", "SANDBOX"
            );
            for record in attachments {
                let phase = match record.phase {
                    Phase::Adding => "adding",
                    Phase::Ready => "ready",
                };
                let address = record
                    .address
                    .map_or_else(|| "-".to_owned(), |address| address.to_string());
                let _ = writeln!(
                    out,
                    "{:<40} {phase:<8} {address:<20} {:<40} {}",
                    record.id().to_string(),
                    record.netns.display(),
                    owner_text(&record.owner)
                );
            }
        }
        RescueReply::Node(view) => {
            let state = &view.state;
            let yes_no = |ok: bool| if ok { "yes" } else { "NO" };
            let _ = writeln!(out, "parent               {}", view.parent);
            let _ = writeln!(
                out,
                "host slave           {} present: {}, up: {}",
                view.host_link,
                yes_no(state.host_link_present),
                yes_no(state.host_link_up)
            );
            let _ = writeln!(
                out,
                "node address         {} present: {}",
                view.node_address,
                yes_no(state.node_address_present)
            );
            let cidrs: Vec<String> = view.service_cidrs.iter().map(ToString::to_string).collect();
            let _ = writeln!(out, "service CIDRs        {}", list(&cidrs));
            let missing: Vec<String> = state
                .missing_routes
                .iter()
                .map(ToString::to_string)
                .collect();
            let stale: Vec<String> = state.stale_routes.iter().map(ToString::to_string).collect();
            let _ = writeln!(out, "pod routes missing   {}", list(&missing));
            let _ = writeln!(out, "pod routes stale     {}", list(&stale));
            match (&view.nftables, &view.nftables_error) {
                (_, Some(error)) => {
                    let _ = writeln!(out, "nftables             cannot read: {error}");
                }
                (None, None) => {
                    let _ = writeln!(out, "nftables             nft not installed");
                }
                (Some(findings), None) if findings.is_empty() => {
                    let _ = writeln!(out, "nftables             nothing shadows kube-proxy");
                }
                (Some(findings), None) => {
                    for finding in findings {
                        let _ = writeln!(out, "nftables             WARNING {finding}");
                    }
                }
            }
            if !state.is_healthy() {
                let _ = writeln!(out, "-> run `hulkctl reapply` to repair the node");
            }
        }
        RescueReply::Released { owner } => {
            let _ = writeln!(out, "released the address of {}", owner_text(owner));
        }
        RescueReply::Drained { returned } => {
            let _ = writeln!(
                out,
                "drained: {returned} idle addresses returned; refills stopped until `hulkctl refill`"
            );
        }
        RescueReply::Refilled { allocated, error } => {
            let _ = writeln!(out, "refill resumed: {allocated} addresses allocated");
            if let Some(error) = error {
                let _ = writeln!(out, "the backend refused: {error}");
            }
        }
        RescueReply::Reapplied(report) => {
            let _ = writeln!(
                out,
                "node configuration re-applied: {} pod routes installed, {} stale removed, \
                 {} pod gateway entries re-pinned",
                report.node.routes_installed,
                report.node.stale_routes_removed.len(),
                report.gateways_repinned
            );
        }
        RescueReply::Collected {
            released,
            suspected,
            orphans,
            pods_checked,
            sandboxes_gone,
            unheld_released,
            del_notes_replayed,
        } => {
            for id in sandboxes_gone {
                let _ = writeln!(out, "sandbox gone: {id} torn down");
            }
            for owner in unheld_released {
                let _ = writeln!(
                    out,
                    "held by no interface: {} released (no record)",
                    owner_text(owner)
                );
            }
            if *del_notes_replayed > 0 {
                let _ = writeln!(
                    out,
                    "{del_notes_replayed} DELs noted while the agent was down done"
                );
            }
            if !pods_checked {
                let _ = writeln!(
                    out,
                    "pods not checked: the agent has no [kubernetes] section (the runtime's CNI GC still works)"
                );
            }
            for owner in released {
                let _ = writeln!(out, "released  {}", owner_text(owner));
            }
            for owner in suspected {
                let _ = writeln!(
                    out,
                    "suspected {} (released on the next pass if still missing)",
                    owner_text(owner)
                );
            }
            let _ = writeln!(
                out,
                "{} released, {} suspected; unknown backend addresses: {} adopted idle, \
                 {} adopted as their marked pod's, {} released, {} left alone; addresses \
                 the backend no longer has: {} idle dropped, {} assigned newly LOST",
                released.len(),
                suspected.len(),
                orphans.adopted_idle,
                orphans.adopted_assigned,
                orphans.released,
                orphans.left_alone,
                orphans.dropped_idle,
                orphans.lost_assigned
            );
            if orphans.lost_assigned > 0 {
                let _ = writeln!(
                    out,
                    "pods use addresses the cloud took back (another node may hold them): \
                     hulkctl leases marks them LOST; recreate those pods"
                );
            }
        }
        RescueReply::Failed { message } => {
            let _ = writeln!(out, "error: {message}");
        }
    }
    out
}
