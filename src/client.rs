//! The query client (`httpmapd query`), like `postmap -q` for machines
//! without Postfix: it speaks tcp_table and socketmap exactly as Postfix's
//! client does (keys `%XX`-encoded for tcp_table, raw in a netstring for
//! socketmap), one request at a time over one connection. It owns its own
//! blocking socket and touches nothing of the daemon.

use crate::codec::{hex, netstring, tcp_table};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::time::Duration;

/// Postfix's client timeout for connect, read and write.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(100);

/// A table named as in main.cf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Table {
    /// `tcp:host:port`
    Tcp(String),
    /// `socketmap:inet:host:port:name` or `socketmap:unix:/path:name`
    Socketmap { addr: SocketmapAddr, name: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketmapAddr {
    Inet(String),
    Unix(String),
}

/// One lookup's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Found(Vec<u8>),
    NotFound,
    /// Temporary error (tcp_table 400, socketmap TEMP/TIMEOUT) with its text.
    Temp(String),
    /// socketmap PERM.
    Perm(String),
}

pub fn parse_table(s: &str) -> Result<Table, String> {
    if let Some(rest) = s.strip_prefix("tcp:") {
        return Ok(Table::Tcp(rest.to_string()));
    }
    if let Some(rest) = s.strip_prefix("socketmap:") {
        let (addr, name) = rest.rsplit_once(':').ok_or_else(|| {
            format!("{s}: expected socketmap:inet:HOST:PORT:NAME or socketmap:unix:PATH:NAME")
        })?;
        let addr = if let Some(a) = addr.strip_prefix("inet:") {
            SocketmapAddr::Inet(a.to_string())
        } else if let Some(p) = addr.strip_prefix("unix:") {
            SocketmapAddr::Unix(p.to_string())
        } else {
            return Err(format!(
                "{s}: expected socketmap:inet:... or socketmap:unix:..."
            ));
        };
        return Ok(Table::Socketmap {
            addr,
            name: name.to_string(),
        });
    }
    Err(format!("{s}: expected a table such as tcp:127.0.0.1:10021 or socketmap:inet:127.0.0.1:10020:virtual"))
}

trait Conn: Read + Write {}
impl<T: Read + Write> Conn for T {}

/// A connection to one table.
pub struct Client {
    table: Table,
    reader: BufReader<Box<dyn Conn>>,
}

impl Client {
    pub fn connect(table: Table) -> io::Result<Client> {
        let conn: Box<dyn Conn> = match &table {
            Table::Tcp(a)
            | Table::Socketmap {
                addr: SocketmapAddr::Inet(a),
                ..
            } => {
                use std::net::ToSocketAddrs;
                let addr = a
                    .to_socket_addrs()?
                    .next()
                    .ok_or_else(|| io::Error::other(format!("{a}: no address")))?;
                let s = std::net::TcpStream::connect_timeout(&addr, CLIENT_TIMEOUT)?;
                s.set_read_timeout(Some(CLIENT_TIMEOUT))?;
                s.set_write_timeout(Some(CLIENT_TIMEOUT))?;
                Box::new(s)
            }
            Table::Socketmap {
                addr: SocketmapAddr::Unix(p),
                ..
            } => {
                let s = std::os::unix::net::UnixStream::connect(p)?;
                s.set_read_timeout(Some(CLIENT_TIMEOUT))?;
                s.set_write_timeout(Some(CLIENT_TIMEOUT))?;
                Box::new(s)
            }
        };
        Ok(Client {
            table,
            reader: BufReader::new(conn),
        })
    }

    pub fn query(&mut self, key: &[u8]) -> io::Result<Reply> {
        let mut req = Vec::new();
        match &self.table {
            Table::Tcp(_) => {
                req.extend_from_slice(b"get ");
                hex::encode(key, &mut req);
                req.push(b'\n');
            }
            Table::Socketmap { name, .. } => {
                netstring::encode(&[name.as_bytes(), b" ", key], &mut req)
            }
        }
        self.reader.get_mut().write_all(&req)?;
        match &self.table {
            Table::Tcp(_) => self.read_tcp_reply(),
            Table::Socketmap { .. } => self.read_socketmap_reply(),
        }
    }

    fn read_tcp_reply(&mut self) -> io::Result<Reply> {
        let mut line = Vec::new();
        (&mut self.reader)
            .take(tcp_table::MAX_REPLY_BYTES as u64)
            .read_until(b'\n', &mut line)?;
        let bad = |why: &str| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("malformed reply: {why}"),
            )
        };
        if line.last() != Some(&b'\n') {
            return Err(bad("no newline within 4096 bytes, or connection closed"));
        }
        line.pop();
        if line.len() < 4
            || !line[..3].iter().all(u8::is_ascii_digit)
            || !line[3].is_ascii_whitespace()
        {
            return Err(bad(&String::from_utf8_lossy(&line)));
        }
        let mut text = Vec::new();
        hex::decode(&line[4..], &mut text).map_err(|e| bad(&e.to_string()))?;
        Ok(match line[0] {
            b'2' => Reply::Found(text),
            b'5' => Reply::NotFound,
            b'4' => Reply::Temp(String::from_utf8_lossy(&text).into_owned()),
            _ => return Err(bad("unexpected status")),
        })
    }

    fn read_socketmap_reply(&mut self) -> io::Result<Reply> {
        let mut digits = Vec::new();
        (&mut self.reader).take(12).read_until(b':', &mut digits)?;
        let bad = |why: &str| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("malformed reply: {why}"),
            )
        };
        if digits.pop() != Some(b':') || digits.is_empty() || !digits.iter().all(u8::is_ascii_digit)
        {
            return Err(bad("bad netstring length"));
        }
        let len: usize = std::str::from_utf8(&digits)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("length"))?;
        if len > netstring::DEFAULT_MAX_REPLY_BYTES {
            return Err(bad("reply longer than 100000 bytes"));
        }
        let mut payload = vec![0; len + 1];
        self.reader.read_exact(&mut payload)?;
        if payload.pop() != Some(b',') {
            return Err(bad("missing ','"));
        }
        let (status, text) = match payload.iter().position(|&b| b == b' ') {
            Some(i) => (&payload[..i], &payload[i + 1..]),
            None => (&payload[..], &b""[..]),
        };
        let text_s = || String::from_utf8_lossy(text).into_owned();
        Ok(match status {
            b"OK" if !text.is_empty() => Reply::Found(text.to_vec()),
            b"NOTFOUND" => Reply::NotFound,
            b"PERM" => Reply::Perm(text_s()),
            b"TEMP" | b"TIMEOUT" => Reply::Temp(text_s()),
            _ => return Err(bad(&String::from_utf8_lossy(&payload))),
        })
    }
}
