//! What the daemon keeps across restarts, in `state.json` in the state directory: the key
//! pinned for every device seen, this device's address in each group, and how it numbers the
//! devices of the social overlay.
//!
//! The file is replaced atomically (written beside, then renamed), readable by root alone. A
//! file that cannot be read is an error at start-up, never a silent reset: forgetting pinned
//! keys would let a new key in without asking.

use anyhow::Context;
use ipop_core::Memory;
use ipop_core::osn::DeviceId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

const FILE: &str = "state.json";

#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct File {
    /// `user/device` → base64 public key.
    #[serde(default)]
    pins: BTreeMap<String, String>,
    /// room → this device's address.
    #[serde(default)]
    groups: BTreeMap<String, Ipv4Addr>,
    /// `user/device` → the address this device gives it.
    #[serde(default)]
    social: BTreeMap<String, Ipv4Addr>,
}

fn device(s: &str) -> Option<DeviceId> {
    let (user, device) = s.split_once('/')?;
    (!user.is_empty() && !device.is_empty()).then(|| DeviceId::new(user, device))
}

/// The state file of a state directory.
pub struct State {
    path: PathBuf,
}

impl State {
    pub fn new(dir: &Path) -> State {
        State {
            path: dir.join(FILE),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the state; a missing file is an empty state.
    pub fn load(&self) -> anyhow::Result<Memory> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Memory::default()),
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read {}", self.path.display()));
            }
        };
        let file: File = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is damaged; fix it or move it away (pinned keys are then forgotten)",
                self.path.display()
            )
        })?;
        let mut memory = Memory::default();
        for (name, key) in file.pins {
            let d = device(&name)
                .with_context(|| format!("{}: {name:?} is not user/device", self.path.display()))?;
            let k = key
                .parse()
                .with_context(|| format!("{}: the key of {name}", self.path.display()))?;
            memory.pins.insert(d, k);
        }
        memory.group_addresses = file.groups;
        for (name, addr) in file.social {
            let d = device(&name)
                .with_context(|| format!("{}: {name:?} is not user/device", self.path.display()))?;
            memory.social_numbers.insert(d, addr);
        }
        Ok(memory)
    }

    /// Writes the state atomically, mode 0600, creating the directory (mode 0700) if needed.
    pub fn save(&self, memory: &Memory) -> anyhow::Result<()> {
        let file = File {
            pins: memory
                .pins
                .iter()
                .map(|(d, k)| (d.to_string(), k.to_string()))
                .collect(),
            groups: memory.group_addresses.clone(),
            social: memory
                .social_numbers
                .iter()
                .map(|(d, a)| (d.to_string(), *a))
                .collect(),
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        if !dir.exists() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        let text = serde_json::to_string_pretty(&file)?;
        // A name of this process's own: two daemons given one state directory by mistake must
        // not rename each other's half-written file.
        let tmp = self
            .path
            .with_extension(format!("json.{}.new", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(text.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)
            .with_context(|| format!("cannot replace {}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipop_core::PublicKey;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ipop-state-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn state_round_trips_and_is_private() {
        let d = dir("round");
        let state = State::new(&d.join("sub"));
        assert_eq!(state.load().unwrap(), Memory::default());
        let mut m = Memory::default();
        let bob = DeviceId::new("bob@example.org", "laptop");
        m.pins.insert(bob.clone(), PublicKey([5; 32]));
        m.group_addresses.insert(
            "lab@conference.example.org".into(),
            "10.20.0.9".parse().unwrap(),
        );
        m.social_numbers.insert(bob, "172.31.4.2".parse().unwrap());
        state.save(&m).unwrap();
        assert_eq!(state.load().unwrap(), m);
        let mode = std::fs::metadata(state.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_damaged_file_is_an_error_that_names_it() {
        let d = dir("damaged");
        std::fs::create_dir_all(&d).unwrap();
        let state = State::new(&d);
        for text in ["{", r#"{"pins": {"nodevice": "AAAA"}}"#, r#"{"other": 1}"#] {
            std::fs::write(state.path(), text).unwrap();
            let e = format!("{:#}", state.load().unwrap_err());
            assert!(e.contains("state.json"), "{e}");
        }
        std::fs::remove_dir_all(&d).unwrap();
    }
}
