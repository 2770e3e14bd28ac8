//! The README's front door, run as written: its quick-start command (in a
//! fresh process group, from the top of the repository, exactly the text in
//! the README) must start the demo, and every `$ command` line that follows
//! must print exactly the lines the README shows under it. The README's
//! test command must be the one `.ci/run` runs.
//!
//! The demo listens on the README's fixed ports (8080, 10020, 10021), so
//! this file holds one test.

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Bound on the quick-start command coming up (it may build first).
const START_TIMEOUT: Duration = Duration::from_secs(300);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The indented (4-space) lines of the README section starting at `heading`.
fn section_code(readme: &str, heading: &str) -> Vec<String> {
    let start = readme
        .find(heading)
        .unwrap_or_else(|| panic!("README has no {heading:?}"));
    let rest = &readme[start + heading.len()..];
    let end = rest.find("\n## ").unwrap_or(rest.len());
    rest[..end]
        .lines()
        .filter_map(|l| l.strip_prefix("    "))
        .map(str::to_string)
        .collect()
}

/// The process group of the quick-start command; dropping it stops the
/// whole group (cargo and the daemon it started).
struct Group(Child);

impl Drop for Group {
    fn drop(&mut self) {
        let pgid = self.0.id() as i32;
        // SAFETY: kill on a process group we created.
        unsafe {
            libc::kill(-pgid, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
        let _ = self.0.wait();
    }
}

fn listening(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

fn run_shell(cmd: &str, dir: &Path, mail_config: &Path) -> (i32, String, String) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .current_dir(dir)
        .env("MAIL_CONFIG", mail_config)
        .env(
            "PATH",
            format!("{}:/usr/sbin", std::env::var("PATH").unwrap_or_default()),
        )
        .output()
        .expect("run sh");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn readme_quick_start_works_as_written() {
    // The README's lookups run Postfix's postmap: fail now if it is missing.
    common::postfix::program("postmap");
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let code = section_code(&readme, "## Quick start");
    // The first command starts everything; the `$` lines and their output follow.
    let start = code
        .iter()
        .find(|l| !l.starts_with('$') && !l.trim().is_empty())
        .expect("a start command in the quick start")
        .clone();
    let test_command = code
        .iter()
        .find(|l| !l.starts_with('$') && **l != start && l.starts_with("cargo test"))
        .expect("the test command in the quick start")
        .clone();
    let ci = std::fs::read_to_string(repo().join(".ci/run")).unwrap();
    assert!(
        ci.lines().any(|l| l.trim() == test_command.trim()),
        ".ci/run must run the README's test command {test_command:?}"
    );
    let mut steps: Vec<(String, Vec<String>)> = Vec::new();
    for l in &code {
        if let Some(cmd) = l.strip_prefix("$ ") {
            steps.push((cmd.to_string(), Vec::new()));
        } else if let Some(last) = steps.last_mut() {
            if *l == test_command {
                break;
            }
            last.1.push(l.clone());
        }
    }
    assert!(steps.len() >= 2, "the quick start shows lookups: {code:?}");
    for port in [8080, 10020, 10021] {
        assert!(
            !listening(port),
            "port {port} is taken before the quick start runs"
        );
    }

    // As the README says for a machine without a Postfix configuration.
    let pf = common::unique_temp_dir("httpmapd-quickstart-pf");
    std::fs::write(pf.join("main.cf"), "").unwrap();
    let log_path = pf.join("quickstart.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let child = Command::new("sh")
        .arg("-c")
        .arg(&start)
        .current_dir(repo())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .process_group(0)
        .spawn()
        .expect("start the quick-start command");
    let mut group = Group(child);
    let deadline = Instant::now() + START_TIMEOUT;
    while !(listening(10021) && listening(10020) && listening(8080)) {
        if let Ok(Some(status)) = group.0.try_wait() {
            let mut text = String::new();
            let _ = std::fs::File::open(&log_path).and_then(|mut f| f.read_to_string(&mut text));
            panic!("{start:?} exited ({status}) before listening:\n{text}");
        }
        assert!(Instant::now() < deadline, "{start:?} did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    for (cmd, want) in &steps {
        let (code, out, err) = run_shell(cmd, &repo(), &pf);
        let got: Vec<&str> = out.lines().collect();
        assert_eq!(got, *want, "{cmd:?} (exit {code}, stderr {err:?})");
        assert_eq!(code, 0, "{cmd:?}: stderr {err:?}");
    }
    drop(group);
    let mut text = String::new();
    let _ = std::fs::File::open(&log_path).and_then(|mut f| f.read_to_string(&mut text));
    assert!(
        text.contains("httpmapd: info: httpmapd") && text.contains("started"),
        "the demo logged its start:\n{text}"
    );
    let _ = std::fs::remove_dir_all(&pf);
}
