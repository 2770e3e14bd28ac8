//! A client connection (tcp_table or socketmap): reading and framing
//! requests, answers kept in request order, backpressure (reading stops when
//! too much is owed and resumes when it drains, whatever stopped it), bad
//! requests, and encoding answers in the session's protocol.

use super::*;

pub(super) enum Slot {
    Waiting,
    Ready(Vec<u8>),
}

#[derive(PartialEq, Eq)]
pub(super) enum SessionState {
    Open,
    /// Answer what is owed, flush, then close (bad framing, over-long line).
    Closing,
}

pub(super) struct Session {
    pub(super) stream: Stream,
    pub(super) proto: Proto,
    /// The client's address (None: a Unix socket client), for log lines.
    pub(super) peer: Option<std::net::SocketAddr>,
    pub(super) gen: u64,
    pub(super) state: SessionState,
    pub(super) rbuf: Vec<u8>,
    pub(super) wbuf: Vec<u8>,
    pub(super) wpos: usize,
    /// Answers owed, in request order: `pending[i]` is request `first_seq + i`.
    pub(super) pending: VecDeque<Slot>,
    /// Bytes of the `Slot::Ready` answers in `pending`.
    pub(super) queued_bytes: usize,
    pub(super) first_seq: u64,
    pub(super) next_seq: u64,
    /// Reading stopped for backpressure; resume when answers drain.
    pub(super) paused: bool,
    /// The client closed its side.
    pub(super) eof: bool,
    /// An event said the client closed its side: read until EOF.
    pub(super) drain_to_eof: bool,
}

impl Session {
    /// Bytes of answers owed: unsent in the write buffer, and ready behind
    /// a lookup still awaited.
    pub(super) fn owed_bytes(&self) -> usize {
        self.wbuf.len() - self.wpos + self.queued_bytes
    }

    /// Whether reading must stop until answers drain.
    pub(super) fn over_mark(&self) -> bool {
        self.pending.len() >= MAX_PENDING_PER_SESSION || self.owed_bytes() >= MAX_WRITE_BUFFER_BYTES
    }

    /// Whether a paused session has drained enough to read again.
    pub(super) fn under_resume_mark(&self) -> bool {
        self.pending.len() < MAX_PENDING_PER_SESSION / 2
            && self.owed_bytes() < MAX_WRITE_BUFFER_BYTES / 2
    }

    /// Takes the next request's sequence number: the waiter that request's
    /// answer is addressed to (worker, session slot and generation, seq).
    pub(super) fn next_waiter(&mut self, worker: u32, sid: usize) -> Waiter {
        let seq = self.next_seq;
        self.next_seq += 1;
        Waiter {
            worker,
            session: sid as u32,
            gen: self.gen,
            seq,
        }
    }

    /// Answers the session's newest request (its sequence number already
    /// taken) at once: straight into the write buffer when nothing is owed
    /// before it, else queued behind the answers still awaited.
    pub(super) fn emit(&mut self, encode: impl FnOnce(&mut Vec<u8>)) {
        if self.pending.is_empty() {
            self.first_seq = self.next_seq;
            encode(&mut self.wbuf);
        } else {
            let mut v = Vec::new();
            encode(&mut v);
            self.queued_bytes += v.len();
            self.pending.push_back(Slot::Ready(v));
        }
    }
}

impl Worker {
    pub(super) fn read_limit(&self, proto: Proto) -> usize {
        match proto {
            Proto::TcpTable { .. } => self.max_line(),
            Proto::Socketmap { max_query, .. } => max_query as usize + NETSTRING_OVERHEAD_BYTES,
            // One byte more than a request may have: the codec then sees
            // the request is too long (a full buffer it would call incomplete).
            Proto::Policy { max_request, .. } => max_request as usize + 1,
        }
    }

    pub(super) fn session_event(&mut self, sid: usize, read_closed: bool, now: Instant) {
        let Some(s) = self.sessions.get_mut(sid) else {
            return;
        };
        // The client's FIN is queued behind its data: read to the end, or
        // the short-read shortcut below would never see the EOF (no new
        // edge comes for it).
        s.drain_to_eof |= read_closed;
        if !self.flush(sid) {
            return;
        }
        self.resume_if_drained(sid, now);
        self.read_session(sid, now);
    }

    /// A session paused for backpressure reads again once its answers
    /// drained below the resume mark (whatever made it pause: a slow
    /// lookup, a client slow to read, a burst of large cache hits).
    pub(super) fn resume_if_drained(&mut self, sid: usize, now: Instant) {
        let Some(s) = self.sessions.get_mut(sid) else {
            return;
        };
        if s.paused && s.under_resume_mark() {
            s.paused = false;
            // Requests already read wait in the buffer: serve them first
            // (no new edge will come for them).
            self.serve(sid, now);
        }
    }

    /// Reads and serves requests until the socket is drained, the session
    /// is paused for backpressure, or it closes.
    pub(super) fn read_session(&mut self, sid: usize, now: Instant) {
        let Some(proto) = self.sessions.get(sid).map(|s| s.proto) else {
            return;
        };
        let limit = self.read_limit(proto);
        loop {
            let Some(s) = self.sessions.get_mut(sid) else {
                return;
            };
            if s.eof || s.state != SessionState::Open {
                break;
            }
            if s.paused {
                // The answers that made it pause may be written by now (no
                // writable edge comes when the kernel took them all): resume
                // at once if they drained, else wait for that edge.
                if !self.flush(sid) {
                    return;
                }
                let Some(s) = self.sessions.get_mut(sid) else {
                    return;
                };
                if !s.under_resume_mark() {
                    break;
                }
                s.paused = false;
                self.serve(sid, now);
                continue;
            }
            // (No more than the read buffer holds per read.)
            let space = limit.saturating_sub(s.rbuf.len()).min(self.read_buf.len());
            if space == 0 {
                // A full buffer without one complete request: the codec says so.
                self.serve(sid, now);
                continue;
            }
            match s.stream.read(&mut self.read_buf[..space]) {
                Ok(0) => {
                    s.eof = true;
                    break;
                }
                Ok(n) => {
                    s.rbuf.extend_from_slice(&self.read_buf[..n]);
                    self.serve(sid, now);
                    let more = self
                        .sessions
                        .get(sid)
                        .is_some_and(|s| s.drain_to_eof || s.paused);
                    if n < space && !more {
                        break; // a short read drained the socket
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.close_session(sid);
                    return;
                }
            }
        }
        if !self.flush(sid) {
            return;
        }
        if let Some(s) = self.sessions.get(sid) {
            if s.eof && s.pending.is_empty() && s.wpos >= s.wbuf.len() {
                self.close_session(sid);
            }
        }
    }

    /// Serves every complete request in the session's read buffer.
    pub(super) fn serve(&mut self, sid: usize, now: Instant) {
        let Some(s) = self.sessions.get_mut(sid) else {
            return;
        };
        let proto = s.proto;
        let mut rbuf = std::mem::take(&mut s.rbuf);
        let mut pos = 0;
        let max_line = self.max_line();
        loop {
            let Some(s) = self.sessions.get_mut(sid) else {
                return;
            };
            if s.state != SessionState::Open {
                break;
            }
            if s.over_mark() {
                s.paused = true;
                break;
            }
            match proto {
                Proto::TcpTable { map } => {
                    let mut key = std::mem::take(&mut self.key_buf);
                    let parsed = tcp_table::parse_request(&rbuf[pos..], max_line, &mut key);
                    match parsed {
                        tcp_table::Parsed::Incomplete => {
                            self.key_buf = key;
                            break;
                        }
                        tcp_table::Parsed::TooLong => {
                            self.key_buf = key;
                            self.bad_request(
                                sid,
                                &format!("request line longer than {max_line} bytes"),
                                true,
                            );
                            pos = rbuf.len();
                            break;
                        }
                        tcp_table::Parsed::Line { consumed, result } => {
                            pos += consumed;
                            match result {
                                Ok(()) => self.lookup(sid, map, &key, now),
                                Err(e) => self.bad_request(sid, &e.to_string(), false),
                            }
                            self.key_buf = key;
                        }
                    }
                }
                Proto::Socketmap { max_query, .. } => {
                    match netstring::parse(&rbuf[pos..], max_query as usize) {
                        Ok(None) => break,
                        Err(e @ netstring::NetstringError::TooLong { .. }) => {
                            // Answer (the client can tell why), then close: the
                            // rest of the query is never read.
                            self.bad_request(sid, &format!("query too long: {e}"), false);
                            self.bad_request_close(sid);
                            pos = rbuf.len();
                            break;
                        }
                        Err(e) => {
                            self.bad_request(sid, &format!("malformed netstring: {e}"), true);
                            pos = rbuf.len();
                            break;
                        }
                        Ok(Some((start, end, consumed))) => {
                            let payload = &rbuf[pos + start..pos + end];
                            match netstring::split_request(payload) {
                                Err(e) => {
                                    let msg = format!("malformed socketmap request: {e}");
                                    self.answer_now(sid, AnswerRef::Perm(msg.as_bytes()));
                                }
                                Ok((name, key)) => match self.shared.map_by_name.get(name).copied()
                                {
                                    Some(map) => {
                                        self.lookup(sid, map, key, now);
                                    }
                                    None => {
                                        let msg = format!(
                                            "unknown map {:?}",
                                            String::from_utf8_lossy(name)
                                        );
                                        self.answer_now(sid, AnswerRef::Perm(msg.as_bytes()));
                                    }
                                },
                            }
                            pos += consumed;
                        }
                    }
                }
                Proto::Policy { map, max_request } => {
                    match policy_codec::parse(&rbuf[pos..], max_request as usize) {
                        Ok(None) => break,
                        Ok(Some((attrs, consumed))) => {
                            pos += consumed;
                            self.policy_lookup(sid, map, &attrs, now);
                        }
                        Err(e) => {
                            // Postfix applies its own default_action when
                            // the connection closes.
                            self.bad_request(sid, &e.to_string(), true);
                            pos = rbuf.len();
                            break;
                        }
                    }
                }
            }
        }
        rbuf.drain(..pos.min(rbuf.len()));
        if let Some(s) = self.sessions.get_mut(sid) {
            s.rbuf = rbuf;
        }
    }

    /// A request that cannot be served: answer an error; `fatal` closes the
    /// connection after the answer (the stream cannot be resynchronised).
    pub(super) fn bad_request(&mut self, sid: usize, why: &str, fatal: bool) {
        self.shared
            .stats
            .counters
            .bad_requests
            .fetch_add(1, Ordering::Relaxed);
        let Some(s) = self.sessions.get(sid) else {
            return;
        };
        let (limit, what) = match s.proto {
            Proto::TcpTable { .. } => (&LOG_BAD_TCP_TABLE, "tcp_table"),
            Proto::Socketmap { .. } => (&LOG_BAD_SOCKETMAP, "socketmap"),
            Proto::Policy { .. } => (&LOG_BAD_POLICY, "policy"),
        };
        if let Some(n) = limit.check() {
            let from = s
                .peer
                .map_or_else(|| "a Unix socket client".to_string(), |p| p.to_string());
            crate::warn!(
                "bad {what} request from {from}{}: {why}{} ({n} similar not logged)",
                match s.proto {
                    Proto::TcpTable { map } => format!(" (map {})", self.shared.map_name(map)),
                    Proto::Policy { map, .. } => {
                        format!(" (policy {})", self.shared.map_name(map))
                    }
                    Proto::Socketmap { .. } => String::new(),
                },
                if fatal {
                    "; closing the connection"
                } else {
                    ""
                }
            );
        }
        match s.proto {
            Proto::TcpTable { .. } => self.answer_now(sid, AnswerRef::Temp(why.as_bytes())),
            Proto::Socketmap { .. } if !fatal => {
                self.answer_now(sid, AnswerRef::Perm(why.as_bytes()))
            }
            Proto::Socketmap { .. } => {}
            // A policy client gets no answer: the connection closes.
            Proto::Policy { .. } => {}
        }
        if fatal {
            if let Some(s) = self.sessions.get_mut(sid) {
                s.state = SessionState::Closing;
            }
        }
    }

    pub(super) fn bad_request_close(&mut self, sid: usize) {
        if let Some(s) = self.sessions.get_mut(sid) {
            s.state = SessionState::Closing;
        }
    }

    /// Answers the next request of `sid` at once (in order behind any owed answers).
    pub(super) fn answer_now(&mut self, sid: usize, a: AnswerRef<'_>) {
        let shared = &self.shared;
        let Some(s) = self.sessions.get_mut(sid) else {
            return;
        };
        let map_name = map_name_of(shared, s.proto);
        s.next_seq += 1;
        let proto = s.proto;
        s.emit(|out| encode_answer(proto, a, out, map_name));
    }

    /// Puts an answer in its place on session `sid` and sends what is in order.
    pub(super) fn deliver(
        &mut self,
        sid: usize,
        gen: u64,
        seq: u64,
        answer: &Answer,
        now: Instant,
    ) {
        let shared = &self.shared;
        let Some(s) = self.sessions.get_mut(sid).filter(|s| s.gen == gen) else {
            return;
        };
        let map_name = map_name_of(shared, s.proto);
        let Some(i) = seq.checked_sub(s.first_seq).map(|i| i as usize) else {
            return;
        };
        if !matches!(s.pending.get(i), Some(Slot::Waiting)) {
            return;
        }
        let a = match answer {
            Answer::Found(v) => AnswerRef::Found(v),
            Answer::NotFound => AnswerRef::NotFound,
            Answer::Temp(m) => AnswerRef::Temp(m.as_bytes()),
        };
        if i == 0 {
            encode_answer(s.proto, a, &mut s.wbuf, map_name);
            s.pending.pop_front();
            s.first_seq += 1;
        } else {
            let mut v = Vec::new();
            encode_answer(s.proto, a, &mut v, map_name);
            s.queued_bytes += v.len();
            s.pending[i] = Slot::Ready(v);
        }
        while let Some(Slot::Ready(_)) = s.pending.front() {
            if let Some(Slot::Ready(v)) = s.pending.pop_front() {
                s.queued_bytes -= v.len();
                s.wbuf.extend_from_slice(&v);
            }
            s.first_seq += 1;
        }
        if !self.flush(sid) {
            return;
        }
        let was_paused = self.sessions.get(sid).is_some_and(|s| s.paused);
        self.resume_if_drained(sid, now);
        if was_paused {
            self.read_session(sid, now);
        } else if let Some(s) = self.sessions.get(sid) {
            if s.eof && s.pending.is_empty() && s.wpos >= s.wbuf.len() {
                self.close_session(sid);
            }
        }
    }

    /// Writes what the session owes. False if the session is gone.
    pub(super) fn flush(&mut self, sid: usize) -> bool {
        let Some(s) = self.sessions.get_mut(sid) else {
            return false;
        };
        while s.wpos < s.wbuf.len() {
            match s.stream.write(&s.wbuf[s.wpos..]) {
                Ok(0) => {
                    self.close_session(sid);
                    return false;
                }
                Ok(n) => s.wpos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.close_session(sid);
                    return false;
                }
            }
        }
        if s.wpos >= s.wbuf.len() {
            s.wbuf.clear();
            s.wpos = 0;
            if s.state == SessionState::Closing && s.pending.is_empty() {
                self.close_session(sid);
                return false;
            }
        }
        true
    }
}

/// The map name for log lines about a session of protocol `proto`.
pub(super) fn map_name_of(shared: &Shared, proto: Proto) -> &str {
    match proto {
        Proto::TcpTable { map } | Proto::Policy { map, .. } => shared.map_name(map),
        Proto::Socketmap { .. } => "",
    }
}

/// An answer borrowed for encoding.
#[derive(Clone, Copy)]
pub(super) enum AnswerRef<'a> {
    Found(&'a [u8]),
    NotFound,
    Temp(&'a [u8]),
    /// A configuration error (socketmap only; tcp_table has no such reply).
    Perm(&'a [u8]),
}

/// Encodes one answer in the session's protocol.
pub(super) fn encode_answer(proto: Proto, a: AnswerRef<'_>, out: &mut Vec<u8>, map_name: &str) {
    match proto {
        Proto::TcpTable { .. } => match a {
            AnswerRef::Found(v) if !v.is_empty() => {
                if let Err(e) = tcp_table::encode_found(v, out) {
                    if let Some(n) = LOG_TOO_LONG.check() {
                        crate::warn!("map {map_name}: a result is too long for tcp_table ({e}); answered 400 ({n} similar not logged)");
                    }
                    tcp_table::encode_temp_error(
                        format!("result too long for tcp_table: {e}").as_bytes(),
                        out,
                    );
                }
            }
            AnswerRef::Found(_) | AnswerRef::NotFound => tcp_table::encode_not_found(b"", out),
            AnswerRef::Temp(m) | AnswerRef::Perm(m) => tcp_table::encode_temp_error(m, out),
        },
        Proto::Socketmap { max_reply, .. } => {
            let max = max_reply as usize;
            match a {
                AnswerRef::Found(v) if !v.is_empty() => {
                    if let Err(e) = netstring::encode_ok(v, max, out) {
                        if let Some(n) = LOG_TOO_LONG.check() {
                            crate::warn!("a result is too long for socketmap ({e}); answered TEMP ({n} similar not logged)");
                        }
                        netstring::encode_temp(
                            format!("result too long: {e}").as_bytes(),
                            max,
                            out,
                        );
                    }
                }
                AnswerRef::Found(_) | AnswerRef::NotFound => netstring::encode_notfound(out),
                AnswerRef::Temp(m) => netstring::encode_temp(m, max, out),
                AnswerRef::Perm(m) => netstring::encode_perm(m, max, out),
            }
        }
        // A policy's error answers are its default_action, put in place by
        // the lookup; an internal error here (a policy removed by a reload)
        // defers.
        Proto::Policy { .. } => match a {
            AnswerRef::Found(v) if !v.is_empty() => policy_codec::encode_action(v, out),
            AnswerRef::Found(_) | AnswerRef::NotFound => policy_codec::encode_action(b"DUNNO", out),
            AnswerRef::Temp(_) | AnswerRef::Perm(_) => {
                policy_codec::encode_action(b"DEFER_IF_PERMIT Service temporarily unavailable", out)
            }
        },
    }
}
