//! Issue 16 items 3 and 4 as `/metrics` shows them: the Service addresses a table
//! computation refuses (a ClusterIP:port an older Service holds, a ClusterIP outside the
//! Service ranges, a ClusterIP that is no address) are counted by reason, through
//! kxdp-control's sync path (`Programmer`). No dataplane is needed: the tables are computed
//! and published whether or not one listens.

use std::sync::Arc;
use std::time::Instant;

use control::health::{ProxyHealth, DEFAULT_HEALTHZ_TIMEOUT};
use control::kube_source::Change;
use control::metrics::{render, ControlMetrics};
use control::stream::Stream;
use control::{Objects, Programmer};
use nat::spec::ClusterSpec;

const OBJECTS: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: node-a}
spec: {podCIDR: 10.244.1.0/24}
status: {addresses: [{type: InternalIP, address: 192.168.0.2}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default, creationTimestamp: "2024-01-01T00:00:00Z"}
spec: {clusterIP: 172.30.0.41, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: a-newcomer, namespace: default, creationTimestamp: "2024-06-01T00:00:00Z"}
spec: {clusterIP: 172.30.0.41, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: hijack, namespace: default}
spec: {clusterIP: 8.8.8.8, ports: [{port: 53, protocol: UDP}]}
---
apiVersion: v1
kind: Service
metadata: {name: garbled, namespace: default}
spec: {clusterIP: 172.30.0.999, ports: [{port: 80}]}
"#;

#[test]
fn refused_service_addresses_are_counted_by_reason() {
    let mut objects = Objects::new();
    let mut errors = Vec::new();
    control::load_text(&mut objects, "test.yaml", OBJECTS, &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
    let metrics = Arc::new(ControlMetrics::new());
    let socket =
        std::env::temp_dir().join(format!("kxdp-refused-services-{}.sock", std::process::id()));
    let mut p = Programmer::new(
        "node-a",
        ClusterSpec::default(),
        Stream::new(&socket),
        metrics.clone(),
        Arc::new(ProxyHealth::new(DEFAULT_HEALTHZ_TIMEOUT)),
    );
    assert!(p.objects_changed(&objects, &Change::default(), Instant::now()));
    let text = render(metrics.snapshot(), None);
    for line in [
        "# TYPE kxdp_service_addresses_refused gauge",
        "kxdp_service_addresses_refused{reason=\"taken\"} 1",
        "kxdp_service_addresses_refused{reason=\"outside_service_ranges\"} 1",
        "kxdp_service_addresses_refused{reason=\"invalid_cluster_ip\"} 1",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
    }

    // Fixed: the newcomer gone, the others corrected; the gauges fall back to 0.
    assert!(objects.delete("Service", "default", "a-newcomer"));
    assert!(objects.delete("Service", "default", "hijack"));
    assert!(objects.delete("Service", "default", "garbled"));
    assert!(p.objects_changed(&objects, &Change::default(), Instant::now()));
    let text = render(metrics.snapshot(), None);
    assert!(
        text.lines()
            .any(|l| l == "kxdp_service_addresses_refused{reason=\"taken\"} 0"),
        "{text}"
    );
}
