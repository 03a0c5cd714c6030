//! The well-known label and annotation names that control reads on the objects (and the
//! ones it writes on its own Node), in one place beside the store that holds the objects.

/// EndpointSlice label naming a slice's Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Node label of the zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Flannel's public IP annotation: the node's VXLAN tunnel address.
pub const FLANNEL_PUBLIC_IP: &str = "flannel.alpha.coreos.com/public-ip";
/// Flannel's backend data annotation (`{"VNI":1,"VtepMAC":"..."}`).
pub const FLANNEL_BACKEND_DATA: &str = "flannel.alpha.coreos.com/backend-data";
/// kxdp's own annotation of a kxdp node's VTEP MAC (`aa:bb:cc:dd:ee:ff`); it wins over
/// flannel's `VtepMAC` when both are present.
pub const KXDP_VTEP_MAC: &str = "kxdp.io/vtep-mac";
/// kxdp's own annotation of a kxdp node's VTEP address; it wins over flannel's `public-ip`.
pub const KXDP_VTEP_IP: &str = "kxdp.io/vtep-ip";
/// The label the API server puts on every Namespace (NetworkPolicy namespace selectors
/// match on it).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
/// flannel's backend type annotation; `vxlan` for kxdp.
pub const FLANNEL_BACKEND_TYPE: &str = "flannel.alpha.coreos.com/backend-type";
/// flannel's marker that the Node's lease is kept by the kube subnet manager; flannel
/// nodes ignore Nodes without `"true"` here.
pub const FLANNEL_KUBE_SUBNET_MANAGER: &str = "flannel.alpha.coreos.com/kube-subnet-manager";
