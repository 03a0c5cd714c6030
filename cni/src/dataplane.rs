//! The plugin's side of the dataplane's control socket: one connection per request,
//! framed by `nat::wire`.

use std::io;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use nat::wire::Message;

use crate::error::{code, CniError};

/// How long the plugin waits for the dataplane to answer one request. Attaching opens an
/// AF_XDP socket per worker, milliseconds; a dataplane slower than this is treated as
/// unreachable, and the runtime retries the ADD.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Why the dataplane did not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// Nobody answered on the socket (not running, restarting, hung).
    #[error("the dataplane at {socket} is not reachable: {source}")]
    Unreachable {
        /// The socket's path.
        socket: String,
        /// What failed.
        source: io::Error,
    },
    /// It answered with a refusal, or with something that is not the answer.
    #[error("the dataplane refused: {0}")]
    Refused(String),
}

impl DataplaneError {
    /// The CNI error for it: unreachable is "try again later" (11), a refusal 101.
    pub fn to_cni(&self, what: &str) -> CniError {
        let c = match self {
            DataplaneError::Unreachable { .. } => code::TRY_AGAIN_LATER,
            DataplaneError::Refused(_) => code::DATAPLANE_REFUSED,
        };
        CniError::new(c, what.to_string(), self.to_string())
    }
}

/// Sends `msg` to the dataplane at `socket` and returns its answer.
pub fn ask(socket: &Path, msg: &Message) -> Result<Message, DataplaneError> {
    let unreachable = |source| DataplaneError::Unreachable {
        socket: socket.display().to_string(),
        source,
    };
    let mut client = ctlclient::Client::connect(socket).map_err(unreachable)?;
    client.set_timeout(TIMEOUT).map_err(unreachable)?;
    client.ask(msg).map_err(unreachable)
}

/// Asks the dataplane to serve `ifname`.
pub fn attach(
    socket: &Path,
    ifname: &str,
    container_id: &str,
    ips: Vec<IpAddr>,
) -> Result<(), DataplaneError> {
    let msg = Message::AttachPod {
        ifname: ifname.to_string(),
        container_id: container_id.to_string(),
        ips,
    };
    match ask(socket, &msg)? {
        Message::PodAttached { ifname: got } if got == ifname => Ok(()),
        Message::Refused { reason } => Err(DataplaneError::Refused(reason)),
        other => Err(DataplaneError::Refused(format!(
            "unexpected answer to AttachPod {ifname}: {other:?}"
        ))),
    }
}

/// Asks the dataplane to stop serving `ifname`; whether it was attached.
pub fn detach(socket: &Path, ifname: &str, container_id: &str) -> Result<bool, DataplaneError> {
    let msg = Message::DetachPod {
        ifname: ifname.to_string(),
        container_id: container_id.to_string(),
    };
    match ask(socket, &msg)? {
        Message::PodDetached { ifname: got, found } if got == ifname => Ok(found),
        Message::Refused { reason } => Err(DataplaneError::Refused(reason)),
        other => Err(DataplaneError::Refused(format!(
            "unexpected answer to DetachPod {ifname}: {other:?}"
        ))),
    }
}

/// Whether the dataplane is up: it answers `GetStats` with its counters.
pub fn ready(socket: &Path) -> Result<(), DataplaneError> {
    match ask(socket, &Message::GetStats)? {
        Message::Stats { .. } => Ok(()),
        Message::Refused { reason } => Err(DataplaneError::Refused(reason)),
        other => Err(DataplaneError::Refused(format!(
            "unexpected answer to GetStats: {other:?}"
        ))),
    }
}
