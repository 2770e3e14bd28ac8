//! Everything the load generator writes. The final report ([`Report`]: text,
//! or one JSON object with `--json`) on stdout; the progress line once a
//! second ([`watch`]) and messages ([`warn`]) on stderr. Rust ignores
//! SIGPIPE, so a closed stdout (`httpmapd-load ... | head -1`) makes writes
//! fail with `BrokenPipe`: the report then stops and the process exits 0
//! quietly; stderr errors are ignored. Nothing here panics on a write.

use crate::keys::KeyOrder;
use crate::proto::Op;
use crate::stats::{Counts, Shared};
use hdrhistogram::Histogram;
use std::io::{self, Write};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// The open-loop part of a report (`--rate`); the measured requests written
/// and how many of them were late are the report's `counts.sent` and
/// `counts.late`.
#[derive(Clone, Copy, Debug)]
pub struct OpenLoop {
    pub target_rps: f64,
    /// A request written more than this after its due time is late.
    pub late_bound: Duration,
    /// Measured requests due but never written before the end.
    pub never_sent: u64,
    /// Written but unanswered when the run ended.
    pub unanswered: u64,
}

/// What a phase measured.
pub struct Report {
    pub target: String,
    pub op: Op,
    pub conns: usize,
    pub depth: usize,
    pub threads: usize,
    pub keys: usize,
    pub order: KeyOrder,
    /// The measured window: `--duration`, or (with `-n`) from the end of
    /// warm-up to the last answer.
    pub elapsed: Duration,
    /// Latencies in nanoseconds.
    pub hist: Histogram<u64>,
    pub counts: Counts,
    pub open_conns: usize,
    pub open_loop: Option<OpenLoop>,
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

/// A rate in requests per second to `digits` significant digits (the
/// whole part at least), trailing zeros dropped: `100`, `0.5`, `2500.5`.
fn rate_text(rps: f64, digits: i32) -> String {
    if !(rps.is_finite() && rps > 0.0) {
        return format!("{rps:.0}");
    }
    let decimals = (digits - 1 - rps.log10().floor() as i32).clamp(0, 9) as usize;
    let t = format!("{rps:.decimals$}");
    if t.contains('.') {
        t.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        t
    }
}

impl Report {
    fn secs(&self) -> f64 {
        self.elapsed.as_secs_f64().max(1e-9)
    }

    fn q(&self, p: f64) -> f64 {
        us(self.hist.value_at_quantile(p))
    }

    pub fn json(&self) -> serde_json::Value {
        let c = &self.counts;
        let n = c.answered();
        let secs = self.secs();
        let (order, zipf) = match self.order {
            KeyOrder::Uniform => ("uniform", None),
            KeyOrder::Sequential => ("sequential", None),
            KeyOrder::Zipf(s) => ("zipf", Some(s)),
        };
        let rate = self.open_loop.map(|o| {
            serde_json::json!({
                "target_rps": o.target_rps,
                "sent": c.sent,
                "sent_rps": c.sent as f64 / secs,
                "late": c.late,
                "late_bound_us": o.late_bound.as_secs_f64() * 1e6,
                "never_sent": o.never_sent,
                "unanswered": o.unanswered,
            })
        });
        serde_json::json!({
            "target": self.target,
            "op": self.op.name(),
            "mode": if self.open_loop.is_some() { "open" } else { "closed" },
            "connections": self.conns,
            "open_connections": self.open_conns,
            "depth": self.depth,
            "threads": self.threads,
            "keys": self.keys,
            "key_order": order,
            "zipf_s": zipf,
            "seconds": secs,
            "requests": n,
            "throughput_rps": n as f64 / secs,
            "rate": rate,
            "latency_us": {
                "p50": self.q(0.5), "p90": self.q(0.9), "p99": self.q(0.99),
                "p999": self.q(0.999), "max": us(self.hist.max()),
                "mean": self.hist.mean() / 1000.0,
            },
            "found": c.found,
            "not_found": c.not_found,
            "stored": c.stored,
            "errors": {
                "connect": c.connect_errors,
                "timeout": c.timeouts,
                "protocol": c.protocol_errors,
                "closed": c.closed,
                "temporary": c.temp,
                "permanent": c.perm,
            },
        })
    }

    pub fn text(&self) -> String {
        let c = &self.counts;
        let n = c.answered();
        let secs = self.secs();
        let order = match self.order {
            KeyOrder::Uniform => "uniform".to_string(),
            KeyOrder::Sequential => "in order".to_string(),
            KeyOrder::Zipf(s) => format!("zipf {s}"),
        };
        let mut t = format!(
            "{}  op={} connections={} (open {}) depth={} threads={} keys={} ({order})\n",
            self.target,
            self.op.name(),
            self.conns,
            self.open_conns,
            self.depth,
            self.threads,
            self.keys,
        );
        t += &format!(
            "  {n} requests in {secs:.2}s: {:.0} req/s  (found {}, not found {}{})\n",
            n as f64 / secs,
            c.found,
            c.not_found,
            if c.stored > 0 {
                format!(", stored {}", c.stored)
            } else {
                String::new()
            }
        );
        if let Some(o) = &self.open_loop {
            t += &format!(
                "  open loop: target {} req/s, sent {} req/s ({} requests); {} sent over {} late, \
                 {} never sent, {} unanswered at the end\n",
                rate_text(o.target_rps, 6),
                rate_text(c.sent as f64 / secs, 3),
                c.sent,
                c.late,
                humantime::format_duration(o.late_bound),
                o.never_sent,
                o.unanswered,
            );
        }
        t += &format!(
            "  latency us{}: p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}\n",
            if self.open_loop.is_some() {
                " (from the due time)"
            } else {
                ""
            },
            self.q(0.5),
            self.q(0.9),
            self.q(0.99),
            self.q(0.999),
            us(self.hist.max())
        );
        t += &format!(
            "  errors: connect {}  timeout {}  protocol {}  closed {}  temporary {}  permanent {}\n",
            c.connect_errors, c.timeouts, c.protocol_errors, c.closed, c.temp, c.perm
        );
        t
    }

    /// Prints the report on stdout: text, or one JSON line.
    pub fn print(&self, json: bool) {
        if json {
            out(&format!("{}\n", self.json()));
        } else {
            out(&self.text());
        }
    }
}

/// Writes to stdout. A closed stdout (the reader went away) ends the
/// process quietly with status 0; another write error with status 1.
pub fn out(text: &str) {
    let mut o = io::stdout().lock();
    if let Err(e) = o.write_all(text.as_bytes()).and_then(|()| o.flush()) {
        if e.kind() == io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        warn(&format!("stdout: {e}"));
        std::process::exit(1);
    }
}

/// A line on stderr, `httpmapd-load: ` first; write errors are ignored.
pub fn warn(msg: &str) {
    let _ = writeln!(io::stderr().lock(), "httpmapd-load: {msg}");
}

/// The progress line for second `sec` of the load.
pub fn progress_line(sec: u64, warmup: bool, answers: u64, p99_ns: u64, errors: u64) -> String {
    format!(
        "{sec:>4}s{} {answers:>9} req/s  p99 {:.1} us  errors {errors}",
        if warmup { " warm-up" } else { "" },
        us(p99_ns),
    )
}

/// While the phase's threads run (`done` false), prints one progress line
/// a second on stderr: answers in that second, the p99 of the measured
/// answers so far, the errors so far.
pub fn watch(shared: &Shared, warmup: Duration, done: &dyn Fn() -> bool) {
    const STEP: Duration = Duration::from_millis(25);
    let start = loop {
        if done() {
            return;
        }
        if let Some(&s) = shared.start.get() {
            break s;
        }
        std::thread::sleep(STEP);
    };
    let mut sec = 1u64;
    let mut answers_before = 0;
    loop {
        let next = start + Duration::from_secs(sec);
        loop {
            if done() {
                return;
            }
            let now = Instant::now();
            if now >= next {
                break;
            }
            std::thread::sleep(STEP.min(next - now));
        }
        let answers = shared.answers.load(Ordering::Relaxed);
        let line = progress_line(
            sec,
            Duration::from_secs(sec) <= warmup,
            answers - answers_before,
            shared.p99(),
            shared.errors.load(Ordering::Relaxed),
        );
        warn(&line);
        answers_before = answers;
        sec += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::new_hist;

    fn report(open_loop: Option<OpenLoop>) -> Report {
        let mut hist = new_hist();
        for ns in [10_000, 20_000, 30_000, 40_000] {
            hist.record(ns).unwrap();
        }
        Report {
            target: "tcp:127.0.0.1:1".into(),
            op: Op::Get,
            conns: 2,
            depth: 1,
            threads: 1,
            keys: 7,
            order: KeyOrder::Zipf(0.99),
            elapsed: Duration::from_secs(2),
            hist,
            counts: Counts {
                found: 3,
                not_found: 1,
                timeouts: 2,
                ..Counts::default()
            },
            open_conns: 2,
            open_loop,
        }
    }

    #[test]
    fn json_fields() {
        let j = report(None).json();
        assert_eq!(j["requests"], 4);
        assert_eq!(j["throughput_rps"], 2.0);
        assert_eq!(j["mode"], "closed");
        assert!(j["rate"].is_null());
        assert_eq!(j["key_order"], "zipf");
        assert_eq!(j["zipf_s"], 0.99);
        assert_eq!(j["errors"]["timeout"], 2);
        for k in ["p50", "p90", "p99", "p999", "max", "mean"] {
            assert!(j["latency_us"][k].is_f64(), "{k}");
        }
        assert_eq!(j["latency_us"]["max"].as_f64().unwrap().round(), 40.0);
        let mut r = report(Some(OpenLoop {
            target_rps: 100.0,
            late_bound: Duration::from_millis(1),
            never_sent: 195,
            unanswered: 1,
        }));
        (r.counts.sent, r.counts.late) = (5, 1);
        let j = r.json();
        assert_eq!(j["mode"], "open");
        assert_eq!(j["rate"]["target_rps"], 100.0);
        assert_eq!(j["rate"]["sent_rps"], 2.5);
        assert_eq!(j["rate"]["sent"], 5);
        assert_eq!(j["rate"]["late"], 1);
        assert_eq!(j["rate"]["never_sent"], 195);
        assert_eq!(j["rate"]["late_bound_us"], 1000.0);
    }

    #[test]
    fn rates_keep_their_fractions() {
        let cases = [
            (100.0, 6, "100"),
            (0.5, 6, "0.5"),
            (2500.5, 6, "2500.5"),
            (1.0 / 3.0, 6, "0.333333"),
            (0.001, 6, "0.001"),
            (1e9 / (1e9 / 2500.5), 6, "2500.5"),
            (250_000.0, 6, "250000"),
            (49.5, 3, "49.5"),
            (0.75, 3, "0.75"),
            (19_987.4, 3, "19987"),
            (0.0, 3, "0"),
        ];
        for (rps, digits, want) in cases {
            assert_eq!(rate_text(rps, digits), want, "{rps}");
        }
    }

    #[test]
    fn text() {
        let t = report(None).text();
        assert!(
            t.contains("  4 requests in 2.00s: 2 req/s  (found 3, not found 1)\n"),
            "{t}"
        );
        assert!(t.contains("keys=7 (zipf 0.99)"), "{t}");
        assert!(
            t.contains("errors: connect 0  timeout 2  protocol 0"),
            "{t}"
        );
        let mut r = report(Some(OpenLoop {
            target_rps: 0.5,
            late_bound: Duration::from_millis(1),
            never_sent: 0,
            unanswered: 1,
        }));
        (r.counts.sent, r.counts.late) = (3, 0);
        let t = r.text();
        assert!(
            t.contains("  open loop: target 0.5 req/s, sent 1.5 req/s (3 requests); 0 sent over 1ms late, 0 never sent, 1 unanswered at the end\n"),
            "{t}"
        );
        assert_eq!(
            progress_line(3, false, 251234, 412_300, 0),
            "   3s    251234 req/s  p99 412.3 us  errors 0"
        );
        assert_eq!(
            progress_line(1, true, 5, 0, 2),
            "   1s warm-up         5 req/s  p99 0.0 us  errors 2"
        );
    }
}
