//! End-to-end test with a real Postfix (issue 6, item 5).
//!
//! A private Postfix instance (its own config, queue and data directories in
//! a temp dir; /etc/postfix and the system instance are left alone) asks
//! httpmapd for its virtual aliases (`virtual_alias_maps = tcp:...`), its
//! recipient access checks (`check_recipient_access tcp:...`) and, in qmgr
//! only, its transports (`transport_maps = tcp:...` on a second
//! trivial-rewrite service), and delivers every message to a tiny SMTP sink
//! written here. httpmapd answers from one scriptable HTTP server (the
//! "directory"). The test talks SMTP to Postfix itself and checks:
//!
//! 1. an alias is accepted and arrives at the sink rewritten;
//! 2. an unknown address in the virtual alias domain gets a 5xx, and so does
//!    an address the access map REJECTs; an address the access map HOLDs is
//!    accepted and kept on hold;
//! 3. with the directory down: every RCPT (or end of DATA) gets a 4xx, never
//!    a 5xx; the held message, released, is deferred in the queue ("address
//!    resolver failure"), neither delivered nor bounced;
//! 4. with the directory back on the same port: `postqueue -f` delivers the
//!    deferred message, and the messages refused with a 4xx in step 3 are
//!    sent again (as an SMTP client does after a 4xx) and delivered,
//!    rewritten. Nothing is ever bounced.
//!
//! The private instance is `common::postfix::PrivatePostfix` (what a
//! private Postfix needs is told there); this file owns its main.cf and
//! smtpd listeners, the directory, the SMTP sink and the steps.

mod common;

use common::postfix::{self, PrivatePostfix, SmtpClient};
use common::{free_port, Acceptor, Daemon, LineClient, Reply, Request, TestServer};
use std::io::{self, BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// The envelope sender of every test message.
const SENDER: &str = "sender@client.test";

/// How long a message may take to reach the sink.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------
// The directory: the HTTP server behind httpmapd
// ---------------------------------------------------------------------------

/// virtual_alias_maps: alias → real address.
const VIRTUAL: &[(&str, &str)] = &[
    ("alias@example.com", "real@dest.test"),
    ("alias2@example.com", "real2@dest.test"),
    ("alias3@example.com", "real3@dest.test"),
    ("held@example.com", "real-held@dest.test"),
];

/// The dict_http handler for the three maps (told apart by URL path):
/// `/virtual` from [`VIRTUAL`]; `/access` REJECTs blocked@example.com and
/// HOLDs held@example.com; `/transport` sends `*@dest.test` to the sink.
fn directory(sink_port: u16) -> impl Fn(&Request) -> Reply + Send + Sync + Clone + 'static {
    move |req: &Request| {
        let key = req.key_str();
        let value = if req.path.starts_with("/virtual") {
            VIRTUAL
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.to_string())
        } else if req.path.starts_with("/access") {
            match key.as_str() {
                "blocked@example.com" => Some("REJECT blocked by the directory".to_string()),
                "held@example.com" => Some("HOLD held by the directory".to_string()),
                _ => None,
            }
        } else if req.path.starts_with("/transport") {
            key.ends_with("@dest.test")
                .then(|| format!("smtp:[127.0.0.1]:{sink_port}"))
        } else {
            None
        };
        match value {
            Some(v) => Reply::found(v.as_bytes()),
            None => Reply::not_found(),
        }
    }
}

/// httpmapd's configuration: three tcp_table maps on one HTTP server, the
/// cache off (every lookup reaches the server, so an outage shows at once and
/// no stale answer hides it), short timeouts and a short rest for a failed
/// server.
fn httpmapd_config(http_port: u16, ports: &MapPorts) -> String {
    let mut out = String::from("[daemon]\nworkers = 2\nlog_level = \"debug\"\n");
    for (name, port) in [
        ("virtual", ports.virtual_),
        ("access", ports.access),
        ("transport", ports.transport),
    ] {
        out.push_str(&format!(
            r#"
[maps.{name}]
tcp_listen = "127.0.0.1:{port}"
servers = ["http://127.0.0.1:{http_port}/{name}"]
connect_timeout = "300ms"
http_timeout = "1s"
lookup_timeout = "2s"
max_attempts = 2
retry_interval = "500ms"
ttl = "0s"
negative_ttl = "0s"
stale_ttl = "0s"
"#
        ));
    }
    out
}

struct MapPorts {
    virtual_: u16,
    access: u16,
    transport: u16,
}

// ---------------------------------------------------------------------------
// The SMTP sink Postfix delivers to
// ---------------------------------------------------------------------------

/// One message the sink received.
#[derive(Clone, Debug)]
struct SinkMessage {
    from: String,
    rcpts: Vec<String>,
    data: String,
}

/// A minimal SMTP server on 127.0.0.1 (220/250/354/221, no extensions) that
/// records every message. Dropping it stops it and closes its connections.
struct Sink {
    acceptor: Acceptor,
    messages: Arc<Mutex<Vec<SinkMessage>>>,
}

impl Sink {
    fn start() -> Sink {
        let messages = Arc::new(Mutex::new(Vec::new()));
        let m = messages.clone();
        let acceptor = Acceptor::start(move |stream, _| {
            let _ = sink_session(stream, &m);
        });
        Sink { acceptor, messages }
    }

    fn port(&self) -> u16 {
        self.acceptor.port()
    }

    fn messages(&self) -> Vec<SinkMessage> {
        self.messages.lock().unwrap().clone()
    }

    /// The first message whose data contains `token`, waiting up to `timeout`.
    fn wait_for(&self, token: &str, timeout: Duration) -> Option<SinkMessage> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(m) = self.find(token) {
                return Some(m);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn find(&self, token: &str) -> Option<SinkMessage> {
        self.messages().into_iter().find(|m| m.data.contains(token))
    }

    /// Messages that look like bounces: the null sender, or sent to our sender.
    fn bounces(&self) -> Vec<SinkMessage> {
        self.messages()
            .into_iter()
            .filter(|m| m.from.is_empty() || m.rcpts.iter().any(|r| r == SENDER))
            .collect()
    }
}

/// The address inside `<...>` (or the first word) of a MAIL/RCPT argument.
fn angle_addr(arg: &str) -> String {
    let arg = arg.trim();
    match (arg.find('<'), arg.find('>')) {
        (Some(a), Some(b)) if a < b => arg[a + 1..b].to_string(),
        _ => arg.split_whitespace().next().unwrap_or("").to_string(),
    }
}

fn sink_session(stream: TcpStream, messages: &Mutex<Vec<SinkMessage>>) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut w = stream.try_clone()?;
    let mut r = BufReader::new(stream);
    let read_line = |r: &mut BufReader<TcpStream>| -> io::Result<Option<String>> {
        let mut buf = Vec::new();
        if r.read_until(b'\n', &mut buf)? == 0 {
            return Ok(None);
        }
        Ok(Some(
            String::from_utf8_lossy(&buf)
                .trim_end_matches(['\r', '\n'])
                .to_string(),
        ))
    };
    w.write_all(b"220 sink.test ESMTP test sink\r\n")?;
    let mut from: Option<String> = None;
    let mut rcpts: Vec<String> = Vec::new();
    while let Some(line) = read_line(&mut r)? {
        let upper = line.to_ascii_uppercase();
        let reply: &[u8] = if upper.starts_with("EHLO") || upper.starts_with("HELO") {
            b"250 sink.test\r\n"
        } else if upper.starts_with("MAIL FROM:") {
            from = Some(angle_addr(&line[10..]));
            rcpts.clear();
            b"250 2.1.0 Ok\r\n"
        } else if upper.starts_with("RCPT TO:") {
            rcpts.push(angle_addr(&line[8..]));
            b"250 2.1.5 Ok\r\n"
        } else if upper == "DATA" {
            w.write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")?;
            let mut data = String::new();
            loop {
                let Some(l) = read_line(&mut r)? else {
                    return Ok(());
                };
                if l == "." {
                    break;
                }
                data.push_str(l.strip_prefix('.').unwrap_or(&l));
                data.push('\n');
            }
            messages.lock().unwrap().push(SinkMessage {
                from: from.take().unwrap_or_default(),
                rcpts: std::mem::take(&mut rcpts),
                data,
            });
            b"250 2.0.0 Ok: stored\r\n"
        } else if upper == "RSET" {
            from = None;
            rcpts.clear();
            b"250 2.0.0 Ok\r\n"
        } else if upper == "NOOP" {
            b"250 2.0.0 Ok\r\n"
        } else if upper == "QUIT" {
            w.write_all(b"221 2.0.0 Bye\r\n")?;
            return Ok(());
        } else {
            b"502 5.5.2 Command not recognized\r\n"
        };
        w.write_all(reply)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Sending mail to Postfix's smtpd
// ---------------------------------------------------------------------------

/// What smtpd did with one message.
#[derive(Debug)]
enum Outcome {
    /// RCPT TO got this reply (not 250): the message was not sent.
    RcptRefused(u16, String),
    /// RCPT TO was accepted, the end of DATA got this reply (not 250).
    DataRefused(u16, String),
    /// Accepted; the queue id from "250 2.0.0 Ok: queued as ID".
    Queued(String),
}

impl Outcome {
    /// smtpd's last reply.
    fn reply(&self) -> String {
        match self {
            Outcome::RcptRefused(_, text) => format!("RCPT TO: {text}"),
            Outcome::DataRefused(_, text) => format!("end of DATA: {text}"),
            Outcome::Queued(id) => format!("250 queued as {id}"),
        }
    }

    fn code(&self) -> u16 {
        match self {
            Outcome::RcptRefused(c, _) | Outcome::DataRefused(c, _) => *c,
            Outcome::Queued(_) => 250,
        }
    }
}

/// Sends one message from [`SENDER`] to `rcpt` through smtpd on `port`; the
/// message carries `token` in its Subject and body.
fn send_mail(port: u16, rcpt: &str, token: &str) -> Outcome {
    let mut c = SmtpClient::connect(port);
    let (code, text) = c.cmd("EHLO client.test");
    assert_eq!(code, 250, "EHLO: {text}");
    let (code, text) = c.cmd(&format!("MAIL FROM:<{SENDER}>"));
    assert_eq!(code, 250, "MAIL FROM: {text}");
    let (code, text) = c.cmd(&format!("RCPT TO:<{rcpt}>"));
    if code != 250 {
        c.quit();
        return Outcome::RcptRefused(code, text);
    }
    let (code, text) = c.cmd("DATA");
    assert_eq!(code, 354, "DATA: {text}");
    let message = format!(
        "From: <{SENDER}>\r\nTo: <{rcpt}>\r\nSubject: e2e {token}\r\n\
         Message-ID: <{token}@client.test>\r\n\r\nThis is message {token}.\r\n."
    );
    let (code, text) = c.cmd(&message);
    c.quit();
    if code != 250 {
        return Outcome::DataRefused(code, text);
    }
    let id = text
        .rsplit("queued as ")
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    assert!(!id.is_empty(), "no queue id in {text:?}");
    Outcome::Queued(id)
}

// ---------------------------------------------------------------------------
// The private Postfix instance: its smtpd listeners and configuration
// ---------------------------------------------------------------------------

/// Ports of the instance's smtpd listeners.
#[derive(Clone, Copy)]
struct SmtpPorts {
    /// Access checks (httpmapd), reject_unauth_destination, and the implicit
    /// reject_unlisted_recipient (a virtual alias lookup at RCPT time).
    main: u16,
    /// No access check: only the virtual alias lookup at RCPT time.
    plain: u16,
    /// No lookup at RCPT time at all (smtpd_reject_unlisted_recipient = no):
    /// the virtual alias lookup happens in cleanup, during DATA.
    late: u16,
}

impl SmtpPorts {
    /// The listeners on the ports [`PrivatePostfix::start`] handed out, in order.
    fn new(ports: &[u16]) -> SmtpPorts {
        let [main, plain, late] = ports[..] else {
            panic!("three smtpd ports, not {ports:?}");
        };
        SmtpPorts { main, plain, late }
    }
}

/// main.cf, after the settings of every private instance.
fn main_cf(maps: &MapPorts, sink_port: u16) -> String {
    format!(
        r#"# Written by tests/postfix_e2e.rs.
myhostname = e2e.test
mydomain = e2e.test
myorigin = e2e.test
relay_domains =
virtual_alias_domains = example.com
virtual_alias_maps = tcp:127.0.0.1:{virtual}
smtpd_recipient_restrictions = check_recipient_access tcp:127.0.0.1:{access}, reject_unauth_destination
relayhost = [127.0.0.1]:{sink_port}
default_transport = smtp
smtp_host_lookup = native
smtp_dns_support_level = disabled
smtp_tls_security_level = none
smtpd_tls_security_level = none
smtp_connection_cache_on_demand = no
smtp_connect_timeout = 5s
smtp_helo_timeout = 10s
smtp_mail_timeout = 10s
smtp_rcpt_timeout = 10s
smtp_data_init_timeout = 10s
smtp_data_xfer_timeout = 10s
smtp_data_done_timeout = 10s
smtp_quit_timeout = 5s
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
"#,
        virtual = maps.virtual_,
        access = maps.access,
    )
}

/// master.cf: the three smtpd listeners and qmgr's own trivial-rewrite,
/// then the standard services.
fn master_cf(smtp: SmtpPorts, maps: &MapPorts) -> String {
    let standard = postfix::standard_services(&[("qmgr", "rewrite_service_name=rewrite-qmgr")]);
    format!(
        r#"# Written by tests/postfix_e2e.rs. chroot (5th column) is n everywhere.
# service type  private unpriv  chroot  wakeup  maxproc command + args
127.0.0.1:{main} inet n - n - - smtpd
127.0.0.1:{plain} inet n - n - - smtpd
  -o smtpd_recipient_restrictions=reject_unauth_destination
127.0.0.1:{late} inet n - n - - smtpd
  -o smtpd_recipient_restrictions=reject_unauth_destination
  -o smtpd_reject_unlisted_recipient=no
# qmgr alone resolves through transport_maps (httpmapd), so that smtpd's
# RCPT checks never depend on it and an accepted message meets the outage
# in the queue.
rewrite-qmgr unix -     -       n       -       -       trivial-rewrite
  -o transport_maps=tcp:127.0.0.1:{transport}
{standard}"#,
        main = smtp.main,
        plain = smtp.plain,
        late = smtp.late,
        transport = maps.transport,
    )
}

// ---------------------------------------------------------------------------
// Helpers for the steps
// ---------------------------------------------------------------------------

/// Asserts that the message with `token` reached the sink, from [`SENDER`]
/// to exactly `rcpt`, within [`DELIVERY_TIMEOUT`].
fn assert_delivered(sink: &Sink, token: &str, rcpt: &str) -> SinkMessage {
    let Some(m) = sink.wait_for(token, DELIVERY_TIMEOUT) else {
        panic!(
            "message {token} did not reach the sink within {DELIVERY_TIMEOUT:?}; the sink has {:#?}",
            sink.messages()
        );
    };
    assert_eq!(m.from, SENDER, "MAIL FROM of {token}");
    assert_eq!(m.rcpts, vec![rcpt.to_string()], "RCPT TO of {token}");
    m
}

/// No bounce so far: none at the sink, none in the mail log.
fn assert_no_bounce(sink: &Sink, pf: &PrivatePostfix) {
    let bounces = sink.bounces();
    assert!(bounces.is_empty(), "bounces reached the sink: {bounces:#?}");
    let log = pf.maillog();
    let bounced: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("status=bounced") || l.contains("non-delivery notification"))
        .collect();
    assert!(
        bounced.is_empty(),
        "the mail log shows bounces: {bounced:#?}"
    );
}

/// Waits until httpmapd answers `get KEY` on `port` with `200 EXPECTED`
/// (after an outage the server rests up to 8 × retry_interval).
fn wait_found(port: u16, key: &str, expected: &str, timeout: Duration) -> Duration {
    let start = Instant::now();
    let want = format!("200 {expected}\n");
    loop {
        let mut c = LineClient::connect(port);
        let reply = c.query(format!("get {key}\n").as_bytes());
        if reply == want.as_bytes() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "httpmapd still answers {:?} for {key} after {timeout:?}",
            String::from_utf8_lossy(&reply)
        );
        thread::sleep(Duration::from_millis(200));
    }
}

// ---------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------

#[test]
fn postfix_delivers_through_httpmapd_and_defers_while_the_directory_is_down() {
    let t0 = Instant::now();

    // Setup: sink, directory, httpmapd, Postfix (dropped in reverse order:
    // Postfix stops first).
    let sink = Sink::start();
    let handler = directory(sink.port());
    let server = TestServer::start(handler.clone());
    let http_addr = server.addr().to_string();
    let maps = MapPorts {
        virtual_: free_port(),
        access: free_port(),
        transport: free_port(),
    };
    let daemon = Daemon::start(&httpmapd_config(server.port(), &maps), maps.transport);
    for port in [maps.virtual_, maps.access] {
        drop(LineClient::connect(port));
    }
    let pf = PrivatePostfix::start(
        "httpmapd-postfix",
        &main_cf(&maps, sink.port()),
        3,
        |ports| master_cf(SmtpPorts::new(ports), &maps),
    );
    let smtp = SmtpPorts::new(&pf.smtpd);
    eprintln!(
        "setup ({:?}): postfix in {} (smtpd on {}, {}, {}), httpmapd tcp maps on {}, {}, {}, \
         directory on {http_addr}, sink on {}",
        t0.elapsed(),
        pf.dir.display(),
        smtp.main,
        smtp.plain,
        smtp.late,
        maps.virtual_,
        maps.access,
        maps.transport,
        sink.port()
    );

    // 1. An alias is accepted and delivered rewritten.
    let outcome = send_mail(smtp.main, "alias@example.com", "step1-alias");
    eprintln!("step 1: RCPT TO:<alias@example.com> -> {}", outcome.reply());
    assert!(matches!(outcome, Outcome::Queued(_)), "step 1: {outcome:?}");
    let m = assert_delivered(&sink, "step1-alias", "real@dest.test");
    eprintln!(
        "step 1: the sink got MAIL FROM:<{}> RCPT TO:{:?} ({:?})",
        m.from,
        m.rcpts,
        t0.elapsed()
    );

    // 2. Unknown and blocked addresses get a 5xx; a held one is accepted and held.
    let outcome = send_mail(smtp.main, "nobody@example.com", "step2-nobody");
    eprintln!(
        "step 2: RCPT TO:<nobody@example.com> -> {}",
        outcome.reply()
    );
    match &outcome {
        Outcome::RcptRefused(550, text) => assert!(
            text.contains("5.1.1") && text.contains("User unknown in virtual alias table"),
            "step 2: {text}"
        ),
        other => panic!("step 2: nobody@example.com should get 550 5.1.1, got {other:?}"),
    }
    let outcome = send_mail(smtp.main, "blocked@example.com", "step2-blocked");
    eprintln!(
        "step 2: RCPT TO:<blocked@example.com> -> {}",
        outcome.reply()
    );
    match &outcome {
        Outcome::RcptRefused(code, text) if *code >= 500 => {
            assert!(text.contains("blocked by the directory"), "step 2: {text}")
        }
        other => panic!("step 2: blocked@example.com should get a 5xx, got {other:?}"),
    }
    let outcome = send_mail(smtp.main, "held@example.com", "step2-held");
    eprintln!("step 2: RCPT TO:<held@example.com> -> {}", outcome.reply());
    let Outcome::Queued(held_id) = outcome else {
        panic!("step 2: held@example.com should be accepted, got {outcome:?}");
    };
    let q = pf.wait_queue(
        |q| q.contains(&format!("{held_id}!")),
        Duration::from_secs(10),
    );
    eprintln!("step 2: postqueue -p:\n{q}");
    assert!(
        q.contains(&format!("{held_id}!")) && q.contains("real-held@dest.test"),
        "step 2: {held_id} should be on hold, rewritten to real-held@dest.test:\n{q}"
    );

    // 3. The directory goes down (its only HTTP server).
    let requests_before = server.requests();
    drop(server);
    eprintln!(
        "step 3: directory down after {requests_before} requests ({:?})",
        t0.elapsed()
    );
    // At RCPT time, with the access check then the virtual alias lookup
    // (main), with the virtual alias lookup only (plain), and with the
    // virtual alias lookup in cleanup (late, a 4xx at the end of DATA).
    let mut refused: Vec<(u16, &str, &str, &str)> = Vec::new();
    for (port, listener, rcpt, token, real) in [
        (
            smtp.main,
            "main",
            "alias2@example.com",
            "step3-main",
            "real2@dest.test",
        ),
        (
            smtp.plain,
            "plain",
            "alias2@example.com",
            "step3-plain",
            "real2@dest.test",
        ),
        (
            smtp.late,
            "late",
            "alias3@example.com",
            "step3-late",
            "real3@dest.test",
        ),
    ] {
        let outcome = send_mail(port, rcpt, token);
        eprintln!(
            "step 3: {listener} smtpd, RCPT TO:<{rcpt}> -> {}",
            outcome.reply()
        );
        assert!(
            outcome.code() < 500,
            "step 3: a directory outage must never give a 5xx: {outcome:?}"
        );
        match outcome {
            Outcome::RcptRefused(code, _) | Outcome::DataRefused(code, _) => {
                assert!((400..500).contains(&code), "step 3: {outcome:?}");
                refused.push((port, rcpt, token, real));
            }
            // A 250 at the end of DATA would mean cleanup took the failed
            // lookup for "not found": the message would be queued
            // unrewritten and bounced ("User unknown in virtual alias table").
            Outcome::Queued(ref id) => panic!(
                "step 3: accepted as {id} although its virtual alias lookup failed \
                 (Postfix would deliver it unrewritten): {outcome:?}"
            ),
        }
    }
    // The held message, released while the directory is down: qmgr's
    // transport lookup fails, so it is deferred (not bounced, not delivered).
    let out = pf.run("postsuper", &["-H", &held_id]);
    assert!(out.ok, "postsuper -H {held_id}: {}", out.text);
    pf.flush();
    let line = pf
        .wait_log(
            &[
                &format!("{held_id}: to=<real-held@dest.test>"),
                "status=deferred",
            ],
            Duration::from_secs(10),
        )
        .unwrap_or_else(|| panic!("step 3: {held_id} was not deferred"));
    eprintln!("step 3: released {held_id}: {line}");
    // It stays deferred through qmgr's retries (queue_run_delay 1 s,
    // backoff 1-2 s): wait for a second deferral, then look again.
    let deadline = Instant::now() + Duration::from_secs(10);
    let deferrals = loop {
        let n = pf
            .maillog()
            .lines()
            .filter(|l| l.contains(&format!("{held_id}: to=<")) && l.contains("status=deferred"))
            .count();
        if n >= 2 || Instant::now() >= deadline {
            break n;
        }
        thread::sleep(Duration::from_millis(100));
    };
    assert!(
        deferrals >= 2,
        "step 3: {held_id} was not retried (and deferred again) within 10 s"
    );
    eprintln!("step 3: {held_id} deferred {deferrals} times so far");
    let q = pf.queue();
    eprintln!("step 3: postqueue -p:\n{q}");
    assert!(
        q.contains(&held_id)
            && !q.contains(&format!("{held_id}!"))
            && q.contains("real-held@dest.test"),
        "step 3: {held_id} should wait in the queue:\n{q}"
    );
    assert!(
        sink.find("step2-held").is_none(),
        "step 3: the held message was delivered while the directory was down"
    );
    assert!(
        sink.find("step3-").is_none(),
        "step 3: a message refused with a 4xx reached the sink"
    );
    assert_no_bounce(&sink, &pf);
    eprintln!(
        "step 3: nothing delivered, nothing bounced ({:?})",
        t0.elapsed()
    );

    // 4. The directory comes back on the same port.
    let server = TestServer::start_on(&http_addr, handler)
        .unwrap_or_else(|e| panic!("restart the directory on {http_addr}: {e}"));
    let waited = wait_found(
        maps.transport,
        "real-held@dest.test",
        &format!("smtp:[127.0.0.1]:{}", sink.port()),
        Duration::from_secs(15),
    );
    wait_found(
        maps.virtual_,
        "alias2@example.com",
        "real2@dest.test",
        Duration::from_secs(15),
    );
    eprintln!("step 4: directory back; httpmapd answers again after {waited:?}");
    // The messages refused with a 4xx at step 3 are sent again, as the
    // client would after a 4xx, and now go through. (They go first for a
    // second reason: qmgr's resolve client keeps its last answer, a failure
    // included, for 30 s (Postfix's resolve_clnt.c one-entry cache), so
    // qmgr would keep deferring the held message without asking
    // trivial-rewrite again until it has resolved some other address.)
    for (port, rcpt, token, real) in refused {
        let token = format!("{token}-again");
        let outcome = send_mail(port, rcpt, &token);
        assert!(
            matches!(outcome, Outcome::Queued(_)),
            "step 4: {rcpt}: {outcome:?}"
        );
        let m = assert_delivered(&sink, &token, real);
        eprintln!(
            "step 4: re-sent to <{rcpt}> on port {port}: {}; the sink got RCPT TO:{:?} ({:?})",
            outcome.reply(),
            m.rcpts,
            t0.elapsed()
        );
    }
    // `postqueue -f` delivers the deferred message, rewritten.
    pf.flush();
    let m = assert_delivered(&sink, "step2-held", "real-held@dest.test");
    eprintln!(
        "step 4: postqueue -f: the deferred {held_id} reached the sink: MAIL FROM:<{}> RCPT TO:{:?} ({:?})",
        m.from,
        m.rcpts,
        t0.elapsed()
    );
    let q = pf.wait_queue(
        |q| q.contains("Mail queue is empty"),
        Duration::from_secs(10),
    );
    assert!(
        q.contains("Mail queue is empty"),
        "step 4: queue not empty:\n{q}"
    );
    assert_no_bounce(&sink, &pf);
    let delivered = sink.messages().len();
    assert_eq!(delivered, 5, "step 4: the sink got {:#?}", sink.messages());
    eprintln!(
        "done: {delivered} messages delivered, queue empty, no bounce; directory saw {} \
         requests since it came back; {:?} in all",
        server.requests(),
        t0.elapsed()
    );
    drop(pf);
    drop(daemon);
}
