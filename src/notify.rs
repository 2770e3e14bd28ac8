//! sd_notify: telling systemd (a `Type=notify` unit) how the daemon is
//! doing, over the datagram socket named in `NOTIFY_SOCKET`.
//!
//! `READY=1` once every listener is bound and the workers run (so
//! `Before=postfix.service` means Postfix starts against a daemon that
//! answers), `RELOADING=1` and `READY=1` around a reload, `STOPPING=1` on
//! stop, with a `STATUS=` line a person reads in `systemctl status`. Without
//! `NOTIFY_SOCKET` (not under systemd) every call does nothing. A path
//! starting with `@` is an abstract socket. Nothing here blocks: a datagram
//! that cannot be sent is dropped.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::OnceLock;

/// The socket and address to send to, found once.
fn target() -> Option<&'static (UnixDatagram, SocketAddr)> {
    static TARGET: OnceLock<Option<(UnixDatagram, SocketAddr)>> = OnceLock::new();
    TARGET
        .get_or_init(|| {
            let path = std::env::var_os("NOTIFY_SOCKET")?;
            let path = path.to_str()?;
            let addr = match path.strip_prefix('@') {
                Some(name) => SocketAddr::from_abstract_name(name.as_bytes()).ok()?,
                None if path.starts_with('/') => SocketAddr::from_pathname(path).ok()?,
                None => return None,
            };
            let sock = UnixDatagram::unbound().ok()?;
            sock.set_nonblocking(true).ok()?;
            Some((sock, addr))
        })
        .as_ref()
}

/// Sends `state` (newline-separated `KEY=VALUE` assignments). False when
/// not under systemd or the datagram could not be sent.
pub fn notify(state: &str) -> bool {
    match target() {
        Some((sock, addr)) => sock.send_to_addr(state.as_bytes(), addr).is_ok(),
        None => false,
    }
}

/// The monotonic clock in microseconds, as `RELOADING=1` wants it in
/// `MONOTONIC_USEC=` (for `Type=notify-reload` units).
pub fn monotonic_usec() -> u64 {
    // SAFETY: clock_gettime with a valid clock id and a zeroed timespec.
    unsafe {
        let mut ts: libc::timespec = std::mem::zeroed();
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
        ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
    }
}

/// `READY=1` with a status line.
pub fn ready(status: &str) {
    notify(&format!("READY=1\nSTATUS={status}"));
}

/// `RELOADING=1`: a reload begins.
pub fn reloading() {
    notify(&format!(
        "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading",
        monotonic_usec()
    ));
}

/// `STOPPING=1`: the daemon is draining and will exit.
pub fn stopping() {
    notify("STOPPING=1\nSTATUS=stopping: finishing lookups in flight");
}
