//! `ipop-flood`: sends forged WireGuard handshake initiations at a device, for benchmarks.
//!
//! ```text
//! ipop-flood --to 10.0.0.2:51820 --key BASE64 --from 10.0.0.201,10.0.0.202
//!            [--rate 20000] [--seconds 5] [--count N] [--forgery random|mac1|both]
//! ```
//!
//! Run it in the namespace that has the `--from` addresses. It prints what it did as one JSON
//! object: `sent`, `sent_valid_mac1`, `failed`, `cookie_replies`, `other_replies`, `seconds`,
//! `rate`.

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use base64::Engine as _;
use ipop_lab::{Flood, Forgery, flood};

const USAGE: &str = "usage: ipop-flood --to ADDR:PORT --key BASE64 --from IP[,IP...] \
                     [--rate N] [--seconds S] [--count N] [--forgery random|mac1|both]";

fn parse(args: &[String]) -> Result<Flood, String> {
    let mut target = None;
    let mut key = None;
    let mut sources = Vec::new();
    let mut rate = 20_000;
    let mut seconds = 5.0;
    let mut count = u64::MAX;
    let mut forgery = Forgery::Both;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value"))?
            .as_str();
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--to" => target = Some(value.parse::<SocketAddr>().map_err(|e| bad(&e))?),
            "--key" => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(value)
                    .map_err(|e| bad(&e))?;
                let bytes: [u8; 32] = bytes.try_into().map_err(|_| bad(&"a key is 32 bytes"))?;
                key = Some(bytes);
            }
            "--from" => {
                for ip in value.split(',') {
                    sources.push(ip.parse::<IpAddr>().map_err(|e| bad(&e))?);
                }
            }
            "--rate" => rate = value.parse().map_err(|e| bad(&e))?,
            "--seconds" => {
                seconds = value.parse::<f64>().map_err(|e| bad(&e))?;
                if !(seconds > 0.0 && seconds <= 3600.0) {
                    return Err(bad(&"between 0 and 3600 seconds"));
                }
            }
            "--count" => count = value.parse().map_err(|e| bad(&e))?,
            "--forgery" => {
                forgery = Forgery::parse(value).ok_or_else(|| bad(&"random, mac1 or both"))?;
            }
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    if sources.is_empty() {
        return Err("--from is required".into());
    }
    Ok(Flood {
        target: target.ok_or("--to is required")?,
        target_key: key.ok_or("--key is required")?,
        sources,
        rate,
        duration: Duration::from_secs_f64(seconds),
        max_datagrams: count,
        stop: None,
        forgery,
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let spec = match parse(&args) {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("ipop-flood: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match flood(&spec) {
        Ok(r) => {
            println!(
                "{}",
                serde_json::json!({
                    "sent": r.sent,
                    "sent_valid_mac1": r.sent_valid_mac1,
                    "failed": r.failed,
                    "cookie_replies": r.cookie_replies,
                    "other_replies": r.other_replies,
                    "seconds": r.elapsed.as_secs_f64(),
                    "rate": r.rate(),
                })
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ipop-flood: cannot bind the source addresses: {e}");
            ExitCode::FAILURE
        }
    }
}
