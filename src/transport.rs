//! A client connection's byte stream, plain TCP or TLS, under the HTTP codec
//! (and later the Redis one): one small type whose `read`, `write` and
//! checks the connection state machines use, so TLS is a transport and not a
//! second client.
//!
//! TLS is rustls' `ClientConnection` on the same non-blocking mio socket,
//! driven by the event loop that owns it: [`Transport::handshake`] moves
//! the handshake as far as the socket allows (`read_tls` /
//! `process_new_packets` / `write_tls`, interest both ways, edge-triggered),
//! [`Transport::write`] hands plaintext to rustls and writes what it can,
//! [`Transport::flush`] writes the rest when the socket is writable again,
//! [`Transport::read`] gives plaintext, reading and decrypting records as
//! needed. Nothing blocks and no thread is spawned. A TLS failure surfaces as
//! an `io::Error` of kind `InvalidData` holding the `rustls::Error`
//! ([`tls_error`] gets it back for the log line).
//!
//! An idle pooled connection must hold no unread byte ([`Transport::idle`]):
//! on TLS, plaintext rustls already decrypted counts as much as bytes on the
//! socket; records that carry no application data (a TLS 1.3 session
//! ticket, a key update) are consumed and the connection stays pooled; a
//! `close_notify` is a clean close; any plaintext is a stray reply. One
//! helper writes what rustls holds for the socket, for the handshake,
//! `flush` and `read` alike.

use mio::net::TcpStream;
use rustls::pki_types::ServerName;
use rustls::ClientConnection;
use std::io::{self, Read, Write};
use std::sync::Arc;

/// What an idle connection holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Idle {
    /// Nothing waiting: safe to reuse.
    Clean,
    /// The server closed it (EOF, `close_notify`) or it failed: drop it quietly.
    Closed,
    /// Data nobody asked for (a duplicated or unsolicited reply): how many
    /// bytes, and the first of them.
    Stray { bytes: usize, first: Vec<u8> },
}

pub enum Transport {
    Plain(TcpStream),
    Tls(TcpStream, Box<ClientConnection>),
    /// A Unix stream socket (the shared cache's `unix:/path`).
    Unix(mio::net::UnixStream),
}

/// Wraps a TLS error as an `io::Error` (kind `InvalidData`).
fn io_tls(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// The rustls error inside an `io::Error` made by this module, if any.
pub fn tls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

/// What [`write_pending`] wrote.
struct Written {
    /// Some bytes went to the socket.
    any: bool,
    /// Nothing is left in rustls (else the socket would block).
    all: bool,
}

/// Writes the TLS records rustls holds, as far as the socket takes them.
/// A socket that takes nothing (`Ok(0)`) is an error (`WriteZero`), never a
/// loop that spins; `WouldBlock` leaves the rest for the next writable edge.
fn write_pending(sock: &mut TcpStream, conn: &mut ClientConnection) -> io::Result<Written> {
    let mut any = false;
    while conn.wants_write() {
        match conn.write_tls(sock) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(_) => any = true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Ok(Written { any, all: false })
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Written { any, all: true })
}

/// Takes in the records read: on an error (a certificate refused, garbage)
/// the alert rustls queued for the server is sent first, as far as the
/// socket takes it, so the server learns why.
fn process(sock: &mut TcpStream, conn: &mut ClientConnection) -> io::Result<()> {
    conn.process_new_packets().map(|_| ()).map_err(|e| {
        let _ = write_pending(sock, conn);
        io_tls(e)
    })
}

impl Transport {
    /// A TLS client connection on `sock`, verifying `name`.
    pub fn tls(
        sock: TcpStream,
        config: Arc<rustls::ClientConfig>,
        name: ServerName<'static>,
    ) -> io::Result<Transport> {
        let conn = ClientConnection::new(config, name).map_err(io_tls)?;
        Ok(Transport::Tls(sock, Box::new(conn)))
    }

    /// The socket, to register with the event loop.
    pub fn socket(&mut self) -> &mut dyn mio::event::Source {
        match self {
            Transport::Plain(s) | Transport::Tls(s, _) => s,
            Transport::Unix(s) => s,
        }
    }

    /// After a non-blocking connect: `Ok(true)` once connected, `Ok(false)`
    /// while it is still in progress, `Err` when it failed.
    pub fn connected(&self) -> io::Result<bool> {
        let (err, peer) = match self {
            Transport::Plain(s) | Transport::Tls(s, _) => {
                (s.take_error(), s.peer_addr().map(|_| ()))
            }
            Transport::Unix(s) => (s.take_error(), s.peer_addr().map(|_| ())),
        };
        match err {
            Ok(Some(e)) | Err(e) => return Err(e),
            Ok(None) => {}
        }
        match peer {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Transport::Tls(..))
    }

    /// After a TLS handshake: whether it resumed an earlier session.
    pub fn resumed(&self) -> Option<bool> {
        match self {
            Transport::Tls(_, c) => c
                .handshake_kind()
                .map(|k| k == rustls::HandshakeKind::Resumed),
            Transport::Plain(_) | Transport::Unix(_) => None,
        }
    }

    /// Moves the TLS handshake on; `Ok(true)` once it is done (always for
    /// plain TCP), `Ok(false)` when the socket has to wait.
    pub fn handshake(&mut self) -> io::Result<bool> {
        let Transport::Tls(sock, conn) = self else {
            return Ok(true);
        };
        loop {
            let mut progress = write_pending(sock, conn)?.any;
            if !conn.is_handshaking() {
                return Ok(true);
            }
            if conn.wants_read() {
                match conn.read_tls(sock) {
                    Ok(0) => {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "connection closed during the TLS handshake",
                        ))
                    }
                    Ok(_) => {
                        process(sock, conn)?;
                        progress = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => progress = true,
                    Err(e) => return Err(e),
                }
            }
            if !progress {
                return Ok(false);
            }
        }
    }

    /// Writes encrypted bytes rustls holds; `Ok(true)` when none are left.
    pub fn flush(&mut self) -> io::Result<bool> {
        let Transport::Tls(sock, conn) = self else {
            return Ok(true);
        };
        Ok(write_pending(sock, conn)?.all)
    }

    /// Writes plaintext: on TLS all of `buf` is taken (rustls buffers it)
    /// and as much as the socket takes is written; [`Transport::flush`]
    /// writes the rest.
    pub fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => s.write(buf),
            Transport::Unix(s) => s.write(buf),
            Transport::Tls(..) => {
                let Transport::Tls(_, conn) = self else {
                    unreachable!()
                };
                conn.writer().write_all(buf)?;
                self.flush()?;
                Ok(buf.len())
            }
        }
    }

    /// Reads plaintext: `Ok(0)` is the end of the stream (EOF, or a TLS
    /// `close_notify`), `WouldBlock` means nothing more for now.
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Transport::Tls(sock, conn) = self else {
            return match self {
                Transport::Plain(s) => s.read(buf),
                Transport::Unix(s) => s.read(buf),
                Transport::Tls(..) => unreachable!(),
            };
        };
        loop {
            match conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The server closed without close_notify: an EOF like any
                // other (the HTTP framing tells a cut reply from a whole one).
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            match conn.read_tls(sock) {
                Ok(0) => {
                    process(sock, conn)?;
                    // Loop once more: buffered plaintext first, then EOF.
                    return match conn.reader().read(buf) {
                        Ok(n) => Ok(n),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
                        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
                        Err(e) => Err(e),
                    };
                }
                Ok(_) => {
                    process(sock, conn)?;
                    // Alerts or key updates rustls answers (what the socket
                    // does not take now, `flush` writes later).
                    write_pending(sock, conn)?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// What an idle connection holds now, without blocking: on TLS first
    /// the plaintext rustls already decrypted (a stray reply that came in
    /// the same read as the last reply is there, not on the socket), then,
    /// as on plain TCP, one `recv(MSG_PEEK)` when nothing waits; on TLS the
    /// records that arrived are processed. Stray data is read (up to `max`
    /// bytes, through `scratch`) so the caller can count and quote it.
    pub fn idle(&mut self, scratch: &mut [u8], max: usize) -> Idle {
        let mut one = [0u8; 1];
        if let Transport::Tls(_, conn) = self {
            match conn.reader().read(&mut one) {
                // Nothing buffered: see what the socket holds.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Ok(0) | Err(_) => return Idle::Closed,
                Ok(_) => return self.stray_after(one[0], scratch, max),
            }
        }
        let peeked = match self {
            Transport::Plain(s) | Transport::Tls(s, _) => s.peek(&mut one),
            // Not pooled by the HTTP side; nothing to check.
            Transport::Unix(_) => return Idle::Clean,
        };
        match peeked {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Idle::Clean,
            Ok(n) if n > 0 => {}
            _ => return Idle::Closed,
        }
        if let Transport::Tls(sock, conn) = self {
            // Records arrived: take them in, then see whether any carried data.
            loop {
                match conn.read_tls(sock) {
                    Ok(0) => return Idle::Closed,
                    Ok(_) => {
                        if conn.process_new_packets().is_err() {
                            return Idle::Closed;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return Idle::Closed,
                }
            }
            match conn.reader().read(&mut one) {
                // A session ticket, a key update: nothing for anybody.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Idle::Clean,
                Ok(0) | Err(_) => return Idle::Closed,
                Ok(_) => return self.stray_after(one[0], scratch, max),
            }
        }
        let (bytes, first) = self.drain(scratch, max);
        Idle::Stray { bytes, first }
    }

    /// Stray plaintext whose first byte, `byte`, was read already: the rest
    /// is read too (see [`Transport::idle`]).
    fn stray_after(&mut self, byte: u8, scratch: &mut [u8], max: usize) -> Idle {
        let (n, mut first) = self.drain(scratch, max);
        first.insert(0, byte);
        Idle::Stray {
            bytes: n + 1,
            first,
        }
    }

    /// Reads what is there (up to `max` bytes): the count and the first read.
    fn drain(&mut self, scratch: &mut [u8], max: usize) -> (usize, Vec<u8>) {
        let mut total = 0;
        let mut first = Vec::new();
        while total < max {
            match self.read(scratch) {
                Ok(0) => break,
                Ok(n) => {
                    if first.is_empty() {
                        first.extend_from_slice(&scratch[..n]);
                    }
                    total += n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        (total, first)
    }
}
