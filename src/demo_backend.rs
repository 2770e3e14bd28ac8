//! The bundled sample backend: a small HTTP/1.1 server that answers dict_http
//! lookups from an in-memory map loaded from a text file (`conf/demo.map`).
//!
//! It exists so a newcomer's first lookup works at once, and as a reference for
//! people writing their own backend, so it favours clarity over speed: plain
//! `std::net`, one thread per connection, blocking reads, `httparse` for the
//! request head. It owns nothing else in the crate and must not be used by the
//! daemon's lookup path; it is only ever a *server* the daemon talks to.
//!
//! The protocol, in full (see `docs/postfix-protocols.md`, "The HTTP side"):
//!
//! ```text
//! GET /virtual HTTP/1.1                    HTTP/1.1 200 OK
//! Host: 127.0.0.1:8080                     POSTFIX-DICT-EMAIL: alice@example.com
//! POSTFIX-DICT-EMAIL: alice@example.com    POSTFIX-DICT-RESULTS: alice@mail.example.com
//!                                          Content-Length: 0
//! ```
//!
//! - The key is the `POSTFIX-DICT-EMAIL` request header (or `POSTFIX_DICT_EMAIL`,
//!   the spelling with `_`); without either, the last path segment of the URL,
//!   percent-decoded (so `GET /virtual/alice%40example.com` works from a browser).
//! - Found: `200` with the value in `POSTFIX-DICT-RESULTS`.
//! - Every reply to a request with the key header echoes it back, byte for
//!   byte, in `POSTFIX-DICT-EMAIL` (the key echo: httpmapd then knows the
//!   reply is this key's, whatever a proxy in between did).
//! - Not found: `200` with an empty `POSTFIX-DICT-RESULTS:` header.
//! - Any other status is a temporary error; `POSTFIX-DICT-RETMSG` says why.
//! - `GET /health` answers `200` with body `ok\n`, for load balancers and scripts.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::thread;

/// Where the backend listens unless told otherwise, and where the shipped
/// configuration's servers are.
pub const DEFAULT_ADDR: &str = "127.0.0.1:8080";

/// Largest request head (request line plus headers) we accept. A lookup
/// request is a few hundred bytes; anything near this is a confused client.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Most request headers we parse; more is answered with `431`.
const MAX_HEADERS: usize = 64;

/// Largest request body we are willing to read and throw away. GET requests
/// have no body, but a client may send one; we must consume it to keep the
/// connection's framing in step.
const MAX_DISCARDED_BODY_BYTES: u64 = 1024 * 1024;

/// The lookup table: lower-cased key -> value (the value is sent as is).
#[derive(Debug, Clone, Default)]
pub struct DemoMap {
    entries: HashMap<String, String>,
}

impl DemoMap {
    /// Parses a map file: lines "key value..." (key = first whitespace-separated
    /// word, value = the rest of the line trimmed; may contain spaces), `#`
    /// comments and blank lines ignored. Keys lower-cased.
    /// Err(String) "FILE:LINE: message" on a line with a key and no value.
    pub fn load(path: &Path) -> Result<DemoMap, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read: {}", path.display(), e))?;
        let mut entries = HashMap::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            // Split at the first run of whitespace: "key   the value".
            let (key, value) = match line.split_once(char::is_whitespace) {
                Some((key, rest)) => (key, rest.trim()),
                None => (line, ""),
            };
            if value.is_empty() {
                return Err(format!(
                    "{}:{}: key {:?} has no value",
                    path.display(),
                    index + 1,
                    key
                ));
            }
            entries.insert(key.to_lowercase(), value.to_string());
        }
        Ok(DemoMap { entries })
    }

    /// Builds a map from (key, value) pairs; keys are lower-cased.
    pub fn from_pairs(pairs: &[(&str, &str)]) -> DemoMap {
        let entries = pairs
            .iter()
            .map(|(k, v)| (k.to_lowercase(), v.to_string()))
            .collect();
        DemoMap { entries }
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the map has no keys.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Looks up a key (lower-cased first).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries.get(&key.to_lowercase()).map(String::as_str)
    }
}

/// Binds `addr` and serves forever on background threads; returns the bound
/// address (so "127.0.0.1:0" works).
pub fn spawn(addr: &str, map: DemoMap) -> io::Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = addr.to_socket_addrs()?.collect();
    let listener = TcpListener::bind(&addrs[..])?;
    let local = listener.local_addr()?;
    eprintln!("demo backend: serving {} keys on {}", map.len(), local);
    let map = Arc::new(map);
    thread::Builder::new()
        .name("demo-accept".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let stream = match stream {
                    Ok(stream) => stream,
                    // Out of file descriptors and the like: try again shortly
                    // rather than spin or give up.
                    Err(_) => {
                        thread::sleep(std::time::Duration::from_millis(10));
                        continue;
                    }
                };
                let map = Arc::clone(&map);
                let _ = thread::Builder::new()
                    .name("demo-conn".into())
                    .spawn(move || {
                        // A connection ending in an error (reset, bad request)
                        // concerns only that client.
                        let _ = serve_connection(stream, &map);
                    });
            }
        })?;
    Ok(local)
}

/// What one parsed request asks for, all that the answer depends on.
struct Request {
    /// The path part of the request target, without the query string.
    path: String,
    /// The key, from the header or the URL; `None` if neither has one.
    key: Option<String>,
    /// The `POSTFIX-DICT-EMAIL` header's bytes as received (trimmed), echoed
    /// back in the reply so the client can check whose answer it is.
    echo: Option<Vec<u8>>,
    /// Whether the client wants the connection kept open after this answer.
    keep_alive: bool,
    /// Bytes of request body to read and discard (from `Content-Length`).
    body_len: u64,
}

/// Why a request head could not be answered normally.
enum BadRequest {
    /// Malformed head: `400`, then close (we cannot find the next request).
    Malformed,
    /// Head over `MAX_HEAD_BYTES` or `MAX_HEADERS`: `431`, then close.
    TooLarge,
    /// A chunked request body, which this sample does not decode: `501`, close.
    Unsupported,
}

/// Serves requests on one connection until the client closes it, asks us to,
/// or sends something we cannot parse.
fn serve_connection(mut stream: TcpStream, map: &DemoMap) -> io::Result<()> {
    let _ = stream.set_nodelay(true);
    // Bytes read but not yet parsed; may hold the start of the next request
    // when a client pipelines.
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    loop {
        // 1. Read until the buffer holds a complete head.
        let (request, head_len) = loop {
            match parse_head(&buf) {
                Ok(Some(parsed)) => break parsed,
                Ok(None) if buf.len() >= MAX_HEAD_BYTES => {
                    return send_error(&mut stream, BadRequest::TooLarge)
                }
                Ok(None) => {
                    let mut chunk = [0u8; 4096];
                    let n = stream.read(&mut chunk)?;
                    if n == 0 {
                        // Clean close between requests (or a truncated head,
                        // which deserves no answer either).
                        return Ok(());
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                Err(bad) => return send_error(&mut stream, bad),
            }
        };
        buf.drain(..head_len);

        // 2. Discard the body, if any, so the next request starts in the right place.
        if request.body_len > MAX_DISCARDED_BODY_BYTES {
            return send_error(&mut stream, BadRequest::TooLarge);
        }
        let mut to_skip = request.body_len as usize;
        let buffered = to_skip.min(buf.len());
        buf.drain(..buffered);
        to_skip -= buffered;
        if to_skip > 0 {
            let copied = io::copy(&mut (&mut stream).take(to_skip as u64), &mut io::sink())?;
            if copied < to_skip as u64 {
                return Ok(()); // the client went away mid-body
            }
        }

        // 3. Answer.
        let response = answer(&request, map);
        stream.write_all(&response)?;
        if !request.keep_alive {
            return Ok(());
        }
    }
}

/// Parses a request head from the start of `buf`. `Ok(None)`: incomplete, read
/// more. `Ok(Some((request, n)))`: the head is the first `n` bytes.
fn parse_head(buf: &[u8]) -> Result<Option<(Request, usize)>, BadRequest> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(BadRequest::TooLarge),
        Err(_) => return Err(BadRequest::Malformed),
    };
    if head_len > MAX_HEAD_BYTES {
        return Err(BadRequest::TooLarge);
    }
    let target = req.path.unwrap_or("/");
    let path = target.split(['?', '#']).next().unwrap_or("").to_string();
    // HTTP/1.1 keeps connections open unless told otherwise; HTTP/1.0 closes
    // them (we do not implement the old `Connection: keep-alive` extension).
    let mut keep_alive = req.version == Some(1);
    let mut header_key = None;
    let mut underscore_key = None;
    let mut echo = None;
    let mut body_len = 0u64;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("POSTFIX-DICT-EMAIL") {
            header_key = Some(String::from_utf8_lossy(h.value).trim().to_string());
            echo = Some(h.value.trim_ascii().to_vec());
        } else if name.eq_ignore_ascii_case("POSTFIX_DICT_EMAIL") {
            underscore_key = Some(String::from_utf8_lossy(h.value).trim().to_string());
            echo = echo.or_else(|| Some(h.value.trim_ascii().to_vec()));
        } else if name.eq_ignore_ascii_case("Connection") {
            let value = String::from_utf8_lossy(h.value);
            if value
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("close"))
            {
                keep_alive = false;
            }
        } else if name.eq_ignore_ascii_case("Content-Length") {
            body_len = std::str::from_utf8(h.value)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or(BadRequest::Malformed)?;
        } else if name.eq_ignore_ascii_case("Transfer-Encoding") {
            return Err(BadRequest::Unsupported);
        }
    }
    // The header wins; the URL is the fallback for browsers and curl.
    let key = header_key
        .or(underscore_key)
        .filter(|k| !k.is_empty())
        .or_else(|| key_from_path(&path));
    let request = Request {
        path,
        key,
        echo,
        keep_alive,
        body_len,
    };
    Ok(Some((request, head_len)))
}

/// The last path segment, percent-decoded (leniently: a `%` that starts
/// no escape is kept); `None` if it is empty.
fn key_from_path(path: &str) -> Option<String> {
    let segment = path.rsplit('/').next().unwrap_or("");
    if segment.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(segment.len());
    crate::codec::hex::decode_lenient(segment.as_bytes(), &mut out);
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// Builds the complete response for one request.
fn answer(request: &Request, map: &DemoMap) -> Vec<u8> {
    if request.path == "/health" {
        return response(request, "200 OK", &[], b"ok\n");
    }
    let key = match &request.key {
        Some(key) => key,
        None => {
            return response(
                request,
                "400 Bad Request",
                &[("POSTFIX-DICT-RETMSG", "no key in request")],
                b"",
            )
        }
    };
    // Values come from map file lines, so they hold no CR or LF; a header
    // value must not.
    let value = map.get(key).unwrap_or("");
    response(request, "200 OK", &[("POSTFIX-DICT-RESULTS", value)], b"")
}

/// Formats a response: status line, the key echo, our headers, framing
/// headers, body.
fn response(request: &Request, status: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status}\r\n").into_bytes();
    if let Some(echo) = &request.echo {
        out.extend_from_slice(b"POSTFIX-DICT-EMAIL: ");
        out.extend_from_slice(echo);
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in headers {
        if value.is_empty() {
            // "POSTFIX-DICT-RESULTS:" with nothing after it: not found.
            out.extend_from_slice(format!("{name}:\r\n").as_bytes());
        } else {
            out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
    }
    if !body.is_empty() {
        out.extend_from_slice(b"Content-Type: text/plain\r\n");
    }
    // Always send a length, so the client knows where the response ends
    // without our closing the connection.
    out.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    if !request.keep_alive {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// Answers a request we could not parse, then closes the connection.
fn send_error(stream: &mut TcpStream, bad: BadRequest) -> io::Result<()> {
    let (status, msg) = match bad {
        BadRequest::Malformed => ("400 Bad Request", "malformed request"),
        BadRequest::TooLarge => ("431 Request Header Fields Too Large", "request too large"),
        BadRequest::Unsupported => (
            "501 Not Implemented",
            "chunked request bodies not supported",
        ),
    };
    let text = format!(
        "HTTP/1.1 {}\r\nPOSTFIX-DICT-RETMSG: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        status, msg
    );
    stream.write_all(text.as_bytes())?;
    // Let the client read the answer before we close.
    let _ = stream.shutdown(std::net::Shutdown::Write);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;

    #[test]
    fn load_parses_keys_values_and_comments() {
        let path = std::env::temp_dir().join(format!(
            "httpmapd-demo-map-{}-{:?}.map",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        std::fs::write(
            &path,
            "# comment\n\nAlice@Example.COM   alice@mail.example.com  \n\
             team@example.com alice@example.com, bob@example.com\n",
        )
        .unwrap();
        let map = DemoMap::load(&path).unwrap();
        assert_eq!(map.len(), 2);
        assert_eq!(map.get("alice@example.com"), Some("alice@mail.example.com"));
        assert_eq!(
            map.get("TEAM@example.com"),
            Some("alice@example.com, bob@example.com")
        );

        std::fs::write(&path, "a@b.c x\n\nlonely\n").unwrap();
        let err = DemoMap::load(&path).unwrap_err();
        assert_eq!(
            err,
            format!("{}:3: key \"lonely\" has no value", path.display())
        );
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn bundled_sample_map_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/demo.map");
        let map = DemoMap::load(&path).unwrap();
        assert_eq!(map.get("alice@example.com"), Some("alice@mail.example.com"));
        assert_eq!(
            map.get("team@example.com"),
            Some("alice@example.com, bob@example.com")
        );
        assert_eq!(map.get("example.com"), Some("OK"));
    }

    #[test]
    fn key_from_path_decodes_last_segment() {
        assert_eq!(key_from_path("/virtual/a%40b.c").as_deref(), Some("a@b.c"));
        assert_eq!(key_from_path("/x/%zz%4").as_deref(), Some("%zz%4"));
        assert_eq!(key_from_path("/x/%+1%2B").as_deref(), Some("%+1+"));
        assert_eq!(key_from_path("/x/%a\u{e9}").as_deref(), Some("%a\u{e9}"));
        assert_eq!(key_from_path("/x/%C3%A9").as_deref(), Some("\u{e9}"));
        assert_eq!(key_from_path("/virtual/"), None);
        assert_eq!(key_from_path("/"), None);
    }

    /// Reads one response (head plus Content-Length body) as text.
    fn read_response(reader: &mut io::BufReader<TcpStream>) -> String {
        let mut text = String::new();
        let mut content_length = 0;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                content_length = v.trim().parse().unwrap();
            }
            text.push_str(&line);
            if line == "\r\n" || line.is_empty() {
                break;
            }
        }
        let mut body = vec![0; content_length];
        reader.read_exact(&mut body).unwrap();
        text.push_str(&String::from_utf8(body).unwrap());
        text
    }

    #[test]
    fn serves_lookups_over_one_keep_alive_connection() {
        let map = DemoMap::from_pairs(&[("alice@example.com", "alice@mail.example.com")]);
        let addr = spawn("127.0.0.1:0", map).unwrap();
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut writer = stream.try_clone().unwrap();
        let mut reader = io::BufReader::new(stream);

        writer
            .write_all(b"GET /virtual HTTP/1.1\r\nHost: x\r\nPOSTFIX-DICT-EMAIL: Alice@Example.com\r\n\r\n")
            .unwrap();
        // The key is echoed back as received (the client checks it).
        assert_eq!(
            read_response(&mut reader),
            "HTTP/1.1 200 OK\r\nPOSTFIX-DICT-EMAIL: Alice@Example.com\r\nPOSTFIX-DICT-RESULTS: alice@mail.example.com\r\nContent-Length: 0\r\n\r\n"
        );

        // A body is read and discarded; the URL supplies the key.
        writer
            .write_all(
                b"GET /virtual/nobody%40example.com HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
            )
            .unwrap();
        assert_eq!(
            read_response(&mut reader),
            "HTTP/1.1 200 OK\r\nPOSTFIX-DICT-RESULTS:\r\nContent-Length: 0\r\n\r\n"
        );

        writer.write_all(b"GET /health HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(
            read_response(&mut reader),
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n"
        );

        writer
            .write_all(b"GET /virtual/ HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap();
        assert_eq!(
            read_response(&mut reader),
            "HTTP/1.1 400 Bad Request\r\nPOSTFIX-DICT-RETMSG: no key in request\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n"
        );
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "server closed after Connection: close");
    }
}
