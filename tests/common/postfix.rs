//! A private real Postfix for the tests that put Postfix itself in front of
//! httpmapd (`tests/postfix_e2e.rs`, `tests/policy.rs`): [`PrivatePostfix`]
//! starts, drives and stops one instance; [`SmtpClient`] talks SMTP to its
//! smtpd; [`standard_services`] lists the master.cf services every instance
//! has. Each test writes its own main.cf and smtpd lines.
//!
//! What Debian's Postfix 3.7 needs for a private instance (run as root): a
//! config directory with main.cf and master.cf, a root-owned queue directory
//! created beforehand (postfix-script does `cd $queue_directory` before it
//! creates the queue's subdirectories), and `MAIL_CONFIG` (or `-c`) on every
//! command. `alternate_config_directories` in the default main.cf is only
//! checked for set-gid commands run by non-root users, so nothing is written
//! outside the temp dir, and /etc/postfix and the system instance are left
//! alone. `maillog_file` needs the `postlog` service and its directory
//! listed in `maillog_file_prefixes`.

// Not every test that includes `common` uses this module.
#![allow(dead_code)]

use super::{find_program, free_port, missing, test_name, unique_temp_dir};
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// How long one Postfix command may run before it is killed.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// A Postfix program: /usr/sbin first, then PATH. Fails the test (see
/// [`missing`]) when Postfix is not installed.
pub fn program(name: &str) -> PathBuf {
    find_program(name, &["/usr/sbin", "$PATH"]).unwrap_or_else(|| {
        missing(
            &format!("Postfix's {name}"),
            "the Debian package postfix (apt-get install postfix)",
        )
    })
}

/// Writes `text` to `path`, dated an hour back: Postfix waits for a config
/// file modified in the last second or so to settle before it reads it.
pub fn write_old_file(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(std::time::SystemTime::now() - Duration::from_secs(3600)))
        .unwrap_or_else(|e| panic!("date {}: {e}", path.display()));
}

/// The main.cf settings of every instance, before the test's own: its
/// queue, data and log in `DIR`, loopback only, no local delivery, no
/// notices, and a patient smtpd that does not slow down after errors.
/// `DIR` is `{dir}`.
const INSTANCE_SETTINGS: &str = "\
# The private instance (tests/common/postfix.rs): nothing shared.
compatibility_level = 3.6
queue_directory = {dir}/queue
data_directory = {dir}/data
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
mynetworks = 127.0.0.0/8
local_recipient_maps =
alias_maps =
alias_database =
biff = no
append_dot_mydomain = no
smtputf8_enable = no
notify_classes =
smtpd_banner = $myhostname ESMTP
smtpd_timeout = 30s
smtpd_error_sleep_time = 0
smtpd_soft_error_limit = 100
smtpd_hard_error_limit = 100
maillog_file = {dir}/maillog
maillog_file_prefixes = {dir}
";

/// The parameter names a main.cf text sets (continuation lines, comments
/// and blank lines skipped).
fn main_cf_names(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| !l.starts_with([' ', '\t', '#']))
        .filter_map(|l| Some(l.split_once('=')?.0.trim()))
        .collect()
}

/// The master.cf services of every instance, as Debian ships them but with
/// chroot (5th column) `n` everywhere, `postlog` included (for
/// `maillog_file`). No smtpd: the tests add their own listeners.
const STANDARD_SERVICES: &str = "\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
";

/// The standard master.cf service lines (pickup ... postlog), for a test to
/// append to its own smtpd lines. `options`: (service, `name=value`) pairs,
/// each added as `  -o name=value` under that service's line; a service
/// not in the list is a panic.
pub fn standard_services(options: &[(&str, &str)]) -> String {
    let mut out = String::new();
    let mut used = vec![false; options.len()];
    for line in STANDARD_SERVICES.lines() {
        out.push_str(line);
        out.push('\n');
        let service = line.split_whitespace().next().unwrap_or("");
        for (i, (name, option)) in options.iter().enumerate() {
            if *name == service {
                out.push_str(&format!("  -o {option}\n"));
                used[i] = true;
            }
        }
    }
    assert!(
        used.iter().all(|&u| u),
        "options for services not in the standard list: {options:?}"
    );
    out
}

/// Output of one Postfix command.
pub struct CmdOutput {
    /// It exited with status 0 (within the 30 s it is given).
    pub ok: bool,
    /// stdout and stderr together.
    pub text: String,
}

/// A running private Postfix instance in a temp dir `DIR` (config in
/// `DIR/conf`, queue in `DIR/queue`, mail log `DIR/maillog`). Dropping it
/// stops it (`postfix stop`, then SIGKILL by pid for any process of this
/// instance still alive) and removes its directory; when the test is
/// panicking it prints the mail log and the queue first.
pub struct PrivatePostfix {
    /// The instance's directory.
    pub dir: PathBuf,
    /// Its config directory (`MAIL_CONFIG`).
    pub conf: PathBuf,
    /// The ports handed to `master_cf` for the smtpd listeners, in order.
    pub smtpd: Vec<u16>,
}

impl PrivatePostfix {
    /// Starts an instance in a fresh temp dir named after `prefix`. Its
    /// main.cf is the settings every instance has (queue, data and mail log
    /// in the temp dir, loopback only, no local delivery, ...; see the
    /// source) followed by `main_cf`, which must not set any of them again;
    /// master.cf is `master_cf(PORTS)` with `smtpd_listeners` fresh
    /// 127.0.0.1 ports, an smtpd on each (e.g. the test's smtpd lines
    /// followed by [`standard_services`]). Ready when every listener greets
    /// with 220. Tries three times with fresh ports (a "free" port can be
    /// taken before master binds it), then panics with what each try said.
    /// Fails the test when not run as root (`postfix start` needs it) or
    /// when Postfix is not installed.
    pub fn start(
        prefix: &str,
        main_cf: &str,
        smtpd_listeners: usize,
        master_cf: impl Fn(&[u16]) -> String,
    ) -> PrivatePostfix {
        let again: Vec<&str> = main_cf_names(main_cf)
            .into_iter()
            .filter(|n| main_cf_names(INSTANCE_SETTINGS).contains(n))
            .collect();
        assert!(
            again.is_empty(),
            "main.cf sets {again:?}, which the harness sets"
        );
        // `postfix start` is reserved for the superuser: there is no
        // private Postfix, and nothing for the test to test, without root.
        // SAFETY: geteuid(2) has no memory effects.
        if unsafe { libc::geteuid() } != 0 {
            panic!(
                "\n{}: FAILED: this test runs a private Postfix, and `postfix start` needs root: \
                 run the tests as root.\n",
                test_name()
            );
        }
        let mut failures = String::new();
        for _ in 0..3 {
            let dir = unique_temp_dir(prefix);
            let conf = dir.join("conf");
            std::fs::create_dir_all(&conf).expect("create conf dir");
            // postfix-script does `cd $queue_directory` before creating the
            // queue's subdirectories itself (owned by postfix): the queue
            // directory must exist, owned by root and not group/other writable.
            std::fs::create_dir_all(dir.join("queue")).expect("create queue dir");
            let smtpd: Vec<u16> = (0..smtpd_listeners).map(|_| free_port()).collect();
            let instance = INSTANCE_SETTINGS.replace("{dir}", &dir.display().to_string());
            write_old_file(&conf.join("main.cf"), &format!("{instance}{main_cf}"));
            write_old_file(&conf.join("master.cf"), &master_cf(&smtpd));
            let pf = PrivatePostfix { dir, conf, smtpd };
            let out = pf.run("postfix", &["start"]);
            if out.ok && pf.wait_smtpd() {
                if !out.text.trim().is_empty() {
                    eprintln!("postfix start said: {}", out.text.trim());
                }
                return pf;
            }
            failures.push_str(&format!(
                "---- postfix start: ok={} ----\n{}\n---- maillog ----\n{}\n",
                out.ok,
                out.text,
                pf.maillog()
            ));
            drop(pf);
        }
        panic!("the private Postfix did not start:\n{failures}");
    }

    /// Whether every smtpd listener greets with 220 (within 10 s in all).
    fn wait_smtpd(&self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        for &port in &self.smtpd {
            loop {
                let ok = TcpStream::connect(("127.0.0.1", port))
                    .and_then(|s| {
                        s.set_read_timeout(Some(Duration::from_secs(5)))?;
                        let mut line = String::new();
                        BufReader::new(&s).read_line(&mut line)?;
                        let _ = (&s).write_all(b"QUIT\r\n");
                        Ok(line.starts_with("220 "))
                    })
                    .unwrap_or(false);
                if ok {
                    break;
                }
                if Instant::now() >= deadline {
                    return false;
                }
                thread::sleep(Duration::from_millis(100));
            }
        }
        true
    }

    /// Runs a Postfix program with `MAIL_CONFIG` set to this instance (and
    /// `-c` for `postfix` itself), stdout and stderr to a file (so a daemon
    /// that keeps them open cannot block us); kills it after 30 s.
    pub fn run(&self, program_name: &str, args: &[&str]) -> CmdOutput {
        let exe = program(program_name);
        let out_path = self.dir.join(format!("{program_name}.out"));
        let out = std::fs::File::create(&out_path).expect("create command output file");
        let mut cmd = Command::new(&exe);
        if program_name == "postfix" {
            cmd.arg("-c").arg(&self.conf);
        }
        let path = format!(
            "/usr/sbin:/usr/bin:/sbin:/bin:{}",
            std::env::var("PATH").unwrap_or_default()
        );
        let mut child = cmd
            .args(args)
            .env("MAIL_CONFIG", &self.conf)
            .env("PATH", path)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", exe.display()));
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                break Some(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            thread::sleep(Duration::from_millis(20));
        };
        let mut text = std::fs::read_to_string(&out_path).unwrap_or_default();
        if status.is_none() {
            text.push_str(&format!("\n(killed after {COMMAND_TIMEOUT:?})"));
        }
        CmdOutput {
            ok: status.is_some_and(|s| s.success()),
            text,
        }
    }

    /// `postqueue -p` (panics if it fails).
    pub fn queue(&self) -> String {
        let out = self.run("postqueue", &["-p"]);
        assert!(out.ok, "postqueue -p failed:\n{}", out.text);
        out.text
    }

    /// `postqueue -f`: deliver everything in the queue now (panics if it fails).
    pub fn flush(&self) {
        let out = self.run("postqueue", &["-f"]);
        assert!(out.ok, "postqueue -f failed:\n{}", out.text);
    }

    /// The mail log so far.
    pub fn maillog(&self) -> String {
        std::fs::read_to_string(self.dir.join("maillog")).unwrap_or_default()
    }

    /// Waits up to `timeout` for a mail log line containing every one of `parts`.
    pub fn wait_log(&self, parts: &[&str], timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self
                .maillog()
                .lines()
                .find(|l| parts.iter().all(|p| l.contains(p)))
            {
                return Some(line.to_string());
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits up to `timeout` until `postqueue -p` output satisfies `pred`;
    /// returns the last output either way.
    pub fn wait_queue(&self, pred: impl Fn(&str) -> bool, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let q = self.queue();
            if pred(&q) || Instant::now() >= deadline {
                return q;
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The master's pid, from the queue's pid file.
    pub fn master_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.dir.join("queue/pid/master.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Pids of live (not zombie) processes of this instance: those whose
    /// environment has our MAIL_CONFIG (master passes it to every daemon).
    pub fn instance_pids(&self) -> Vec<i32> {
        let mut needle = b"MAIL_CONFIG=".to_vec();
        needle.extend_from_slice(self.conf.as_os_str().as_encoded_bytes());
        let me = std::process::id() as i32;
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|&pid| pid != me)
            .filter(|&pid| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let state = stat.rsplit(')').next().unwrap_or("").trim_start();
                !state.starts_with('Z') && !state.is_empty()
            })
            .filter(|&pid| {
                std::fs::read(format!("/proc/{pid}/environ"))
                    .map(|env| env.split(|&b| b == 0).any(|var| var == needle.as_slice()))
                    .unwrap_or(false)
            })
            .collect()
    }
}

impl Drop for PrivatePostfix {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "---- Postfix maillog ({}) ----\n{}---- end ----",
                self.dir.display(),
                self.maillog()
            );
            if self.master_pid().is_some() {
                let q = self.run("postqueue", &["-p"]);
                eprintln!("---- postqueue -p ----\n{}\n---- end ----", q.text);
            }
        }
        if self.master_pid().is_some() {
            let out = self.run("postfix", &["stop"]);
            if !out.ok {
                eprintln!("postfix stop: {}", out.text);
            }
        }
        // Whatever is left of this instance (normally nothing): kill by pid.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let pids = self.instance_pids();
            if pids.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                for pid in pids {
                    eprintln!("killing leftover Postfix process {pid}");
                    // SAFETY: kill(2) has no memory effects.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
                thread::sleep(Duration::from_millis(200));
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An SMTP client for the instance's smtpd (30 s per reply).
pub struct SmtpClient {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl SmtpClient {
    /// Connects to smtpd on 127.0.0.1:`port` and reads its greeting, which
    /// must be a 220.
    pub fn connect(port: u16) -> SmtpClient {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("connect to smtpd on 127.0.0.1:{port}: {e}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let w = stream.try_clone().unwrap();
        let mut c = SmtpClient {
            r: BufReader::new(stream),
            w,
        };
        let (code, text) = c.reply();
        assert_eq!(code, 220, "smtpd greeting: {text}");
        c
    }

    /// One (possibly multi-line) reply: its code, and its lines (each with
    /// its code, trailing white space trimmed) joined with '\n'.
    pub fn reply(&mut self) -> (u16, String) {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            let n = self
                .r
                .read_line(&mut line)
                .unwrap_or_else(|e| panic!("reading an SMTP reply: {e} (have {text:?})"));
            assert!(n > 0, "smtpd closed the connection (have {text:?})");
            let line = line.trim_end();
            text.push_str(line);
            let code: u16 = line
                .get(..3)
                .and_then(|c| c.parse().ok())
                .unwrap_or_else(|| panic!("malformed SMTP reply line {line:?}"));
            if line.as_bytes().get(3) != Some(&b'-') {
                return (code, text);
            }
            text.push('\n');
        }
    }

    /// Sends one command line (CRLF added) and reads its reply.
    pub fn cmd(&mut self, line: &str) -> (u16, String) {
        self.w
            .write_all(format!("{line}\r\n").as_bytes())
            .expect("send SMTP command");
        self.reply()
    }

    /// Sends QUIT and closes the sending side, without waiting for the reply.
    pub fn quit(mut self) {
        let _ = self.w.write_all(b"QUIT\r\n");
        let _ = self.w.shutdown(Shutdown::Write);
    }
}
