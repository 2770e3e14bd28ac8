//! A blocking connection to the shared cache, for the admin commands
//! (purge, show) served off the event loops: connect, `HELLO 3` with `AUTH`,
//! `SELECT`, then one command at a time, every step bounded by a timeout.
//! Plain TCP, TLS (rustls over the blocking socket) or a Unix socket.

use crate::codec::resp::{self, Value};
use crate::config::{RedisAddr, SharedCache};
use std::io::{Read, Write};
use std::time::Duration;

/// Largest reply read (a dump of keys comes in SCAN pages).
const MAX_REPLY_BYTES: usize = 64 << 20;

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

pub struct Blocking {
    stream: Box<dyn Stream>,
    rbuf: Vec<u8>,
    /// The name TLS verifies (errors are worded by [`crate::tls::describe`]).
    tls_name: Option<rustls::pki_types::ServerName<'static>>,
}

impl Blocking {
    /// Connects and logs in; errors never show the password.
    pub fn connect(cfg: &SharedCache, timeout: Duration) -> Result<Blocking, String> {
        let target = cfg.target.describe();
        let tls_name = cfg.tls_name();
        let stream: Box<dyn Stream> = match &cfg.target.addr {
            RedisAddr::Tcp { .. } => {
                let addr = *cfg
                    .addrs
                    .first()
                    .ok_or_else(|| format!("{target}: no address"))?;
                let s = std::net::TcpStream::connect_timeout(&addr, timeout)
                    .map_err(|e| format!("{target}: connect: {e}"))?;
                s.set_read_timeout(Some(timeout)).ok();
                s.set_write_timeout(Some(timeout)).ok();
                let _ = s.set_nodelay(true);
                match (&cfg.tls, &tls_name) {
                    (Some(tls), Some(name)) => {
                        let conn = rustls::ClientConnection::new(tls.config.clone(), name.clone())
                            .map_err(|e| format!("{target}: TLS: {e}"))?;
                        Box::new(rustls::StreamOwned::new(conn, s))
                    }
                    _ => Box::new(s),
                }
            }
            RedisAddr::Unix(p) => {
                let s = std::os::unix::net::UnixStream::connect(p)
                    .map_err(|e| format!("{target}: connect: {e}"))?;
                s.set_read_timeout(Some(timeout)).ok();
                s.set_write_timeout(Some(timeout)).ok();
                Box::new(s)
            }
        };
        let mut b = Blocking {
            stream,
            rbuf: Vec::new(),
            tls_name,
        };
        b.ok(&super::hello_args(&cfg.target, "httpmapd-admin"))
            .map_err(|e| format!("{target}: HELLO: {e}"))?;
        if cfg.target.db != 0 {
            let db = cfg.target.db.to_string();
            b.ok(&[b"SELECT", db.as_bytes()])
                .map_err(|e| format!("{target}: SELECT: {e}"))?;
        }
        Ok(b)
    }

    /// One command and its reply (push messages skipped).
    pub fn cmd(&mut self, args: &[&[u8]]) -> Result<Value, String> {
        let mut out = Vec::new();
        resp::write_command(&mut out, args);
        self.stream
            .write_all(&out)
            .map_err(|e| format!("write: {}", self.io_text(&e)))?;
        self.stream
            .flush()
            .map_err(|e| format!("write: {}", self.io_text(&e)))?;
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match resp::parse(&self.rbuf, MAX_REPLY_BYTES).map_err(|e| e.to_string())? {
                Some((Value::Push(_), n)) => {
                    self.rbuf.drain(..n);
                }
                Some((v, n)) => {
                    self.rbuf.drain(..n);
                    return Ok(v);
                }
                None => {
                    let n = self
                        .stream
                        .read(&mut chunk)
                        .map_err(|e| format!("read: {}", self.io_text(&e)))?;
                    if n == 0 {
                        return Err("the server closed the connection".into());
                    }
                    self.rbuf.extend_from_slice(&chunk[..n]);
                }
            }
        }
    }

    /// An IO error in words (a TLS failure as the HTTPS servers' are).
    fn io_text(&self, e: &std::io::Error) -> String {
        match &self.tls_name {
            Some(name) => crate::tls::io_text(e, name),
            None => e.to_string(),
        }
    }

    /// A command whose reply must not be an error.
    pub fn ok(&mut self, args: &[&[u8]]) -> Result<Value, String> {
        match self.cmd(args)? {
            Value::Error(e) => Err(String::from_utf8_lossy(&e).into_owned()),
            v => Ok(v),
        }
    }
}
