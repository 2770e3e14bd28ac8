//! One connection of the load generator: the mio stream (TCP or Unix), its
//! state (down, connecting, up), its read and write buffers, and the
//! requests it has in flight ([`Sent`]: when each was due and written, and
//! whether it is measured), oldest first, answers arriving in that order.

use crate::cli::Addr;
use mio::net::{TcpStream, UnixStream};
use mio::{Interest, Registry, Token};
use std::collections::VecDeque;
use std::io::{self, Read, Write};
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

pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub fn connect(a: &Addr) -> io::Result<Stream> {
        match a {
            Addr::Tcp(sa) => {
                let s = TcpStream::connect(*sa)?;
                let _ = s.set_nodelay(true);
                Ok(Stream::Tcp(s))
            }
            Addr::Unix(p) => Ok(Stream::Unix(UnixStream::connect(p)?)),
        }
    }
    /// Ok(true): connected; Ok(false): still connecting.
    pub fn connected(&self) -> io::Result<bool> {
        match self {
            Stream::Tcp(s) => {
                if let Some(e) = s.take_error()? {
                    return Err(e);
                }
                match s.peer_addr() {
                    Ok(_) => Ok(true),
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
                    Err(e) => Err(e),
                }
            }
            Stream::Unix(s) => {
                if let Some(e) = s.take_error()? {
                    return Err(e);
                }
                Ok(true)
            }
        }
    }
    pub fn register(&mut self, r: &Registry, t: Token) -> io::Result<()> {
        let i = Interest::READABLE | Interest::WRITABLE;
        match self {
            Stream::Tcp(s) => r.register(s, t, i),
            Stream::Unix(s) => r.register(s, t, i),
        }
    }
    pub fn deregister(&mut self, r: &Registry) {
        let _ = match self {
            Stream::Tcp(s) => r.deregister(s),
            Stream::Unix(s) => r.deregister(s),
        };
    }
    pub fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(b),
            Stream::Unix(s) => s.read(b),
        }
    }
    pub fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(b),
            Stream::Unix(s) => s.write(b),
        }
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
    pub stream: Option<Stream>,
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
