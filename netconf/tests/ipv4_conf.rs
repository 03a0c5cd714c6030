//! A link's IPv4 settings set through route netlink ([`Netlink::set_ipv4_conf`]) on a veth in
//! a network namespace of the test's own (unique name, deleted on drop, also when the test
//! fails), read back with the system's own `sysctl`. Needs root; skipped (with a message)
//! otherwise.

use std::fs::File;
use std::process::Command;

use netconf::netlink::{Ipv4DevConf, Netlink};
use nix::sched::{setns, CloneFlags};

/// A namespace `ncconf-<pid>`, deleted when dropped.
struct Namespace(String);

impl Namespace {
    fn new() -> Namespace {
        let name = format!("ncconf-{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("run ip");
        assert!(ok.success(), "ip netns add {name}");
        Namespace(name)
    }

    /// `sysctl -n net.ipv4.conf.<dev>.<key>` in the namespace.
    fn sysctl(&self, dev: &str, key: &str) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, "sysctl", "-n"])
            .arg(format!("net.ipv4.conf.{dev}.{key}"))
            .output()
            .expect("run sysctl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `sysctl -w net.ipv4.conf.<dev>.<key>=<value>` in the namespace.
    fn sysctl_write(&self, dev: &str, key: &str, value: &str) {
        let ok = Command::new("ip")
            .args(["netns", "exec", &self.0, "sysctl", "-qw"])
            .arg(format!("net.ipv4.conf.{dev}.{key}={value}"))
            .status()
            .expect("run sysctl");
        assert!(ok.success(), "sysctl -w {dev}.{key}={value}");
    }

    /// Runs `f` on a thread of its own inside the namespace.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let ns = File::open(format!("/var/run/netns/{}", self.0)).expect("open the namespace");
        std::thread::scope(|s| {
            let h = s.spawn(|| {
                setns(&ns, CloneFlags::CLONE_NEWNET).expect("enter the namespace");
                f()
            });
            match h.join() {
                Ok(v) => v,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn ipv4_settings_set_by_netlink_are_the_sysctls_and_touch_nothing_else() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (a network namespace, a veth pair)");
        return;
    }
    let ns = Namespace::new();
    let index = ns.run(|| {
        let mut nl = Netlink::open().expect("netlink");
        nl.create_veth_here("cnf0", "cnf1", 1).expect("veth");
        nl.link_by_name("cnf0")
            .expect("look up")
            .expect("there")
            .index
    });
    // Settings the request does not name, away from their defaults: they must stay.
    ns.sysctl_write("cnf0", "log_martians", "1");
    ns.sysctl_write("cnf0", "arp_ignore", "2");
    assert_eq!(ns.sysctl("cnf0", "accept_local"), "0");

    ns.run(|| {
        let mut nl = Netlink::open().expect("netlink");
        nl.set_ipv4_conf(
            index,
            &[(Ipv4DevConf::AcceptLocal, 1), (Ipv4DevConf::RpFilter, 2)],
        )
    })
    .expect("set accept_local and rp_filter");
    assert_eq!(ns.sysctl("cnf0", Ipv4DevConf::AcceptLocal.name()), "1");
    assert_eq!(ns.sysctl("cnf0", Ipv4DevConf::RpFilter.name()), "2");
    assert_eq!(ns.sysctl("cnf0", "log_martians"), "1");
    assert_eq!(ns.sysctl("cnf0", "arp_ignore"), "2");
    // Its peer is another interface: untouched.
    assert_eq!(ns.sysctl("cnf1", "accept_local"), "0");

    // A zero is a value too.
    ns.run(|| {
        let mut nl = Netlink::open().expect("netlink");
        nl.set_ipv4_conf(index, &[(Ipv4DevConf::RpFilter, 0)])
    })
    .expect("set rp_filter to 0");
    assert_eq!(ns.sysctl("cnf0", "rp_filter"), "0");
    assert_eq!(ns.sysctl("cnf0", "accept_local"), "1");

    // No such link: the kernel's ENODEV as an error.
    let gone = ns.run(|| {
        let mut nl = Netlink::open().expect("netlink");
        nl.set_ipv4_conf(index + 1000, &[(Ipv4DevConf::AcceptLocal, 1)])
    });
    assert_eq!(
        gone.expect_err("no such link").raw_os_error(),
        Some(libc::ENODEV)
    );
}
