//! Host names that resolve inside one namespace. `ip netns exec NAME` shows the files of
//! `/etc/netns/NAME/` in place of those of `/etc`, so a `hosts` file there names addresses for
//! the programs started with [`Netns::command`] (not for threads of [`Netns::run_in`]).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Once;

use crate::PREFIX;
use crate::netns::{Netns, exists};

/// Where `ip netns exec` looks for a namespace's own `/etc` files.
const NETNS_ETC: &str = "/etc/netns";

static SWEEP: Once = Once::new();

/// A `hosts` file for one namespace: the machine's `/etc/hosts` and the names given.
///
/// Dropping it removes `/etc/netns/NAME`.
#[derive(Debug)]
pub struct NetnsHosts {
    dir: PathBuf,
}

impl NetnsHosts {
    /// Makes each `(name, address)` resolve in `ns`, besides the names of `/etc/hosts`.
    ///
    /// # Panics
    /// When the file cannot be written.
    #[must_use]
    pub fn new(ns: &Netns, entries: &[(&str, IpAddr)]) -> NetnsHosts {
        SWEEP.call_once(sweep_stale_hosts);
        let dir = Path::new(NETNS_ETC).join(ns.name());
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let hosts = NetnsHosts { dir };
        let mut text = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        for (name, address) in entries {
            text.push_str(&format!("{address} {name}\n"));
        }
        let path = hosts.dir.join("hosts");
        std::fs::write(&path, text)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        hosts
    }

    /// The file, `/etc/netns/NAME/hosts`.
    #[must_use]
    pub fn path(&self) -> PathBuf {
        self.dir.join("hosts")
    }
}

impl Drop for NetnsHosts {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("cannot remove {}: {e}", self.dir.display());
        }
    }
}

/// A `resolv.conf` for one namespace: the programs started there with [`Netns::command`] ask
/// `nameserver` for names, and nothing else.
///
/// Dropping it removes the file, and `/etc/netns/NAME` when nothing else is left in it.
#[derive(Debug)]
pub struct NetnsResolver {
    path: PathBuf,
}

impl NetnsResolver {
    /// # Panics
    /// When the file cannot be written.
    #[must_use]
    pub fn new(ns: &Netns, nameserver: IpAddr) -> NetnsResolver {
        SWEEP.call_once(sweep_stale_hosts);
        let dir = Path::new(NETNS_ETC).join(ns.name());
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let resolver = NetnsResolver {
            path: dir.join("resolv.conf"),
        };
        std::fs::write(
            &resolver.path,
            format!("nameserver {nameserver}\noptions timeout:2 attempts:2\n"),
        )
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", resolver.path.display()));
        resolver
    }
}

impl Drop for NetnsResolver {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            eprintln!("cannot remove {}: {e}", self.path.display());
        }
        if let Some(dir) = self.path.parent() {
            // Left in place while a hosts file is still there.
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Removes the `/etc/netns/ipl-*` directories of namespaces that no longer exist, left by a
/// test process that died without running destructors. [`NetnsHosts::new`] calls it once per
/// process.
pub fn sweep_stale_hosts() {
    let Ok(entries) = std::fs::read_dir(NETNS_ETC) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(PREFIX) && !exists(&name) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_inside_the_namespace_until_dropped() {
        let ns = Netns::new("hosts");
        let address: IpAddr = "198.18.0.2".parse().expect("address");
        let hosts = NetnsHosts::new(&ns, &[("turn.example.org", address)]);
        let out = ns.try_exec(&["getent", "hosts", "turn.example.org"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("198.18.0.2"), "{text}");
        let path = hosts.path();
        drop(hosts);
        assert!(!path.exists(), "removed on drop");
        let out = ns.try_exec(&["getent", "hosts", "turn.example.org"]);
        assert!(!out.status.success(), "the name is gone");
    }
}
