//! The `httpmapd` command line (clap): serve a configuration, check it, run
//! the demo (the bundled backend with the daemon in front of it), run the
//! sample backend alone, or query a table like `postmap -q`.
//!
//! Help and version go to stdout with exit 0; usage errors to stderr with
//! exit 2. Output to a closed pipe (`httpmapd query ... | head -1`) ends the
//! command quietly, never with a panic.

use clap::{Args, Parser, Subcommand};
use httpmapd::client::{self, Client, Reply};
use httpmapd::{config, daemon, demo_backend};
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// A Postfix lookup table (tcp_table and socketmap) answered by HTTP
/// servers speaking dict_http, through an in-memory cache.
#[derive(Parser)]
#[command(
    name = "httpmapd",
    version,
    propagate_version = true,
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true,
    after_help = "Serve:  httpmapd -c /etc/httpmapd/httpmapd.toml\n\
                  Check:  httpmapd -c /etc/httpmapd/httpmapd.toml --check\n\
                  Signals: HUP reloads the file, TERM/INT drain and stop, USR1 logs the counters.\n\
                  See httpmapd(8) and httpmapd.toml(5)."
)]
struct Cli {
    /// The configuration file (TOML); serve it in the foreground.
    #[arg(short = 'c', long = "config", value_name = "FILE", required = true)]
    config: Option<PathBuf>,
    /// Only check FILE: print each problem as FILE:LINE: message on stderr
    /// and exit 1 if there is any, else print "FILE: ok" and exit 0.
    #[arg(long)]
    check: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Look keys up in a table, like `postmap -q` (for machines without Postfix).
    Query(QueryArgs),
    /// Start the bundled sample backend and serve a configuration in front of it.
    Demo(DemoArgs),
    /// Run only the bundled sample dict_http backend.
    Backend(BackendArgs),
    /// Drop keys or whole maps from the cache of a running daemon (and from
    /// the shared cache, so every node of a fleet drops them).
    Purge(PurgeArgs),
    /// Show what the caches hold for a key.
    Show(ShowArgs),
    /// Every entry of the in-process cache as tab-separated lines: map, key,
    /// value (empty: not found), seconds left fresh (negative: expired).
    Dump(DumpArgs),
}

/// Where a running daemon's admin socket is: the configuration file's
/// `[daemon] admin_socket`.
#[derive(Args)]
struct AdminTarget {
    /// The daemon's configuration file.
    #[arg(
        short = 'c',
        long = "config",
        value_name = "FILE",
        default_value = "/etc/httpmapd/httpmapd.toml"
    )]
    config: PathBuf,
}

#[derive(Args)]
#[command(after_help = "purge -c FILE MAP KEY...   drop these keys\n\
                        purge -c FILE MAP --all    drop a map\n\
                        purge -c FILE --all        drop every map\n\
                        Prints how many entries were dropped; exit 1 when the daemon, or with a \
                        shared cache Redis, cannot be reached.")]
struct PurgeArgs {
    #[command(flatten)]
    target: AdminTarget,
    /// The map (its name in the configuration).
    map: Option<String>,
    /// Keys to drop (folded as the map folds them).
    #[arg(allow_hyphen_values = true)]
    keys: Vec<String>,
    /// Drop every entry of MAP, or of every map without MAP.
    #[arg(long)]
    all: bool,
}

#[derive(Args)]
struct ShowArgs {
    #[command(flatten)]
    target: AdminTarget,
    map: String,
    #[arg(allow_hyphen_values = true)]
    key: String,
}

#[derive(Args)]
struct DumpArgs {
    #[command(flatten)]
    target: AdminTarget,
    /// Only this map.
    map: Option<String>,
}

#[derive(Args)]
#[command(
    after_help = "Exit status: 0 found, 1 not found, 2 error (temporary error, \
                        configuration error, connection refused)."
)]
struct QueryArgs {
    /// The table as in main.cf: tcp:HOST:PORT, socketmap:inet:HOST:PORT:NAME
    /// or socketmap:unix:PATH:NAME.
    table: String,
    /// Keys to look up; `-` reads keys from standard input, one per line, over
    /// one connection. With several keys each found one prints KEY<TAB>VALUE.
    #[arg(required = true, allow_hyphen_values = true)]
    keys: Vec<String>,
}

#[derive(Args)]
struct DemoArgs {
    /// The configuration to serve [default: conf/httpmapd.toml, or
    /// /etc/httpmapd/httpmapd.toml where there is no conf/ (the package)].
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    config: Option<PathBuf>,
    /// The map the sample backend serves (`KEY VALUE` lines) [default:
    /// conf/demo.map, or /usr/share/httpmapd/demo.map where there is no conf/].
    #[arg(long, value_name = "FILE")]
    map: Option<PathBuf>,
    /// Where the sample backend listens; the configuration's servers at
    /// 127.0.0.1:8080 are pointed here.
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_BACKEND_ADDR)]
    backend: SocketAddr,
}

#[derive(Args)]
struct BackendArgs {
    /// Where to listen.
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_BACKEND_ADDR)]
    listen: SocketAddr,
    /// The map to serve (`KEY VALUE` lines) [default: conf/demo.map, or
    /// /usr/share/httpmapd/demo.map where there is no conf/].
    #[arg(long, value_name = "FILE")]
    map: Option<PathBuf>,
}

/// The demo's files in this repository, and where the package installs them.
const DEFAULT_CONFIG: [&str; 2] = ["conf/httpmapd.toml", "/etc/httpmapd/httpmapd.toml"];
const DEFAULT_DEMO_MAP: [&str; 2] = ["conf/demo.map", "/usr/share/httpmapd/demo.map"];

/// `given`, or the first of `defaults` that exists (else the first).
fn or_default(given: &Option<PathBuf>, defaults: [&str; 2]) -> PathBuf {
    given.clone().unwrap_or_else(|| {
        let found = defaults.iter().find(|p| Path::new(p).exists());
        PathBuf::from(found.unwrap_or(&defaults[0]))
    })
}
const DEFAULT_BACKEND_ADDR: &str = demo_backend::DEFAULT_ADDR;

/// Exit status for an invalid configuration file (as `--check` gives), or a
/// demo map that cannot be read.
const EXIT_FAILURE: u8 = 1;
/// Exit status when the daemon cannot start (an address in use, no
/// permission...), as since the first release.
const EXIT_START_FAILURE: u8 = 2;
/// `query`: an error, not an answer.
const EXIT_QUERY_ERROR: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Query(q)) => query(&q),
        Some(Command::Demo(d)) => demo(&d),
        Some(Command::Backend(b)) => backend(&b),
        Some(Command::Purge(p)) => purge(&p),
        Some(Command::Show(s)) => admin(
            &s.target,
            &[b"show", s.map.as_bytes(), s.key.as_bytes()],
            |_| String::new(),
        ),
        Some(Command::Dump(d)) => {
            let mut f: Vec<&[u8]> = vec![b"dump"];
            if let Some(m) = &d.map {
                f.push(m.as_bytes());
            }
            admin(&d.target, &f, |_| String::new())
        }
        None => match cli.config {
            Some(path) => serve(&path, cli.check, None),
            None => unreachable!("clap requires -c without a subcommand"),
        },
    };
    result.unwrap_or_else(|(code, msg)| {
        eprintln!("httpmapd: {msg}");
        ExitCode::from(code)
    })
}

type Outcome = Result<ExitCode, (u8, String)>;

/// Writes one line to stdout; false when stdout is closed (the reader went
/// away: the command ends quietly).
fn print_line(line: &str) -> bool {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|()| out.flush()).is_ok()
}

/// Serves (or with `check`, checks) the file at `path`. `point_at`: the
/// demo's backend address, replacing the default one in every map (at start
/// and at each reload).
fn serve(path: &Path, check: bool, point_at: Option<SocketAddr>) -> Outcome {
    let cfg = match config::load(path) {
        Ok(c) => c,
        Err(errs) => {
            for e in &errs.0 {
                eprintln!("{e}");
            }
            return Ok(ExitCode::from(EXIT_FAILURE));
        }
    };
    if check {
        print_line(&format!(
            "{}: ok ({} map(s))",
            path.display(),
            cfg.maps.len()
        ));
        return Ok(ExitCode::SUCCESS);
    }
    daemon::run(cfg, path.to_path_buf(), point_at).map_err(|e| (EXIT_START_FAILURE, e))?;
    Ok(ExitCode::SUCCESS)
}

/// Starts the sample backend on `addr` with the map file `map` (or the
/// default one).
fn start_backend(map: &Option<PathBuf>, addr: SocketAddr) -> Result<(), (u8, String)> {
    let m = demo_backend::DemoMap::load(&or_default(map, DEFAULT_DEMO_MAP))
        .map_err(|e| (EXIT_FAILURE, e))?;
    demo_backend::spawn(&addr.to_string(), m)
        .map_err(|e| (EXIT_START_FAILURE, format!("demo backend on {addr}: {e}")))?;
    Ok(())
}

fn demo(d: &DemoArgs) -> Outcome {
    start_backend(&d.map, d.backend)?;
    serve(
        &or_default(&d.config, DEFAULT_CONFIG),
        false,
        Some(d.backend),
    )
}

fn backend(b: &BackendArgs) -> Outcome {
    start_backend(&b.map, b.listen)?;
    loop {
        std::thread::park();
    }
}

fn purge(p: &PurgeArgs) -> Outcome {
    let usage = |m: &str| -> Outcome {
        use clap::CommandFactory;
        Cli::command()
            .find_subcommand_mut("purge")
            .expect("purge")
            .clone()
            .bin_name("httpmapd purge")
            .error(clap::error::ErrorKind::MissingRequiredArgument, m)
            .exit()
    };
    let mut f: Vec<&[u8]> = Vec::new();
    match (&p.map, p.keys.is_empty(), p.all) {
        (None, _, true) => f.push(b"purge-all"),
        (Some(m), true, true) => f.extend([&b"purge-map"[..], m.as_bytes()]),
        _ if p.keys.iter().any(|k| k == "--all") => return usage("give KEYs or --all, not both"),
        (Some(m), false, false) => {
            f.extend([&b"purge"[..], m.as_bytes()]);
            f.extend(p.keys.iter().map(String::as_bytes));
        }
        (Some(_), false, true) => return usage("give KEYs or --all, not both"),
        _ => return usage("give MAP and KEYs, MAP --all, or --all"),
    }
    admin(&p.target, &f, |ok| {
        let mut it = ok.split('\t');
        let l1 = it.next().unwrap_or("0");
        match it.next() {
            Some(l2) => format!(
                "dropped {l1} entries from the in-process cache and {l2} from the shared cache"
            ),
            None => format!("dropped {l1} entries from the in-process cache"),
        }
    })
}

/// The admin socket named in the configuration file (read without the
/// rest of the validation: the file's other parts may need privileges).
fn admin_socket(config: &Path) -> Result<PathBuf, String> {
    let text = std::fs::read_to_string(config)
        .map_err(|e| format!("{}: cannot read: {e}", config.display()))?;
    let v: toml::Value =
        toml::from_str(&text).map_err(|e| format!("{}: {}", config.display(), e.message()))?;
    v.get("daemon")
        .and_then(|d| d.get("admin_socket"))
        .and_then(|s| s.as_str())
        .map(PathBuf::from)
        .ok_or_else(|| format!("{}: no admin_socket in [daemon]", config.display()))
}

/// Sends one request to the daemon's admin socket, prints the data lines,
/// and the `ok` line as `done` words it.
fn admin(target: &AdminTarget, fields: &[&[u8]], done: impl Fn(&str) -> String) -> Outcome {
    let fail = |m: String| (EXIT_FAILURE, m);
    let path = admin_socket(&target.config).map_err(fail)?;
    let mut s = std::os::unix::net::UnixStream::connect(&path).map_err(|e| {
        fail(format!(
            "cannot reach the daemon at {}: {e}",
            path.display()
        ))
    })?;
    s.set_read_timeout(Some(httpmapd::admin::IO_TIMEOUT * 3))
        .ok();
    s.write_all(&httpmapd::admin::encode_fields(fields))
        .map_err(|e| fail(format!("{}: {e}", path.display())))?;
    for line in std::io::BufReader::new(s).split(b'\n') {
        let line = line.map_err(|e| fail(format!("{}: {e}", path.display())))?;
        if let Some(d) = line.strip_prefix(b"d\t") {
            if !print_line(&String::from_utf8_lossy(d)) {
                return Ok(ExitCode::SUCCESS);
            }
        } else if let Some(ok) = line.strip_prefix(b"ok\t") {
            let text = done(&String::from_utf8_lossy(ok));
            if !text.is_empty() {
                print_line(&text);
            }
            return Ok(ExitCode::SUCCESS);
        } else if let Some(e) = line.strip_prefix(b"error\t") {
            return Err(fail(String::from_utf8_lossy(e).into_owned()));
        }
    }
    Err(fail(
        "the daemon closed the connection without an answer".into(),
    ))
}

fn query(q: &QueryArgs) -> Outcome {
    let err = |msg: String| (EXIT_QUERY_ERROR, msg);
    let table = client::parse_table(&q.table).map_err(err)?;
    let mut c =
        Client::connect(table).map_err(|e| err(format!("cannot connect to {}: {e}", q.table)))?;
    let mut all: Vec<String> = Vec::new();
    let many = q.keys.len() > 1 || q.keys[0] == "-";
    for k in &q.keys {
        if k == "-" {
            for line in std::io::stdin().lock().lines() {
                all.push(line.map_err(|e| err(format!("stdin: {e}")))?);
            }
        } else {
            all.push(k.clone());
        }
    }
    let mut found_any = false;
    for key in &all {
        match c
            .query(key.as_bytes())
            .map_err(|e| err(format!("query error: {key}: {e}")))?
        {
            Reply::Found(v) => {
                found_any = true;
                let v = String::from_utf8_lossy(&v);
                let line = if many {
                    format!("{key}\t{v}")
                } else {
                    v.into_owned()
                };
                if !print_line(&line) {
                    break; // the reader went away
                }
            }
            Reply::NotFound => {}
            Reply::Temp(t) => return Err(err(format!("query error: {key}: temporary error: {t}"))),
            Reply::Perm(t) => {
                return Err(err(format!("query error: {key}: configuration error: {t}")))
            }
        }
    }
    Ok(if found_any {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
