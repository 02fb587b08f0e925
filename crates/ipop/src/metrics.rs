//! Prometheus metrics: a small HTTP server that answers `GET /metrics` with the daemon's status
//! in the text exposition format (version 0.0.4).
//!
//! Each scrape asks the data plane for a status snapshot over the control request channel, as
//! `ipop status` does, so the packet path never updates or locks a metric.

use crate::control::Request;
use crate::status::{Peer, Status};
use anyhow::Context;
use std::collections::{BTreeMap, HashSet};
use std::fmt::{Display, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot};

/// How long a client may take to send its request, and the data plane to answer.
const TIMEOUT: Duration = Duration::from_secs(5);
/// The longest request head (request line and headers) read.
const MAX_HEAD: usize = 8 * 1024;
/// Scrapes served at once; further connections wait to be accepted.
const MAX_CLIENTS: usize = 8;

/// Binds `listen` and serves metrics from there on; returns the bound address.
pub async fn serve(
    listen: SocketAddr,
    requests: mpsc::Sender<Request>,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("[metrics] listen: cannot listen on {listen}"))?;
    let bound = listener
        .local_addr()
        .with_context(|| format!("[metrics] listen: no local address for {listen}"))?;
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    tokio::spawn(async move {
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            match listener.accept().await {
                Ok((stream, _)) => {
                    let requests = requests.clone();
                    tokio::spawn(async move {
                        answer(stream, &requests).await;
                        drop(slot);
                    });
                }
                Err(e) => {
                    tracing::warn!("metrics: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(bound)
}

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// `GET /metrics`: the metrics (200).
    Metrics,
    /// Another well-formed request: 404.
    NotFound,
    /// Not an HTTP/1 request line: 400.
    BadRequest,
}

/// Routes a request by its head (the bytes read up to its blank line, at most 8 KiB):
/// `GET /metrics` (a query string is ignored) gets the metrics, any other well-formed HTTP/1
/// request gets "not found".
pub fn route(head: &[u8]) -> Route {
    let Some(end) = head.iter().position(|&b| b == b'\n') else {
        return Route::BadRequest;
    };
    let Ok(line) = std::str::from_utf8(&head[..end]) else {
        return Route::BadRequest;
    };
    let line = line.strip_suffix('\r').unwrap_or(line);
    let mut words = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return Route::BadRequest;
    };
    let token = |w: &str| !w.is_empty() && w.bytes().all(|b| b.is_ascii_graphic());
    if !token(method) || !token(target) || !matches!(version, "HTTP/1.0" | "HTTP/1.1") {
        return Route::BadRequest;
    }
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    if method == "GET" && path == "/metrics" {
        Route::Metrics
    } else {
        Route::NotFound
    }
}

/// Whether `head` holds the blank line that ends a request head; the server reads until it
/// does (or 8 KiB, or the end of the stream) and answers an incomplete head with 400.
pub fn head_complete(head: &[u8]) -> bool {
    head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n")
}

/// Reads the request head: up to its blank line, the end of the stream, or [`MAX_HEAD`] bytes.
/// Reading all of it, not only the request line, lets the close that follows the answer be a
/// clean one rather than a reset.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while head.len() < MAX_HEAD && !head_complete(&head) {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(head)
}

async fn answer(mut stream: TcpStream, requests: &mpsc::Sender<Request>) {
    let head = match tokio::time::timeout(TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(head)) => head,
        Ok(Err(_)) | Err(_) => return,
    };
    let route = if head_complete(&head) {
        route(&head)
    } else {
        Route::BadRequest
    };
    let (status, content_type, body) = match route {
        Route::Metrics => match snapshot(requests).await {
            Ok(s) => ("200 OK", "text/plain; version=0.0.4", render(&s)),
            Err(e) => ("503 Service Unavailable", "text/plain", format!("{e}\n")),
        },
        Route::NotFound => (
            "404 Not Found",
            "text/plain",
            "not found: the metrics are at /metrics\n".to_owned(),
        ),
        Route::BadRequest => ("400 Bad Request", "text/plain", "bad request\n".to_owned()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let send = async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(TIMEOUT, send).await;
}

/// Asks the data plane for its status, as the control socket does.
async fn snapshot(requests: &mpsc::Sender<Request>) -> Result<Status, String> {
    const STOPPING: &str = "the daemon is stopping";
    let (reply, answer) = oneshot::channel();
    let ask = async {
        let request = Request {
            command: "status".to_owned(),
            reply,
        };
        requests.send(request).await.map_err(|_| STOPPING)?;
        answer.await.map_err(|_| STOPPING)
    };
    let text = tokio::time::timeout(TIMEOUT, ask)
        .await
        .map_err(|_| "the data plane did not answer within 5 s".to_owned())??;
    serde_json::from_str(&text).map_err(|e| format!("the data plane's status is unreadable: {e}"))
}

/// A label value as the exposition format quotes it.
fn escape(value: &str) -> String {
    let mut s = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// The exposition text under construction.
struct Exposition(String);

impl Exposition {
    /// Starts a metric family with its HELP and TYPE lines.
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        // Writing to a String cannot fail.
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            let labels: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            let _ = write!(self.0, "{{{}}}", labels.join(","));
        }
        let _ = writeln!(self.0, " {value}");
    }
}

/// Renders a status as Prometheus metrics. A device in several overlays is one link: its
/// traffic and its path count once.
pub fn render(s: &Status) -> String {
    let mut out = Exposition(String::new());
    out.family(
        "ipop_uptime_seconds",
        "gauge",
        "Seconds since the daemon started.",
    );
    out.sample("ipop_uptime_seconds", &[], s.uptime_s);
    out.family(
        "ipop_loop_stall_max_seconds",
        "gauge",
        "The longest the packet loop went without waiting in the last minute.",
    );
    out.sample("ipop_loop_stall_max_seconds", &[], s.loop_stall_max_s);

    out.family("ipop_peers", "gauge", "Peers of each overlay.");
    for o in &s.overlays {
        out.sample("ipop_peers", &[("overlay", &o.name)], o.peers.len());
    }
    out.family(
        "ipop_peers_linked",
        "gauge",
        "Peers of each overlay whose link is up.",
    );
    for o in &s.overlays {
        let linked = o.peers.iter().filter(|p| p.state == "connected").count();
        out.sample("ipop_peers_linked", &[("overlay", &o.name)], linked);
    }

    let mut seen = HashSet::new();
    let peers: Vec<(String, &Peer)> = s
        .overlays
        .iter()
        .flat_map(|o| &o.peers)
        .filter(|p| seen.insert(p.id.as_str()))
        .map(|p| (p.label(), p))
        .collect();

    let mut links = BTreeMap::from([("direct", 0u64), ("relay", 0)]);
    for (_, p) in &peers {
        if let Some(path) = &p.path {
            *links.entry(path.as_str()).or_default() += 1;
        }
    }
    out.family("ipop_links", "gauge", "Links that are up, by network path.");
    for (path, n) in links {
        out.sample("ipop_links", &[("path", path)], n);
    }

    let punching = &s.punching;
    out.family(
        "ipop_punch_links_total",
        "counter",
        "Links that hole punching found a direct path for, or none.",
    );
    out.sample(
        "ipop_punch_links_total",
        &[("result", "punched")],
        punching.punched,
    );
    out.sample(
        "ipop_punch_links_total",
        &[("result", "failed")],
        punching.failed,
    );
    out.family(
        "ipop_punch_probes_total",
        "counter",
        "Hole punching probes sent, from extra sockets and to the other side's ports.",
    );
    out.sample("ipop_punch_probes_total", &[], punching.probes);

    out.family(
        "ipop_peer_rx_bytes_total",
        "counter",
        "Bytes received from the peer through its tunnel.",
    );
    for (label, p) in &peers {
        out.sample("ipop_peer_rx_bytes_total", &[("peer", label)], p.rx_bytes);
    }
    out.family(
        "ipop_peer_tx_bytes_total",
        "counter",
        "Bytes sent to the peer through its tunnel.",
    );
    for (label, p) in &peers {
        out.sample("ipop_peer_tx_bytes_total", &[("peer", label)], p.tx_bytes);
    }
    out.family(
        "ipop_peer_last_handshake_seconds",
        "gauge",
        "Seconds since the last WireGuard handshake with the peer.",
    );
    for (label, p) in &peers {
        if let Some(t) = p.last_handshake_s {
            out.sample("ipop_peer_last_handshake_seconds", &[("peer", label)], t);
        }
    }
    out.family(
        "ipop_peer_rtt_seconds",
        "gauge",
        "Round-trip time of the network path ICE chose to the peer.",
    );
    for (label, p) in &peers {
        if let Some(ms) = p.rtt_ms {
            out.sample("ipop_peer_rtt_seconds", &[("peer", label)], ms / 1000.0);
        }
    }

    out.family(
        "ipop_drops_total",
        "counter",
        "Packets dropped and signals refused, by reason.",
    );
    for (reason, n) in &s.drops {
        out.sample("ipop_drops_total", &[("reason", reason)], n);
    }

    if let Some(x) = &s.xmpp {
        out.family(
            "ipop_xmpp_connected",
            "gauge",
            "1 while the XMPP session is online, else 0.",
        );
        out.sample("ipop_xmpp_connected", &[], u8::from(x.state == "online"));
        out.family(
            "ipop_xmpp_reconnects_total",
            "counter",
            "Times the XMPP session was connected again after a loss.",
        );
        out.sample("ipop_xmpp_reconnects_total", &[], x.reconnects);
        out.family(
            "ipop_xmpp_resumptions_total",
            "counter",
            "Reconnections that resumed the stream (XEP-0198) and lost nothing.",
        );
        out.sample("ipop_xmpp_resumptions_total", &[], x.resumptions);
        out.family(
            "ipop_xmpp_stanza_drops_total",
            "counter",
            "XMPP stanzas dropped, by reason.",
        );
        for (reason, n) in &x.drops {
            out.sample("ipop_xmpp_stanza_drops_total", &[("reason", reason)], n);
        }
        out.family(
            "ipop_xmpp_stanzas_total",
            "counter",
            "XMPP stanzas sent to the server and received from it.",
        );
        out.sample(
            "ipop_xmpp_stanzas_total",
            &[("direction", "sent")],
            x.stanzas_sent,
        );
        out.sample(
            "ipop_xmpp_stanzas_total",
            &[("direction", "received")],
            x.stanzas_received,
        );
        out.family(
            "ipop_xmpp_bytes_total",
            "counter",
            "Bytes on the connection to the XMPP server, TLS included.",
        );
        out.sample(
            "ipop_xmpp_bytes_total",
            &[("direction", "sent")],
            x.bytes_sent,
        );
        out.sample(
            "ipop_xmpp_bytes_total",
            &[("direction", "received")],
            x.bytes_received,
        );
        out.family(
            "ipop_xmpp_signals_sent_total",
            "counter",
            "Link signals (Jingle IQs) sent.",
        );
        out.sample("ipop_xmpp_signals_sent_total", &[], x.signals_sent);
        out.family(
            "ipop_xmpp_signals_received_total",
            "counter",
            "Well-formed link signals (Jingle IQs) received from devices.",
        );
        out.sample("ipop_xmpp_signals_received_total", &[], x.signals_received);
        out.family(
            "ipop_xmpp_link_offers_total",
            "counter",
            "Link offers sent; repeated: to a device that had one before.",
        );
        out.sample(
            "ipop_xmpp_link_offers_total",
            &[("repeated", "false")],
            x.link_offers.saturating_sub(x.link_offers_repeated),
        );
        out.sample(
            "ipop_xmpp_link_offers_total",
            &[("repeated", "true")],
            x.link_offers_repeated,
        );
        out.family(
            "ipop_xmpp_signal_failures_total",
            "counter",
            "Link signals that failed, by why: refused, timeout, unsent.",
        );
        for (reason, n) in &x.signal_failures {
            out.sample("ipop_xmpp_signal_failures_total", &[("reason", reason)], n);
        }
        out.family(
            "ipop_xmpp_signals_coalesced_total",
            "counter",
            "Link signals never sent: made moot by a later one, or merged into one, in the send queue.",
        );
        out.sample(
            "ipop_xmpp_signals_coalesced_total",
            &[],
            x.signals_coalesced,
        );
        out.family(
            "ipop_xmpp_send_queue",
            "gauge",
            "Stanzas waiting in the send queue, paced under the server's rate limit.",
        );
        out.sample("ipop_xmpp_send_queue", &[], x.send_queue);
        out.family(
            "ipop_xmpp_send_wait_max_seconds",
            "gauge",
            "The longest a stanza waited in the send queue.",
        );
        out.sample(
            "ipop_xmpp_send_wait_max_seconds",
            &[],
            x.send_wait_max_ms as f64 / 1000.0,
        );
    }
    out.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{Overlay, XmppInfo};

    fn peer(id: &str, jid: Option<&str>, name: Option<&str>, path: Option<&str>) -> Peer {
        Peer {
            id: id.into(),
            fingerprint: format!("fp-{id}"),
            name: name.map(Into::into),
            jid: jid.map(Into::into),
            device: jid.map(|_| "laptop".into()),
            addresses: Vec::new(),
            state: if path.is_some() {
                "connected"
            } else {
                "connecting"
            }
            .into(),
            path: path.map(Into::into),
            endpoint: None,
            rx_bytes: 0,
            tx_bytes: 0,
            last_handshake_s: None,
            reason: None,
            pair: None,
            rtt_ms: None,
            via: None,
            candidates_tried: Vec::new(),
            offline_on_xmpp: false,
        }
    }

    fn overlay(name: &str, peers: Vec<Peer>) -> Overlay {
        Overlay {
            name: name.into(),
            kind: "static".into(),
            addresses: Vec::new(),
            peers,
        }
    }

    #[test]
    fn renders_a_small_status_exactly() {
        let mut bob = peer("kb", None, Some("bob \"b\"\\1"), Some("direct"));
        bob.rx_bytes = 1500;
        bob.tx_bytes = 700;
        bob.last_handshake_s = Some(4.5);
        bob.rtt_ms = Some(1.5);
        let mut carol = peer("kc", Some("carol@example.org"), None, Some("relay"));
        carol.tx_bytes = 92;
        let s = Status {
            interface: "ipop0".into(),
            public_key: "k".into(),
            fingerprint: "f".into(),
            listen_port: 51820,
            uptime_s: 12.0,
            loop_stall_max_s: 0.0035,
            port_mapping: None,
            relay: None,
            nat_mapping: String::new(),
            punching: Default::default(),
            advertised_routes: BTreeMap::new(),
            routes: Vec::new(),
            exit: None,
            xmpp: Some(XmppInfo {
                state: "online".into(),
                jid: None,
                server: None,
                reconnects: 2,
                resumptions: 1,
                drops: BTreeMap::from([("too_large".into(), 1)]),
                stanzas_sent: 40,
                stanzas_received: 75,
                bytes_sent: 9_000,
                bytes_received: 21_000,
                signals_sent: 6,
                signals_received: 4,
                link_offers: 3,
                link_offers_repeated: 1,
                signal_failures: BTreeMap::from([
                    ("refused".into(), 1),
                    ("timeout".into(), 0),
                    ("unsent".into(), 0),
                ]),
                signals_coalesced: 2,
                send_queue: 5,
                send_wait_max_ms: 1_250,
                rooms: Vec::new(),
            }),
            overlays: vec![
                overlay("static", vec![bob, peer("kd", None, None, None)]),
                overlay("social", vec![carol]),
                overlay("lab@conference.example.org", Vec::new()),
            ],
            ice_servers: Vec::new(),
            drops: BTreeMap::from([("no_route".into(), 3)]),
        };
        let expected = r#"# HELP ipop_uptime_seconds Seconds since the daemon started.
# TYPE ipop_uptime_seconds gauge
ipop_uptime_seconds 12
# HELP ipop_loop_stall_max_seconds The longest the packet loop went without waiting in the last minute.
# TYPE ipop_loop_stall_max_seconds gauge
ipop_loop_stall_max_seconds 0.0035
# HELP ipop_peers Peers of each overlay.
# TYPE ipop_peers gauge
ipop_peers{overlay="static"} 2
ipop_peers{overlay="social"} 1
ipop_peers{overlay="lab@conference.example.org"} 0
# HELP ipop_peers_linked Peers of each overlay whose link is up.
# TYPE ipop_peers_linked gauge
ipop_peers_linked{overlay="static"} 1
ipop_peers_linked{overlay="social"} 1
ipop_peers_linked{overlay="lab@conference.example.org"} 0
# HELP ipop_links Links that are up, by network path.
# TYPE ipop_links gauge
ipop_links{path="direct"} 1
ipop_links{path="relay"} 1
# HELP ipop_punch_links_total Links that hole punching found a direct path for, or none.
# TYPE ipop_punch_links_total counter
ipop_punch_links_total{result="punched"} 0
ipop_punch_links_total{result="failed"} 0
# HELP ipop_punch_probes_total Hole punching probes sent, from extra sockets and to the other side's ports.
# TYPE ipop_punch_probes_total counter
ipop_punch_probes_total 0
# HELP ipop_peer_rx_bytes_total Bytes received from the peer through its tunnel.
# TYPE ipop_peer_rx_bytes_total counter
ipop_peer_rx_bytes_total{peer="bob \"b\"\\1"} 1500
ipop_peer_rx_bytes_total{peer="fp-kd"} 0
ipop_peer_rx_bytes_total{peer="carol@example.org/laptop"} 0
# HELP ipop_peer_tx_bytes_total Bytes sent to the peer through its tunnel.
# TYPE ipop_peer_tx_bytes_total counter
ipop_peer_tx_bytes_total{peer="bob \"b\"\\1"} 700
ipop_peer_tx_bytes_total{peer="fp-kd"} 0
ipop_peer_tx_bytes_total{peer="carol@example.org/laptop"} 92
# HELP ipop_peer_last_handshake_seconds Seconds since the last WireGuard handshake with the peer.
# TYPE ipop_peer_last_handshake_seconds gauge
ipop_peer_last_handshake_seconds{peer="bob \"b\"\\1"} 4.5
# HELP ipop_peer_rtt_seconds Round-trip time of the network path ICE chose to the peer.
# TYPE ipop_peer_rtt_seconds gauge
ipop_peer_rtt_seconds{peer="bob \"b\"\\1"} 0.0015
# HELP ipop_drops_total Packets dropped and signals refused, by reason.
# TYPE ipop_drops_total counter
ipop_drops_total{reason="no_route"} 3
# HELP ipop_xmpp_connected 1 while the XMPP session is online, else 0.
# TYPE ipop_xmpp_connected gauge
ipop_xmpp_connected 1
# HELP ipop_xmpp_reconnects_total Times the XMPP session was connected again after a loss.
# TYPE ipop_xmpp_reconnects_total counter
ipop_xmpp_reconnects_total 2
# HELP ipop_xmpp_resumptions_total Reconnections that resumed the stream (XEP-0198) and lost nothing.
# TYPE ipop_xmpp_resumptions_total counter
ipop_xmpp_resumptions_total 1
# HELP ipop_xmpp_stanza_drops_total XMPP stanzas dropped, by reason.
# TYPE ipop_xmpp_stanza_drops_total counter
ipop_xmpp_stanza_drops_total{reason="too_large"} 1
# HELP ipop_xmpp_stanzas_total XMPP stanzas sent to the server and received from it.
# TYPE ipop_xmpp_stanzas_total counter
ipop_xmpp_stanzas_total{direction="sent"} 40
ipop_xmpp_stanzas_total{direction="received"} 75
# HELP ipop_xmpp_bytes_total Bytes on the connection to the XMPP server, TLS included.
# TYPE ipop_xmpp_bytes_total counter
ipop_xmpp_bytes_total{direction="sent"} 9000
ipop_xmpp_bytes_total{direction="received"} 21000
# HELP ipop_xmpp_signals_sent_total Link signals (Jingle IQs) sent.
# TYPE ipop_xmpp_signals_sent_total counter
ipop_xmpp_signals_sent_total 6
# HELP ipop_xmpp_signals_received_total Well-formed link signals (Jingle IQs) received from devices.
# TYPE ipop_xmpp_signals_received_total counter
ipop_xmpp_signals_received_total 4
# HELP ipop_xmpp_link_offers_total Link offers sent; repeated: to a device that had one before.
# TYPE ipop_xmpp_link_offers_total counter
ipop_xmpp_link_offers_total{repeated="false"} 2
ipop_xmpp_link_offers_total{repeated="true"} 1
# HELP ipop_xmpp_signal_failures_total Link signals that failed, by why: refused, timeout, unsent.
# TYPE ipop_xmpp_signal_failures_total counter
ipop_xmpp_signal_failures_total{reason="refused"} 1
ipop_xmpp_signal_failures_total{reason="timeout"} 0
ipop_xmpp_signal_failures_total{reason="unsent"} 0
# HELP ipop_xmpp_signals_coalesced_total Link signals never sent: made moot by a later one, or merged into one, in the send queue.
# TYPE ipop_xmpp_signals_coalesced_total counter
ipop_xmpp_signals_coalesced_total 2
# HELP ipop_xmpp_send_queue Stanzas waiting in the send queue, paced under the server's rate limit.
# TYPE ipop_xmpp_send_queue gauge
ipop_xmpp_send_queue 5
# HELP ipop_xmpp_send_wait_max_seconds The longest a stanza waited in the send queue.
# TYPE ipop_xmpp_send_wait_max_seconds gauge
ipop_xmpp_send_wait_max_seconds 1.25
"#;
        assert_eq!(render(&s), expected);
    }

    #[test]
    fn a_device_in_two_overlays_counts_once() {
        let mut carol = peer("kc", Some("carol@example.org"), None, Some("direct"));
        carol.rx_bytes = 10;
        let s = Status {
            interface: "ipop0".into(),
            public_key: "k".into(),
            fingerprint: "f".into(),
            listen_port: 0,
            uptime_s: 1.0,
            loop_stall_max_s: 0.0,
            port_mapping: None,
            relay: None,
            nat_mapping: String::new(),
            punching: Default::default(),
            advertised_routes: BTreeMap::new(),
            routes: Vec::new(),
            exit: None,
            xmpp: None,
            overlays: vec![
                overlay(
                    "social",
                    vec![peer("kc", Some("carol@example.org"), None, Some("direct"))],
                ),
                overlay("lab@conference.example.org", vec![carol]),
            ],
            ice_servers: Vec::new(),
            drops: BTreeMap::new(),
        };
        let text = render(&s);
        assert!(text.contains("ipop_links{path=\"direct\"} 1\n"), "{text}");
        assert_eq!(
            text.matches("ipop_peer_rx_bytes_total{").count(),
            1,
            "{text}"
        );
        assert!(
            text.contains("ipop_peers{overlay=\"social\"} 1\n"),
            "{text}"
        );
        assert!(!text.contains("ipop_xmpp"), "{text}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
        assert_eq!(escape("alice@example.org/phone"), "alice@example.org/phone");
    }

    #[test]
    fn requests_are_routed() {
        let cases: [(&[u8], Route); 12] = [
            (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", Route::Metrics),
            (b"GET /metrics HTTP/1.0\r\n\r\n", Route::Metrics),
            (
                b"GET /metrics?name[]=ipop_links HTTP/1.1\n\n",
                Route::Metrics,
            ),
            (b"GET /other HTTP/1.1\r\n\r\n", Route::NotFound),
            (b"GET /metrics/ HTTP/1.1\r\n\r\n", Route::NotFound),
            (b"POST /metrics HTTP/1.1\r\n\r\n", Route::NotFound),
            (b"GET /metrics\r\n\r\n", Route::BadRequest),
            (b"GET  /metrics HTTP/1.1\r\n\r\n", Route::BadRequest),
            (b"GET /metrics HTTP/2.0\r\n\r\n", Route::BadRequest),
            (b"GET /metrics HTTP/1.1 x\r\n\r\n", Route::BadRequest),
            (b"\xff\xfe /metrics HTTP/1.1\r\n\r\n", Route::BadRequest),
            (b"GET /metrics HTTP/1.1", Route::BadRequest),
        ];
        for (head, expected) in cases {
            assert_eq!(route(head), expected, "{}", String::from_utf8_lossy(head));
        }
        assert!(head_complete(b"GET / HTTP/1.1\r\nA: b\r\n\r\n"));
        assert!(!head_complete(b"GET / HTTP/1.1\r\nA: b\r\n"));
    }
}
