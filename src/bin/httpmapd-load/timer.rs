//! The open loop's wait for the next request's due time. mio's `poll`
//! timeout is rounded up to whole milliseconds (epoll_wait), which would add
//! up to 1 ms to open-loop latencies; so the loop first waits on mio's own
//! epoll descriptor with `ppoll`, whose timeout has nanosecond resolution,
//! then, if anything is ready, collects the events with a zero-timeout
//! `poll`. The thread's timer slack (how late the kernel may wake it, 50 µs
//! by default) is lowered to 1 µs. Both are Linux calls; elsewhere the poll
//! timeout is used as it is.

use mio::Poll;
use std::time::Duration;

/// Asks the kernel to wake this thread within 1 µs of its timeouts.
pub fn fine_slack() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_TIMERSLACK takes a plain integer and affects this thread only.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong);
    }
}

/// Waits until `poll` has events or `timeout` passes, to the microsecond:
/// `Some(true)` events are ready (collect them with a zero timeout),
/// `Some(false)` the time came and nothing is ready; `None` where the
/// precise wait is not available (then poll with `timeout` itself).
pub fn precise_wait(poll: &Poll, timeout: Duration) -> Option<bool> {
    #[cfg(target_os = "linux")]
    {
        use std::io;
        use std::os::fd::AsRawFd;
        let mut fds = libc::pollfd {
            fd: poll.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: one valid pollfd, a valid timespec, no signal mask.
        let r = unsafe { libc::ppoll(&mut fds, 1, &ts, std::ptr::null()) };
        if r >= 0 {
            return Some(r > 0);
        }
        if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            return Some(true);
        }
    }
    let _ = (poll, timeout);
    None
}
