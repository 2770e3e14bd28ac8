//! One connection of the load generator: its stream (the daemon's own
//! `Transport`, plain TCP or Unix), its state (down, connecting, up), its
//! read and write buffers, and the requests it has in flight ([`Sent`]: when each was due and written, and
//! whether it is measured), oldest first, answers arriving in that order.

use crate::cli::Addr;
use httpmapd::transport::Transport;
use mio::net::{TcpStream, UnixStream};
use std::collections::VecDeque;
use std::io;
use std::time::Instant;

/// A request in flight.
#[derive(Clone, Copy, Debug)]
pub struct Sent {
    /// When it was due: its write in the closed loop, its place in the
    /// schedule in the open loop. Latency runs from here.
    pub due: Instant,
    /// When it was written (the timeout runs from here).
    pub sent: Instant,
    /// Measured (not warm-up).
    pub measured: bool,
}

/// Opens a non-blocking connection to `a`: the daemon's own [`Transport`]
/// (plain TCP, `TCP_NODELAY` set, or a Unix stream socket), registered with
/// the event loop through [`Transport::socket`].
pub fn connect(a: &Addr) -> io::Result<Transport> {
    match a {
        Addr::Tcp(sa) => {
            let s = TcpStream::connect(*sa)?;
            let _ = s.set_nodelay(true);
            Ok(Transport::Plain(s))
        }
        Addr::Unix(p) => Ok(Transport::Unix(UnixStream::connect(p)?)),
    }
}

#[derive(PartialEq, Eq, Clone, Copy)]
pub enum State {
    /// Not started, or closed and waiting to reconnect at `retry_at`.
    Down,
    Connecting,
    Up,
}

pub struct Conn {
    pub stream: Option<Transport>,
    pub state: State,
    /// When a connection that is down may connect again.
    pub retry_at: Instant,
    pub rbuf: Vec<u8>,
    pub wbuf: Vec<u8>,
    pub wpos: usize,
    /// The requests in flight, oldest first.
    pub inflight: VecDeque<Sent>,
    /// Open loop: this connection's number over every thread (0..C).
    pub gid: u64,
    /// Open loop: the number of this connection's next request (its k-th).
    pub next_k: u64,
}

impl Conn {
    pub fn new(gid: u64) -> Conn {
        Conn {
            stream: None,
            state: State::Down,
            retry_at: Instant::now(),
            rbuf: Vec::new(),
            wbuf: Vec::new(),
            wpos: 0,
            inflight: VecDeque::new(),
            gid,
            next_k: 0,
        }
    }

    /// Measured requests in flight.
    pub fn measured_in_flight(&self) -> u64 {
        self.inflight.iter().filter(|s| s.measured).count() as u64
    }
}
