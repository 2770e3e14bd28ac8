//! The `[cache]` section: the cache's bounds (entries and bytes) and the
//! default lifetimes every map inherits.

use super::raw::{Ctx, RawCache};
use super::{
    Cache, DEFAULT_MAX_ENTRIES, DEFAULT_MAX_MEMORY_BYTES, DEFAULT_NEGATIVE_TTL, DEFAULT_STALE_TTL,
    DEFAULT_TTL,
};

/// The smallest `max_memory` accepted.
const MIN_MAX_MEMORY_BYTES: usize = 1 << 20;

pub(super) fn cache(cx: &mut Ctx<'_>, c: Option<RawCache>) -> Cache {
    let c = c.unwrap_or_default();
    let refresh_ahead_percent = match c.refresh_ahead {
        None => 10,
        Some(v) => match v
            .get_ref()
            .trim()
            .strip_suffix('%')
            .and_then(|n| n.trim().parse::<u32>().ok())
        {
            Some(p) if p < 100 => p,
            _ => {
                cx.err(
                    v.span().start,
                    "refresh_ahead: expected a percentage such as \"10%\" (0% = off)",
                );
                10
            }
        },
    };
    let max_memory_at = c.max_memory.as_ref().map_or(0, |v| v.span().start);
    let max_memory = cx.size("max_memory", c.max_memory, DEFAULT_MAX_MEMORY_BYTES);
    if max_memory < MIN_MAX_MEMORY_BYTES {
        cx.err(max_memory_at, "max_memory: at least 1MiB");
    }
    Cache {
        max_memory,
        stale_negative: c.stale_negative.unwrap_or(false),
        max_entries: cx.count(
            "max_entries",
            c.max_entries,
            1,
            1 << 32,
            DEFAULT_MAX_ENTRIES,
        ),
        ttl: cx.duration("ttl", c.ttl, DEFAULT_TTL),
        negative_ttl: cx.duration("negative_ttl", c.negative_ttl, DEFAULT_NEGATIVE_TTL),
        stale_ttl: cx.duration("stale_ttl", c.stale_ttl, DEFAULT_STALE_TTL),
        refresh_ahead_percent,
    }
}
