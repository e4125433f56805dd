//! SHA-256 of files and byte strings, to identify GGUF files (cache keys,
//! known-model checks), through the `sha2` crate (which uses the CPU's SHA
//! instructions where it has them).

use std::io::Read;
use std::path::Path;

use sha2::Digest;

use crate::error::{Error, Result};

/// Incremental SHA-256.
#[derive(Clone, Default)]
pub struct Sha256(sha2::Sha256);

impl Sha256 {
    pub fn new() -> Self {
        Sha256(sha2::Sha256::new())
    }

    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    pub fn finish(self) -> [u8; 32] {
        self.0.finalize().into()
    }

    /// The digest as lowercase hex.
    pub fn finish_hex(self) -> String {
        hex(&self.finish())
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// SHA-256 of `data` as lowercase hex.
pub fn sha256_hex(data: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(data);
    h.finish_hex()
}

/// SHA-256 of a file's contents as lowercase hex, read in 4 MiB pieces.
pub fn sha256_file(path: impl AsRef<Path>) -> Result<String> {
    sha256_file_with_progress(path, |_| {})
}

/// [`sha256_file`], calling `progress(bytes hashed so far)` after each piece.
pub fn sha256_file_with_progress(
    path: impl AsRef<Path>,
    mut progress: impl FnMut(u64),
) -> Result<String> {
    let path = path.as_ref();
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut done = 0u64;
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io(path, e)),
        };
        h.update(&buf[..n]);
        done += n as u64;
        progress(done);
    }
    Ok(h.finish_hex())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        // FIPS 180-4 / NIST examples.
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            sha256_hex(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
        let million_a = vec![b'a'; 1_000_000];
        assert_eq!(
            sha256_hex(&million_a),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"
        );
    }

    #[test]
    fn incremental_matches_one_shot() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 31 % 251) as u8).collect();
        let want = sha256_hex(&data);
        for split in [0, 1, 55, 56, 63, 64, 65, 500, 999, 1000] {
            let mut h = Sha256::new();
            h.update(&data[..split]);
            h.update(&data[split..]);
            assert_eq!(h.finish_hex(), want, "split at {split}");
        }
    }

    #[test]
    fn file_matches_bytes_across_piece_boundaries() {
        // Longer than one 4 MiB read, so the file path goes through several.
        let data: Vec<u8> = (0..(4u32 << 20) + 12345)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let dir = std::env::temp_dir().join(format!("wgllm-sha256-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("data.bin");
        std::fs::write(&p, &data).unwrap();
        let mut calls = Vec::new();
        let got = sha256_file_with_progress(&p, |d| calls.push(d)).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(got, sha256_hex(&data));
        assert_eq!(calls.last().copied(), Some(data.len() as u64));
        assert!(calls.len() >= 2, "{calls:?}");
    }
}
