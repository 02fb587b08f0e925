//! End to end: the Prometheus metrics of a daemon, scraped over HTTP from inside its network
//! namespace while it carries traffic. Needs root (namespaces, veths, TUN devices), `ip` and
//! `ping`.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use ipop_lab::{Lab, Node, log_tail, wait_until};

const IPOP: &str = env!("CARGO_BIN_EXE_ipop");
const PORT: u16 = 51820;
const METRICS: &str = "127.0.0.1:9469";
/// Time for two daemons on one LAN to start and link up.
const LINK_UP: Duration = Duration::from_secs(10);
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends `request` to the node's metrics listener from inside its namespace and returns the
/// whole answer, read until the server closes the connection.
fn http(node: &Node, request: &str) -> Result<String, String> {
    let addr: SocketAddr = METRICS.parse().map_err(|e| format!("{METRICS}: {e}"))?;
    node.ns().run_in(|| {
        let mut stream =
            TcpStream::connect_timeout(&addr, IO_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
            .map_err(|e| format!("socket options: {e}"))?;
        stream
            .write_all(request.as_bytes())
            .map_err(|e| format!("send: {e}"))?;
        let mut answer = String::new();
        stream
            .read_to_string(&mut answer)
            .map_err(|e| format!("read after {} bytes: {e}", answer.len()))?;
        Ok(answer)
    })
}

fn get(node: &Node, path: &str) -> Result<String, String> {
    http(
        node,
        &format!("GET {path} HTTP/1.1\r\nHost: {METRICS}\r\nAccept: text/plain\r\n\r\n"),
    )
}

/// The value of the sample `series` (name and labels, as the text format writes them).
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

#[test]
fn metrics_show_the_link_and_its_traffic() {
    let mut lab = Lab::new(IPOP, "metrics", 2);
    let mut configs = lab.mesh_configs(PORT);
    configs[0].extra = format!("[metrics]\nlisten = \"{METRICS}\"");
    let [a, b] = &mut lab.nodes[..] else {
        panic!("two nodes expected");
    };
    for (node, config) in [(&mut *a, &configs[0]), (&mut *b, &configs[1])] {
        node.write_config(config);
        node.start();
    }

    let target = IpAddr::V4(b.overlay_v4);
    wait_until(LINK_UP, "a ping from a to b over the overlay", || {
        a.assert_running("the wait for the link");
        b.assert_running("the wait for the link");
        let out = a.ping(target, 1);
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stdout).into_owned())
        }
    });
    let out = a.ping(target, 3);
    assert!(out.status.success(), "ping -c 3 {target} from a failed");

    let answer = get(a, "/metrics").expect("a should answer GET /metrics");
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of the response head:\n{answer}"));
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains("\r\nContent-Type: text/plain; version=0.0.4\r\n")
            && head.contains("\r\nConnection: close"),
        "{head}"
    );
    let peer = format!("peer=\"{}\"", b.name);
    for counter in ["ipop_peer_rx_bytes_total", "ipop_peer_tx_bytes_total"] {
        let series = format!("{counter}{{{peer}}}");
        let value = sample(body, &series).unwrap_or_else(|| panic!("no {series}:\n{body}"));
        assert!(value > 0.0, "{series} is {value} after pings:\n{body}");
        assert!(
            body.contains(&format!("# TYPE {counter} counter\n")),
            "{body}"
        );
    }
    assert_eq!(
        sample(body, "ipop_links{path=\"direct\"}"),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        sample(body, "ipop_links{path=\"relay\"}"),
        Some(0.0),
        "{body}"
    );
    assert_eq!(
        sample(body, "ipop_peers_linked{overlay=\"static\"}"),
        Some(1.0),
        "{body}"
    );
    assert!(
        sample(body, &format!("ipop_peer_last_handshake_seconds{{{peer}}}"))
            .is_some_and(|age| age < LINK_UP.as_secs_f64() + 5.0),
        "{body}"
    );

    let answer = get(a, "/other").expect("a should answer GET /other");
    assert!(answer.starts_with("HTTP/1.1 404 Not Found\r\n"), "{answer}");
    let answer = http(a, "nonsense\r\n\r\n").expect("a should answer a malformed request");
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{answer}"
    );

    let log = std::fs::read_to_string(a.log_path()).unwrap_or_default();
    assert!(
        log.contains(&format!("metrics on http://{METRICS}/metrics")),
        "a's log should say where the metrics are:\n{log}"
    );
    assert!(
        get(b, "/metrics").is_err(),
        "b has no [metrics] section and should not listen"
    );
    lab.stop_all();
}

#[test]
fn an_address_that_cannot_be_bound_stops_the_start() {
    let mut lab = Lab::new(IPOP, "metrics-bind", 1);
    let [a] = &mut lab.nodes[..] else {
        panic!("one node expected");
    };
    let mut config = a.config(PORT);
    // Not an address of the namespace: binding fails.
    config.extra = "[metrics]\nlisten = \"192.0.2.1:9469\"".to_owned();
    a.write_config(&config);
    a.start();
    let exit = wait_until(IO_TIMEOUT, "ipop to give up its start", || {
        a.exited().ok_or_else(|| "still running".to_owned())
    });
    let log = log_tail(&a.log_path(), 20);
    assert!(!exit.success(), "ipop should fail to start:\n{log}");
    assert!(
        log.contains("[metrics] listen: cannot listen on 192.0.2.1:9469"),
        "the error should name the key and the address:\n{log}"
    );
}
