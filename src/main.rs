//! The `httpmapd` command line: serve, check a config, run the demo, run the
//! sample backend alone, or query a table like `postmap -q`.

use httpmapd::client::{self, Client, Reply};
use httpmapd::{config, daemon, demo_backend};
use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "\
usage:
  httpmapd -c FILE             serve in the foreground
  httpmapd -c FILE --check     validate FILE; print FILE:LINE: message; exit 1 on problems
  httpmapd demo [-c FILE] [--map FILE] [--backend ADDR]
                               start the bundled sample backend (default conf/demo.map on
                               127.0.0.1:8080) and serve conf/httpmapd.toml in front of it
  httpmapd backend [--listen ADDR] [--map FILE]
                               run only the sample dict_http backend
  httpmapd query TABLE KEY...  look KEYs up like `postmap -q` (KEY `-`: one key per line
                               on stdin); TABLE is tcp:HOST:PORT,
                               socketmap:inet:HOST:PORT:NAME or socketmap:unix:PATH:NAME.
                               Exit 0 found, 1 not found, 2 error
  httpmapd --version";

const DEFAULT_CONFIG: &str = "conf/httpmapd.toml";
const DEFAULT_DEMO_MAP: &str = "conf/demo.map";
const DEFAULT_BACKEND_ADDR: &str = "127.0.0.1:8080";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("httpmapd: {msg}");
            ExitCode::from(2)
        }
    }
}

/// Takes the value of a `-x VALUE` option.
fn value<'a>(it: &mut impl Iterator<Item = &'a String>, opt: &str) -> Result<String, String> {
    it.next()
        .cloned()
        .ok_or_else(|| format!("{opt} needs a value\n{USAGE}"))
}

fn run(args: &[String]) -> Result<ExitCode, String> {
    match args.first().map(String::as_str) {
        Some("demo") => return demo(&args[1..]),
        Some("backend") => return backend(&args[1..]),
        Some("query") => return query(&args[1..]),
        Some("--version" | "-V") => {
            println!("httpmapd {}", env!("CARGO_PKG_VERSION"));
            return Ok(ExitCode::SUCCESS);
        }
        Some("--help" | "-h") => {
            println!("{USAGE}");
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    let mut cfg_path = None;
    let mut check = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-c" | "--config" => cfg_path = Some(PathBuf::from(value(&mut it, a)?)),
            "--check" => check = true,
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let Some(cfg_path) = cfg_path else {
        return Err(format!("missing -c FILE\n{USAGE}"));
    };
    serve(&cfg_path, check)
}

fn serve(cfg_path: &std::path::Path, check: bool) -> Result<ExitCode, String> {
    let cfg = match config::load(cfg_path) {
        Ok(c) => c,
        Err(errs) => {
            for e in &errs.0 {
                eprintln!("{e}");
            }
            return Ok(ExitCode::from(1));
        }
    };
    if check {
        println!("{}: ok ({} map(s))", cfg_path.display(), cfg.maps.len());
        return Ok(ExitCode::SUCCESS);
    }
    daemon::run(cfg, cfg_path.to_path_buf())?;
    Ok(ExitCode::SUCCESS)
}

fn demo(args: &[String]) -> Result<ExitCode, String> {
    let mut cfg_path = PathBuf::from(DEFAULT_CONFIG);
    let mut map = PathBuf::from(DEFAULT_DEMO_MAP);
    let mut addr = DEFAULT_BACKEND_ADDR.to_string();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-c" | "--config" => cfg_path = PathBuf::from(value(&mut it, a)?),
            "--map" => map = PathBuf::from(value(&mut it, a)?),
            "--backend" => addr = value(&mut it, a)?,
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let m = demo_backend::DemoMap::load(&map)?;
    demo_backend::spawn(&addr, m).map_err(|e| format!("demo backend on {addr}: {e}"))?;
    serve(&cfg_path, false)
}

fn backend(args: &[String]) -> Result<ExitCode, String> {
    let mut map = PathBuf::from(DEFAULT_DEMO_MAP);
    let mut addr = DEFAULT_BACKEND_ADDR.to_string();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--map" => map = PathBuf::from(value(&mut it, a)?),
            "--listen" => addr = value(&mut it, a)?,
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let m = demo_backend::DemoMap::load(&map)?;
    demo_backend::spawn(&addr, m).map_err(|e| format!("demo backend on {addr}: {e}"))?;
    loop {
        std::thread::park();
    }
}

fn query(args: &[String]) -> Result<ExitCode, String> {
    let [table, keys @ ..] = args else {
        return Err(format!("query needs a TABLE and at least one KEY\n{USAGE}"));
    };
    if keys.is_empty() {
        return Err(format!("query needs at least one KEY\n{USAGE}"));
    }
    let table = client::parse_table(table)?;
    let mut c =
        Client::connect(table.clone()).map_err(|e| format!("cannot connect to {table:?}: {e}"))?;
    let mut all: Vec<String> = Vec::new();
    let many = keys.len() > 1 || keys[0] == "-";
    for k in keys {
        if k == "-" {
            for line in std::io::stdin().lock().lines() {
                all.push(line.map_err(|e| format!("stdin: {e}"))?);
            }
        } else {
            all.push(k.clone());
        }
    }
    let mut found_any = false;
    for key in &all {
        match c
            .query(key.as_bytes())
            .map_err(|e| format!("query error: {key}: {e}"))?
        {
            Reply::Found(v) => {
                found_any = true;
                let v = String::from_utf8_lossy(&v);
                if many {
                    println!("{key}\t{v}");
                } else {
                    println!("{v}");
                }
            }
            Reply::NotFound => {}
            Reply::Temp(t) => return Err(format!("query error: {key}: temporary error: {t}")),
            Reply::Perm(t) => return Err(format!("query error: {key}: configuration error: {t}")),
        }
    }
    Ok(if found_any {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
