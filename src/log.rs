//! Logging to stderr, one line per event, for journald or a terminal.
//!
//! This module owns the global log level and the line format. On a terminal
//! or a file a line is `httpmapd: LEVEL: message` (with `log_timestamps`, an
//! RFC 3339 time first). When stderr is the journal (`JOURNAL_STREAM` names
//! its device and inode, as systemd sets it), a line is `<N>LEVEL: message`:
//! `<N>` is its sd-daemon priority (3 error, 4 warning, 6 info, 7 debug),
//! which journald strips and keeps as the priority (and as the syslog
//! severity, facility mail with the unit's `SyslogFacility=mail`); the
//! unit's `SyslogIdentifier` names the program. It must never be given
//! secrets (request headers from the config) and is not for per-lookup
//! lines except at debug.
//! [`RateLimit`] keeps a repeating event (a value too long, a stale answer)
//! to at most one line per interval.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error = 0,
    Warn = 1,
    Info = 2,
    Debug = 3,
}

impl Level {
    pub fn parse(s: &str) -> Option<Level> {
        match s {
            "error" => Some(Level::Error),
            "warn" | "warning" => Some(Level::Warn),
            "info" => Some(Level::Info),
            "debug" => Some(Level::Debug),
            _ => None,
        }
    }
    /// The sd-daemon / syslog priority of the level.
    fn priority(self) -> u8 {
        match self {
            Level::Error => 3,
            Level::Warn => 4,
            Level::Info => 6,
            Level::Debug => 7,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warn => "warning",
            Level::Info => "info",
            Level::Debug => "debug",
        }
    }
}

static LEVEL: AtomicU8 = AtomicU8::new(Level::Info as u8);

pub fn set_level(l: Level) {
    LEVEL.store(l as u8, Ordering::Relaxed);
}

pub fn enabled(l: Level) -> bool {
    (l as u8) <= LEVEL.load(Ordering::Relaxed)
}

static JOURNAL: AtomicBool = AtomicBool::new(false);
static TIMESTAMPS: AtomicBool = AtomicBool::new(false);

/// Chooses the line format, once at start: journal prefixes when stderr is
/// the journal, else plain lines, with the time first if `timestamps`.
pub fn init(timestamps: bool) {
    JOURNAL.store(stderr_is_journal(), Ordering::Relaxed);
    set_timestamps(timestamps);
}

/// `log_timestamps` as a reload sets it (stderr is still where it was).
pub fn set_timestamps(timestamps: bool) {
    TIMESTAMPS.store(timestamps, Ordering::Relaxed);
}

/// Whether `JOURNAL_STREAM` (`DEVICE:INODE`) names stderr itself (not a
/// descriptor inherited by a program started from the unit with stderr
/// redirected elsewhere).
fn stderr_is_journal() -> bool {
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    // SAFETY: fstat on fd 2 with a zeroed, properly sized stat buffer.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(2, &mut st) == 0 && st.st_dev as u64 == dev && st.st_ino as u64 == ino
    }
}

/// One log line as written (without the newline).
fn format_line(
    l: Level,
    args: std::fmt::Arguments<'_>,
    journal: bool,
    time: Option<String>,
) -> String {
    if journal {
        format!("<{}>{}: {}", l.priority(), l.name(), args)
    } else if let Some(t) = time {
        format!("{t} httpmapd: {}: {}", l.name(), args)
    } else {
        format!("httpmapd: {}: {}", l.name(), args)
    }
}

/// Writes one line; use the macros.
pub fn write(l: Level, args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let journal = JOURNAL.load(Ordering::Relaxed);
    let time = (!journal && TIMESTAMPS.load(Ordering::Relaxed))
        .then(|| humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string());
    let mut line = format_line(l, args, journal, time);
    line.push('\n');
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

#[macro_export]
macro_rules! log_at {
    ($lvl:expr, $($arg:tt)*) => {
        if $crate::log::enabled($lvl) { $crate::log::write($lvl, format_args!($($arg)*)) }
    };
}
#[macro_export]
macro_rules! error { ($($arg:tt)*) => { $crate::log_at!($crate::log::Level::Error, $($arg)*) }; }
#[macro_export]
macro_rules! warn { ($($arg:tt)*) => { $crate::log_at!($crate::log::Level::Warn, $($arg)*) }; }
#[macro_export]
macro_rules! info { ($($arg:tt)*) => { $crate::log_at!($crate::log::Level::Info, $($arg)*) }; }
#[macro_export]
macro_rules! debug { ($($arg:tt)*) => { $crate::log_at!($crate::log::Level::Debug, $($arg)*) }; }

/// Lets an event through at most once per `interval`, counting the ones held back.
pub struct RateLimit {
    interval_ms: u64,
    /// Milliseconds since `epoch` of the last line let through, plus one (0 = never).
    last_ms: AtomicU64,
    suppressed: AtomicU64,
}

fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl RateLimit {
    pub const fn new(interval: Duration) -> RateLimit {
        RateLimit {
            interval_ms: interval.as_millis() as u64,
            last_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }
    /// `Some(n)` when a line may be written now (`n` = lines held back since the last one).
    pub fn check(&self) -> Option<u64> {
        let now = epoch().elapsed().as_millis() as u64 + 1;
        let last = self.last_ms.load(Ordering::Relaxed);
        if last != 0 && now < last + self.interval_ms {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if self
            .last_ms
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_formats() {
        let f = |l, journal, time: Option<&str>| {
            format_line(
                l,
                format_args!("x {}", 1),
                journal,
                time.map(str::to_string),
            )
        };
        assert_eq!(f(Level::Warn, false, None), "httpmapd: warning: x 1");
        assert_eq!(f(Level::Error, true, None), "<3>error: x 1");
        assert_eq!(f(Level::Warn, true, None), "<4>warning: x 1");
        assert_eq!(f(Level::Info, true, None), "<6>info: x 1");
        assert_eq!(f(Level::Debug, true, None), "<7>debug: x 1");
        assert_eq!(
            f(Level::Info, false, Some("2026-12-03T11:00:00.000Z")),
            "2026-12-03T11:00:00.000Z httpmapd: info: x 1"
        );
    }
}
