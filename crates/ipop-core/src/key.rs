//! Device keys: the WireGuard static key pair that identifies a device.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use blake2::{Blake2s256, Digest};
use boringtun::x25519;
use std::fmt;
use std::str::FromStr;

/// A device's WireGuard public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

/// Why a key string could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("not base64: expected a 32-byte key in base64, as `ipop key` prints it")]
    Base64,
    #[error("a key is 32 bytes, this one has {0}")]
    Length(usize),
}

fn decode32(s: &str) -> Result<[u8; 32], KeyError> {
    let bytes = STANDARD
        .decode(s.trim().as_bytes())
        .map_err(|_| KeyError::Base64)?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| KeyError::Length(bytes.len()))
}

impl PublicKey {
    /// The public half of a secret key.
    pub fn from_secret(secret: &x25519::StaticSecret) -> Self {
        Self(x25519::PublicKey::from(secret).to_bytes())
    }

    /// A short fingerprint for people to compare: five groups of four hex digits of the
    /// BLAKE2s digest of the key.
    pub fn fingerprint(&self) -> String {
        let digest = Blake2s256::digest(self.0);
        let mut out = String::with_capacity(24);
        for (i, pair) in digest[..10].chunks(2).enumerate() {
            if i > 0 {
                out.push('-');
            }
            out.push_str(&format!("{:02x}{:02x}", pair[0], pair[1]));
        }
        out
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        decode32(s).map(Self)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.fingerprint())
    }
}

/// Reads a secret key written as base64 (the format of `wg genkey` and of `ipop init`).
pub fn parse_secret(s: &str) -> Result<x25519::StaticSecret, KeyError> {
    decode32(s).map(x25519::StaticSecret::from)
}

/// Writes a secret key as base64.
pub fn format_secret(secret: &x25519::StaticSecret) -> String {
    STANDARD.encode(secret.to_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_key_round_trips_through_base64() {
        let secret = x25519::StaticSecret::random_from_rng(rand_core::OsRng);
        let public = PublicKey::from_secret(&secret);
        let text = public.to_string();
        assert_eq!(text.len(), 44);
        assert_eq!(text.parse::<PublicKey>(), Ok(public));
    }

    #[test]
    fn secret_round_trips_and_derives_the_same_public_key() {
        let secret = x25519::StaticSecret::random_from_rng(rand_core::OsRng);
        let again = parse_secret(&format_secret(&secret)).expect("own output parses");
        assert_eq!(
            PublicKey::from_secret(&secret),
            PublicKey::from_secret(&again)
        );
    }

    #[test]
    fn bad_keys_say_what_is_wrong() {
        assert_eq!("not base64!".parse::<PublicKey>(), Err(KeyError::Base64));
        assert_eq!("AAAA".parse::<PublicKey>(), Err(KeyError::Length(3)));
    }

    #[test]
    fn fingerprint_is_short_stable_and_distinguishes_keys() {
        let a = PublicKey([1; 32]);
        let b = PublicKey([2; 32]);
        assert_eq!(a.fingerprint(), a.fingerprint());
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint().len(), 24);
        assert_eq!(a.fingerprint().matches('-').count(), 4);
    }
}
