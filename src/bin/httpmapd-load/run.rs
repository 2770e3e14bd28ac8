//! A phase of the load: its plan (options, key set and key choice, the
//! `-n` budget or the open-loop schedule) shared by `--threads` event loops
//! (`event_loop.rs`), started together once every connection is up; the
//! progress line printed while they run; what they counted merged into a
//! [`Report`].

use crate::cli::Opts;
use crate::event_loop::run_thread;
use crate::keys::{Chooser, KeyOrder, Keys};
use crate::proto::Op;
use crate::report::{self, OpenLoop, Report};
use crate::schedule::Schedule;
use crate::stats::{Counts, Shared};
use std::sync::atomic::AtomicI64;
use std::sync::Barrier;
use std::time::{Duration, Instant};

/// What every thread of a phase shares.
pub struct Plan<'a> {
    pub opts: &'a Opts,
    pub op: Op,
    pub keys: &'a Keys,
    pub chooser: Chooser,
    /// Closed loop with `-n`: requests still to send once measuring starts.
    pub budget: Option<AtomicI64>,
    /// Open loop.
    pub schedule: Option<Schedule>,
    pub barrier: Barrier,
    pub shared: Shared,
}

/// What one thread hands back.
pub struct ThreadResult {
    pub counts: Counts,
    /// The last measured answer.
    pub last: Option<Instant>,
    pub open_conns: usize,
    /// Open loop: measured requests never sent, and sent but unanswered at the end.
    pub never_sent: u64,
    pub unanswered: u64,
}

/// One phase: `opts.threads` event loops over `opts.conns` connections,
/// `count` measured requests or `opts.duration`.
pub fn run_phase(opts: &Opts, op: Op, keys: &Keys, count: Option<u64>) -> Report {
    let order = if keys.len() == 0 {
        KeyOrder::Uniform
    } else {
        opts.order
    };
    // (`--idle` conflicts with `--rate`: an idle phase has no schedule.)
    let schedule = opts
        .rate
        .map(|rate| Schedule::new(rate, opts.conns, opts.warmup, opts.duration, count));
    let plan = Plan {
        opts,
        op,
        keys,
        chooser: Chooser::new(keys.len(), order),
        budget: match (&schedule, count) {
            (None, Some(n)) => Some(AtomicI64::new(n as i64)),
            _ => None,
        },
        schedule,
        barrier: Barrier::new(opts.threads),
        shared: Shared::new(),
    };
    let per = opts.conns / opts.threads;
    let extra = opts.conns % opts.threads;
    let results: Vec<ThreadResult> = std::thread::scope(|s| {
        let mut gid = 0;
        let handles: Vec<_> = (0..opts.threads)
            .map(|t| {
                let n = per + usize::from(t < extra);
                let plan = &plan;
                let base = gid;
                gid += n;
                s.spawn(move || run_thread(plan, n, base, 0x5eed + t as u64))
            })
            .collect();
        if !opts.quiet && !opts.idle {
            report::watch(&plan.shared, opts.warmup, &|| {
                handles.iter().all(|h| h.is_finished())
            });
        }
        handles
            .into_iter()
            .map(|h| h.join().expect("load thread"))
            .collect()
    });
    let mut counts = Counts::default();
    let mut open_conns = 0;
    let mut last = None::<Instant>;
    let (mut never_sent, mut unanswered) = (0, 0);
    for r in &results {
        counts.add(&r.counts);
        open_conns += r.open_conns;
        last = last.max(r.last);
        never_sent += r.never_sent;
        unanswered += r.unanswered;
    }
    let elapsed = match (count, plan.shared.start.get()) {
        // From the end of warm-up to the last answer.
        (Some(_), Some(&start)) => last.map_or(Duration::ZERO, |l| {
            l.saturating_duration_since(start + opts.warmup)
        }),
        (Some(_), None) => Duration::ZERO,
        (None, _) => opts.duration,
    };
    let open_loop = plan.schedule.as_ref().map(|s| OpenLoop {
        target_rps: s.rate(),
        late_bound: opts.late,
        never_sent,
        unanswered,
    });
    let hist = plan
        .shared
        .hist
        .into_inner()
        .unwrap_or_else(|e| e.into_inner());
    Report {
        target: opts.target.spec.clone(),
        op,
        conns: opts.conns,
        depth: if opts.idle { 0 } else { opts.depth },
        threads: opts.threads,
        keys: keys.len(),
        order,
        elapsed,
        hist,
        counts,
        open_conns,
        open_loop,
    }
}
