//! Property tests: every result and configuration survives JSON in every
//! supported version.

use std::net::IpAddr;

use hulk_cni::{
    Attachment, CniResult, CniVersion, Dns, Interface, IpConfig, IpamConf, NetConf, PluginConf,
    Route,
};
use ipnet::IpNet;
use proptest::prelude::*;
use serde_json::{Map, Value};

fn arb_ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(IpAddr::from),
        any::<[u8; 16]>().prop_map(IpAddr::from),
    ]
}

fn arb_net() -> impl Strategy<Value = IpNet> {
    (arb_ip(), any::<u8>()).prop_map(|(ip, prefix)| {
        let max = if ip.is_ipv4() { 33 } else { 129 };
        IpNet::new(ip, prefix % max).expect("prefix is in range")
    })
}

fn arb_text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_./:-]{1,20}"
}

fn arb_interface() -> impl Strategy<Value = Interface> {
    (
        arb_text(),
        proptest::option::of("([0-9a-f]{2}:){5}[0-9a-f]{2}"),
        proptest::option::of(any::<u32>()),
        proptest::option::of(arb_text()),
        proptest::option::of(arb_text()),
        proptest::option::of(arb_text()),
    )
        .prop_map(|(name, mac, mtu, sandbox, socket_path, pci_id)| Interface {
            name,
            mac,
            mtu,
            sandbox,
            socket_path,
            pci_id,
        })
}

fn arb_route() -> impl Strategy<Value = Route> {
    (
        arb_net(),
        proptest::option::of(arb_ip()),
        proptest::option::of(any::<u32>()),
        proptest::option::of(any::<u32>()),
        proptest::option::of(any::<u32>()),
        proptest::option::of(any::<u32>()),
        proptest::option::of(any::<u8>()),
    )
        .prop_map(|(dst, gw, mtu, advmss, priority, table, scope)| Route {
            dst,
            gw,
            mtu,
            advmss,
            priority,
            table,
            scope,
        })
}

fn arb_dns() -> impl Strategy<Value = Dns> {
    (
        proptest::collection::vec(arb_ip(), 0..3),
        proptest::option::of(arb_text()),
        proptest::collection::vec(arb_text(), 0..3),
        proptest::collection::vec(arb_text(), 0..3),
    )
        .prop_map(|(nameservers, domain, search, options)| Dns {
            nameservers,
            domain,
            search,
            options,
        })
}

fn arb_result() -> impl Strategy<Value = CniResult> {
    proptest::collection::vec(arb_interface(), 0..4).prop_flat_map(|interfaces| {
        let count = interfaces.len() as u32;
        let index = if count == 0 {
            Just(None).boxed()
        } else {
            proptest::option::of(0..count).boxed()
        };
        let ip = (arb_net(), proptest::option::of(arb_ip()), index).prop_map(
            |(address, gateway, interface)| IpConfig {
                address,
                gateway,
                interface,
            },
        );
        (
            Just(interfaces),
            proptest::collection::vec(ip, 0..4),
            proptest::collection::vec(arb_route(), 0..4),
            arb_dns(),
        )
            .prop_map(|(interfaces, ips, routes, dns)| CniResult {
                interfaces,
                ips,
                routes,
                dns,
            })
    })
}

fn arb_version() -> impl Strategy<Value = CniVersion> {
    proptest::sample::select(CniVersion::ALL.to_vec())
}

/// JSON values for plugin-specific fields (no floats: JSON cannot keep NaN).
fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        arb_text().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z]{1,6}", inner, 0..4)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

const KNOWN_KEYS: [&str; 13] = [
    "cniVersion",
    "name",
    "type",
    "capabilities",
    "ipam",
    "dns",
    "args",
    "runtimeConfig",
    "prevResult",
    "disableCheck",
    "disableGC",
    "cni.dev/valid-attachments",
    "cni.dev/attachments",
];

fn arb_plugin_fields() -> impl Strategy<Value = Map<String, Value>> {
    proptest::collection::btree_map("[a-zA-Z][a-zA-Z0-9]{0,10}", arb_json(), 0..5).prop_map(|map| {
        map.into_iter()
            .filter(|(key, _)| !KNOWN_KEYS.contains(&key.as_str()))
            .collect()
    })
}

fn arb_attachments() -> impl Strategy<Value = Option<Vec<Attachment>>> {
    proptest::option::of(proptest::collection::vec(
        ("[a-z0-9]{1,12}", "eth[0-9]").prop_map(|(container_id, ifname)| Attachment {
            container_id,
            ifname,
        }),
        0..3,
    ))
}

prop_compose! {
    fn arb_conf()(
        version in arb_version(),
        name in "[a-z0-9][a-z0-9_.-]{0,15}",
        plugin_type in arb_text(),
        capabilities in proptest::collection::btree_map("[a-zA-Z]{1,8}", any::<bool>(), 0..3),
        ipam in proptest::option::of((arb_text(), arb_plugin_fields())),
        dns in proptest::option::of(arb_dns()),
        args in proptest::option::of(arb_json()),
        runtime_config in proptest::option::of(arb_plugin_fields()),
        prev_result in proptest::option::of((arb_result(), arb_version())),
        disable_check in any::<bool>(),
        disable_gc in any::<bool>(),
        valid_attachments in arb_attachments(),
        attachments in arb_attachments(),
        plugin in arb_plugin_fields(),
    ) -> NetConf {
        NetConf {
            cni_version: version,
            name,
            plugin: PluginConf {
                plugin_type,
                capabilities,
                ipam: ipam.map(|(ipam_type, fields)| IpamConf {
                    ipam_type,
                    fields: fields.into_iter().filter(|(key, _)| key != "type").collect(),
                }),
                dns,
                fields: plugin,
            },
            // `args: null` reads back as absent, so never generate it.
            args: args.filter(|value| !value.is_null()),
            runtime_config,
            prev_result: prev_result.map(|(result, version)| result.to_value(version)),
            disable_check,
            disable_gc,
            valid_attachments,
            attachments,
        }
    }
}

proptest! {
    #[test]
    fn every_result_round_trips_in_every_version(result in arb_result(), version in arb_version()) {
        let written = result.to_value(version);
        let text = serde_json::to_string(&written).unwrap();
        let (read_version, read) = CniResult::from_value(serde_json::from_str(&text).unwrap()).unwrap();
        prop_assert_eq!(read_version, version);
        prop_assert_eq!(read, result.restricted_to(version));
    }

    #[test]
    fn conversion_between_versions_matches_direct_writing(
        result in arb_result(),
        from in arb_version(),
        to in arb_version(),
    ) {
        let converted = CniResult::convert(result.to_value(from), to).unwrap();
        prop_assert_eq!(converted, result.restricted_to(from).to_value(to));
    }

    #[test]
    fn every_configuration_round_trips(conf in arb_conf()) {
        let text = serde_json::to_string(&conf).unwrap();
        let read = NetConf::from_slice(text.as_bytes()).unwrap();
        prop_assert_eq!(read, conf);
    }

    #[test]
    fn prev_result_reads_back_what_was_written(conf in arb_conf()) {
        if let Some(value) = &conf.prev_result {
            let (_, expected) = CniResult::from_value(value.clone()).unwrap();
            prop_assert_eq!(conf.prev_result().unwrap(), Some(expected));
        }
    }
}
