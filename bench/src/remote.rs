//! The bench on three machines (`vagrant/`): the generator, the device under test and the
//! sink each on a VM of its own, joined by two private networks, instead of namespaces on
//! one host. The roles are the namespace bench's, taken apart:
//!
//! - [`serve_dut`] on the DUT VM: its two NICs moved into a fresh namespace as `u0` and
//!   `p0`, the device set up there exactly as in the namespace bench ([`Dut::set_up_on`]),
//!   left working for a bounded time, then torn down;
//! - [`run_sink`] on the sink VM: the sink on its NIC, answering ARP for the probed
//!   endpoints, and reflecting every frame back (a different machine's clock cannot time a
//!   one-way trip, so latency is the generator's round trip);
//! - [`run_gen`] on the generator VM: the generator on its NIC, counting what comes back
//!   and its round-trip time.
//!
//! Each prints one JSON object; `vagrant/bench.sh` collects them and
//! [`vm_report`] tables them. The DUT's NICs go back to the VM's root namespace under their
//! names when it is done, without the addresses they had (`vagrant reload dut` restores
//! those).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use pktio::xsk::{self, XdpMode, XdpProgram, XskConfig, XskDevice};
use pktio::Device;

use crate::baseline;
use crate::dut::{Dut, DutContext, DutKind, Neighbors};
use crate::frame::FlowSet;
use crate::gen::{GenConfig, Generator};
use crate::measure::Percentiles;
use crate::netns::{self, NetnsGuard};
use crate::sink::{Sink, SinkConfig};
use crate::suite::{self, SOURCE};
use crate::topology::{self, Topology, POD_IF, UPLINK_IF, UPLINK_PREFIX};

/// Longest a DUT, generator or sink of the VM bench runs.
pub const MAX_HOLD: Duration = Duration::from_secs(900);

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> anyhow::Result<[u8; 6]> {
    let parts: Vec<u8> = s
        .trim()
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("{s:?} is not a MAC address"))?;
    let mac: [u8; 6] = parts
        .try_into()
        .map_err(|_| anyhow::anyhow!("{s:?} is not a MAC address"))?;
    Ok(mac)
}

/// The MAC of `ifname` in this (the root) namespace.
pub fn mac_of(ifname: &str) -> anyhow::Result<[u8; 6]> {
    let path = format!("/sys/class/net/{ifname}/address");
    parse_mac(&std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?)
}

/// The MAC of `ifname` in namespace `ns` (`ip -j link show`).
fn mac_in(ns: &NetnsGuard, ifname: &str) -> anyhow::Result<[u8; 6]> {
    let out = ns.ip(&["-j", "link", "show", "dev", ifname])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let addr = v[0]["address"]
        .as_str()
        .with_context(|| format!("no address for {ifname} in `ip -j link` of {}", ns.name()))?;
    parse_mac(addr)
}

/// What [`serve_dut`] needs.
#[derive(Clone, Debug)]
pub struct VmDut {
    /// Which device.
    pub kind: DutKind,
    /// The NIC towards the generator.
    pub uplink: String,
    /// The NIC towards the sink.
    pub pods: String,
    /// Services installed.
    pub services: u32,
    /// The node's address on the uplink network.
    pub node_ip: Ipv4Addr,
    /// The generator's address and MAC.
    pub gen: (Ipv4Addr, [u8; 6]),
    /// The sink's MAC.
    pub sink_mac: [u8; 6],
    /// How long to keep the device working.
    pub hold: Duration,
    /// Where `kxdp-dataplane` is.
    pub bin_dir: PathBuf,
    /// The device's core; its other threads', and the rest.
    pub core: usize,
    /// The other threads' core.
    pub other_core: usize,
}

/// Sets the device up on the VM's NICs, calls `ready` with a JSON description (the
/// frontend to send to, the endpoints, the uplink's MAC), keeps it working for the hold
/// time, and tears it down.
pub fn serve_dut(cfg: &VmDut, mut ready: impl FnMut(serde_json::Value)) -> anyhow::Result<()> {
    if cfg.hold > MAX_HOLD {
        bail!("--hold {:?} is over {MAX_HOLD:?}", cfg.hold);
    }
    let ns = NetnsGuard::new("kxdp-bvm-dut")?;
    for (nic, name) in [(&cfg.uplink, UPLINK_IF), (&cfg.pods, POD_IF)] {
        let st = std::process::Command::new("ip")
            .args(["link", "set", "dev", nic, "netns", ns.name()])
            .status()?;
        if !st.success() {
            bail!("ip link set dev {nic} netns {}: {st}", ns.name());
        }
        ns.ip(&["link", "set", "dev", nic, "name", name])?;
        ns.ip(&["link", "set", "dev", name, "up"])?;
        // Virtual NICs may not offer these; a dataplane needs complete packets anyway.
        let _ = topology::offloads_off(&ns, name);
    }
    ns.ip(&["link", "set", "dev", "lo", "up"])?;
    ns.ip(&[
        "addr",
        "add",
        &format!("{}/{UPLINK_PREFIX}", cfg.node_ip),
        "dev",
        UPLINK_IF,
    ])?;
    let neighbors = Neighbors {
        gen_ip: cfg.gen.0,
        gen_mac: cfg.gen.1,
        sink_mac: cfg.sink_mac,
        uplink_mac: mac_in(&ns, UPLINK_IF)?,
        pod_mac: mac_in(&ns, POD_IF)?,
    };
    let mut set = suite::service_set(cfg.services);
    set.node_ip = cfg.node_ip;
    let spec = set.table_spec()?;
    let ports = baseline::service_ports(&spec);
    let (position, sp) = suite::probe(&ports).context("no Services")?;
    let endpoints: Vec<Ipv4Addr> = sp.cluster_endpoints.iter().map(|e| e.ip).collect();
    let logs = std::env::temp_dir();
    let ctx = DutContext {
        spec: &spec,
        pod_cidr: set.pod_cidr,
        node_ip: cfg.node_ip,
        neighbors,
        endpoints: &endpoints,
        core: cfg.core,
        other_core: cfg.other_core,
        bin_dir: &cfg.bin_dir,
        log_dir: &logs,
        install_limit: Duration::from_secs(600),
        xdp_mode: XdpMode::Auto,
        idle_cpu: Duration::ZERO,
    };
    let topo = Topology::dut_only(ns)?;
    let mut dut = match Dut::set_up_on(cfg.kind, &ctx, "vm", topo)? {
        Ok(d) => d,
        Err(why) => bail!("{}: {why}", cfg.kind.name()),
    };
    ready(serde_json::json!({
        "dut": cfg.kind.name(),
        "services": cfg.services,
        "install_seconds": dut.install.seconds,
        "how": dut.install.how,
        "frontend": SocketAddrV4::new(sp.cluster_ip, sp.port).to_string(),
        "position": position,
        "endpoints": endpoints.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
        "uplink_mac": netns::mac_string(neighbors.uplink_mac),
    }));
    let hold = cfg.hold;
    let result = dut.during(|_| {
        std::thread::sleep(hold);
        Ok(())
    });
    // Give the NICs back, under their names, before the namespace goes (a deleted
    // namespace would destroy virtual NICs and strand physical ones unconfigured).
    let topo = dut.stop();
    let ns = topo.dut_ns();
    let me = std::process::id().to_string();
    for (nic, name) in [(&cfg.uplink, UPLINK_IF), (&cfg.pods, POD_IF)] {
        let _ = ns.ip(&["link", "set", "dev", name, "down"]);
        let _ = ns.ip(&["link", "set", "dev", name, "name", nic]);
        if let Err(e) = ns.ip(&["link", "set", "dev", nic, "netns", &me]) {
            log::warn!("could not move {nic} back: {e}");
        }
    }
    drop(topo);
    let ((), counters) = result?;
    ready(serde_json::json!({ "dut": cfg.kind.name(), "counters": counters.counters }));
    Ok(())
}

/// What [`run_gen`] sends.
#[derive(Clone, Debug)]
pub struct VmGen {
    /// The NIC.
    pub iface: String,
    /// The device under test's uplink MAC.
    pub dst_mac: [u8; 6],
    /// The frontend.
    pub to: SocketAddrV4,
    /// Frame size.
    pub size: usize,
    /// Flows.
    pub flows: u32,
    /// Frames per second, `None` flat out.
    pub rate: Option<u64>,
    /// Sending time.
    pub seconds: f64,
    /// The core to run on.
    pub core: usize,
}

/// Generates on the VM's NIC, counting reflected frames; returns the JSON summary.
pub fn run_gen(cfg: &VmGen) -> anyhow::Result<serde_json::Value> {
    let duration = Duration::from_secs_f64(cfg.seconds);
    if duration > MAX_HOLD {
        bail!("--seconds {} is over {MAX_HOLD:?}", cfg.seconds);
    }
    let idx = xsk::ifindex(&cfg.iface)?;
    crate::pin(cfg.core);
    // Reflected frames come back on the same NIC: everything on it goes to the socket.
    let prog = XdpProgram::attach(idx, 1, XdpMode::Auto).context("attach XDP")?;
    let mut dev = XskDevice::new(
        &[(idx, 0)],
        &XskConfig {
            frame_count: 16384,
            frame_size: 2048,
            rx_size: 4096,
            tx_size: 2048,
            fill_size: 4096,
            comp_size: 2048,
            zero_copy: false,
            runtime_ports: 0,
            stamped: false,
        },
    )?;
    prog.insert(0, dev.socket_fd(0))?;
    let gen_cfg = GenConfig {
        size: cfg.size,
        flows: FlowSet {
            src_mac: mac_of(&cfg.iface)?,
            dst_mac: cfg.dst_mac,
            src_ip: SOURCE,
            src_port: 1024,
            flows: cfg.flows,
            dests: vec![cfg.to],
        },
        rate_pps: cfg.rate,
        duration,
        count: None,
    };
    let epoch = Instant::now();
    let stop = AtomicBool::new(false);
    let mut g = Generator::new(&dev, 0, &gen_cfg, epoch)?.count_returns();
    // Bound: the duration.
    while !g.done(&stop) {
        g.step(&mut dev);
    }
    let (report, returned) = g.finish_with_returns(&mut dev, || {});
    let returned = returned.expect("counted");
    drop(dev);
    drop(prog);
    Ok(serde_json::json!({
        "sent": report.sent,
        "offered_pps": report.pps(),
        "returned": returned.frames,
        "returned_pps": if report.elapsed_ns == 0 { 0.0 } else { returned.frames as f64 * 1e9 / report.elapsed_ns as f64 },
        "rtt_ns": Percentiles::of(&returned.rtt),
        "other": returned.other,
    }))
}

/// Runs the sink on the VM's NIC for `seconds`, answering ARP for `arp`, reflecting if
/// asked; returns the JSON summary.
pub fn run_sink(
    iface: &str,
    arp: &[Ipv4Addr],
    reflect: bool,
    seconds: f64,
    core: usize,
) -> anyhow::Result<serde_json::Value> {
    let duration = Duration::from_secs_f64(seconds);
    if duration > MAX_HOLD {
        bail!("--seconds {seconds} is over {MAX_HOLD:?}");
    }
    let idx = xsk::ifindex(iface)?;
    crate::pin(core);
    let prog = XdpProgram::attach(idx, 1, XdpMode::Auto).context("attach XDP")?;
    let mut dev = XskDevice::new(&[(idx, 0)], &crate::measure::sink_xsk_config())?;
    prog.insert(0, dev.socket_fd(0))?;
    let mut sink = Sink::new(
        &dev,
        0,
        SinkConfig {
            expect_size: 0,
            mac: mac_of(iface)?,
            arp: arp.to_vec(),
            reflect,
            stamped: false,
        },
    );
    let epoch = Instant::now();
    sink.announce(&mut dev);
    let end = Instant::now() + duration;
    // Bound: the duration.
    while Instant::now() < end {
        if sink.step(&mut dev, epoch) == 0 {
            std::hint::spin_loop();
        }
    }
    let r = sink.finish(&mut dev);
    dev.flush();
    drop(dev);
    drop(prog);
    Ok(serde_json::json!({
        "received": r.frames,
        "received_pps": r.pps(),
        "reflected": r.reflected,
        "arp_replies": r.arp_replies,
        "destinations": r.destinations.iter().map(|(d, n)| (d.to_string(), *n)).collect::<Vec<_>>(),
        "sources": r.sources.iter().map(|(s, n)| (s.to_string(), *n)).collect::<Vec<_>>(),
        "other": r.other,
    }))
}

/// Tables the VM bench's results in `dir` (`dut-KIND.json`, `sink-KIND.json`,
/// `gen-KIND.json`, as `vagrant/bench.sh` writes them) as Markdown.
pub fn vm_report(dir: &Path) -> anyhow::Result<String> {
    let read = |name: String| -> Option<serde_json::Value> {
        let text = std::fs::read_to_string(dir.join(name)).ok()?;
        // The DUT writes two lines (ready, then its counters): the first describes it.
        text.lines()
            .find_map(|l| serde_json::from_str::<serde_json::Value>(l.trim()).ok())
    };
    let mut out = String::from(
        "| device | Services | tables loaded (s) | offered pps | at the sink pps | back at the generator pps | RTT p50 µs | RTT p99 µs |\n|---|---|---|---|---|---|---|---|\n",
    );
    for kind in DutKind::ALL {
        let (Some(d), Some(s), Some(g)) = (
            read(format!("dut-{}.json", kind.name())),
            read(format!("sink-{}.json", kind.name())),
            read(format!("gen-{}.json", kind.name())),
        ) else {
            continue;
        };
        let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
        out.push_str(&format!(
            "| {} | {} | {:.2} | {} | {} | {} | {:.1} | {:.1} |\n",
            kind.short(),
            d["services"],
            f(&d["install_seconds"]),
            crate::report::thousands(f(&g["offered_pps"])),
            crate::report::thousands(f(&s["received_pps"])),
            crate::report::thousands(f(&g["returned_pps"])),
            f(&g["rtt_ns"]["p50"]) / 1000.0,
            f(&g["rtt_ns"]["p99"]) / 1000.0,
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_and_the_report_tables_what_is_there() {
        assert_eq!(
            parse_mac("02:6b:62:00:01:0a\n").unwrap(),
            [2, 0x6b, 0x62, 0, 1, 10]
        );
        assert!(parse_mac("02:6b:62").is_err());
        let dir = std::env::temp_dir().join(format!("kxdp-vm-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("dut-kxdp.json"),
            "{\"services\":10,\"install_seconds\":0.5}\n{\"counters\":[]}\n",
        )
        .unwrap();
        std::fs::write(dir.join("sink-kxdp.json"), "{\"received_pps\":1000.0}").unwrap();
        std::fs::write(
            dir.join("gen-kxdp.json"),
            "{\"offered_pps\":2000.0,\"returned_pps\":900.0,\"rtt_ns\":{\"p50\":50000,\"p99\":90000}}",
        )
        .unwrap();
        let t = vm_report(&dir).unwrap();
        assert!(
            t.contains("| kxdp | 10 | 0.50 | 2,000 | 1,000 | 900 | 50.0 | 90.0 |"),
            "{t}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
