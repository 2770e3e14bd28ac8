//! The keep-alive pool of each server's connections, and the connection
//! slots: at most `max_open` connections per server in this worker (its
//! share of `max_connections`), every one of them counted from its connect
//! to its close.
//!
//! A connection whose reply is done returns to its server's pool, or goes
//! at once to a fetch waiting for one; before a pooled connection is reused
//! it is checked clean (nothing unread, no EOF: [`crate::transport`]'s
//! `idle`), and one that is not is closed, its stray bytes counted.
//!
//! Closing a connection is two steps: [`Backend::drop_conn`] gives its slot
//! up, and [`Backend::slot_freed`] hands a free slot to a waiting fetch
//! (queued at the server, or at a busier mirror), which connects.
//! [`Backend::close_conn`] does both. A caller that reuses the slot itself
//! (the retry of a failed attempt on a fresh connection, the next address
//! of a server after a failed connect) only drops the connection: handing
//! the slot on as well would open one connection more than the limit, and
//! a fetch handed the slot before the failed address is marked resting
//! could connect to it again. Every connect goes through a check of the
//! limit ([`Backend::slot_freed`]'s, or `assign`'s in [`super`]).
//!
//! Everything here is `impl Backend`, next to [`super::conn`]'s state
//! machine.

use super::conn::{quote, ProtocolError};
use super::Backend;
use crate::codec::http::MAX_HEAD_BYTES;
use crate::transport::Idle;
use mio::Registry;
use std::sync::atomic::Ordering;
use std::time::Instant;

impl Backend {
    /// An idle connection of `server` that is safe to reuse: nothing waits
    /// on it. The others on the way are closed (stray bytes counted).
    pub(super) fn take_idle(
        &mut self,
        registry: &Registry,
        server: usize,
        now: Instant,
    ) -> Option<usize> {
        while let Some(idx) = self.servers[server].idle.pop() {
            if self.idle_is_clean(registry, idx, now) {
                return Some(idx);
            }
        }
        None
    }

    /// Whether idle connection `idx` holds no unread byte and no EOF (one
    /// non-blocking peek; on TLS, what rustls already decrypted first, and
    /// records without data are taken in). If it does, it is closed (and not
    /// in the pool), stray bytes counted.
    pub(super) fn idle_is_clean(&mut self, registry: &Registry, idx: usize, now: Instant) -> bool {
        let c = &mut self.conns[idx];
        let moved = !self.servers[c.server]
            .shared
            .still_serves(c.addr, &mut c.addrs_gen);
        if c.peer_closed || moved {
            // Closed by the server, or its name no longer leads here.
            self.close_conn(registry, idx, now);
            return false;
        }
        match c.io.idle(&mut self.read_buf, MAX_HEAD_BYTES) {
            Idle::Clean => true,
            Idle::Closed => {
                // EOF (the server's idle close), close_notify, or an error.
                self.close_conn(registry, idx, now);
                false
            }
            Idle::Stray { bytes, first } => {
                let server = c.server;
                self.protocol_error(
                    server,
                    ProtocolError::StrayBytes,
                    &format!(
                        "{bytes} unexpected byte(s) on an idle connection ({}): a duplicated or unsolicited reply; closed it",
                        quote(&first)
                    ),
                );
                self.close_conn(registry, idx, now);
                false
            }
        }
    }

    /// Returns `idx` to its server's pool, or hands it to a queued fetch.
    pub(super) fn make_idle(&mut self, registry: &Registry, idx: usize, now: Instant) {
        let c = &mut self.conns[idx];
        c.park();
        let server = c.server;
        // The server closed right after its reply, or a stray byte is already
        // here: not reusable (a fetch queued for a connection moves on
        // through `close_conn`).
        if !self.idle_is_clean(registry, idx, now) {
            return;
        }
        match self.take_queued(server, now) {
            Some(f) => self.send(registry, idx, f, now),
            None => self.servers[server].idle.push(idx),
        }
    }

    /// Closes `idx` and hands its slot on ([`Backend::drop_conn`], then
    /// [`Backend::slot_freed`]).
    pub(super) fn close_conn(&mut self, registry: &Registry, idx: usize, now: Instant) {
        if let Some(server) = self.drop_conn(registry, idx) {
            self.slot_freed(registry, server, now);
        }
    }

    /// Closes `idx` and gives its slot up, handing it to nobody: the caller
    /// reuses it, or calls [`Backend::slot_freed`]. `None` if it was closed
    /// already; else its server.
    pub(super) fn drop_conn(&mut self, registry: &Registry, idx: usize) -> Option<usize> {
        let mut c = self.conns.try_remove(idx)?;
        let _ = registry.deregister(c.io.socket());
        let srv = &mut self.servers[c.server];
        srv.open = srv.open.saturating_sub(1);
        srv.shared.open.fetch_sub(1, Ordering::Relaxed);
        if let Some(p) = srv.idle.iter().position(|&i| i == idx) {
            srv.idle.swap_remove(p);
        }
        Some(c.server)
    }

    /// A slot of `server` may be free: while it is, a fetch queued there
    /// (or at a busier mirror) connects.
    pub(super) fn slot_freed(&mut self, registry: &Registry, server: usize, now: Instant) {
        let srv = &self.servers[server];
        if srv.open >= srv.max_open {
            return;
        }
        if let Some(f) = self.take_queued(server, now) {
            self.connect(registry, f, server, now);
        }
    }
}
