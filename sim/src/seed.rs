//! Seeds: a u64, or a 40-hex git commit id hashed to one (so CI can run
//! "the seed of this commit" and a failure names a reproducible number).

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SeedError {
    #[error("seed {0:?} is neither a u64 nor a 40-hex git commit id")]
    Invalid(String),
}

/// Parse a seed. A 40-hex-digit string is a commit id: its 20 bytes are
/// folded with crc32c into a u64 (two crcs over the two halves), which is
/// stable across platforms and versions of this tool.
pub fn parse_seed(s: &str) -> Result<u64, SeedError> {
    let t = s.trim();
    if t.len() == 40 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
        let mut bytes = [0u8; 20];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = u8::from_str_radix(&t[2 * i..2 * i + 2], 16)
                .map_err(|_| SeedError::Invalid(s.into()))?;
        }
        let hi = crc32c::crc32c(&bytes[..10]) as u64;
        let lo = crc32c::crc32c(&bytes[10..]) as u64;
        return Ok(hi << 32 | lo);
    }
    let (digits, radix) = match t.strip_prefix("0x") {
        Some(h) => (h, 16),
        None => (t, 10),
    };
    u64::from_str_radix(digits, radix).map_err(|_| SeedError::Invalid(s.into()))
}
