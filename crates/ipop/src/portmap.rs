//! Port mapping: asks the home router (the default gateway) to forward a public UDP port to
//! ipop's port, so that a device behind a NAT that maps every destination to a new port (a
//! "hard" NAT) can still be reached directly. The public endpoint of the mapping is offered to
//! peers as an ICE candidate, shown as `mapped`.
//!
//! The gateway is asked with PCP (RFC 6887), then NAT-PMP (RFC 6886), then UPnP IGD, each with
//! a short timeout; the first that grants a mapping is kept. The mapping is renewed at half its
//! lifetime, asked for again when the default route changes (a new network), and deleted when
//! the daemon stops. PCP and NAT-PMP come from `crab_nat`; UPnP from `igd-next`, whose blocking
//! client runs on tokio's blocking threads.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::num::NonZeroU16;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crab_nat::{InternetProtocol, PortMappingOptions, TimeoutConfig};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

/// The lifetime asked for by default (`[nat] port_mapping_lifetime`); gateways may grant less.
pub const LIFETIME: Duration = Duration::from_secs(7200);
/// How often the default route is looked at again: a new network needs a new mapping. (One
/// read of `/proc/net/route` and one `connect` on a UDP socket.)
const RECHECK: Duration = Duration::from_secs(2);
/// How long after a refusal the gateway is asked again, doubling up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(30);
const RETRY_MAX: Duration = Duration::from_secs(600);
/// What the description field of a UPnP mapping says.
const DESCRIPTION: &str = "ipop";
/// How long the gateway gets to answer one UPnP search or the last of a PCP or NAT-PMP
/// request's retransmissions (250 ms, 500 ms, 1 s: RFC 6886's schedule, cut short).
const UPNP_SEARCH: Duration = Duration::from_secs(2);
const REQUEST_TIMEOUTS: TimeoutConfig = TimeoutConfig {
    initial_timeout: Duration::from_millis(250),
    max_retries: 2,
    max_retry_timeout: Some(Duration::from_secs(1)),
};
/// The shortest lifetime a granted mapping may have: it is renewed at half of it.
const MIN_LIFETIME: Duration = Duration::from_secs(20);
/// How long deleting the mapping may hold up the daemon's exit.
const DELETE_TIMEOUT: Duration = Duration::from_secs(3);

/// The protocol that granted a mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Pcp,
    NatPmp,
    Upnp,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Pcp => "PCP",
            Protocol::NatPmp => "NAT-PMP",
            Protocol::Upnp => "UPnP",
        })
    }
}

/// The way out: the default gateway and this host's address towards it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub gateway: Ipv4Addr,
    pub local: Ipv4Addr,
}

/// The IPv4 default route of the main table (`/proc/net/route`) and the source address the
/// kernel picks towards its gateway; `None` without a default route through a gateway.
pub fn default_route() -> std::io::Result<Option<Route>> {
    let table = std::fs::read_to_string("/proc/net/route")?;
    let Some(gateway) = gateway_of(&table) else {
        return Ok(None);
    };
    let probe = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    probe.connect((gateway, crab_nat::GATEWAY_PORT))?;
    match probe.local_addr()?.ip() {
        IpAddr::V4(local) => Ok(Some(Route { gateway, local })),
        IpAddr::V6(_) => Ok(None),
    }
}

/// The gateway of the first default route (destination and mask 0, flag RTF_GATEWAY) in the
/// text of `/proc/net/route`, whose addresses are hexadecimal in host byte order.
fn gateway_of(table: &str) -> Option<Ipv4Addr> {
    const RTF_UP: u16 = 0x1;
    const RTF_GATEWAY: u16 = 0x2;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (destination, gateway, flags, mask) = (f.get(1)?, f.get(2)?, f.get(3)?, f.get(7)?);
        let flags = u16::from_str_radix(flags, 16).ok()?;
        let up_via_gateway = flags & (RTF_UP | RTF_GATEWAY) == RTF_UP | RTF_GATEWAY;
        (*destination == "00000000" && *mask == "00000000" && up_via_gateway)
            .then(|| u32::from_str_radix(gateway, 16).ok())
            .flatten()
            .map(|g| Ipv4Addr::from(g.to_le_bytes()))
    })
}

/// A mapping the gateway granted.
pub struct Mapping {
    pub protocol: Protocol,
    pub gateway: Ipv4Addr,
    /// This host's address and ipop's port.
    pub internal: SocketAddrV4,
    /// Where the internet reaches it.
    pub external: SocketAddrV4,
    pub lifetime: Duration,
    pub granted: Instant,
    handle: Handle,
}

enum Handle {
    Crab(crab_nat::PortMapping),
    Upnp(Box<igd_next::Gateway>),
}

/// Why no protocol granted a mapping: each one's answer, in the order asked.
#[derive(Debug)]
pub struct Refused(pub Vec<(Protocol, String)>);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let each: Vec<String> = self.0.iter().map(|(p, e)| format!("{p}: {e}")).collect();
        f.write_str(&each.join("; "))
    }
}

/// Asks the gateway of `route` to forward a public UDP port to `route.local:port` for
/// `lifetime`: PCP, NAT-PMP, then UPnP IGD.
pub async fn map(route: Route, port: NonZeroU16, lifetime: Duration) -> Result<Mapping, Refused> {
    let mut refused = Vec::new();
    let seconds = u32::try_from(lifetime.as_secs()).unwrap_or(u32::MAX);
    let options = PortMappingOptions {
        external_port: Some(port),
        lifetime_seconds: Some(seconds),
        timeout_config: Some(REQUEST_TIMEOUTS),
    };
    let gateway = crab_nat::GatewayAddress::IpV4(route.gateway);
    let internal = SocketAddrV4::new(route.local, port.get());
    let pcp = crab_nat::pcp::port_mapping(
        crab_nat::pcp::BaseMapRequest::new(
            gateway,
            IpAddr::V4(route.local),
            InternetProtocol::Udp,
            port,
        ),
        None,
        None,
        options,
    )
    .await;
    match pcp {
        Ok(m) => {
            if let crab_nat::PortMappingType::Pcp {
                external_ip: IpAddr::V4(ip),
                ..
            } = m.mapping_type()
            {
                match usable(granted(Protocol::Pcp, route, internal, ip, m)).await {
                    Ok(m) => return Ok(m),
                    Err(e) => refused.push((Protocol::Pcp, e)),
                }
            } else {
                refused.push((Protocol::Pcp, "no IPv4 external address".to_owned()));
            }
        }
        Err(e) => refused.push((Protocol::Pcp, e.to_string())),
    }
    let natpmp =
        crab_nat::natpmp::port_mapping(gateway, InternetProtocol::Udp, port, options).await;
    match natpmp {
        Ok(m) => match crab_nat::natpmp::external_address(gateway, Some(REQUEST_TIMEOUTS)).await {
            Ok(ip) => match usable(granted(Protocol::NatPmp, route, internal, ip, m)).await {
                Ok(m) => return Ok(m),
                Err(e) => refused.push((Protocol::NatPmp, e)),
            },
            Err(e) => {
                refused.push((Protocol::NatPmp, format!("no external address: {e}")));
                let _ = m.try_drop().await;
            }
        },
        Err(e) => refused.push((Protocol::NatPmp, e.to_string())),
    }
    match upnp(route, internal, seconds).await {
        Ok(m) => match usable(m).await {
            Ok(m) => return Ok(m),
            Err(e) => refused.push((Protocol::Upnp, e)),
        },
        Err(e) => refused.push((Protocol::Upnp, e)),
    }
    Err(Refused(refused))
}

/// A granted mapping that cannot serve is deleted and refused: no external address, or a
/// lifetime too short to renew in time (a gateway's answer is taken as it comes).
async fn usable(m: Mapping) -> Result<Mapping, String> {
    let ip = *m.external.ip();
    let why = if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || ip.is_broadcast() {
        format!("granted {} with no usable external address", m.external)
    } else if m.lifetime < MIN_LIFETIME {
        format!("granted only {} s", m.lifetime.as_secs())
    } else {
        return Ok(m);
    };
    let _ = m.delete().await;
    Err(why)
}

/// The gateway's own address is private (or shared, RFC 6598): another NAT lies beyond it, and
/// the mapping serves only devices behind that one.
pub fn beyond_another_nat(external: Ipv4Addr) -> bool {
    let [a, b, ..] = external.octets();
    external.is_private() || external.is_link_local() || (a == 100 && (64..128).contains(&b))
}

fn granted(
    protocol: Protocol,
    route: Route,
    internal: SocketAddrV4,
    ip: Ipv4Addr,
    m: crab_nat::PortMapping,
) -> Mapping {
    Mapping {
        protocol,
        gateway: route.gateway,
        internal,
        external: SocketAddrV4::new(ip, m.external_port().get()),
        lifetime: Duration::from_secs(m.lifetime().into()),
        granted: Instant::now(),
        handle: Handle::Crab(m),
    }
}

/// UPnP IGD: finds the gateway with SSDP from this host's address, then asks for the same
/// external port as the internal one, or any port when that is taken.
async fn upnp(route: Route, internal: SocketAddrV4, seconds: u32) -> Result<Mapping, String> {
    let job = move || {
        let mut search = igd_next::SearchOptions::default();
        search.bind_addr = SocketAddr::new(IpAddr::V4(route.local), 0);
        search.timeout = Some(UPNP_SEARCH);
        search.single_search_timeout = Some(UPNP_SEARCH);
        let gateway = igd_next::search_gateway(search).map_err(|e| e.to_string())?;
        let ip = match gateway.get_external_ip().map_err(|e| e.to_string())? {
            IpAddr::V4(ip) => ip,
            IpAddr::V6(ip) => return Err(format!("external address {ip} is not IPv4")),
        };
        let udp = igd_next::PortMappingProtocol::UDP;
        let local = SocketAddr::V4(internal);
        let port = match gateway.add_port(udp, internal.port(), local, seconds, DESCRIPTION) {
            Ok(()) => internal.port(),
            Err(_) => gateway
                .add_any_port(udp, local, seconds, DESCRIPTION)
                .map_err(|e| e.to_string())?,
        };
        Ok((gateway, SocketAddrV4::new(ip, port)))
    };
    let (gateway, external) = tokio::task::spawn_blocking(job)
        .await
        .map_err(|e| e.to_string())??;
    Ok(Mapping {
        protocol: Protocol::Upnp,
        gateway: route.gateway,
        internal,
        external,
        lifetime: Duration::from_secs(seconds.into()),
        granted: Instant::now(),
        handle: Handle::Upnp(Box::new(gateway)),
    })
}

impl Mapping {
    /// When to renew: at half the lifetime.
    pub fn renew_at(&self) -> Instant {
        self.granted + self.lifetime / 2
    }

    /// Asks for the same mapping again, for a full lifetime from now. The external endpoint
    /// may change: the caller compares it.
    pub async fn renew(&mut self) -> Result<(), String> {
        match &mut self.handle {
            Handle::Crab(m) => {
                m.renew().await.map_err(|e| e.to_string())?;
                self.external.set_port(m.external_port().get());
                self.lifetime = Duration::from_secs(m.lifetime().into());
                if self.lifetime < MIN_LIFETIME {
                    return Err(format!("renewed for only {} s", self.lifetime.as_secs()));
                }
            }
            Handle::Upnp(gateway) => {
                let gateway = gateway.clone();
                let (external, internal) = (self.external.port(), self.internal);
                let seconds = u32::try_from(self.lifetime.as_secs()).unwrap_or(u32::MAX);
                tokio::task::spawn_blocking(move || {
                    gateway.add_port(
                        igd_next::PortMappingProtocol::UDP,
                        external,
                        SocketAddr::V4(internal),
                        seconds,
                        DESCRIPTION,
                    )
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            }
        }
        self.granted = Instant::now();
        Ok(())
    }

    /// Deletes the mapping on the gateway.
    pub async fn delete(self) -> Result<(), String> {
        match self.handle {
            Handle::Crab(m) => m.try_drop().await.map_err(|(e, _)| e.to_string()),
            Handle::Upnp(gateway) => {
                let port = self.external.port();
                tokio::task::spawn_blocking(move || {
                    gateway.remove_port(igd_next::PortMappingProtocol::UDP, port)
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())
            }
        }
    }
}

/// What `ipop status` shows of port mapping.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PortMapStatus {
    /// `off` (`[nat] port_mapping = false`), `asking`, `mapped` or `none`.
    pub state: String,
    /// The protocol that granted the mapping: `PCP`, `NAT-PMP` or `UPnP`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<String>,
    /// Seconds until the mapping is renewed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_in_s: Option<u64>,
    /// Why there is no mapping, or what limits the one there is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    #[serde(default)]
    pub renewals: u64,
}

impl PortMapStatus {
    fn off() -> PortMapStatus {
        PortMapStatus {
            state: "off".to_owned(),
            ..PortMapStatus::default()
        }
    }

    fn none(problem: String) -> PortMapStatus {
        PortMapStatus {
            state: "none".to_owned(),
            problem: Some(problem),
            ..PortMapStatus::default()
        }
    }

    fn mapped(m: &Mapping, renewals: u64) -> PortMapStatus {
        let ip = *m.external.ip();
        PortMapStatus {
            state: "mapped".to_owned(),
            protocol: Some(m.protocol.to_string()),
            gateway: Some(m.gateway.to_string()),
            internal: Some(m.internal.to_string()),
            external: Some(m.external.to_string()),
            renew_in_s: Some(
                m.renew_at()
                    .saturating_duration_since(Instant::now())
                    .as_secs(),
            ),
            problem: beyond_another_nat(ip).then(|| {
                format!(
                    "the gateway's own address {ip} is private: another NAT lies beyond it, \
                     and only devices behind that one can use the mapping"
                )
            }),
            renewals,
        }
    }
}

/// A change the data plane hears of: the mapping now in force (internal, external), or none.
pub type Found = Option<(SocketAddr, SocketAddr)>;

/// The running port mapper: a task that keeps one mapping of ipop's port.
pub struct PortMapper {
    status: Arc<Mutex<PortMapStatus>>,
    stop: Option<(oneshot::Sender<()>, tokio::task::JoinHandle<()>)>,
}

impl PortMapper {
    /// A mapper that does nothing: `[nat] port_mapping = false`.
    pub fn off() -> PortMapper {
        PortMapper {
            status: Arc::new(Mutex::new(PortMapStatus::off())),
            stop: None,
        }
    }

    /// Starts keeping a mapping of UDP `port`, asked for `lifetime` at a time; changes go to
    /// `found`.
    pub fn spawn(port: u16, lifetime: Duration, found: mpsc::UnboundedSender<Found>) -> PortMapper {
        let Some(port) = NonZeroU16::new(port) else {
            return PortMapper::off();
        };
        let status = Arc::new(Mutex::new(PortMapStatus {
            state: "asking".to_owned(),
            ..PortMapStatus::default()
        }));
        let (stop_tx, stop) = oneshot::channel();
        let task = tokio::spawn(keep(port, lifetime, found, status.clone(), stop));
        PortMapper {
            status,
            stop: Some((stop_tx, task)),
        }
    }

    /// A reader of the current status, for `ipop status`.
    pub fn status_fn(&self) -> impl Fn() -> PortMapStatus + Send + 'static {
        let status = self.status.clone();
        move || {
            status
                .lock()
                .map(|s| s.clone())
                .unwrap_or_else(|e| e.into_inner().clone())
        }
    }

    /// Deletes the mapping on the gateway (waiting at most a few seconds) and stops.
    pub async fn shutdown(self) {
        if let Some((stop, task)) = self.stop {
            let _ = stop.send(());
            if tokio::time::timeout(DELETE_TIMEOUT, task).await.is_err() {
                tracing::warn!(
                    "the port mapper did not finish in time: a mapping may be left on the gateway until its lifetime ends"
                );
            }
        }
    }
}

fn set(status: &Mutex<PortMapStatus>, value: PortMapStatus) {
    match status.lock() {
        Ok(mut s) => *s = value,
        Err(e) => *e.into_inner() = value,
    }
}

/// The mapper's task: looks at the default route every [`RECHECK`], maps the port when there
/// is none, renews at half the lifetime, and deletes the mapping when told to stop.
async fn keep(
    port: NonZeroU16,
    lifetime: Duration,
    found: mpsc::UnboundedSender<Found>,
    status: Arc<Mutex<PortMapStatus>>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut route: Option<Route> = None;
    let mut current: Option<Mapping> = None;
    let mut renewals = 0;
    let mut retry = RETRY_FIRST;
    let mut next_try = Instant::now();
    let announce = |m: Option<&Mapping>| {
        let _ = found.send(m.map(|m| (SocketAddr::V4(m.internal), SocketAddr::V4(m.external))));
    };
    loop {
        let now_route = default_route().unwrap_or_else(|e| {
            tracing::debug!("cannot read the default route: {e}");
            None
        });
        if now_route != route {
            if let Some(old) = current.take() {
                tracing::info!(external = %old.external, "the network changed; mapping the port again");
                announce(None);
                if let Err(e) = old.delete().await {
                    tracing::info!("the old mapping stays until its lifetime ends: {e}");
                }
            }
            route = now_route;
            (retry, next_try) = (RETRY_FIRST, Instant::now());
        }
        match (&mut current, route) {
            (None, None) => set(
                &status,
                PortMapStatus::none("no IPv4 default gateway".into()),
            ),
            // Asking can take seconds (every protocol's timeout): stopping does not wait for it.
            (None, Some(r)) if Instant::now() >= next_try => match tokio::select! {
                granted = map(r, port, lifetime) => granted,
                _ = &mut stop => return,
            } {
                Ok(m) => {
                    tracing::info!(
                        protocol = %m.protocol, gateway = %m.gateway, external = %m.external,
                        lifetime_s = m.lifetime.as_secs(), "the gateway maps a port to ipop"
                    );
                    announce(Some(&m));
                    set(&status, PortMapStatus::mapped(&m, renewals));
                    current = Some(m);
                }
                Err(refused) => {
                    tracing::info!(gateway = %r.gateway, "no port mapping: {refused}");
                    set(
                        &status,
                        PortMapStatus::none(format!(
                            "the gateway {} refused or did not answer: {refused}",
                            r.gateway
                        )),
                    );
                    next_try = Instant::now() + retry;
                    retry = (retry * 2).min(RETRY_MAX);
                }
            },
            (Some(m), _) if Instant::now() >= m.renew_at() => {
                let before = m.external;
                match m.renew().await {
                    Ok(()) => {
                        renewals += 1;
                        if m.external != before {
                            announce(Some(m));
                        }
                        set(&status, PortMapStatus::mapped(m, renewals));
                    }
                    Err(e) => {
                        tracing::warn!(external = %m.external, "the gateway did not renew the port mapping: {e}");
                        current = None;
                        announce(None);
                        next_try = Instant::now();
                    }
                }
            }
            (Some(m), _) => set(&status, PortMapStatus::mapped(m, renewals)),
            (None, Some(_)) => {}
        }
        let mut wake = Instant::now() + RECHECK;
        if let Some(m) = &current {
            wake = wake.min(m.renew_at());
        } else if route.is_some() {
            wake = wake.min(next_try);
        }
        tokio::select! {
            _ = tokio::time::sleep_until(wake.into()) => {}
            _ = &mut stop => break,
        }
    }
    if let Some(m) = current {
        let external = m.external;
        match m.delete().await {
            Ok(()) => tracing::info!(%external, "port mapping deleted"),
            Err(e) => tracing::warn!(%external, "cannot delete the port mapping: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_route_is_read_from_the_kernel_table() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth0\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                     eth0\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        assert_eq!(gateway_of(table), Some(Ipv4Addr::new(192, 168, 1, 1)));
    }

    #[test]
    fn a_gateway_with_a_private_address_lies_behind_another_nat() {
        for ip in [
            "10.1.2.3",
            "192.168.0.1",
            "172.16.5.5",
            "100.64.0.1",
            "100.127.255.254",
        ] {
            assert!(beyond_another_nat(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["198.51.100.7", "100.63.255.255", "100.128.0.1", "8.8.8.8"] {
            assert!(!beyond_another_nat(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn a_table_without_a_default_route_through_a_gateway_has_none() {
        let header = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n";
        let on_link = format!("{header}eth0\t00000000\t00000000\t0001\t0\t0\t0\t00000000\n");
        assert_eq!(gateway_of(&on_link), None);
        let down = format!("{header}eth0\t00000000\t0101A8C0\t0002\t0\t0\t0\t00000000\n");
        assert_eq!(gateway_of(&down), None);
        assert_eq!(gateway_of(header), None);
        assert_eq!(gateway_of("garbage\nx y\n"), None);
    }
}
