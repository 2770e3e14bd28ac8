//! Listening sockets and client streams, TCP or Unix, behind one type each so
//! the event loop does not care which. This module owns binding (with
//! `SO_REUSEPORT`, so every worker has its own TCP listener on one address,
//! and the handling of a stale Unix socket file); it knows nothing of protocols.

use crate::config::Listen;
use mio::event::Source;
use mio::{Interest, Registry, Token};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Pending connections the kernel queues per listener.
const LISTEN_BACKLOG: i32 = 1024;

pub enum Listener {
    Tcp(mio::net::TcpListener),
    Unix(mio::net::UnixListener),
}

pub enum Stream {
    Tcp(mio::net::TcpStream),
    Unix(mio::net::UnixStream),
}

/// Binds a TCP listener with `SO_REUSEPORT` (several workers, one address).
pub fn bind_tcp(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(LISTEN_BACKLOG)?;
    Ok(s.into())
}

/// Fails if another socket (another httpmapd, say) listens on `addr`:
/// `SO_REUSEPORT` would otherwise let two daemons share the address, each
/// getting some of the clients. A plain bind (no `SO_REUSEPORT`) tells.
fn ensure_unused(addr: SocketAddr) -> io::Result<()> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())
}

/// Binds a Unix listener at `path`, replacing a stale socket file (one that
/// nobody accepts on) but never a live one or a file that is not a socket.
pub fn bind_unix(
    path: &Path,
    mode: u32,
    owner: Option<u32>,
    group: Option<u32>,
) -> io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is in use by another process", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    // Created with no permission beyond `mode` (the umask decides a new
    // socket's mode), so nobody else connects before the chmod below.
    // SAFETY: umask only changes this process's file creation mask; it is
    // restored at once (no thread of ours creates files meanwhile).
    let old = unsafe { libc::umask(!(mode as libc::mode_t) & 0o777) };
    let bound = std::os::unix::net::UnixListener::bind(path);
    unsafe { libc::umask(old) };
    let l = bound?;
    l.set_nonblocking(true)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    if owner.is_some() || group.is_some() {
        std::os::unix::fs::chown(path, owner, group)?;
    }
    Ok(l)
}

/// The std listener for `listen`, for one worker. A Unix listener is bound
/// once and shared (cloned) by every worker; a TCP one is bound per worker.
pub enum Bound {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

impl Bound {
    pub fn bind(listen: &Listen, d: &crate::config::Daemon) -> io::Result<Bound> {
        match listen {
            Listen::Tcp(a) => {
                ensure_unused(*a)?;
                bind_tcp(*a).map(Bound::Tcp)
            }
            Listen::Unix(p) => bind_unix(
                p,
                d.unix_socket_mode,
                d.unix_socket_owner,
                d.unix_socket_group,
            )
            .map(Bound::Unix),
        }
    }

    /// Another listener for the next worker.
    pub fn for_worker(&self, listen: &Listen) -> io::Result<Bound> {
        match (self, listen) {
            (Bound::Tcp(_), Listen::Tcp(a)) => bind_tcp(*a).map(Bound::Tcp),
            (Bound::Unix(l), _) => l.try_clone().map(Bound::Unix),
            (Bound::Tcp(_), Listen::Unix(_)) => Err(io::Error::other("listener kind mismatch")),
        }
    }

    pub fn into_mio(self) -> Listener {
        match self {
            Bound::Tcp(l) => Listener::Tcp(mio::net::TcpListener::from_std(l)),
            Bound::Unix(l) => Listener::Unix(mio::net::UnixListener::from_std(l)),
        }
    }
}

impl Listener {
    /// Accepts one connection: the stream and, for TCP, the peer's address.
    pub fn accept(&self) -> io::Result<(Stream, Option<std::net::SocketAddr>)> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept()?;
                let _ = s.set_nodelay(true);
                Ok((Stream::Tcp(s), Some(peer)))
            }
            Listener::Unix(l) => l.accept().map(|(s, _)| (Stream::Unix(s), None)),
        }
    }
}

impl Source for Listener {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.register(r, t, i),
            Listener::Unix(l) => l.register(r, t, i),
        }
    }
    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.reregister(r, t, i),
            Listener::Unix(l) => l.reregister(r, t, i),
        }
    }
    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.deregister(r),
            Listener::Unix(l) => l.deregister(r),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Source for Stream {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.register(r, t, i),
            Stream::Unix(s) => s.register(r, t, i),
        }
    }
    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.reregister(r, t, i),
            Stream::Unix(s) => s.reregister(r, t, i),
        }
    }
    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.deregister(r),
            Stream::Unix(s) => s.deregister(r),
        }
    }
}
