//! The ADD result (spec section 5, "ADD Success") for versions 1.0.0 and 1.1.0, the
//! abbreviated result an IPAM plugin returns, and how a plugin's own result joins a
//! `prevResult` in a chain.
//!
//! 1.1.0 added interface `mtu`, `socketPath` and `pciID`, and route `mtu`, `advmss`,
//! `priority`, `table` and `scope`: a 1.0.0 result carries none of them
//! ([`CniResult::for_version`]).

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::error::{code, CniError};

/// A plugin's success result.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniResult {
    /// The version supplied on input.
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    /// Every interface the attachment created (host ones with an empty sandbox).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    /// The addresses assigned.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    /// The routes created.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    /// DNS settings.
    #[serde(default, skip_serializing_if = "Dns::is_empty")]
    pub dns: Dns,
}

/// One interface of a result.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    /// Its name.
    pub name: String,
    /// Its MAC, `aa:bb:cc:dd:ee:ff`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    /// Its MTU (1.1.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The netns path for a container interface, empty on the host.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sandbox: String,
    /// A socket file of the interface (1.1.0).
    #[serde(
        rename = "socketPath",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub socket_path: Option<String>,
    /// Its PCI ID (1.1.0).
    #[serde(rename = "pciID", default, skip_serializing_if = "Option::is_none")]
    pub pci_id: Option<String>,
}

/// One address of a result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// The address with its prefix length, `10.244.1.5/24`.
    pub address: IpNet,
    /// The subnet's default gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces` (absent in an IPAM result).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

/// One route of a result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// The destination, `0.0.0.0/0`.
    pub dst: IpNet,
    /// The next hop; when absent, the `gateway` of the family's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    /// Path MTU (1.1.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// MSS to advertise (1.1.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advmss: Option<u32>,
    /// Route priority (1.1.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    /// Routing table (1.1.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    /// Route scope (1.1.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<u32>,
}

impl Route {
    /// A route to `dst` via `gw`, with nothing of 1.1.0's.
    pub fn via(dst: IpNet, gw: Option<IpAddr>) -> Route {
        Route {
            dst,
            gw,
            mtu: None,
            advmss: None,
            priority: None,
            table: None,
            scope: None,
        }
    }
}

/// DNS settings of a result (and of a network config's `dns`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    /// Name servers, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    /// The local domain.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub domain: String,
    /// Search domains.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    /// Resolver options.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    /// Nothing set.
    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty()
            && self.domain.is_empty()
            && self.search.is_empty()
            && self.options.is_empty()
    }
}

impl CniResult {
    /// Parses a result (a `prevResult`, or what an IPAM plugin printed). Code 6 when it is
    /// not one.
    pub fn parse(value: serde_json::Value, what: &str) -> Result<CniResult, CniError> {
        serde_json::from_value(value).map_err(|e| {
            CniError::new(
                code::DECODE,
                format!("failed to decode {what}"),
                e.to_string(),
            )
        })
    }

    /// The result as version `version` has it: 1.0.0 loses 1.1.0's fields.
    pub fn for_version(mut self, version: &str) -> CniResult {
        self.cni_version = version.to_string();
        if version == "1.0.0" {
            for i in &mut self.interfaces {
                i.mtu = None;
                i.socket_path = None;
                i.pci_id = None;
            }
            for r in &mut self.routes {
                r.mtu = None;
                r.advmss = None;
                r.priority = None;
                r.table = None;
                r.scope = None;
            }
        }
        self
    }

    /// This plugin's `own` result joined to `prev` (chained ADD: "output it as their
    /// result, with any possible modifications made by that plugin included"): the
    /// previous interfaces, addresses and routes first, ours after them with our
    /// addresses' interface indexes moved past the previous interfaces; the previous DNS
    /// unless it is empty.
    pub fn chained_after(self, prev: CniResult) -> CniResult {
        let offset = prev.interfaces.len();
        let mut out = prev;
        out.interfaces.extend(self.interfaces);
        out.ips.extend(self.ips.into_iter().map(|mut ip| {
            ip.interface = ip.interface.map(|i| i + offset);
            ip
        }));
        out.routes.extend(self.routes);
        if out.dns.is_empty() {
            out.dns = self.dns;
        }
        out.cni_version = self.cni_version;
        out
    }

    /// The addresses given to interface `index`.
    pub fn ips_of(&self, index: usize) -> impl Iterator<Item = &IpConfig> {
        self.ips
            .iter()
            .filter(move |ip| ip.interface == Some(index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own() -> CniResult {
        CniResult {
            cni_version: "1.1.0".into(),
            interfaces: vec![
                Interface {
                    name: "kxdp0123456789a".into(),
                    mac: "02:00:00:00:00:01".into(),
                    mtu: Some(1450),
                    ..Default::default()
                },
                Interface {
                    name: "eth0".into(),
                    mac: "02:00:00:00:00:02".into(),
                    mtu: Some(1450),
                    sandbox: "/var/run/netns/p".into(),
                    ..Default::default()
                },
            ],
            ips: vec![
                IpConfig {
                    address: "10.244.1.5/24".parse().unwrap(),
                    gateway: Some("10.244.1.1".parse().unwrap()),
                    interface: Some(1),
                },
                IpConfig {
                    address: "fd00:10:244:1::5/64".parse().unwrap(),
                    gateway: Some("fd00:10:244:1::1".parse().unwrap()),
                    interface: Some(1),
                },
            ],
            routes: vec![Route {
                scope: Some(0),
                ..Route::via(
                    "0.0.0.0/0".parse().unwrap(),
                    Some("10.244.1.1".parse().unwrap()),
                )
            }],
            dns: Dns::default(),
        }
    }

    #[test]
    fn result_1_1_0_shape() {
        let v = serde_json::to_value(own().for_version("1.1.0")).unwrap();
        let want = serde_json::json!({
            "cniVersion": "1.1.0",
            "interfaces": [
                {"name": "kxdp0123456789a", "mac": "02:00:00:00:00:01", "mtu": 1450},
                {"name": "eth0", "mac": "02:00:00:00:00:02", "mtu": 1450,
                 "sandbox": "/var/run/netns/p"}
            ],
            "ips": [
                {"address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 1},
                {"address": "fd00:10:244:1::5/64", "gateway": "fd00:10:244:1::1", "interface": 1}
            ],
            "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1", "scope": 0}]
        });
        assert_eq!(v, want);
    }

    #[test]
    fn result_1_0_0_has_no_1_1_fields() {
        let v = serde_json::to_value(own().for_version("1.0.0")).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        for i in v["interfaces"].as_array().unwrap() {
            assert!(i.get("mtu").is_none(), "{i}");
        }
        assert_eq!(
            v["routes"],
            serde_json::json!([{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}])
        );
        assert_eq!(v["ips"][0]["interface"], 1);
        assert_eq!(v["interfaces"][1]["sandbox"], "/var/run/netns/p");
    }

    #[test]
    fn ipam_result_parses_without_interfaces() {
        // host-local's answer (spec section 5's example, dual stack).
        let r = CniResult::parse(
            serde_json::json!({
                "cniVersion": "1.0.0",
                "ips": [{"address": "10.1.0.5/16", "gateway": "10.1.0.1"},
                        {"address": "fd00::5/64", "gateway": "fd00::1"}],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dns": {"nameservers": ["10.1.0.1"]}
            }),
            "the IPAM result",
        )
        .unwrap();
        assert!(r.interfaces.is_empty());
        assert_eq!(r.ips.len(), 2);
        assert_eq!(r.ips[0].interface, None);
        assert_eq!(r.routes[0].gw, None);
        assert_eq!(r.dns.nameservers, vec!["10.1.0.1".to_string()]);
        let bad = CniResult::parse(serde_json::json!({"ips": [{"address": "nope"}]}), "x");
        assert_eq!(bad.unwrap_err().code, code::DECODE);
    }

    #[test]
    fn chained_result_keeps_prev_and_moves_our_indexes() {
        let prev = CniResult {
            cni_version: "1.1.0".into(),
            interfaces: vec![Interface {
                name: "dummy0".into(),
                ..Default::default()
            }],
            ips: vec![IpConfig {
                address: "192.168.0.2/24".parse().unwrap(),
                gateway: None,
                interface: Some(0),
            }],
            routes: vec![],
            dns: Dns {
                nameservers: vec!["192.168.0.53".into()],
                ..Default::default()
            },
        };
        let mut ours = own();
        ours.dns.nameservers = vec!["10.96.0.10".into()];
        let out = ours.chained_after(prev);
        assert_eq!(out.interfaces.len(), 3);
        assert_eq!(out.interfaces[0].name, "dummy0");
        assert_eq!(out.ips[0].interface, Some(0));
        // Our eth0 was index 1; after the previous plugin's one interface it is 2.
        assert_eq!(out.ips[1].interface, Some(2));
        assert_eq!(out.ips[2].interface, Some(2));
        assert_eq!(out.interfaces[2].name, "eth0");
        assert_eq!(out.ips_of(2).count(), 2);
        assert_eq!(out.dns.nameservers, vec!["192.168.0.53".to_string()]);
        assert_eq!(out.routes.len(), 1);
    }
}
