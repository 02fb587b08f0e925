//! The daemon's side of the overlays, outside the packet path: it keeps what the engine
//! remembers on disk, moves this device's address when a group collision makes the engine move
//! it (on the interface and in the device's presence), and answers DNS for peers' names.
//! What can wait on the system (writing the state with fsync, `resolvectl`) runs on a worker
//! thread of its own, never on the packet loop.

use crate::config::ExitFallback;
use crate::dns::{self, Forwarding, NameTable};
use crate::state::State;
use ipnet::IpNet;
use ipop_core::osn::{Claim, DeviceId, OverlayId};
use ipop_core::{Engine, EngineEvent, ExitChoice, ExitStatus, RouteState};
use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle as ThreadHandle;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tun_rs::AsyncDevice;

/// Tells the social network binding which address this device claims in an overlay.
pub type Announcer = mpsc::UnboundedSender<(OverlayId, Option<Claim>)>;

/// DNS settings the keeper serves with.
pub struct DnsSettings {
    pub suffix: String,
    pub port: u16,
    /// The networks of the overlays this device is an exit for: their devices' queries are
    /// forwarded to this host's resolvers.
    pub carried: Vec<IpNet>,
    /// Whether this device's own queries go through the exit in use, when it answers DNS.
    pub through_exit: bool,
}

pub struct Keeper {
    /// Jobs for the worker thread, in order.
    jobs: Option<std::sync::mpsc::Sender<Job>>,
    worker: Option<ThreadHandle<()>>,
    /// Whether the worker registered the DNS routing domain with systemd-resolved.
    registered: Arc<AtomicBool>,
    saved: u64,
    interface: String,
    announce: Option<Announcer>,
    dns: Option<Dns>,
    /// The engine's routes version the TUN device's routes were last set from.
    routes_seen: u64,
    /// What internet traffic does while the exit is not up.
    exit_fallback: ExitFallback,
    /// Reads the XMPP server's address, which stays off the tunnel while an exit is in use.
    xmpp_server: Option<Box<dyn Fn() -> Option<IpAddr> + Send>>,
    /// The exit routing last asked of the worker: on or not, and the servers kept off it.
    exit_sent: Option<(bool, Vec<IpAddr>)>,
}

struct Dns {
    settings: DnsSettings,
    names: watch::Sender<NameTable>,
    forwarding: watch::Sender<Forwarding>,
    server: Option<JoinHandle<()>>,
    bound: Vec<IpAddr>,
    /// The addresses systemd-resolved was last given, which the responder is bound to.
    servers: Vec<IpAddr>,
    /// The exit's responder that this device's own queries go to.
    exit: Option<SocketAddr>,
    /// Whether every name is sent here (DNS through the exit), or only the suffix's.
    everything: bool,
    /// What the names were last built from: the engine's addresses version, this device and
    /// its own addresses.
    seen: Option<(u64, Option<DeviceId>, Vec<IpAddr>)>,
}

impl Keeper {
    /// A keeper that saves to `state` (already up to date with `engine`) and serves DNS when
    /// `dns` is set.
    pub fn new(state: State, engine: &Engine, interface: &str, dns: Option<DnsSettings>) -> Self {
        let registered = Arc::new(AtomicBool::new(false));
        let (jobs, queue) = std::sync::mpsc::channel();
        let done = registered.clone();
        let exit = crate::exit::ExitRouting::new(interface);
        let worker = std::thread::Builder::new()
            .name("ipop-keeper".into())
            .spawn(move || work(&state, &queue, &done, exit))
            .map_err(|e| tracing::error!("no worker thread for the state and DNS: {e}"))
            .ok();
        Keeper {
            jobs: worker.is_some().then_some(jobs),
            worker,
            registered,
            saved: engine.memory_version(),
            interface: interface.to_owned(),
            announce: None,
            routes_seen: 0,
            exit_fallback: ExitFallback::Block,
            xmpp_server: None,
            exit_sent: None,
            dns: dns.map(|settings| Dns {
                names: watch::Sender::new(NameTable::new(&settings.suffix)),
                forwarding: watch::Sender::new(Forwarding::default()),
                settings,
                server: None,
                bound: Vec::new(),
                servers: Vec::new(),
                exit: None,
                everything: false,
                seen: None,
            }),
        }
    }

    /// Where address changes are announced (the XMPP binding).
    pub fn set_announcer(&mut self, announce: Announcer) {
        self.announce = Some(announce);
    }

    /// What internet traffic does while the exit is not up.
    pub fn set_exit_fallback(&mut self, fallback: ExitFallback) {
        self.exit_fallback = fallback;
    }

    pub fn exit_fallback(&self) -> ExitFallback {
        self.exit_fallback
    }

    /// The exit's DNS responder, while this device's DNS goes through it.
    pub fn exit_dns(&self) -> Option<SocketAddr> {
        self.dns.as_ref().and_then(|d| d.exit)
    }

    /// Where the XMPP server's address is read, to keep it off the tunnel.
    pub fn set_xmpp_server(&mut self, f: Box<dyn Fn() -> Option<IpAddr> + Send>) {
        self.xmpp_server = Some(f);
    }

    /// Routes internet traffic into the tunnel while an exit is chosen and up (or, with the
    /// `block` fallback, chosen), keeping the servers ipop needs off the tunnel.
    fn follow_exit(&mut self, engine: &Engine) {
        let exit = engine.exit_status();
        if exit.choice == ExitChoice::Off && self.exit_sent.is_none() {
            return;
        }
        let on = exit.choice != ExitChoice::Off
            && (exit.up || self.exit_fallback == ExitFallback::Block);
        let mut servers: Vec<IpAddr> = engine.servers().map(|s| s.address.ip()).collect();
        servers.extend(self.xmpp_server.as_ref().and_then(|f| f()));
        servers.sort();
        servers.dedup();
        let wanted = (on, servers);
        if self.exit_sent.as_ref() != Some(&wanted) {
            self.send(Job::Exit {
                on: wanted.0,
                servers: wanted.1.clone(),
            });
            self.exit_sent = Some(wanted);
        }
        self.follow_exit_dns(engine, &exit, on);
    }

    /// While internet traffic goes to an exit (`on`) that answers DNS, and `exit_dns` allows,
    /// every name goes to the responder (systemd-resolved is told), and the responder sends
    /// what is not under the suffix to the exit's, while the exit is up. Otherwise the
    /// responder answers for the suffix only.
    fn follow_exit_dns(&mut self, engine: &Engine, exit: &ExitStatus, on: bool) {
        let Some(dns) = self.dns.as_mut() else {
            return;
        };
        let everything = dns.settings.through_exit && on && exit.dns.is_some();
        let to = exit
            .dns
            .zip(exit.in_use.as_ref())
            .filter(|_| everything && exit.up)
            .and_then(|(port, device)| {
                let hosts = || {
                    engine
                        .link_addresses(device)
                        .iter()
                        .filter(|n| n.prefix_len() == n.max_prefix_len())
                        .map(IpNet::addr)
                };
                let addr = hosts().find(IpAddr::is_ipv4).or_else(|| hosts().next())?;
                Some(SocketAddr::new(addr, port))
            });
        if to != dns.exit {
            match to {
                Some(to) => tracing::info!(%to, "DNS goes through the exit"),
                None => tracing::info!("DNS no longer goes through an exit"),
            }
            dns.exit = to;
            publish_forwarding(dns);
        }
        if everything != dns.everything {
            dns.everything = everything;
            if !dns.servers.is_empty() {
                let job = Job::Register {
                    interface: self.interface.clone(),
                    servers: dns.servers.clone(),
                    suffix: dns.settings.suffix.clone(),
                    everything,
                };
                self.send(job);
            }
        }
    }

    /// Runs after the engine handled something: applies address changes, saves what changed,
    /// and refreshes DNS now and then.
    pub fn after(&mut self, engine: &mut Engine, tun: &AsyncDevice) {
        while let Some(event) = engine.poll_event() {
            match event {
                EngineEvent::AddressChanged { overlay, old, new } => {
                    self.move_address(engine, tun, &overlay, old.into(), new.into());
                }
            }
        }
        if engine.memory_version() != self.saved {
            self.saved = engine.memory_version();
            self.send(Job::Save(engine.memory().clone()));
        }
        if engine.routes_version() != self.routes_seen {
            self.routes_seen = engine.routes_version();
            let wanted = engine
                .routes()
                .iter()
                .filter_map(|r| match r.state {
                    // An exit's default routes go in a table of their own (see `exit`): in the
                    // main table they would replace the host's.
                    RouteState::Accepted { source } if r.prefix.prefix_len() > 0 => {
                        Some((r.prefix, source))
                    }
                    _ => None,
                })
                .collect();
            match tun.if_index() {
                Ok(ifindex) => self.send(Job::Routes { ifindex, wanted }),
                Err(e) => tracing::error!("cannot route prefixes into {}: {e}", self.interface),
            }
        }
        self.follow_exit(engine);
        self.refresh_dns(engine, tun, false);
    }

    fn move_address(
        &mut self,
        engine: &Engine,
        tun: &AsyncDevice,
        overlay: &OverlayId,
        old: IpAddr,
        new: IpAddr,
    ) {
        let Some(own) = engine
            .own_addresses()
            .into_iter()
            .find(|o| &o.overlay == overlay)
        else {
            return;
        };
        if let Err(e) = tun.remove_address(old) {
            tracing::warn!(%old, "cannot remove the old address from {}: {e}", self.interface);
        }
        if let Err(e) = tun.add_address_v4(own.v4.addr(), own.v4.prefix_len()) {
            tracing::error!(%new, "cannot add the new address to {}: {e}", self.interface);
        }
        tracing::warn!(%overlay, %old, %new, "this device's address moved");
        if let Some(a) = &self.announce {
            let claim = engine
                .claims()
                .into_iter()
                .find(|(o, _)| o == overlay)
                .map(|(_, c)| c);
            let _ = a.send((overlay.clone(), claim));
        }
        self.refresh_dns(engine, tun, true);
    }

    /// Rebuilds the name table from the links when what it is built from changed (a peer came,
    /// went or changed its addresses; this device's name or addresses changed) or when
    /// `force`, and rebinds the responder when this device's addresses changed. Otherwise it
    /// costs a comparison: it runs after every timer of the packet loop.
    fn refresh_dns(&mut self, engine: &Engine, tun: &AsyncDevice, force: bool) {
        let Some(dns) = self.dns.as_mut() else {
            return;
        };
        let own = own_addresses(engine);
        let basis = (engine.addresses_version(), engine.me().cloned(), own);
        if !force && dns.seen.as_ref() == Some(&basis) {
            return;
        }
        let own = dns.seen.insert(basis).2.clone();
        let table = names(engine, &dns.settings.suffix, &own);
        dns.names.send_if_modified(|t| {
            let changed = *t != table;
            *t = table;
            changed
        });
        if own != dns.bound {
            if let Some(server) = dns.server.take() {
                server.abort();
            }
            // Only the addresses the interface has (IPv6 may be off on this host).
            let on_interface = tun.addresses().unwrap_or_default();
            let addrs: Vec<IpAddr> = own
                .iter()
                .copied()
                .filter(|a| on_interface.contains(a))
                .collect();
            let (port, names, bind) = (dns.settings.port, dns.names.subscribe(), addrs.clone());
            let forwarding = dns.forwarding.subscribe();
            dns.server = Some(tokio::spawn(async move {
                let sockets = dns::bind(&bind, port).await;
                dns::serve(sockets, names, forwarding).await;
            }));
            dns.bound = own;
            publish_forwarding(dns);
            if !addrs.is_empty() {
                dns.servers.clone_from(&addrs);
                let job = Job::Register {
                    interface: self.interface.clone(),
                    servers: addrs,
                    suffix: dns.settings.suffix.clone(),
                    everything: dns.everything,
                };
                self.send(job);
            }
        }
    }

    /// Hands a job to the worker thread.
    fn send(&self, job: Job) {
        if let Some(jobs) = &self.jobs {
            let _ = jobs.send(job);
        }
    }

    /// Stops the responder, waits for the worker to finish its jobs (the last state is
    /// saved), and takes the routing domain back from systemd-resolved.
    pub fn shutdown(&mut self) {
        if let Some(server) = self.dns.as_mut().and_then(|d| d.server.take()) {
            server.abort();
        }
        self.jobs = None;
        if let Some(worker) = self.worker.take()
            && worker.join().is_err()
        {
            tracing::error!("the worker thread for the state and DNS failed");
        }
        if self.registered.load(Ordering::Relaxed) {
            dns::unregister_from_resolved(&self.interface);
        }
    }
}

/// What the worker thread does for the keeper.
enum Job {
    /// Writes what the engine remembers to the state file (with fsync).
    Save(ipop_core::Memory),
    /// Gives systemd-resolved this interface's DNS servers and routing domain, or every name
    /// (`everything`).
    Register {
        interface: String,
        servers: Vec<IpAddr>,
        suffix: String,
        everything: bool,
    },
    /// Routes exactly these prefixes into the interface, each from its source address.
    Routes {
        ifindex: u32,
        wanted: Vec<(IpNet, IpAddr)>,
    },
    /// Internet traffic through the exit (`on`), the servers kept off it, or not.
    Exit { on: bool, servers: Vec<IpAddr> },
}

/// Tells the responder where its refusals go now.
fn publish_forwarding(dns: &Dns) {
    let wanted = Forwarding {
        own: dns.bound.clone(),
        exit: dns.exit,
        carried: dns.settings.carried.clone(),
    };
    dns.forwarding.send_if_modified(|f| {
        let changed = *f != wanted;
        *f = wanted;
        changed
    });
}

/// The worker thread: runs the jobs in order until the keeper goes.
fn work(
    state: &State,
    jobs: &std::sync::mpsc::Receiver<Job>,
    registered: &AtomicBool,
    mut exit: crate::exit::ExitRouting,
) {
    let mut routed: Vec<(IpNet, IpAddr)> = Vec::new();
    for job in jobs {
        match job {
            Job::Save(memory) => {
                if let Err(e) = state.save(&memory) {
                    tracing::error!("cannot save the state to {}: {e:#}", state.path().display());
                }
            }
            Job::Register {
                interface,
                servers,
                suffix,
                everything,
            } => {
                let done = dns::register_with_resolved(&interface, &servers, &suffix, everything);
                registered.store(done, Ordering::Relaxed);
            }
            Job::Routes { ifindex, wanted } => set_routes(ifindex, &mut routed, wanted),
            Job::Exit { on, servers } => exit.set(on, servers),
        }
    }
}

/// Moves the routes into the interface from `routed` to `wanted`: what is no longer wanted
/// goes, what is new comes. A route the kernel refuses is logged and left out.
fn set_routes(ifindex: u32, routed: &mut Vec<(IpNet, IpAddr)>, wanted: Vec<(IpNet, IpAddr)>) {
    for &(net, _) in routed.iter().filter(|r| !wanted.contains(r)) {
        match crate::netlink::delete_route(ifindex, net) {
            Ok(()) => tracing::info!(%net, "no longer routed into the tunnel"),
            Err(e) => tracing::debug!(%net, "cannot remove the route: {e}"),
        }
    }
    let mut now = Vec::new();
    for (net, source) in wanted {
        if routed.contains(&(net, source)) {
            now.push((net, source));
            continue;
        }
        match crate::netlink::add_route_from(ifindex, net, source) {
            Ok(()) => {
                tracing::info!(%net, %source, "routed into the tunnel");
                now.push((net, source));
            }
            Err(e) => tracing::error!(%net, %source, "cannot route into the tunnel: {e}"),
        }
    }
    *routed = now;
}

/// This device's addresses in every overlay, IPv4 and IPv6.
fn own_addresses(engine: &Engine) -> Vec<IpAddr> {
    engine
        .own_addresses()
        .iter()
        .flat_map(|o| [IpAddr::V4(o.v4.addr()), IpAddr::V6(o.v6.addr())])
        .collect()
}

/// The names of this device (at `own`) and of every device it has a link with, up or idle:
/// `device.user.domain.SUFFIX` with the addresses this device reaches it at, and
/// `user.domain.SUFFIX` for the user's first device.
fn names(engine: &Engine, suffix: &str, own: &[IpAddr]) -> NameTable {
    let mut table = NameTable::new(suffix);
    let mut users = BTreeSet::new();
    let mut add = |user: &str, device: &str, addrs: &[IpAddr]| {
        for &a in addrs {
            table.insert(&dns::device_name(user, device, suffix), a);
        }
        if users.insert(user.to_owned()) {
            for &a in addrs {
                table.insert(&dns::user_name(user, suffix), a);
            }
        }
    };
    if let Some(me) = engine.me() {
        add(&me.user, &me.device, own);
    }
    for link in engine.links() {
        let hosts: Vec<IpAddr> = link
            .addresses
            .iter()
            .filter(|n| n.prefix_len() == n.max_prefix_len())
            .map(IpNet::addr)
            .collect();
        add(&link.device.user, &link.device.device, &hosts);
    }
    table
}
