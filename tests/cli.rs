//! The `httpmapd` command line and how it talks to systemd, on the real
//! binary: help and version on stdout with exit 0 for every command, usage
//! errors on stderr with exit 2, a closed stdout pipe ending `query`
//! quietly, readable errors (`tcp:HOST:PORT`, not Rust debug text),
//! `demo --backend ADDR` pointing the daemon at ADDR; sd_notify (`READY=1`
//! once the listeners accept, `RELOADING=1`/`READY=1` around SIGHUP,
//! `STOPPING=1` on SIGTERM) to a datagram socket of the test's, by path and
//! abstract name; journald priority prefixes when stderr is the stream that
//! `JOURNAL_STREAM` names, plain lines otherwise; `log_timestamps`.

mod common;

use common::{crate_file, free_port, show, unique_temp_dir, TestServer};
use std::io::{BufRead, BufReader, Read};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_httpmapd");
const WAIT: Duration = Duration::from_secs(10);

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run httpmapd")
}

#[test]
fn help_and_version_go_to_stdout_with_exit_0() {
    let version = format!("httpmapd {}\n", env!("CARGO_PKG_VERSION"));
    for args in [&["--version"][..], &["-V"]] {
        let o = run(args);
        assert_eq!(o.status.code(), Some(0), "{args:?}");
        assert_eq!(show(&o.stdout), version, "{args:?}");
        assert_eq!(show(&o.stderr), "", "{args:?}");
    }
    for args in [
        &["--help"][..],
        &["-h"],
        &["help"],
        &["query", "--help"],
        &["demo", "--help"],
        &["backend", "--help"],
        &["help", "query"],
    ] {
        let o = run(args);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", show(&o.stderr));
        let out = show(&o.stdout);
        assert!(out.contains("Usage: httpmapd"), "{args:?}: {out}");
        assert_eq!(show(&o.stderr), "", "{args:?}");
    }
    // Subcommands answer --version too.
    let o = run(&["query", "--version"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(show(&o.stdout).ends_with(&format!(" {}\n", env!("CARGO_PKG_VERSION"))));
    // The top-level help names every command and the config option.
    let help = show(&run(&["--help"]).stdout);
    for word in ["query", "demo", "backend", "--config <FILE>", "--check"] {
        assert!(help.contains(word), "{word} in:\n{help}");
    }
}

#[test]
fn usage_errors_go_to_stderr_with_exit_2() {
    for args in [
        &[][..],
        &["--bogus"],
        &["-c"],
        &["query"],
        &["query", "tcp:127.0.0.1:1"],
        &["demo", "--backend", "not-an-address"],
        &["backend", "--listen"],
        &["frobnicate"],
        &["-c", "x.toml", "query", "tcp:1", "k"],
    ] {
        let o = run(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert_eq!(show(&o.stdout), "", "{args:?}: nothing on stdout");
        let err = show(&o.stderr);
        assert!(err.starts_with("error: "), "{args:?}: {err}");
        assert!(
            err.contains("Usage: httpmapd") || err.contains("try '--help'"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn check_and_query_errors_are_readable() {
    let dir = unique_temp_dir("httpmapd-cli");
    let path = dir.join("ok.toml");
    std::fs::write(
        &path,
        "[maps.virtual]\ntcp_listen = \"127.0.0.1:10021\"\nservers = [\"http://127.0.0.1:8080/v\"]\n",
    )
    .unwrap();
    let o = run(&["-c", path.to_str().unwrap(), "--check"]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(
        show(&o.stdout),
        format!("{}: ok (1 map(s))\n", path.display())
    );
    assert_eq!(show(&o.stderr), "");
    // A refused connection: the table as written, the OS's reason, exit 2.
    let port = free_port();
    let o = run(&["query", &format!("tcp:127.0.0.1:{port}"), "k"]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        show(&o.stderr),
        format!(
            "httpmapd: cannot connect to tcp:127.0.0.1:{port}: Connection refused (os error 111)\n"
        )
    );
    let o = run(&[
        "query",
        &format!("socketmap:inet:127.0.0.1:{port}:virtual"),
        "k",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        show(&o.stderr).starts_with(&format!(
            "httpmapd: cannot connect to socketmap:inet:127.0.0.1:{port}:virtual: "
        )),
        "{}",
        show(&o.stderr)
    );
    let o = run(&["query", "nonsense", "k"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(show(&o.stderr).contains("expected a table such as tcp:"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A daemon serving map `virtual` (values `v-KEY`) on a tcp_table port.
fn daemon_with_map() -> (common::Daemon, u16, TestServer) {
    let server = TestServer::start(|req| {
        let v = format!("v-{}", req.key_str());
        common::Reply::found(v.as_bytes())
    });
    let port = free_port();
    let d = common::Daemon::start(
        &format!(
            "[daemon]\nworkers = 1\n[maps.virtual]\ntcp_listen = \"127.0.0.1:{port}\"\nservers = [\"{}\"]\n",
            server.url("/v")
        ),
        port,
    );
    (d, port, server)
}

#[test]
fn query_into_a_closed_pipe_ends_quietly() {
    let (_d, port, _server) = daemon_with_map();
    let keys: Vec<String> = (0..2000).map(|i| format!("key{i}@example.com")).collect();
    let mut args = vec!["query".to_string(), format!("tcp:127.0.0.1:{port}")];
    args.extend(keys);
    let mut child = Command::new(BIN)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read one line, then close the pipe, as `| head -1` does.
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert_eq!(first, "key0@example.com\tv-key0@example.com\n");
    let status = wait(&mut child, WAIT).expect("query ends after its stdout closed");
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(err, "", "quiet: no panic, no message");
    assert_eq!(status.code(), Some(0), "found keys: exit 0");
}

fn wait(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    None
}

/// Kills the child on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_listening(port: u16) {
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn demo_backend_option_points_the_daemon_at_it() {
    let dir = unique_temp_dir("httpmapd-cli-demo");
    let (tcp, backend) = (free_port(), free_port());
    let cfg = dir.join("demo.toml");
    // The shipped default: servers at 127.0.0.1:8080; --backend moves them.
    std::fs::write(
        &cfg,
        format!(
            "[daemon]\nworkers = 1\n[maps.virtual]\ntcp_listen = \"127.0.0.1:{tcp}\"\nservers = [\"http://127.0.0.1:8080/virtual\"]\n"
        ),
    )
    .unwrap();
    let child = Command::new(BIN)
        .args(["demo", "-c", cfg.to_str().unwrap(), "--backend"])
        .arg(format!("127.0.0.1:{backend}"))
        .arg("--map")
        .arg(crate_file("conf/demo.map"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _running = Running(child);
    wait_listening(tcp);
    wait_listening(backend);
    let o = run(&[
        "query",
        &format!("tcp:127.0.0.1:{tcp}"),
        "alice@example.com",
    ]);
    assert_eq!(
        show(&o.stdout),
        "alice@mail.example.com\n",
        "{}",
        show(&o.stderr)
    );
    assert_eq!(o.status.code(), Some(0));
    // A reload keeps --backend: a second map (its port listening says the
    // reload took effect) and a key not asked before (no cache) still reach
    // the backend, not 127.0.0.1:8080.
    let tcp2 = free_port();
    std::fs::write(
        &cfg,
        format!(
            "[daemon]\nworkers = 1\n[maps.virtual]\ntcp_listen = \"127.0.0.1:{tcp}\"\nservers = [\"http://127.0.0.1:8080/virtual\"]\n\
             [maps.second]\ntcp_listen = \"127.0.0.1:{tcp2}\"\nservers = [\"http://127.0.0.1:8080/virtual\"]\n"
        ),
    )
    .unwrap();
    signal(&_running.0, libc::SIGHUP);
    wait_listening(tcp2);
    for (port, key, value) in [
        (tcp, "bob@example.com", "bob@mail.example.com\n"),
        (tcp2, "carol@example.com", "carol@mail.example.org\n"),
    ] {
        let o = run(&["query", &format!("tcp:127.0.0.1:{port}"), key]);
        assert_eq!(show(&o.stdout), value, "{}", show(&o.stderr));
        assert_eq!(o.status.code(), Some(0));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A daemon started by the test with extra environment and stderr as given.
fn spawn_daemon(config: &str, env: &[(&str, &str)], stderr: Stdio) -> (Running, PathBuf) {
    let dir = unique_temp_dir("httpmapd-cli-d");
    let path = dir.join("httpmapd.toml");
    std::fs::write(&path, config).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.arg("-c")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    for (k, v) in env {
        cmd.env(k, v);
    }
    (Running(cmd.spawn().unwrap()), path)
}

fn simple_config(port: u16) -> String {
    format!(
        "[daemon]\nworkers = 1\n[maps.virtual]\ntcp_listen = \"127.0.0.1:{port}\"\nservers = [\"http://127.0.0.1:9/v\"]\n"
    )
}

fn recv(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = sock
        .recv(&mut buf)
        .expect("a notification within the timeout");
    show(&buf[..n])
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

fn notify_round(sock: &UnixDatagram, env_value: &str) {
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let port = free_port();
    let (d, path) = spawn_daemon(
        &simple_config(port),
        &[("NOTIFY_SOCKET", env_value)],
        Stdio::null(),
    );
    let ready = recv(sock);
    assert!(ready.starts_with("READY=1\n"), "{ready:?}");
    assert!(ready.contains("STATUS=serving 1 map(s)"), "{ready:?}");
    // READY means the listeners accept.
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_ok(),
        "listening when READY=1 arrives"
    );
    signal(&d.0, libc::SIGHUP);
    let reloading = recv(sock);
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading:?}"
    );
    let again = recv(sock);
    assert_eq!(again, "READY=1\nSTATUS=serving 1 map(s)");
    // A refused reload still ends in READY=1, saying so.
    std::fs::write(&path, "bogus = 1\n").unwrap();
    signal(&d.0, libc::SIGHUP);
    assert!(recv(sock).starts_with("RELOADING=1\n"));
    let refused = recv(sock);
    assert!(
        refused.starts_with("READY=1\n") && refused.contains("refused"),
        "{refused:?}"
    );
    signal(&d.0, libc::SIGTERM);
    let stopping = recv(sock);
    assert!(stopping.starts_with("STOPPING=1\n"), "{stopping:?}");
}

#[test]
fn sd_notify_ready_reloading_stopping() {
    let dir = unique_temp_dir("httpmapd-cli-notify");
    let path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    notify_round(&sock, path.to_str().unwrap());
    // An abstract socket, as systemd may give.
    let name = format!("httpmapd-test-{}", std::process::id());
    let addr =
        <std::os::unix::net::SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(
            name.as_bytes(),
        )
        .unwrap();
    let sock = UnixDatagram::bind_addr(&addr).unwrap();
    notify_round(&sock, &format!("@{name}"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Device and inode of a descriptor, as `JOURNAL_STREAM` writes them.
fn dev_ino(fd: &impl AsRawFd) -> String {
    // SAFETY: fstat on an open descriptor with a zeroed buffer.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        assert_eq!(libc::fstat(fd.as_raw_fd(), &mut st), 0);
        format!("{}:{}", st.st_dev, st.st_ino)
    }
}

/// Starts a daemon whose stderr is one end of a socket pair; returns the
/// other end, read line by line.
fn daemon_on_socket(
    port: u16,
    journal_stream: Option<&str>,
    extra: &str,
) -> (Running, BufReader<UnixStream>, String) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let id = dev_ino(&theirs);
    let value = journal_stream.map_or(id.clone(), str::to_string);
    let (d, _) = spawn_daemon(
        &format!("{}{extra}", simple_config(port)),
        &[("JOURNAL_STREAM", &value)],
        Stdio::from(OwnedFd::from(theirs)),
    );
    ours.set_read_timeout(Some(WAIT)).unwrap();
    (d, BufReader::new(ours), id)
}

fn next_line(r: &mut BufReader<UnixStream>) -> String {
    let mut l = String::new();
    r.read_line(&mut l).expect("a log line");
    l
}

#[test]
fn journal_priorities_when_stderr_is_the_journal_stream() {
    let port = free_port();
    let (d, mut r, _) = daemon_on_socket(port, None, "");
    let first = next_line(&mut r);
    assert!(first.starts_with("<6>info: httpmapd "), "{first:?}");
    assert!(first.contains(" started: "), "{first:?}");
    // A warning and an error: <4> and <3>.
    wait_listening(port);
    let c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    std::io::Write::write_all(&mut &c, b"bogus\n").unwrap();
    let warn = next_line(&mut r);
    assert!(
        warn.starts_with("<4>warning: bad tcp_table request from 127.0.0.1:"),
        "{warn:?}"
    );
    signal(&d.0, libc::SIGUSR1);
    let info = next_line(&mut r);
    assert!(info.starts_with("<6>info: counters: "), "{info:?}");
    drop(d);

    // JOURNAL_STREAM naming another stream (stderr redirected): plain lines.
    let port = free_port();
    let (_d, mut r, id) = daemon_on_socket(port, Some("1:2"), "");
    assert_ne!(id, "1:2");
    let first = next_line(&mut r);
    assert!(first.starts_with("httpmapd: info: httpmapd "), "{first:?}");

    // log_timestamps: an RFC 3339 time first (plain lines only).
    let port = free_port();
    let cfg = simple_config(port).replace("[daemon]\n", "[daemon]\nlog_timestamps = true\n");
    let (ours, theirs) = UnixStream::pair().unwrap();
    let (_d, _) = spawn_daemon(&cfg, &[], Stdio::from(OwnedFd::from(theirs)));
    ours.set_read_timeout(Some(WAIT)).unwrap();
    let line = next_line(&mut BufReader::new(ours));
    let (time, rest) = line.split_once(' ').unwrap();
    assert!(rest.starts_with("httpmapd: info: httpmapd "), "{line:?}");
    assert!(humantime_like(time), "{time:?}");
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ`
fn humantime_like(t: &str) -> bool {
    let b = t.as_bytes();
    b.len() == 24
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'.'
        && b[23] == b'Z'
        && t.chars().filter(char::is_ascii_digit).count() == 17
}
