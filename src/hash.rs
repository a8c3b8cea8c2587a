//! sha256 as chatvec records it everywhere (manifests, the hash cache,
//! provenance checks): lowercase hex, of bytes or of a whole file read in
//! pieces.

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex sha256 of `bytes`.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Hex sha256 of the file at `path`, read in 8 MiB pieces; stops with
/// `Error::Interrupted` after Ctrl-C.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = crate::json::open_regular(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 8 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io("reading", path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        crate::interrupt::check()?;
    }
    Ok(hex(&h.finalize()))
}
