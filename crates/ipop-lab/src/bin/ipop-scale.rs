//! `ipop-scale`: the scale benchmark (run as root; `bench/scale.sh` builds and runs it).
//!
//! ```text
//! ipop-scale N [prosody|ejabberd] [all|on-demand|auto]
//! ```
//!
//! N devices in one group room and one device whose user has the N users as friends, each in
//! its own namespace with its own `ipop up`, on one XMPP server with its stock client rate
//! limits; every device has the given `links` policy (default `auto`) in the group and in the
//! social overlay. Prints a table of the time until every pair passes a ping, the on-demand
//! set-up time, the XMPP stanzas and bytes per device and per link, link offers and failed
//! signals, idle CPU and memory.
//!
//! Environment: `IPOP_BIN` (default `target/release/ipop`), `SCALE_TIMEOUT` (seconds for the
//! pairs to pass, default 600), `SCALE_IDLE_SECONDS` (idle measurement, default 30),
//! `SCALE_PING_WORKERS` (pings at once, default 8), `SCALE_JSON` (a file to write the report
//! to as JSON), `SCALE_LOGS` (a directory to copy the daemons' and the server's logs to),
//! `SCALE_REST_SECONDS` (an `idle_timeout` for the links, after which they close before the
//! final figures; unset, they stay up to the end), `SCALE_SEND_RATE` (every device's
//! `[xmpp] send_rate`, bytes per second, 0 for no pacing; unset, the default).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use ipop_lab::ServerKind;
use ipop_lab::scale::{self, LinkPolicy, Options};

const USAGE: &str = "usage: ipop-scale N [prosody|ejabberd] [all|on-demand|auto]";

fn env_number(name: &str, default: u64) -> Result<u64, String> {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .map_err(|e| format!("{name}={value:?} is not a number: {e}")),
        Err(_) => Ok(default),
    }
}

fn options(args: &[String]) -> Result<Options, String> {
    let (devices, server, links) = match args {
        [n] => (n, "prosody", "auto"),
        [n, server] => (n, server.as_str(), "auto"),
        [n, server, links] => (n, server.as_str(), links.as_str()),
        _ => return Err(USAGE.to_owned()),
    };
    let devices: u8 = devices
        .parse()
        .map_err(|e| format!("N {devices:?}: {e}; {USAGE}"))?;
    let server = match server {
        "prosody" => ServerKind::Prosody,
        "ejabberd" => ServerKind::Ejabberd,
        other => return Err(format!("unknown server {other:?}; {USAGE}")),
    };
    let links = LinkPolicy::parse(links)
        .ok_or_else(|| format!("unknown link policy {links:?}; {USAGE}"))?;
    let ipop = std::env::var_os("IPOP_BIN").map_or_else(scale::default_ipop, PathBuf::from);
    let workers = env_number("SCALE_PING_WORKERS", 16)?;
    Ok(Options {
        devices,
        server,
        links,
        ipop,
        timeout: Duration::from_secs(env_number("SCALE_TIMEOUT", 600)?),
        idle: Duration::from_secs(env_number("SCALE_IDLE_SECONDS", 30)?),
        ping_workers: usize::try_from(workers.clamp(1, 64)).unwrap_or(16),
        keep_logs: std::env::var_os("SCALE_LOGS").map(PathBuf::from),
        rest: match env_number("SCALE_REST_SECONDS", 0)? {
            0 => None,
            secs => Some(Duration::from_secs(secs)),
        },
        send_rate: match std::env::var("SCALE_SEND_RATE") {
            Ok(_) => Some(
                u32::try_from(env_number("SCALE_SEND_RATE", 0)?)
                    .map_err(|e| format!("SCALE_SEND_RATE: {e}"))?,
            ),
            Err(_) => None,
        },
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match options(&args) {
        Ok(opts) => opts,
        Err(e) => {
            eprintln!("ipop-scale: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = scale::stop_on_signals() {
        eprintln!("ipop-scale: {e}");
        return ExitCode::FAILURE;
    }
    let report = match scale::run(&opts) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("ipop-scale: {e}");
            return ExitCode::FAILURE;
        }
    };
    print!("{}", report.table());
    if let Some(path) = std::env::var_os("SCALE_JSON") {
        let text = format!("{:#}\n", report.json());
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!(
                "ipop-scale: cannot write {}: {e}",
                PathBuf::from(path).display()
            );
            return ExitCode::FAILURE;
        }
    }
    if report.interrupted {
        ExitCode::from(130)
    } else if report.timed_out || !report.exited.is_empty() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
