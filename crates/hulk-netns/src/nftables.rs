//! Detects nftables rules that can shadow kube-proxy's iptables rules.
//!
//! With iptables-nft, kube-proxy's rules live in nftables tables too, and
//! every base chain on a hook sees every packet. A drop anywhere is final,
//! and the first NAT decision for a connection sticks. So a firewall's own
//! table (firewalld, a distribution's default `inet filter`) that drops, or
//! that NATs at a lower priority, can break Service traffic although
//! kube-proxy's rules are right. This module only reports; it never
//! changes a ruleset it does not own.

use std::fmt;

use serde::Deserialize;
use serde_json::Value;

/// One chain that can override kube-proxy.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct NftFinding {
    /// `family table chain`, e.g. `inet firewalld filter_FORWARD`.
    pub chain: String,
    /// The netfilter hook.
    pub hook: String,
    /// The chain's priority.
    pub priority: i64,
    /// Why it can shadow kube-proxy.
    pub reason: String,
}

impl fmt::Display for NftFinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "nftables chain {} (hook {}, priority {}) {}",
            self.chain, self.hook, self.priority, self.reason
        )
    }
}

/// Tables iptables-nft and kube-proxy's nftables mode manage themselves.
fn is_kube_proxy_or_iptables_table(family: &str, table: &str) -> bool {
    matches!(family, "ip" | "ip6")
        && matches!(
            table,
            "filter" | "nat" | "mangle" | "raw" | "security" | "kube-proxy"
        )
}

#[derive(Deserialize)]
struct Ruleset {
    nftables: Vec<Value>,
}

#[derive(Deserialize)]
struct Chain {
    family: String,
    table: String,
    name: String,
    hook: Option<String>,
    #[serde(rename = "type")]
    chain_type: Option<String>,
    prio: Option<i64>,
    policy: Option<String>,
}

#[derive(Deserialize)]
struct Rule {
    family: String,
    table: String,
    chain: String,
    #[serde(default)]
    expr: Vec<Value>,
}

/// Statements whose presence in a foreign chain matters, by kind.
fn statement_kinds(rule: &Rule) -> impl Iterator<Item = &str> {
    rule.expr
        .iter()
        .filter_map(|expression| expression.as_object())
        .flat_map(|object| object.keys().map(String::as_str))
}

/// Reads `nft -j list ruleset` output and lists the chains that can drop
/// or re-NAT traffic outside kube-proxy's and iptables' own tables.
pub fn nftables_shadowing(ruleset_json: &str) -> Result<Vec<NftFinding>, serde_json::Error> {
    let ruleset: Ruleset = serde_json::from_str(ruleset_json)?;
    let mut chains = Vec::new();
    let mut rules = Vec::new();
    for item in ruleset.nftables {
        if let Some(chain) = item.get("chain") {
            chains.push(Chain::deserialize(chain)?);
        } else if let Some(rule) = item.get("rule") {
            rules.push(Rule::deserialize(rule)?);
        }
    }
    let mut findings = Vec::new();
    for chain in &chains {
        let Some(hook) = &chain.hook else { continue };
        if is_kube_proxy_or_iptables_table(&chain.family, &chain.table) {
            continue;
        }
        let priority = chain.prio.unwrap_or(0);
        let name = format!("{} {} {}", chain.family, chain.table, chain.name);
        let mut reasons = Vec::new();
        if chain.policy.as_deref() == Some("drop") {
            reasons.push("has policy drop: it drops what it does not accept, whatever kube-proxy's rules accept".to_owned());
        }
        let kinds: Vec<&str> = rules
            .iter()
            .filter(|rule| {
                rule.family == chain.family && rule.table == chain.table && rule.chain == chain.name
            })
            .flat_map(statement_kinds)
            .collect();
        if kinds.iter().any(|kind| matches!(*kind, "drop" | "reject")) {
            reasons.push(
                "has drop/reject rules: a drop in any chain is final for the packet".to_owned(),
            );
        }
        let nats = kinds
            .iter()
            .any(|kind| matches!(*kind, "dnat" | "snat" | "masquerade" | "redirect"));
        // kube-proxy's DNAT runs at dstnat (-100) in prerouting/output.
        if chain.chain_type.as_deref() == Some("nat") && nats && priority <= -100 {
            reasons.push(
                "NATs before kube-proxy's DNAT: the first NAT of a connection sticks".to_owned(),
            );
        }
        for reason in reasons {
            findings.push(NftFinding {
                chain: name.clone(),
                hook: hook.clone(),
                priority,
                reason,
            });
        }
    }
    Ok(findings)
}

/// Runs `nft -j list ruleset` and reports shadowing chains. `Ok(None)`
/// when nft is not installed (then nothing of nftables' own can shadow).
pub fn check_nftables() -> std::io::Result<Option<Vec<NftFinding>>> {
    let output = match std::process::Command::new("nft")
        .args(["-j", "list", "ruleset"])
        .output()
    {
        Ok(output) => output,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    if !output.status.success() {
        return Err(std::io::Error::other(format!(
            "nft -j list ruleset failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    nftables_shadowing(&text)
        .map(Some)
        .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidData, error))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ruleset(items: Value) -> String {
        json!({"nftables": items}).to_string()
    }

    #[test]
    fn iptables_and_kube_proxy_tables_are_not_findings() {
        let text = ruleset(json!([
            {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
            {"table": {"family": "ip", "name": "nat", "handle": 1}},
            {"chain": {"family": "ip", "table": "nat", "name": "PREROUTING", "handle": 1,
                       "type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"}},
            {"chain": {"family": "ip", "table": "filter", "name": "FORWARD", "handle": 2,
                       "type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}},
            {"chain": {"family": "ip", "table": "kube-proxy", "name": "filter-forward", "handle": 3,
                       "type": "filter", "hook": "forward", "prio": -110, "policy": "accept"}},
            {"rule": {"family": "ip", "table": "kube-proxy", "chain": "filter-forward", "handle": 4,
                      "expr": [{"drop": null}]}}
        ]));
        assert_eq!(nftables_shadowing(&text).unwrap(), []);
    }

    #[test]
    fn a_firewall_that_drops_is_reported() {
        let text = ruleset(json!([
            {"table": {"family": "inet", "name": "firewalld", "handle": 7}},
            {"chain": {"family": "inet", "table": "firewalld", "name": "filter_FORWARD", "handle": 1,
                       "type": "filter", "hook": "forward", "prio": 10, "policy": "accept"}},
            {"rule": {"family": "inet", "table": "firewalld", "chain": "filter_FORWARD", "handle": 2,
                      "expr": [{"match": {"op": "==", "left": {"ct": {"key": "state"}}, "right": "invalid"}},
                               {"reject": {"type": "icmpx", "expr": "admin-prohibited"}}]}},
            {"chain": {"family": "inet", "table": "filter", "name": "input", "handle": 3,
                       "type": "filter", "hook": "input", "prio": 0, "policy": "drop"}},
            {"chain": {"family": "inet", "table": "filter", "name": "helper", "handle": 4}}
        ]));
        let findings = nftables_shadowing(&text).unwrap();
        let described: Vec<String> = findings.iter().map(ToString::to_string).collect();
        assert_eq!(findings.len(), 2, "{described:#?}");
        assert!(described[0].starts_with("nftables chain inet firewalld filter_FORWARD (hook forward, priority 10) has drop/reject"));
        assert!(described[1].starts_with(
            "nftables chain inet filter input (hook input, priority 0) has policy drop"
        ));
    }

    #[test]
    fn an_earlier_nat_chain_is_reported_and_a_later_one_is_not() {
        let chain = |name: &str, prio: i64| {
            json!({"chain": {"family": "inet", "table": "mine", "name": name, "handle": 1,
                             "type": "nat", "hook": "prerouting", "prio": prio, "policy": "accept"}})
        };
        let rule = |name: &str| {
            json!({"rule": {"family": "inet", "table": "mine", "chain": name, "handle": 2,
                            "expr": [{"dnat": {"addr": "10.0.0.1"}}]}})
        };
        let text = ruleset(json!([
            chain("early", -150),
            rule("early"),
            chain("late", 50),
            rule("late")
        ]));
        let findings = nftables_shadowing(&text).unwrap();
        assert_eq!(findings.len(), 1);
        assert_eq!(findings[0].chain, "inet mine early");
        assert!(findings[0].reason.contains("NATs before kube-proxy"));
    }

    #[test]
    fn malformed_output_is_an_error_not_a_clean_bill() {
        assert!(nftables_shadowing("{\"nftables\": [{\"chain\": {\"family\": 1}}]}").is_err());
        assert!(nftables_shadowing("not json").is_err());
    }
}
