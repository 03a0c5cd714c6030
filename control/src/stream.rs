//! The client end of the control stream: sends tables to `kxdp-dataplane` and waits for
//! them to be applied; reconnects when the dataplane restarts.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nat::spec::TableSpec;
use nat::wire::{self, Message};

/// Why a table did not reach the dataplane.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The socket could not be reached or broke.
    #[error("control socket {path}: {source} (is kxdp-dataplane running?)")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The dataplane refused the table.
    #[error("the dataplane refused generation {generation}: {reason}")]
    Refused {
        /// The generation sent.
        generation: u64,
        /// Its reason.
        reason: String,
    },
    /// The dataplane answered something else.
    #[error("unexpected answer from the dataplane: {0}")]
    Unexpected(String),
}

/// A connection to the dataplane that is re-established on demand.
pub struct Stream {
    path: PathBuf,
    conn: Option<UnixStream>,
}

impl Stream {
    /// A stream to the socket at `path` (connected lazily).
    pub fn new(path: &Path) -> Stream {
        Stream {
            path: path.to_owned(),
            conn: None,
        }
    }

    fn io(&self, source: io::Error) -> StreamError {
        StreamError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Sends `tables` as `generation` and waits until the dataplane has applied them. On a
    /// broken connection it reconnects once and resends (the dataplane keeps forwarding
    /// with its old tables meanwhile).
    pub fn send(&mut self, generation: u64, tables: &TableSpec) -> Result<(), StreamError> {
        let msg = Message::Snapshot {
            generation,
            tables: Box::new(tables.clone()),
        };
        match self.try_send(&msg, generation) {
            Err(StreamError::Io { .. }) => {
                self.conn = None;
                self.try_send(&msg, generation)
            }
            other => other,
        }
    }

    fn try_send(&mut self, msg: &Message, generation: u64) -> Result<(), StreamError> {
        if self.conn.is_none() {
            let c = UnixStream::connect(&self.path).map_err(|e| self.io(e))?;
            // A table of 100k Services takes a while to compile; a dead peer does not.
            c.set_read_timeout(Some(Duration::from_secs(60)))
                .map_err(|e| self.io(e))?;
            self.conn = Some(c);
        }
        let result = {
            let conn = self.conn.as_mut().expect("connected above");
            wire::write_message(conn, msg).and_then(|_| wire::read_message(conn))
        };
        match result {
            Ok(Message::Applied { generation: g }) if g == generation => Ok(()),
            Ok(Message::Refused { reason }) => Err(StreamError::Refused { generation, reason }),
            Ok(other) => Err(StreamError::Unexpected(format!("{other:?}"))),
            Err(e) => {
                self.conn = None;
                Err(self.io(e))
            }
        }
    }
}
