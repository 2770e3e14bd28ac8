//! The command line. Owns the clap (derive) definition of every option, its
//! help text and validation, the TARGET syntax (`tcp:`, `socketmap:`,
//! `memcached:`, `http:`, `policy:`, written like Postfix tables) and the duration
//! syntax, and turns them into [`Command`]: either a map file to write or the
//! plain [`Opts`] the load run reads. Usage errors leave through clap (stderr,
//! exit 2); `--help` and `--version` through clap too (stdout, exit 0).

use crate::keys::{KeyOrder, KeySource};
use clap::error::ErrorKind;
use clap::{CommandFactory, Parser};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

const AFTER_HELP: &str = "\
TARGET is written like a Postfix table:
  tcp:HOST:PORT                    tcp_table: get KEY\\n, answered 200/500/400
  socketmap:inet:HOST:PORT:NAME    socketmap netstrings (NAME KEY)
  socketmap:unix:PATH:NAME
  memcached:HOST:PORT              memcached text protocol: get KEY\\r\\n
  http:HOST:PORT[/PATH]            dict_http straight to an HTTP server: GET /PATH
                                   with POSTFIX-DICT-EMAIL: KEY, keep-alive
  policy:HOST:PORT                 Postfix policy delegation (check_policy_service):
  policy:unix:PATH                 a 31-attribute smtpd RCPT request, sender=KEY;
                                   action=DUNNO is not found; DEFER, DEFER_IF_PERMIT,
                                   DEFER_IF_REJECT and 4xx temporary; any other
                                   action (REJECT, 5xx, OK...) found

DUR is a number with a unit (500us, 250ms, 10s, 1m, 1m30s, 1.5s); a bare
number is seconds.

Without --rate the load is closed-loop: each connection sends its next request
when an answer comes back, and latency runs from the write to the whole reply.
With --rate N it is open-loop (as wrk2): request m of the run is due at m/N
seconds on connection m mod C, whatever the answers do; latency runs from the
time it was due, so a slow server's queueing shows in the percentiles.

Examples:
  httpmapd-load tcp:127.0.0.1:10021 --keys conf/demo.map -d 5s
      the demo's own keys (cargo run --release -- demo): cache hits
  httpmapd-load tcp:127.0.0.1:10021 --keys conf/demo.map -d 10s --rate 20000 --zipf 0.99
  httpmapd-load http:127.0.0.1:8080/virtual --keys conf/demo.map -c 1 -d 5s --json
  httpmapd-load memcached:127.0.0.1:11211 --populate -c 100 -d 10s";

/// The options, as clap reads them.
#[derive(Parser, Debug)]
#[command(
    name = "httpmapd-load",
    version,
    about = "Load generator for Postfix lookup tables (tcp_table, socketmap), policy services, memcached and dict_http servers",
    after_help = AFTER_HELP,
    max_term_width = 100
)]
struct Args {
    /// Where to send lookups (see below)
    #[arg(
        value_name = "TARGET",
        value_parser = parse_target,
        required_unless_present = "write_map"
    )]
    target: Option<Target>,

    /// Connections
    #[arg(short = 'c', long = "connections", value_name = "N", default_value_t = 10,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..),
          help_heading = "Load")]
    connections: usize,

    /// Requests in flight per connection (1: like a Postfix process)
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..),
          help_heading = "Load")]
    depth: usize,

    /// Measure this long
    #[arg(short = 'd', long, value_name = "DUR", default_value = "10s",
          value_parser = parse_duration, help_heading = "Load")]
    duration: Duration,

    #[arg(help = "Or measure exactly N requests (with --rate: the first N due,\nall waited for)")]
    #[arg(short = 'n', long = "requests", value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..), help_heading = "Load")]
    requests: Option<u64>,

    /// Run this long first, not recorded
    #[arg(long, value_name = "DUR", default_value = "0s", value_parser = parse_duration,
          help_heading = "Load")]
    warmup: Duration,

    /// Event-loop threads driving the connections
    #[arg(short = 't', long, value_name = "N", default_value_t = 1,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..),
          help_heading = "Load")]
    threads: usize,

    #[arg(help = "Unanswered this long after its write: a timeout; the\nconnection is reopened")]
    #[arg(long, value_name = "DUR", default_value = "5s", value_parser = parse_duration,
          help_heading = "Load")]
    timeout: Duration,

    #[arg(
        help = "Open loop: N requests per second in all, on a fixed schedule;\nlatency from each request's due time (see below)"
    )]
    #[arg(long, value_name = "N", value_parser = parse_rate, allow_negative_numbers = true, help_heading = "Load")]
    rate: Option<f64>,

    #[arg(
        help = "With --rate: a request written more than DUR after its due\ntime counts as late"
    )]
    #[arg(long, value_name = "DUR", default_value = "1ms", value_parser = parse_duration,
          requires = "rate", help_heading = "Load")]
    late: Duration,

    #[arg(
        help = "Keys from FILE, map-file syntax (\"KEY [VALUE]\" lines, # comments),\ne.g. conf/demo.map"
    )]
    #[arg(long, value_name = "FILE", help_heading = "Keys")]
    keys: Option<PathBuf>,

    #[arg(help = "Or generated keys PREFIX{0..N-1}@DOMAIN\n(values PREFIX{i}@mail.DOMAIN)")]
    #[arg(long, value_name = "N", default_value_t = 10_000,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..),
          help_heading = "Keys")]
    keyspace: usize,

    /// Prefix of generated keys
    #[arg(long, value_name = "P", default_value = "user", help_heading = "Keys")]
    prefix: String,

    /// Domain of generated keys
    #[arg(
        long,
        value_name = "D",
        default_value = "example.com",
        help_heading = "Keys"
    )]
    domain: String,

    #[arg(
        help = "This share of requests use keys outside the key set, never\nrepeated (never cached)"
    )]
    #[arg(long, value_name = "F", default_value_t = 0.0, value_parser = parse_share, allow_negative_numbers = true,
          help_heading = "Keys")]
    miss_ratio: f64,

    #[arg(
        help = "Keys in order 0,1,2,... instead of uniformly random\n(with -n KEYSPACE: each key once, to fill a cache)"
    )]
    #[arg(long, conflicts_with = "zipf", help_heading = "Keys")]
    sequential: bool,

    #[arg(
        help = "Zipf key popularity, exponent S > 0 (e.g. 0.99): the r-th key\nof the set is asked in proportion to 1/r^S"
    )]
    #[arg(long, value_name = "S", value_parser = parse_zipf, allow_negative_numbers = true, help_heading = "Keys")]
    zipf: Option<f64>,

    #[arg(
        help = "memcached: first `set` every key (the file's VALUE, or the\ngenerated value), then run the load"
    )]
    #[arg(long, help_heading = "Other modes")]
    populate: bool,

    /// Populate, print what was stored, exit
    #[arg(long, help_heading = "Other modes")]
    populate_only: bool,

    #[arg(
        help = "Write the key set as a map file (\"KEY VALUE\" lines, for\n`httpmapd backend --map`), exit"
    )]
    #[arg(long, value_name = "FILE", help_heading = "Other modes")]
    write_map: Option<PathBuf>,

    #[arg(
        help = "Open the connections, send nothing, hold them for --duration,\nprint how many were open, exit"
    )]
    #[arg(long, conflicts_with_all = ["rate", "requests"], help_heading = "Other modes")]
    idle: bool,

    /// Print the result as one JSON object on stdout
    #[arg(long, help_heading = "Output")]
    json: bool,

    /// No progress line on stderr (one per second otherwise)
    #[arg(short = 'q', long, help_heading = "Output")]
    quiet: bool,
}

/// Where requests go.
#[derive(Clone, Debug)]
pub enum Addr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// What requests look like.
#[derive(Clone, Debug)]
pub enum Proto {
    TcpTable,
    Socketmap {
        name: Vec<u8>,
    },
    Memcached,
    Http {
        host: String,
        path: Vec<u8>,
    },
    /// Postfix's policy delegation protocol (`name=value` lines, an empty
    /// line; the reply `action=TEXT` and an empty line).
    Policy,
}

/// A parsed TARGET.
#[derive(Clone, Debug)]
pub struct Target {
    /// As written on the command line (for the report).
    pub spec: String,
    pub addr: Addr,
    pub proto: Proto,
}

/// The settings of a load run.
#[derive(Clone, Debug)]
pub struct Opts {
    pub target: Target,
    pub conns: usize,
    pub depth: usize,
    pub duration: Duration,
    pub count: Option<u64>,
    pub warmup: Duration,
    pub threads: usize,
    pub timeout: Duration,
    /// Open loop: requests per second in all.
    pub rate: Option<f64>,
    /// Open loop: a request written later than this after its due time is late.
    pub late: Duration,
    pub keys: KeySource,
    pub miss_ratio: f64,
    pub order: KeyOrder,
    pub populate: bool,
    pub populate_only: bool,
    pub idle: bool,
    pub json: bool,
    pub quiet: bool,
}

/// What the command line asks for.
pub enum Command {
    /// `--write-map FILE`: write the key set, exit.
    WriteMap {
        path: PathBuf,
        keys: KeySource,
    },
    Load(Box<Opts>),
}

/// Parses the command line; on a usage error, `--help` or `--version`,
/// prints (clap) and exits.
pub fn parse() -> Command {
    from_args(Args::parse())
}

fn from_args(a: Args) -> Command {
    let keys = KeySource {
        file: a.keys,
        keyspace: a.keyspace,
        prefix: a.prefix,
        domain: a.domain,
    };
    if let Some(path) = a.write_map {
        return Command::WriteMap { path, keys };
    }
    let target = a.target.expect("clap: TARGET required without --write-map");
    let populate = a.populate || a.populate_only;
    if populate && !matches!(target.proto, Proto::Memcached) {
        Args::command()
            .error(
                ErrorKind::ArgumentConflict,
                "--populate is for memcached: targets (fill httpmapd with --sequential -n KEYSPACE)",
            )
            .exit();
    }
    let order = match (a.sequential, a.zipf) {
        (true, _) => KeyOrder::Sequential,
        (false, Some(s)) => KeyOrder::Zipf(s),
        (false, None) => KeyOrder::Uniform,
    };
    Command::Load(Box::new(Opts {
        target,
        conns: a.connections,
        depth: a.depth,
        duration: a.duration,
        count: a.requests,
        warmup: a.warmup,
        threads: a.threads.min(a.connections),
        timeout: a.timeout,
        rate: a.rate,
        late: a.late,
        keys,
        miss_ratio: a.miss_ratio,
        order,
        populate,
        populate_only: a.populate_only,
        idle: a.idle,
        json: a.json,
        quiet: a.quiet,
    }))
}

/// A duration: humantime's syntax (`500ms`, `10s`, `1m30s`), a decimal with
/// one unit (`1.5s`, `0.5ms`), or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let bad = || format!("bad duration {s:?} (e.g. 500ms, 10s, 1m30s)");
    if let Ok(secs) = s.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).map_err(|_| bad());
    }
    if let Ok(d) = humantime::parse_duration(s) {
        return Ok(d);
    }
    let i = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .ok_or_else(bad)?;
    let (num, unit) = s.split_at(i);
    let v: f64 = num.parse().map_err(|_| bad())?;
    let scale = match unit {
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return Err(bad()),
    };
    Duration::try_from_secs_f64(v * scale).map_err(|_| bad())
}

fn parse_positive(s: &str, what: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("{what} must be a number above 0, not {s:?}")),
    }
}

fn parse_rate(s: &str) -> Result<f64, String> {
    parse_positive(s, "the rate (requests per second)")
}

fn parse_zipf(s: &str) -> Result<f64, String> {
    parse_positive(s, "the Zipf exponent")
}

fn parse_share(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("a share from 0 to 1, not {s:?}")),
    }
}

fn resolve(hostport: &str) -> Result<SocketAddr, String> {
    hostport
        .to_socket_addrs()
        .map_err(|e| format!("{hostport}: {e}"))?
        .next()
        .ok_or_else(|| format!("{hostport}: no address"))
}

/// Parses (and resolves) a TARGET.
pub fn parse_target(t: &str) -> Result<Target, String> {
    let (addr, proto) = if let Some(rest) = t.strip_prefix("tcp:") {
        (Addr::Tcp(resolve(rest)?), Proto::TcpTable)
    } else if let Some(rest) = t.strip_prefix("memcached:") {
        (Addr::Tcp(resolve(rest)?), Proto::Memcached)
    } else if let Some(rest) = t.strip_prefix("socketmap:") {
        let (addr_part, name) = rest
            .rsplit_once(':')
            .ok_or("a socketmap target needs :NAME at the end")?;
        let proto = Proto::Socketmap {
            name: name.as_bytes().to_vec(),
        };
        if let Some(hp) = addr_part.strip_prefix("inet:") {
            (Addr::Tcp(resolve(hp)?), proto)
        } else if let Some(p) = addr_part.strip_prefix("unix:") {
            (Addr::Unix(PathBuf::from(p)), proto)
        } else {
            return Err("expected socketmap:inet:... or socketmap:unix:...".into());
        }
    } else if let Some(rest) = t.strip_prefix("http:") {
        let rest = rest.strip_prefix("//").unwrap_or(rest);
        let (hp, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, "/"),
        };
        let proto = Proto::Http {
            host: hp.to_string(),
            path: path.as_bytes().to_vec(),
        };
        (Addr::Tcp(resolve(hp)?), proto)
    } else if let Some(rest) = t.strip_prefix("policy:") {
        // As Postfix writes check_policy_service: inet:HOST:PORT (or
        // HOST:PORT) and unix:PATH.
        if let Some(p) = rest.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("policy:unix: needs a socket path".into());
            }
            (Addr::Unix(PathBuf::from(p)), Proto::Policy)
        } else {
            let hp = rest.strip_prefix("inet:").unwrap_or(rest);
            (Addr::Tcp(resolve(hp)?), Proto::Policy)
        }
    } else {
        return Err("unknown target (tcp:, socketmap:, memcached:, http:, policy:)".into());
    };
    Ok(Target {
        spec: t.to_string(),
        addr,
        proto,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(args: &[&str]) -> Opts {
        let a = Args::try_parse_from(std::iter::once("httpmapd-load").chain(args.iter().copied()))
            .expect("parses");
        match from_args(a) {
            Command::Load(o) => *o,
            Command::WriteMap { .. } => panic!("write-map"),
        }
    }

    #[test]
    fn the_clap_definition_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn durations() {
        let ms = Duration::from_millis;
        assert_eq!(parse_duration("500ms"), Ok(ms(500)));
        assert_eq!(parse_duration("10s"), Ok(ms(10_000)));
        assert_eq!(parse_duration("1m30s"), Ok(ms(90_000)));
        assert_eq!(parse_duration("1.5s"), Ok(ms(1500)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("2"), Ok(ms(2000)));
        assert_eq!(parse_duration("0.25"), Ok(ms(250)));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("10q").is_err());
        assert!(parse_duration("-1").is_err());
    }

    #[test]
    fn defaults_are_the_old_ones() {
        let o = load(&["tcp:127.0.0.1:10021"]);
        assert_eq!(o.conns, 10);
        assert_eq!(o.depth, 1);
        assert_eq!(o.duration, Duration::from_secs(10));
        assert_eq!(o.count, None);
        assert_eq!(o.warmup, Duration::ZERO);
        assert_eq!(o.threads, 1);
        assert_eq!(o.timeout, Duration::from_secs(5));
        assert_eq!(o.rate, None);
        assert_eq!(o.keys.keyspace, 10_000);
        assert_eq!(o.keys.prefix, "user");
        assert_eq!(o.keys.domain, "example.com");
        assert_eq!(o.miss_ratio, 0.0);
        assert!(matches!(o.order, KeyOrder::Uniform));
        assert!(!o.populate && !o.idle && !o.json && !o.quiet);
        assert!(matches!(o.target.proto, Proto::TcpTable));
    }

    #[test]
    fn targets() {
        let t = parse_target("socketmap:inet:127.0.0.1:10020:virtual").unwrap();
        assert!(matches!(t.addr, Addr::Tcp(a) if a.port() == 10020));
        assert!(matches!(t.proto, Proto::Socketmap { ref name } if name == b"virtual"));
        let t = parse_target("socketmap:unix:/run/x.sock:access").unwrap();
        assert!(matches!(t.addr, Addr::Unix(ref p) if p == &PathBuf::from("/run/x.sock")));
        let t = parse_target("http:127.0.0.1:8080/virtual").unwrap();
        assert!(
            matches!(t.proto, Proto::Http { ref host, ref path } if host == "127.0.0.1:8080" && path == b"/virtual")
        );
        let t = parse_target("http://127.0.0.1:8080").unwrap();
        assert!(matches!(t.proto, Proto::Http { ref path, .. } if path == b"/"));
        assert!(matches!(
            parse_target("memcached:127.0.0.1:11211").unwrap().proto,
            Proto::Memcached
        ));
        let t = parse_target("policy:127.0.0.1:10040").unwrap();
        assert!(matches!(t.addr, Addr::Tcp(a) if a.port() == 10040));
        assert!(matches!(t.proto, Proto::Policy));
        let t = parse_target("policy:inet:127.0.0.1:10041").unwrap();
        assert!(matches!(t.addr, Addr::Tcp(a) if a.port() == 10041));
        let t = parse_target("policy:unix:/run/policy.sock").unwrap();
        assert!(matches!(t.addr, Addr::Unix(ref p) if p == &PathBuf::from("/run/policy.sock")));
        assert!(matches!(t.proto, Proto::Policy));
        assert!(parse_target("policy:unix:").is_err());
        assert!(parse_target("policy:127.0.0.1").is_err());
        assert!(parse_target("socketmap:tcp:1.2.3.4:5:x").is_err());
        assert!(parse_target("redis:127.0.0.1:6379").is_err());
    }

    #[test]
    fn options_as_the_scripts_write_them() {
        // benches/compare.sh and benches/profile.sh
        let o = load(&[
            "tcp:127.0.0.1:19021",
            "-c",
            "64",
            "--depth",
            "4",
            "-n",
            "1000000",
            "--sequential",
            "--keyspace",
            "1000000",
            "--timeout",
            "20s",
            "--json",
        ]);
        assert_eq!((o.conns, o.depth, o.count), (64, 4, Some(1_000_000)));
        assert!(matches!(o.order, KeyOrder::Sequential));
        assert_eq!(o.timeout, Duration::from_secs(20));
        assert!(o.json);
        let o = load(&["memcached:127.0.0.1:19211", "--populate-only", "-c", "8"]);
        assert!(o.populate && o.populate_only);
        let o = load(&["tcp:127.0.0.1:19021", "--idle", "-c", "10000", "-d", "8s"]);
        assert!(o.idle);
        let o = load(&[
            "tcp:127.0.0.1:1",
            "--rate",
            "2500.5",
            "--zipf",
            "0.99",
            "-q",
        ]);
        assert_eq!(o.rate, Some(2500.5));
        assert!(matches!(o.order, KeyOrder::Zipf(s) if s == 0.99));
        assert!(o.quiet);
        assert_eq!(o.late, Duration::from_millis(1));
    }

    #[test]
    fn usage_errors() {
        let bad = |args: &[&str]| {
            Args::try_parse_from(std::iter::once("httpmapd-load").chain(args.iter().copied()))
                .map(|_| ())
                .unwrap_err()
                .kind()
        };
        assert_eq!(bad(&[]), ErrorKind::MissingRequiredArgument);
        assert_eq!(
            bad(&["tcp:127.0.0.1:1", "--bogus"]),
            ErrorKind::UnknownArgument
        );
        assert_eq!(
            bad(&["tcp:127.0.0.1:1", "-c", "0"]),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            bad(&["tcp:127.0.0.1:1", "--rate", "0"]),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            bad(&["tcp:127.0.0.1:1", "--zipf", "-1"]),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            bad(&["tcp:127.0.0.1:1", "--miss-ratio", "1.5"]),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            bad(&["tcp:127.0.0.1:1", "--zipf", "1", "--sequential"]),
            ErrorKind::ArgumentConflict
        );
        assert_eq!(
            bad(&["tcp:127.0.0.1:1", "--late", "5ms"]),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(bad(&["nowhere:1"]), ErrorKind::ValueValidation);
        // --write-map needs no target.
        let a = Args::try_parse_from(["httpmapd-load", "--write-map", "/tmp/x"]).unwrap();
        assert!(matches!(from_args(a), Command::WriteMap { .. }));
    }
}
