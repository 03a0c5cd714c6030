//! The client end of `kxdp-dataplane`'s control socket: connect to the Unix socket, send a
//! request framed by [`nat::wire`], read the answer. The one client every user of the
//! socket shares: `kxdp-control`'s table stream and its metrics, the `kxdp` CLI (its
//! `monitor` stream too), the CNI plugin and the bench.
//!
//! It is a crate of its own, depending only on `nat`, because its users sit on both sides
//! of the workspace's layering: `control` must not link `dataplane` and `dataplane` must
//! not link `control`, and `nat` stays pure (no sockets). It deliberately knows nothing of
//! what a request means beyond the one answer it decodes ([`DataplaneStats`]): retries,
//! backoff, deltas and what to do with a refusal are its callers' business. Plain blocking
//! `std::os::unix::net`: one request, one answer; an async caller runs it on a blocking
//! thread.

#![forbid(unsafe_code)]

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use nat::wire::{self, Message};

/// A connection to the dataplane's control socket.
#[derive(Debug)]
pub struct Client {
    conn: UnixStream,
}

impl Client {
    /// Connects to the socket at `path`; the error is the socket's, for the caller to name
    /// the path in.
    pub fn connect(path: &Path) -> io::Result<Client> {
        Ok(Client {
            conn: UnixStream::connect(path)?,
        })
    }

    /// Gives up on a read or a write that takes longer than `timeout`.
    pub fn set_timeout(&mut self, timeout: Duration) -> io::Result<()> {
        self.conn.set_read_timeout(Some(timeout))?;
        self.conn.set_write_timeout(Some(timeout))
    }

    /// Sends one frame that the caller encoded ([`wire::encode`]), for a caller that counts
    /// its bytes.
    pub fn send_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        self.conn.write_all(frame)
    }

    /// Sends one message.
    pub fn send(&mut self, msg: &Message) -> io::Result<()> {
        wire::write_message(&mut self.conn, msg)
    }

    /// Reads the next message (an answer, or the next of a stream such as `Monitor`'s).
    pub fn read(&mut self) -> io::Result<Message> {
        wire::read_message(&mut self.conn)
    }

    /// Sends `msg` and reads the answer.
    pub fn ask(&mut self, msg: &Message) -> io::Result<Message> {
        self.send(msg)?;
        self.read()
    }

    /// The dataplane's counters (`GetStats`).
    pub fn stats(&mut self) -> io::Result<DataplaneStats> {
        DataplaneStats::from_answer(self.ask(&Message::GetStats)?)
    }

    /// Whether the idle connection is still open: a read that would block means yes, end
    /// of file or an error means the dataplane went away, and unrequested bytes mean the
    /// stream is out of step.
    pub fn alive(&mut self) -> bool {
        if self.conn.set_nonblocking(true).is_err() {
            return false;
        }
        let mut byte = [0u8; 1];
        let alive =
            matches!(self.conn.read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        alive && self.conn.set_nonblocking(false).is_ok()
    }
}

/// The dataplane's answer to `GetStats`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DataplaneStats {
    /// Generation of the tables in use.
    pub generation: u64,
    /// Tracked connections.
    pub conntrack: usize,
    /// Connection table capacity.
    pub conntrack_capacity: usize,
    /// Per worker: named counters.
    pub workers: Vec<Vec<(String, u64)>>,
    /// NetworkPolicy refusals by `pod ns/name ingress|egress` and `policy ns/name`.
    pub policy_drops: Vec<(String, u64)>,
    /// Tables from control the dataplane's validation refused since it started.
    pub refused_tables: u64,
    /// How its workers wait for packets (`busy`, `adaptive`, `interrupt`); empty when the
    /// dataplane does not say.
    pub poll_mode: String,
}

impl DataplaneStats {
    /// The stats in an answer to `GetStats`; any other answer is an error that names it.
    pub fn from_answer(answer: Message) -> io::Result<DataplaneStats> {
        match answer {
            Message::Stats {
                generation,
                conntrack,
                conntrack_capacity,
                workers,
                policy_drops,
                refused_tables,
                poll_mode,
            } => Ok(DataplaneStats {
                generation,
                conntrack,
                conntrack_capacity,
                workers,
                policy_drops,
                refused_tables,
                poll_mode,
            }),
            other => Err(io::Error::other(format!(
                "the dataplane answered GetStats with {other:?}"
            ))),
        }
    }

    /// Each counter summed over the workers, in the order the first worker names them.
    pub fn summed(&self) -> Vec<(String, u64)> {
        let mut sum: Vec<(String, u64)> = Vec::new();
        for w in &self.workers {
            for (k, v) in w {
                match sum.iter_mut().find(|(sk, _)| sk == k) {
                    Some(e) => e.1 += v,
                    None => sum.push((k.clone(), *v)),
                }
            }
        }
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn socket_path(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("ctlclient-{}-{name}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("ctl.sock");
        let _ = std::fs::remove_file(&path);
        path
    }

    /// A dataplane that answers one request with `answer`.
    fn answering(path: &Path, answer: Message) -> std::thread::JoinHandle<Message> {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let asked = wire::read_message(&mut s).unwrap();
            wire::write_message(&mut s, &answer).unwrap();
            asked
        })
    }

    #[test]
    fn stats_are_asked_for_and_decoded() {
        let path = socket_path("stats");
        let dataplane = answering(
            &path,
            Message::Stats {
                generation: 3,
                conntrack: 2,
                conntrack_capacity: 10,
                workers: vec![
                    vec![("rx".into(), 1), ("tx".into(), 2)],
                    vec![("rx".into(), 4), ("tx".into(), 8)],
                ],
                policy_drops: vec![],
                refused_tables: 1,
                poll_mode: "adaptive".into(),
            },
        );
        let mut client = Client::connect(&path).unwrap();
        client.set_timeout(Duration::from_secs(5)).unwrap();
        let stats = client.stats().unwrap();
        assert!(matches!(dataplane.join().unwrap(), Message::GetStats));
        assert_eq!(stats.generation, 3);
        assert_eq!(stats.refused_tables, 1);
        assert_eq!(stats.poll_mode, "adaptive");
        assert_eq!(
            stats.summed(),
            vec![("rx".to_string(), 5), ("tx".to_string(), 10)]
        );
    }

    #[test]
    fn an_answer_other_than_stats_is_an_error_naming_it() {
        let e = DataplaneStats::from_answer(Message::Busy {
            reason: "held".into(),
        })
        .unwrap_err();
        assert!(e.to_string().contains("Busy"), "{e}");
    }

    #[test]
    fn a_missing_socket_is_not_found() {
        let path = socket_path("missing");
        let e = Client::connect(&path).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn a_closed_connection_is_not_alive() {
        let path = socket_path("closed");
        let listener = UnixListener::bind(&path).unwrap();
        let mut client = Client::connect(&path).unwrap();
        let (server, _) = listener.accept().unwrap();
        assert!(client.alive());
        drop(server);
        assert!(!client.alive());
    }
}
