//! httpmapd-load: a load generator for Postfix lookup tables and policy
//! services, so httpmapd and its peers (memcached, an HTTP server asked
//! directly) are measured with the same client. This file owns the order of a run: the command
//! line, the key set, `--write-map`, `--idle`, the memcached `--populate`
//! phase, the load phase, its report and the exit status (0; 1 when nothing
//! was answered and there were errors; 2 for a usage or key-file error).
//!
//! Modules: `cli` (options, TARGET and duration syntax), `keys` (the key set
//! and key choice) with `zipf` (the Zipf sampler), `proto` (request and
//! reply bytes per target), `conn` (one connection), `schedule` (the
//! open-loop schedule), `timer` (its precise wake-up), `event_loop` (one
//! thread's connections), `run` (a phase: the threads together), `stats` (counters, histograms, what threads share),
//! `report` (stdout and stderr).

mod cli;
mod conn;
mod event_loop;
mod keys;
mod proto;
mod report;
mod run;
mod schedule;
mod stats;
mod timer;
mod zipf;

use cli::Command;
use keys::KeyOrder;
use proto::Op;
use std::time::Duration;

fn raise_nofile(want: u64) {
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < want {
            r.rlim_cur = want.min(r.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

fn fail(msg: &str) -> ! {
    report::warn(msg);
    std::process::exit(2);
}

fn main() {
    let opts = match cli::parse() {
        Command::WriteMap { path, keys } => {
            let k = keys::load(&keys).unwrap_or_else(|e| fail(&e));
            keys::write_map(&k, &path).unwrap_or_else(|e| fail(&e));
            report::warn(&format!("wrote {} keys to {}", k.len(), path.display()));
            return;
        }
        Command::Load(o) => *o,
    };
    raise_nofile(opts.conns as u64 + 64);
    if opts.idle {
        let r = run::run_phase(&opts, Op::Get, &keys::Keys::default(), None);
        r.print(opts.json);
        return;
    }
    let keys = keys::load(&opts.keys).unwrap_or_else(|e| fail(&e));
    if opts.populate {
        let mut p = opts.clone();
        p.conns = opts.conns.clamp(1, 8);
        p.threads = 1;
        p.depth = 64;
        p.warmup = Duration::ZERO;
        p.order = KeyOrder::Sequential;
        p.miss_ratio = 0.0;
        p.rate = None;
        let r = run::run_phase(&p, Op::Set, &keys, Some(keys.len() as u64));
        if opts.populate_only || !opts.json {
            r.print(opts.json);
        }
        if opts.populate_only {
            return;
        }
    }
    let r = run::run_phase(&opts, Op::Get, &keys, opts.count);
    r.print(opts.json);
    let c = &r.counts;
    if c.connect_errors + c.timeouts + c.protocol_errors + c.closed > 0 && c.answered() == 0 {
        std::process::exit(1);
    }
}
