//! `ipop ping JID/DEVICE`: ICMP echo requests through the tunnel to a device, each answer shown
//! with its round-trip time and the path of the link that carried it (direct or relay, the
//! endpoint and the ICE pair), as the running daemon reports them.
//!
//! The probes are ordinary pings from this host to the device's overlay address, so they test
//! the whole way: this daemon, the path, the other daemon and the other host. An on-demand link
//! at rest is set up by the first probe, as by any first packet. A device that drops ICMP does
//! not answer; the path is shown all the same.

use crate::control;
use anyhow::{Context, bail};
use clap::Args;
use ipop::config::Config;
use ipop::status::{Peer, Status};
use socket2::{Domain, Protocol, Socket, Type};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct PingArgs {
    /// The device, as JID/DEVICE (like bob@example.org/phone; `ipop status` lists them).
    device: String,
    /// How many probes to send.
    #[arg(short = 'n', long, default_value_t = 4)]
    count: u32,
    /// Seconds to wait for each answer.
    #[arg(short = 'W', long, default_value_t = 2.0)]
    timeout: f64,
    #[arg(short, long, env = "IPOP_CONFIG", default_value = ipop::config::DEFAULT_PATH)]
    config: PathBuf,
}

/// Time between the probes (from one's send to the next's), as ping's default.
const INTERVAL: Duration = Duration::from_secs(1);
/// What each probe carries after the ICMP header.
const PAYLOAD: &[u8] = b"ipop ping probe.";

pub fn run(args: &PingArgs) -> anyhow::Result<()> {
    let device = crate::split_device(&args.device)?;
    if !(args.timeout.is_finite() && args.timeout > 0.0 && args.timeout <= 60.0) {
        bail!("--timeout must be between 0 and 60 seconds");
    }
    let wait = Duration::from_secs_f64(args.timeout);
    let config = Config::load(&args.config)?;
    let socket = config.control_socket();
    let runtime = crate::runtime()?;
    let status = || -> anyhow::Result<Status> {
        let answer = runtime.block_on(control::ask(&socket, "status"))?;
        serde_json::from_str(&answer).context("the daemon's status is not what this ipop reads")
    };
    let peer = find(status()?, device)?;
    let target = peer
        .addresses
        .iter()
        .filter_map(|a| a.split('/').next()?.parse::<IpAddr>().ok())
        .min_by_key(IpAddr::is_ipv6)
        .with_context(|| format!("{} has no overlay address yet", args.device))?;
    let mut out = std::io::stdout().lock();
    let idle = peer.state == "idle";
    writeln!(
        out,
        "ipop ping {} ({target}): {}",
        args.device,
        if idle {
            "no link yet (on demand); the first probe sets it up".to_owned()
        } else {
            format!("link {}", peer.state)
        }
    )?;

    let pinger = Pinger::open(target)?;
    let mut rtts = Vec::new();
    let mut last_path = None;
    for seq in 1..=args.count {
        let sent = Instant::now();
        pinger.send(seq)?;
        let answer = pinger.wait(seq, wait)?;
        let now = find(status()?, device).ok();
        match answer {
            Some(rtt) => {
                rtts.push(rtt);
                let path = now.as_ref().map_or_else(|| "?".to_owned(), describe);
                writeln!(
                    out,
                    "probe {seq}: reply in {:.2} ms via {path}",
                    rtt.as_secs_f64() * 1000.0
                )?;
                last_path = now.and_then(|p| p.path);
            }
            None => writeln!(
                out,
                "probe {seq}: no reply within {wait:?} (link {})",
                now.map_or_else(|| "gone".to_owned(), |p| p.state)
            )?,
        }
        if seq < args.count {
            std::thread::sleep(INTERVAL.saturating_sub(sent.elapsed()));
        }
    }

    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    let summary = match (rtts.iter().min(), rtts.iter().max()) {
        (Some(min), Some(max)) => format!(
            "; rtt min/avg/max {:.2}/{:.2}/{:.2} ms; path {}",
            ms(min),
            rtts.iter().map(ms).sum::<f64>() / rtts.len() as f64,
            ms(max),
            last_path.as_deref().unwrap_or("?")
        ),
        _ => String::new(),
    };
    writeln!(
        out,
        "{}: {} probes, {} replies{summary}",
        args.device,
        args.count,
        rtts.len()
    )?;
    if rtts.is_empty() {
        bail!("no reply from {}", args.device);
    }
    Ok(())
}

/// The entry of `(jid, name)` in the status, or why there is none to ping.
fn find(status: Status, (jid, name): (&str, &str)) -> anyhow::Result<Peer> {
    let device = format!("{jid}/{name}");
    let peer = status
        .overlays
        .into_iter()
        .flat_map(|o| o.peers)
        .filter(|p| p.jid.as_deref() == Some(jid) && p.device.as_deref() == Some(name))
        .max_by_key(|p| p.state == "connected")
        .with_context(|| {
            format!(
                "{device} is not a device this one links with: not a friend's, not in a shared \
                 group, or not online (see `ipop status`)"
            )
        })?;
    if matches!(peer.state.as_str(), "refused" | "untrusted") {
        bail!(
            "{device} is {}: {}",
            peer.state,
            peer.reason.as_deref().unwrap_or("see `ipop status`")
        );
    }
    Ok(peer)
}

/// The path of a link as the daemon reports it: `direct 192.0.2.7:51820 (srflx ... -> ...)`.
fn describe(peer: &Peer) -> String {
    let mut s = peer.path.clone().unwrap_or_else(|| peer.state.clone());
    if let Some(endpoint) = &peer.endpoint {
        s.push(' ');
        s.push_str(endpoint);
    }
    if let Some(via) = &peer.via {
        s.push_str(&format!(" through {via}"));
    }
    if let Some(pair) = &peer.pair {
        s.push_str(&format!(" ({pair})"));
    }
    s
}

/// A raw ICMP (or ICMPv6) socket connected to one address: echo requests out, matching echo
/// replies in.
struct Pinger {
    socket: Socket,
    v6: bool,
    id: u16,
}

impl Pinger {
    fn open(target: IpAddr) -> anyhow::Result<Pinger> {
        let v6 = target.is_ipv6();
        let (domain, protocol) = if v6 {
            (Domain::IPV6, Protocol::ICMPV6)
        } else {
            (Domain::IPV4, Protocol::ICMPV4)
        };
        let socket = Socket::new(domain, Type::RAW, Some(protocol))
            .context("cannot open an ICMP socket (ipop ping needs root or CAP_NET_RAW)")?;
        socket
            .connect(&SocketAddr::new(target, 0).into())
            .with_context(|| format!("no route to {target}"))?;
        // Only the low bits of the process ID: the echo identifier is 16 bits.
        let id = (std::process::id() & 0xffff) as u16;
        Ok(Pinger { socket, v6, id })
    }

    fn send(&self, seq: u32) -> anyhow::Result<()> {
        let seq = (seq & 0xffff) as u16;
        let mut packet = vec![if self.v6 { 128 } else { 8 }, 0, 0, 0];
        packet.extend_from_slice(&self.id.to_be_bytes());
        packet.extend_from_slice(&seq.to_be_bytes());
        packet.extend_from_slice(PAYLOAD);
        if !self.v6 {
            // The kernel computes ICMPv6 checksums itself, not ICMP ones.
            let sum = !tun_rs::checksum(&packet, 0);
            packet[2..4].copy_from_slice(&sum.to_be_bytes());
        }
        self.socket.send(&packet).context("cannot send the probe")?;
        Ok(())
    }

    /// The round-trip time of the reply to probe `seq`, or `None` after `wait`.
    fn wait(&self, seq: u32, wait: Duration) -> anyhow::Result<Option<Duration>> {
        let seq = (seq & 0xffff) as u16;
        let sent = Instant::now();
        let deadline = sent + wait;
        let mut buf = [0u8; 1500];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.socket.set_read_timeout(Some(left))?;
            let n = match (&self.socket).read(&mut buf) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("cannot read the reply"),
            };
            if self.is_reply(&buf[..n], seq) {
                return Ok(Some(sent.elapsed()));
            }
        }
    }

    /// Whether `packet` (with its IPv4 header; ICMPv6 comes without one) is the echo reply to
    /// probe `seq`.
    fn is_reply(&self, packet: &[u8], seq: u16) -> bool {
        let icmp = if self.v6 {
            packet
        } else {
            let header = usize::from(packet.first().map_or(0, |b| b & 0x0f)) * 4;
            packet.get(header..).unwrap_or_default()
        };
        let reply = if self.v6 { 129 } else { 0 };
        icmp.len() >= 8
            && icmp[0] == reply
            && icmp[4..6] == self.id.to_be_bytes()
            && icmp[6..8] == seq.to_be_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_echo_reply_to_this_probe_counts() {
        let pinger = |v6| Pinger {
            socket: Socket::new(Domain::IPV4, Type::DGRAM, None).expect("socket"),
            v6,
            id: 0x1234,
        };
        let v4 = pinger(false);
        let mut packet = vec![0x45; 1];
        packet.resize(20, 0);
        packet.extend_from_slice(&[0, 0, 0, 0, 0x12, 0x34, 0, 5]);
        assert!(v4.is_reply(&packet, 5));
        assert!(!v4.is_reply(&packet, 6), "another probe's reply");
        packet[20] = 8;
        assert!(!v4.is_reply(&packet, 5), "an echo request");
        packet[20] = 0;
        packet[24] = 0x99;
        assert!(!v4.is_reply(&packet, 5), "another pinger's reply");
        assert!(!v4.is_reply(&packet[..23], 5), "cut short");
        assert!(!v4.is_reply(&[0x4f], 5), "a header longer than the packet");
        let v6 = pinger(true);
        assert!(v6.is_reply(&[129, 0, 0, 0, 0x12, 0x34, 0, 5], 5));
        assert!(!v6.is_reply(&[128, 0, 0, 0, 0x12, 0x34, 0, 5], 5));
    }
}
