//! `ipop`: a peer-to-peer VPN whose membership and signalling come from XMPP.

mod dataplane;
mod device;
mod doctor;
mod exit;
mod forward;
mod init;
mod netlink;
mod overlays;
mod ping;
mod relay;
mod state;
mod streams;
mod udp;
mod xmpp;

use anyhow::{Context, bail};
use clap::{CommandFactory, Parser, Subcommand};
use config::Config;
use ipnet::IpNet;
use ipop::{coalesce, config, control, dns, metrics, portmap, status};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "ipop",
    version,
    about = "Peer-to-peer VPN whose membership and signalling come from XMPP"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a commented config for an XMPP account (or, with --static, for static peers), this
    /// device's private key and the account's password file.
    Init(init::InitArgs),
    /// Run the daemon in the foreground until SIGINT or SIGTERM.
    Up {
        #[arg(short, long, env = "IPOP_CONFIG", default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Show the links of the running daemon.
    Status {
        #[arg(short, long, env = "IPOP_CONFIG", default_value = config::DEFAULT_PATH)]
        config: PathBuf,
        /// Print JSON (the stable format for scripts) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Check, step by step, what links need: config, XMPP login, STUN, NAT type, TURN, TUN.
    Doctor {
        #[arg(short, long, env = "IPOP_CONFIG", default_value = config::DEFAULT_PATH)]
        config: PathBuf,
        /// Print the checks as a JSON array of {check, verdict, detail, advice}.
        #[arg(long)]
        json: bool,
    },
    /// Print this device's public key and its fingerprint.
    Key {
        #[arg(short, long, env = "IPOP_CONFIG", default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Accept the new key that DEVICE (JID/DEVICE) announces in place of the one pinned for it,
    /// or move to DEVICE a key pinned for another device (whose pin and link then go). Compare
    /// its fingerprint (in `ipop status`) with the one its owner sees in `ipop key`.
    Trust {
        device: String,
        #[arg(short, long, env = "IPOP_CONFIG", default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Send internet traffic through an exit: JID/DEVICE (a device that offers to be one),
    /// `auto` (the fastest that is up), or `none`. Until the daemon restarts; `[device] exit`
    /// sets it for good.
    Exit {
        exit: String,
        #[arg(short, long, env = "IPOP_CONFIG", default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Manage the members of a group room that you own.
    Group {
        #[command(subcommand)]
        action: GroupAction,
        #[arg(short, long, env = "IPOP_CONFIG", default_value = config::DEFAULT_PATH, global = true)]
        config: PathBuf,
    },
    /// Ping a device through its tunnel (setting the link up if it is idle) and show the path
    /// that answers (direct or relay, endpoint, ICE pair) and each round-trip time.
    Ping(ping::PingArgs),
    /// Print the completion script for SHELL: `ipop completions bash >
    /// /etc/bash_completion.d/ipop`, or zsh, fish, elvish, powershell.
    Completions { shell: clap_complete::Shell },
    /// Write the manual pages (ipop.1 and one per command) into DIR, as the Debian package
    /// installs them.
    #[command(hide = true)]
    Man { dir: PathBuf },
}

#[derive(Subcommand)]
enum GroupAction {
    /// Make JID a member of ROOM: their devices join the group's overlay.
    Add { room: String, jid: String },
    /// Take membership of ROOM away from JID: their links are torn down.
    Remove { room: String, jid: String },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Init(args) => init::run(&args),
        Command::Up { config } => up(&config),
        Command::Status { config, json } => status(&config, json),
        Command::Doctor { config, json } => doctor::run(&config, json),
        Command::Key { config } => key(&config),
        Command::Group { action, config } => group(&config, action),
        Command::Trust { device, config } => trust(&config, &device),
        Command::Exit { exit, config } => set_exit(&config, &exit),
        Command::Ping(args) => ping::run(&args),
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "ipop", &mut script);
            print_bytes(&script)
        }
        Command::Man { dir } => clap_mangen::generate_to(Cli::command(), &dir)
            .with_context(|| format!("cannot write the manual pages into {}", dir.display())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ipop: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn key(config: &Path) -> anyhow::Result<()> {
    let config = Config::load(config)?;
    let secret = config::read_secret(&config.key_path())?;
    let public = ipop_core::PublicKey::from_secret(&secret);
    print_out(&format!("{public}\n{}\n", public.fingerprint()))
}

/// Writes to stdout; a reader that went away (`ipop key | head -1`) is not an error.
fn print_out(text: &str) -> anyhow::Result<()> {
    print_bytes(text.as_bytes())
}

fn print_bytes(bytes: &[u8]) -> anyhow::Result<()> {
    match std::io::stdout().lock().write_all(bytes) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn status(config: &Path, json: bool) -> anyhow::Result<()> {
    let config = Config::load(config)?;
    let answer = runtime()?.block_on(control::ask(&config.control_socket(), "status"))?;
    if json {
        print_out(&format!("{answer}\n"))
    } else {
        let s: status::Status =
            serde_json::from_str(&answer).context("the daemon's answer is not a status")?;
        print_out(&status::render(&s))
    }
}

/// A device named on the command line as JID/DEVICE, split into its JID and device name.
pub(crate) fn split_device(device: &str) -> anyhow::Result<(&str, &str)> {
    match device.split_once('/') {
        Some((jid, name))
            if jid.contains('@') && !name.is_empty() && !device.contains(char::is_whitespace) =>
        {
            Ok((jid, name))
        }
        _ => bail!("{device:?} is not JID/DEVICE, like alice@example.org/laptop"),
    }
}

/// Sends `command` to the running daemon and returns its JSON answer, or its error.
fn ask_daemon(config: &Config, command: &str) -> anyhow::Result<serde_json::Value> {
    let answer = runtime()?.block_on(control::ask(&config.control_socket(), command))?;
    let v: serde_json::Value =
        serde_json::from_str(&answer).context("the daemon's answer is not JSON")?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        bail!("{e}");
    }
    Ok(v)
}

fn trust(config: &Path, device: &str) -> anyhow::Result<()> {
    let config = Config::load(config)?;
    split_device(device)?;
    let v = ask_daemon(&config, &format!("trust {device}"))?;
    let fingerprint = v["fingerprint"].as_str().unwrap_or("?");
    print_out(&format!("{device} is now trusted with key {fingerprint}\n"))
}

fn set_exit(config: &Path, exit: &str) -> anyhow::Result<()> {
    let config = Config::load(config)?;
    config::parse_exit(exit).map_err(|e| anyhow::anyhow!(e))?;
    let v = ask_daemon(&config, &format!("exit {exit}"))?;
    let e = &v["exit"];
    let line = match (e["in_use"].as_str(), e["state"].as_str()) {
        (_, Some("off")) | (None, None) => "internet traffic goes the host's own way".to_owned(),
        (Some(d), Some(state)) => format!("exit {d}: {state}"),
        (None, Some(state)) => format!("no exit offered yet: {state}"),
        (Some(d), None) => format!("exit {d}"),
    };
    print_out(&format!("{line}\n"))
}

fn group(config: &Path, action: GroupAction) -> anyhow::Result<()> {
    let config = Config::load(config)?;
    let (verb, room, jid) = match &action {
        GroupAction::Add { room, jid } => ("add", room, jid),
        GroupAction::Remove { room, jid } => ("remove", room, jid),
    };
    for word in [room, jid] {
        if word.is_empty() || word.contains(char::is_whitespace) {
            bail!("{word:?} is not a JID");
        }
    }
    ask_daemon(&config, &format!("group {verb} {room} {jid}"))?;
    let done = if verb == "add" {
        "is now a member of"
    } else {
        "is no longer a member of"
    };
    print_out(&format!("{jid} {done} {room}\n"))
}

fn up(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    // Before anything is set up: a secret that other users can read stops ipop here.
    config.check_secret_files()?;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .or_else(|| config.device.log_level.clone())
        .unwrap_or_else(|| "info".to_owned());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&filter)
                .with_context(|| format!("invalid log level {filter:?}"))?,
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    if let Some(warning) = config.open_inline_secrets(path) {
        tracing::warn!("{warning}");
    }
    let secret = config::read_secret(&config.key_path())?;
    let node = ipop_core::Node::new(secret, config.peer_configs())
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let public = node.public_key();
    let seed = rand_core::RngCore::next_u64(&mut rand_core::OsRng);
    let secret = rand_core::RngCore::next_u64(&mut rand_core::OsRng);
    let state = state::State::new(&config.state_dir());
    let memory = state.load()?;
    let mut engine = ipop_core::Engine::new(node, config.overlays(), memory.clone(), seed, secret);
    engine.set_config_servers(config.ice_servers()?);
    // Addresses chosen now must be the same after a restart.
    if *engine.memory() != memory {
        state.save(engine.memory())?;
    }
    let mut addresses = config.interface.addresses.clone();
    let mut ula = Vec::new();
    // The networks of the overlays this device is an exit for.
    let mut carried = Vec::new();
    let exit_for: Vec<ipop_core::osn::OverlayId> = config
        .overlays()
        .into_iter()
        .filter(ipop_core::OverlayConfig::is_exit)
        .map(|o| o.id)
        .collect();
    for own in engine.own_addresses() {
        tracing::info!(overlay = %own.overlay, v4 = %own.v4, v6 = %own.v6, "overlay addresses");
        addresses.push(IpNet::V4(own.v4));
        ula.push(own.v6);
        if exit_for.contains(&own.overlay) {
            carried.extend([IpNet::V4(own.v4.trunc()), IpNet::V6(own.v6.trunc())]);
        }
    }
    let routes = device::extra_routes(&addresses, config.peers.iter().flat_map(|p| &p.addresses));
    let dns = config.dns.enabled.then(|| overlays::DnsSettings {
        suffix: config.dns.suffix.clone(),
        port: config.dns.port,
        carried,
        through_exit: config.device.exit_dns,
    });
    engine.set_exit(config.device.exit.clone());
    let mut keeper = overlays::Keeper::new(state, &engine, &config.interface.name, dns);
    keeper.set_exit_fallback(config.device.exit_fallback);
    let claims = engine.claims();
    runtime()?.block_on(async {
        // Log in first: a wrong password or an unreachable server ends here, with nothing to
        // undo.
        // A relay announces itself in the presence: it starts before the login.
        let relay = if config.relay.enabled {
            let r = &config.relay;
            let limits = ipop_core::peer_relay::RelayLimits {
                max_pairs: r.max_pairs,
                pair_rate: r.pair_rate * 1_000_000 / 8,
                total_rate: r.total_rate * 1_000_000 / 8,
            };
            let port = if r.port != 0 {
                r.port
            } else {
                config
                    .interface
                    .listen_port
                    .checked_add(1)
                    .filter(|_| config.interface.listen_port != 0)
                    .unwrap_or(0)
            };
            let hosts = device::host_addresses(&config.interface.name);
            Some(relay::Relay::start(port, r.endpoint, &hosts, limits).await?)
        } else {
            None
        };
        let binding = xmpp::start(
            &config,
            public,
            &claims,
            relay.as_ref().and_then(relay::Relay::offer),
        )
        .await?;
        let mut plane = dataplane::Dataplane::new(
            engine,
            keeper,
            &config.interface,
            &addresses,
            &ula,
            &routes,
        )?;
        plane.discover_host_candidates();
        plane.set_advertised_routes(
            config
                .overlays()
                .iter()
                .filter(|o| !o.advertise.is_empty())
                .map(|o| {
                    let list = o.advertise.iter().map(ToString::to_string).collect();
                    (o.id.to_string(), list)
                })
                .collect(),
        );
        let advertised = config.advertised_routes();
        // Only what comes from an address of the overlays is forwarded.
        let sources: Vec<IpNet> = addresses
            .iter()
            .map(IpNet::trunc)
            .chain(ula.iter().map(|u| IpNet::V6(u.trunc())))
            .collect();
        let _forwarding = if advertised.is_empty() {
            None
        } else {
            Some(forward::Forwarding::start(
                &config.interface.name,
                &advertised,
                &sources,
            )?)
        };
        plane.trust_ca_file(
            config
                .xmpp
                .as_ref()
                .and_then(|x| x.ca_file.as_ref())
                .map(|p| config.resolve(p)),
        );
        let mapper = if config.nat.port_mapping {
            let (found, news) = tokio::sync::mpsc::unbounded_channel();
            let mapper = portmap::PortMapper::spawn(
                plane.listen_port(),
                config.nat.port_mapping_lifetime,
                found,
            );
            plane.set_port_map(dataplane::PortMap {
                found: news,
                status: Box::new(mapper.status_fn()),
            });
            mapper
        } else {
            portmap::PortMapper::off()
        };
        if let Some(r) = &relay {
            plane.set_relay_status(Box::new(r.status_fn()));
        }
        let (requests_tx, requests) = tokio::sync::mpsc::channel(16);
        let _control =
            control::ControlSocket::bind(&config.control_socket(), requests_tx.clone()).await?;
        if let Some(m) = &config.metrics {
            let bound = metrics::serve(m.listen, requests_tx).await?;
            tracing::info!("metrics on http://{bound}/metrics");
        }
        tracing::info!(
            interface = %config.interface.name,
            port = plane.listen_port(),
            key = %public.fingerprint(),
            peers = config.peers.len(),
            "ipop is up"
        );
        let (requests, osn, binding) = match binding {
            Some((binding, osn)) => {
                plane.set_xmpp_info(binding.info());
                plane.set_xmpp_server(binding.server_ip());
                plane.set_announcer(binding.announcer());
                let (to_plane, plane_requests) = tokio::sync::mpsc::channel(16);
                binding.route_commands(requests, to_plane);
                (plane_requests, Some(osn), Some(binding))
            }
            None => (requests, None, None),
        };
        plane.run(requests, osn, shutdown_signal()?).await;
        tracing::info!("shutting down");
        mapper.shutdown().await;
        if let Some(binding) = binding {
            binding.shutdown().await;
        }
        Ok(())
    })
}

/// Resolves on the first SIGINT or SIGTERM.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}
