//! Pure codecs over byte slices: no sockets, no clocks, no allocation beyond
//! the output buffers the caller hands in. Every decoder has an explicit limit.
//!
//! - [`hex`]: Postfix's `%XX` quoting (tcp_table keys and values).
//! - [`tcp_table`]: `get KEY\n` requests and `NNN text\n` replies.
//! - [`netstring`]: socketmap requests and replies.
//! - [`http`]: HTTP/1.1 request writing, response head parsing, body framing.
//! - [`policy`]: Postfix policy delegation requests and replies.
//! - [`resp`]: the Redis protocol (RESP2/RESP3): commands out, replies and pushes in.

pub mod hex;
pub mod http;
pub mod netstring;
pub mod policy;
pub mod resp;
pub mod tcp_table;
