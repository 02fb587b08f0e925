//! HTTP request heads into the metrics endpoint's request parser: what the server reads from a
//! client (at most 8 KiB and one read of 1 KiB more) is routed without panicking, and only a
//! well-formed `GET /metrics` request line gets the metrics.
#![no_main]

use ipop::metrics::{Route, head_complete, route};
use libfuzzer_sys::fuzz_target;

/// The most the server reads of a request head: 8 KiB, and the rest of the last 1 KiB read.
const MAX_READ: usize = 9 * 1024;

fuzz_target!(|head: &[u8]| {
    if head.len() > MAX_READ {
        return;
    }
    let complete = head_complete(head);
    let routed = route(head);
    if routed == Route::Metrics {
        let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        assert!(
            line.starts_with(b"GET /metrics ") || line.starts_with(b"GET /metrics?"),
            "routed to the metrics: {line:?}"
        );
        assert!(
            line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0"),
            "routed to the metrics: {line:?}"
        );
    }
    // A head that holds its blank line gets the same answer with anything after it.
    if complete {
        let mut longer = head.to_vec();
        longer.extend_from_slice(b"X-Trailing: yes\r\n\r\n");
        assert!(head_complete(&longer));
        assert_eq!(route(&longer), routed);
    }
});
