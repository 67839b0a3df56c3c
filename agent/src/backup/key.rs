//! The repository key and the sealed-object codec.
//!
//! Why one file: the key is only ever used through [`RepoKey::seal`] / [`RepoKey::open`], so
//! keeping both here means no other module touches raw key bytes.
//!
//! Sealed object layout (all objects of the repository):
//! ```text
//! 0      4     5            37           61
//! | YDR1 | flg | hash (32)  | nonce (24) | ciphertext … | tag (16) |
//! flg bit 0: plaintext was zstd-compressed before encryption
//! flg bit 1: `hash` is of the stored bytes (the zstd stream as encrypted), not the plaintext
//! hash: BLAKE3 keyed with the id key, of the *uncompressed* plaintext (= chunk id for chunks),
//!       or with bit 1 of the stored bytes
//! AEAD: XChaCha20-Poly1305(enc key, nonce, aad = "YDR1" ‖ object name ‖ hash)
//! ```
//! Invariant: a successfully opened object is byte-for-byte the plaintext that was sealed under
//! that name (authenticated by the AEAD tag and re-checked against `hash`: after decompression,
//! or with bit 1 before it).
//!
//! Bit 1 is what the fs `wal-push` writes (`StreamSeal`). A WAL object is named by its
//! segment, not by its content, so nothing needs the plaintext's hash, and hashing the 16 MiB
//! plaintext was 9 % of a push's CPU where the ~2 MiB zstd stream costs an eighth of that
//! (docs/benchmarks.md, "wal-push hashes what it stores"). A repeat push compares plaintexts
//! instead (`wal_push::compare_archived`). Readers without bit 1 (none were released) would
//! report such an object as a hash mismatch, never open it wrongly.
//!
//! Restore trusts the tag ([`RepoKey::open_chunk_into`]): a valid tag proves that this
//! (name, hash, compressed bytes) triple was produced together by a holder of the key, and
//! [`RepoKey::seal_hashed`] derives the hash and the compressed bytes from the same plaintext;
//! zstd decoding is deterministic, so the decoded bytes are the plaintext the hash was computed
//! from. Re-hashing them (BLAKE3 of every restored byte, ~0.4 s CPU per GB) would only catch a
//! key holder who sealed a wrong hash on purpose (who could forge anything anyway) or a zstd
//! decoding bug; against the latter restore checks the decoded length against the manifest.
//! `verify` and every other reader still re-hash ([`RepoKey::open`]).
//!
//! Chunk compression is adaptive ([`RepoKey::seal_adaptive`]): a chunk is compressed at zstd 1
//! first and kept so when that shrinks it more than [`FAST_ENOUGH_RATIO`] times (heap pages
//! of narrow rows, which level 3 shrinks no further); otherwise it is recompressed at the
//! configured level (indexes: 4.3x at level 1, 6x at level 3). Every level decodes the same
//! way, so readers need not know and the format is unchanged.

use std::cell::RefCell;
use std::fmt;
use std::path::Path;

use chacha20::XChaCha20;
use chacha20::cipher::{KeyIvInit, StreamCipher, StreamCipherSeek};
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};
use poly1305::Poly1305;
use poly1305::universal_hash::UniversalHash;
use serde::{Deserialize, Serialize};

use super::{BackupError, BackupResult};

const MAGIC: &[u8; 4] = b"YDR1";
const FLAG_ZSTD: u8 = 1;
/// `hash` is of the stored bytes, not the plaintext (module docs).
const FLAG_STORED_HASH: u8 = 2;
/// Bytes before the ciphertext.
pub const HEADER_LEN: usize = 4 + 1 + 32 + 24;
pub const TAG_LEN: usize = 16;
/// Below this size a sealed payload is compressed on the calling thread only.
const PARALLEL_MIN: usize = 4 << 20;
/// A chunk that zstd 1 shrinks more than this many times stays at level 1 (see module docs).
pub const FAST_ENOUGH_RATIO: usize = 10;

/// Keyed BLAKE3 of a chunk's plaintext: its name in the repository.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", hex::encode(&self.0[..8]))
    }
}

impl std::str::FromStr for ChunkId {
    type Err = BackupError;
    fn from_str(s: &str) -> BackupResult<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out)
            .map_err(|e| BackupError::Invalid(format!("bad chunk id {s:?}: {e}")))?;
        Ok(ChunkId(out))
    }
}

impl Serialize for ChunkId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ChunkId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl ChunkId {
    /// Object name of this chunk.
    pub fn object_name(&self) -> String {
        let h = self.to_string();
        format!("data/{}/{}", &h[..2], h)
    }
}

/// The repository key: 32 secret bytes plus the sub-keys derived from them.
/// `Debug` prints nothing secret.
#[derive(Clone)]
pub struct RepoKey {
    id_key: [u8; 32],
    enc_key: [u8; 32],
    cipher: XChaCha20Poly1305,
    check: [u8; 32],
}

impl fmt::Debug for RepoKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RepoKey(check={})", hex::encode(&self.check[..4]))
    }
}

impl RepoKey {
    pub fn from_master(master: &[u8; 32]) -> Self {
        let id_key = blake3::derive_key("yeslocker-dr repository v1 chunk id", master);
        let enc_key = blake3::derive_key("yeslocker-dr repository v1 encryption", master);
        let check = blake3::derive_key("yeslocker-dr repository v1 key check", master);
        RepoKey {
            id_key,
            enc_key,
            cipher: XChaCha20Poly1305::new((&enc_key).into()),
            check,
        }
    }

    /// A fresh random key, returned as the hex text to store in the key file.
    pub fn generate_hex() -> String {
        let master: [u8; 32] = rand::random();
        hex::encode(master)
    }

    /// Parse a key file's content (64 hex digits, surrounding whitespace ignored).
    pub fn parse_hex(text: &str, path: &Path) -> BackupResult<Self> {
        let mut master = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut master).map_err(|_| BackupError::KeyFile {
            path: path.display().to_string(),
            reason: "expected 64 hexadecimal digits".into(),
        })?;
        Ok(Self::from_master(&master))
    }

    /// Read a key file (refusing one that others can read).
    pub fn load(path: &Path) -> BackupResult<Self> {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path)
            .map_err(|e| BackupError::io(format!("read key file {}", path.display()), e))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(BackupError::KeyFile {
                path: path.display().to_string(),
                reason: "permissions allow group/other access; chmod 600 it".into(),
            });
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| BackupError::io(format!("read key file {}", path.display()), e))?;
        Self::parse_hex(&text, path)
    }

    /// Value stored in the repository `config` so a wrong key is recognised as such.
    pub fn check_value(&self) -> String {
        hex::encode(self.check)
    }

    /// An incremental keyed BLAKE3 (same result as [`RepoKey::hash`] of the whole input).
    pub fn hasher(&self) -> blake3::Hasher {
        blake3::Hasher::new_keyed(&self.id_key)
    }

    /// Keyed BLAKE3 of `data`.
    pub fn hash(&self, data: &[u8]) -> ChunkId {
        ChunkId(*blake3::keyed_hash(&self.id_key, data).as_bytes())
    }

    /// Seal `plain` under object `name`, compressing at `level` with up to `threads` threads.
    /// Returns the object bytes and the plaintext hash.
    pub fn seal(
        &self,
        name: &str,
        plain: &[u8],
        level: i32,
        threads: usize,
    ) -> BackupResult<(Vec<u8>, ChunkId)> {
        if threads > 1 && plain.len() >= PARALLEL_MIN {
            // Independent zstd frames per piece; a decoder reads concatenated frames as one.
            let piece_len = plain.len().div_ceil(threads);
            let (hash, pieces) = std::thread::scope(|s| {
                let handles: Vec<_> = plain
                    .chunks(piece_len)
                    .map(|p| s.spawn(move || compress(p, level)))
                    .collect();
                let hash = self.hash(plain);
                let mut pieces = Vec::with_capacity(handles.len());
                for h in handles {
                    match h.join() {
                        Ok(r) => pieces.push(r?),
                        Err(_) => return Err(BackupError::Invalid("zstd worker panicked".into())),
                    }
                }
                Ok((hash, pieces))
            })?;
            Ok((self.seal_pieces(name, plain, hash, &pieces)?, hash))
        } else {
            let hash = self.hash(plain);
            Ok((self.seal_hashed(name, plain, hash, level)?, hash))
        }
    }

    /// [`RepoKey::seal`] on the calling thread for a plaintext whose hash the caller already
    /// computed (the backup hashes a chunk first to skip known ones; hashing twice cost ~10%
    /// of a full backup's CPU).
    pub fn seal_hashed(
        &self,
        name: &str,
        plain: &[u8],
        hash: ChunkId,
        level: i32,
    ) -> BackupResult<Vec<u8>> {
        let c = compress(plain, level)?;
        self.seal_pieces(name, plain, hash, std::slice::from_ref(&c))
    }

    pub(crate) fn seal_pieces(
        &self,
        name: &str,
        plain: &[u8],
        hash: ChunkId,
        pieces: &[Vec<u8>],
    ) -> BackupResult<Vec<u8>> {
        match self.seal_compressed(name, plain.len(), hash, pieces)? {
            Some(sealed) => Ok(sealed),
            None => self.seal_plain(name, plain, hash),
        }
    }

    /// Seal `plain` uncompressed (what readers expect when compression does not shrink it).
    pub(crate) fn seal_plain(
        &self,
        name: &str,
        plain: &[u8],
        hash: ChunkId,
    ) -> BackupResult<Vec<u8>> {
        self.seal_parts(name, 0, hash, &[plain])
    }

    /// Seal the zstd frames `pieces` (which decode, concatenated, to a plaintext of `plain_len`
    /// bytes hashing to `hash`). None when they are not smaller than the plaintext: the caller
    /// seals the plaintext itself then ([`RepoKey::seal_hashed`] does), as every reader expects.
    pub(crate) fn seal_compressed(
        &self,
        name: &str,
        plain_len: usize,
        hash: ChunkId,
        pieces: &[Vec<u8>],
    ) -> BackupResult<Option<Vec<u8>>> {
        let clen: usize = pieces.iter().map(Vec::len).sum();
        if clen >= plain_len {
            return Ok(None);
        }
        let parts: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
        self.seal_parts(name, FLAG_ZSTD, hash, &parts).map(Some)
    }

    fn seal_parts(
        &self,
        name: &str,
        flags: u8,
        hash: ChunkId,
        parts: &[&[u8]],
    ) -> BackupResult<Vec<u8>> {
        let body_len: usize = parts.iter().map(|p| p.len()).sum();
        let mut out = Vec::with_capacity(HEADER_LEN + body_len + TAG_LEN);
        out.extend_from_slice(MAGIC);
        out.push(flags);
        out.extend_from_slice(&hash.0);
        let nonce: [u8; 24] = rand::random();
        out.extend_from_slice(&nonce);
        for p in parts {
            out.extend_from_slice(p);
        }
        let aad = aad(name, &hash);
        let tag = self
            .cipher
            .encrypt_in_place_detached(XNonce::from_slice(&nonce), &aad, &mut out[HEADER_LEN..])
            .map_err(|_| BackupError::Invalid("encryption failed".into()))?;
        out.extend_from_slice(&tag);
        Ok(out)
    }

    /// Start sealing a compressed object whose zstd frames arrive one by one, in order
    /// ([`StreamSeal`]): wal-push encrypts and writes each frame while later ones are still
    /// being compressed.
    pub(crate) fn seal_stream(&self) -> StreamSeal {
        let nonce: [u8; 24] = rand::random();
        let mut cipher = XChaCha20::new((&self.enc_key).into(), (&nonce).into());
        // As chacha20poly1305 does: the Poly1305 key is the start of keystream block 0, the
        // message is encrypted from block 1 on.
        let mut mac_key = [0u8; 32];
        cipher.apply_keystream(&mut mac_key);
        cipher.seek(64u64);
        let mut r = [0u8; 16];
        r.copy_from_slice(&mac_key[..16]);
        let mut s = [0u8; 16];
        s.copy_from_slice(&mac_key[16..]);
        // The ciphertext's Poly1305 with s = 0: finish() adds the aad in front and s.
        let mut r_only = [0u8; 32];
        r_only[..16].copy_from_slice(&r);
        StreamSeal {
            hasher: self.hasher(),
            cipher,
            mac: Poly1305::new((&r_only).into()),
            r,
            s,
            carry: [0u8; 16],
            held: 0,
            nonce,
            len: 0,
        }
    }

    /// The hash recorded in a sealed object's header: of the plaintext, or of the stored
    /// bytes (flag bit 1, see the module docs). Not authenticated until [`RepoKey::open`].
    pub fn peek_hash(name: &str, sealed: &[u8]) -> BackupResult<ChunkId> {
        if sealed.len() < HEADER_LEN || &sealed[..4] != MAGIC {
            return Err(BackupError::Corrupt {
                key: name.to_string(),
                reason: "bad header".into(),
            });
        }
        let mut h = [0u8; 32];
        h.copy_from_slice(&sealed[5..37]);
        Ok(ChunkId(h))
    }

    /// Authenticate, decrypt, decompress and re-hash a sealed object (the plaintext, or the
    /// stored bytes before decompressing them when flag bit 1 says the hash is of those).
    /// `max_plain` bounds the decompressed size. Returns the plaintext and the header's hash.
    pub fn open(
        &self,
        name: &str,
        mut sealed: Vec<u8>,
        max_plain: usize,
    ) -> BackupResult<(Vec<u8>, ChunkId)> {
        let corrupt = |reason: &str| BackupError::Corrupt {
            key: name.to_string(),
            reason: reason.to_string(),
        };
        if sealed.len() < HEADER_LEN + TAG_LEN {
            return Err(corrupt("truncated"));
        }
        let hash = Self::peek_hash(name, &sealed)?;
        let flags = sealed[4];
        let mut nonce = [0u8; 24];
        nonce.copy_from_slice(&sealed[37..HEADER_LEN]);
        let tag_at = sealed.len() - TAG_LEN;
        let tag = *Tag::from_slice(&sealed[tag_at..]);
        sealed.truncate(tag_at);
        let aad = aad(name, &hash);
        self.cipher
            .decrypt_in_place_detached(
                XNonce::from_slice(&nonce),
                &aad,
                &mut sealed[HEADER_LEN..],
                &tag,
            )
            .map_err(|_| corrupt("authentication failed (damaged, moved, or another key)"))?;
        let stored_hash = flags & FLAG_STORED_HASH != 0;
        if stored_hash && self.hash(&sealed[HEADER_LEN..]) != hash {
            return Err(corrupt("content hash mismatch (stored bytes)"));
        }
        let plain = if flags & FLAG_ZSTD != 0 {
            decompress(&sealed[HEADER_LEN..], max_plain)
                .map_err(|e| corrupt(&format!("zstd: {e}")))?
        } else {
            sealed.drain(..HEADER_LEN);
            sealed
        };
        if !stored_hash && self.hash(&plain) != hash {
            return Err(corrupt("content hash mismatch"));
        }
        Ok((plain, hash))
    }
}

/// The chunk paths of backup and restore (see the module docs).
impl RepoKey {
    /// [`RepoKey::seal_hashed`] with adaptive compression: zstd 1 when that shrinks the chunk
    /// more than [`FAST_ENOUGH_RATIO`] times, else `level`. `poor` is the caller's per-file
    /// memory: set once a chunk of the file needed `level`, so its next chunks go straight to
    /// `level` (an index does not pay for two compressions per chunk).
    pub fn seal_adaptive(
        &self,
        name: &str,
        plain: &[u8],
        hash: ChunkId,
        level: i32,
        poor: &std::sync::atomic::AtomicBool,
    ) -> BackupResult<Vec<u8>> {
        use std::sync::atomic::Ordering::Relaxed;
        if level <= 1 || poor.load(Relaxed) {
            return self.seal_hashed(name, plain, hash, level);
        }
        let fast = compress(plain, 1)?;
        if fast.len().saturating_mul(FAST_ENOUGH_RATIO) <= plain.len() {
            return self.seal_pieces(name, plain, hash, std::slice::from_ref(&fast));
        }
        poor.store(true, Relaxed);
        self.seal_hashed(name, plain, hash, level)
    }

    /// Open a sealed chunk into `out`: authenticate, decrypt in place and decompress, without
    /// re-hashing (the module docs say why the tag suffices), and check that it decodes to
    /// exactly `out.len()` bytes (the length the manifest gives). Returns the hash from the
    /// authenticated header.
    pub fn open_chunk_into(
        &self,
        name: &str,
        sealed: &mut [u8],
        out: &mut [u8],
    ) -> BackupResult<ChunkId> {
        let expected_len = out.len();
        let corrupt = |reason: String| BackupError::Corrupt {
            key: name.to_string(),
            reason,
        };
        if sealed.len() < HEADER_LEN + TAG_LEN {
            return Err(corrupt("truncated".into()));
        }
        let hash = Self::peek_hash(name, sealed)?;
        let flags = sealed[4];
        let mut nonce = [0u8; 24];
        nonce.copy_from_slice(&sealed[37..HEADER_LEN]);
        let tag_at = sealed.len() - TAG_LEN;
        let tag = *Tag::from_slice(&sealed[tag_at..]);
        let aad = aad(name, &hash);
        self.cipher
            .decrypt_in_place_detached(
                XNonce::from_slice(&nonce),
                &aad,
                &mut sealed[HEADER_LEN..tag_at],
                &tag,
            )
            .map_err(|_| {
                corrupt("authentication failed (damaged, moved, or another key)".into())
            })?;
        let body = &sealed[HEADER_LEN..tag_at];
        let n = if flags & FLAG_ZSTD != 0 {
            DCTX.with(|d| {
                let mut d = d.borrow_mut();
                if d.is_none() {
                    *d = Some(zstd::bulk::Decompressor::new()?);
                }
                match d.as_mut() {
                    Some(z) => z.decompress_to_buffer(body, &mut *out),
                    None => Err(std::io::Error::other("no zstd context")),
                }
            })
            .map_err(|e| {
                corrupt(format!(
                    "zstd (the manifest says {expected_len} bytes): {e}"
                ))
            })?
        } else {
            if body.len() == expected_len {
                out.copy_from_slice(body);
            }
            body.len()
        };
        if n != expected_len {
            return Err(corrupt(format!(
                "decodes to {n} bytes where the manifest says {expected_len}"
            )));
        }
        Ok(hash)
    }
}

/// A sealed object built frame by frame: the frames' zstd stream, encrypted as
/// [`RepoKey::seal_compressed`] would with the same nonce, under flag bit 1 (the header's
/// hash is of that stream, hashed here as the frames pass: see the module docs).
/// XChaCha20-Poly1305 is a stream cipher plus a MAC over `aad ‖ pad ‖ ciphertext ‖ pad ‖
/// lengths`, and the aad holds the hash, known only once the last frame is in. So the MAC runs over each frame as it is encrypted, as if the
/// aad were empty, and [`StreamSeal::finish`] puts the aad in front with Poly1305's algebra:
/// neither the frames (2 MiB of fresh pages per segment) are kept nor a pass over them
/// remains after the last one.
pub(crate) struct StreamSeal {
    /// Keyed BLAKE3 of the frames so far (before encryption).
    hasher: blake3::Hasher,
    cipher: XChaCha20,
    /// Poly1305 with the object's r and s = 0, over the ciphertext so far.
    mac: Poly1305,
    r: [u8; 16],
    s: [u8; 16],
    /// The ciphertext's last bytes short of a whole 16-byte block.
    carry: [u8; 16],
    held: usize,
    nonce: [u8; 24],
    len: u64,
}

impl StreamSeal {
    /// Hash the next frame, encrypt it in place and add it to the MAC.
    pub(crate) fn encrypt(&mut self, frame: &mut [u8]) {
        self.hasher.update(frame);
        self.cipher.apply_keystream(frame);
        self.len += frame.len() as u64;
        // The ciphertext as one stream of 16-byte blocks across the frame boundaries.
        let mut f = &frame[..];
        if self.held > 0 {
            let take = (16 - self.held).min(f.len());
            self.carry[self.held..self.held + take].copy_from_slice(&f[..take]);
            self.held += take;
            f = &f[take..];
            if self.held < 16 {
                return;
            }
            self.mac.update_padded(&self.carry);
            self.held = 0;
        }
        let whole = f.len() / 16 * 16;
        self.mac.update_padded(&f[..whole]);
        self.carry[..f.len() - whole].copy_from_slice(&f[whole..]);
        self.held = f.len() - whole;
    }

    /// Bytes encrypted so far (the ciphertext offset of the next frame).
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// The header (before the ciphertext) and the tag (after it) for the object `name`, and
    /// the hash in the header (of the frames, flag bit 1).
    pub(crate) fn finish(
        mut self,
        name: &str,
    ) -> BackupResult<([u8; HEADER_LEN], [u8; TAG_LEN], ChunkId)> {
        let hash = ChunkId(*self.hasher.finalize().as_bytes());
        let aad = aad(name, &hash);
        self.mac.update_padded(&self.carry[..self.held]);
        let mut lengths = [0u8; 16];
        lengths[..8].copy_from_slice(&(aad.len() as u64).to_le_bytes());
        lengths[8..].copy_from_slice(&self.len.to_le_bytes());
        self.mac.update_padded(&lengths);
        // Blocks after the aad: the padded ciphertext and the lengths.
        let blocks = self.len.div_ceil(16) + 1;
        let tag = prepend_aad(&self.mac, &self.r, &self.s, &aad, blocks).ok_or_else(|| {
            // Unreachable in practice (two of four candidates agreeing in 128 bits); a retry
            // draws a new nonce, hence a new r.
            BackupError::Invalid("sealing: Poly1305 value ambiguous; retry".into())
        })?;
        let mut header = [0u8; HEADER_LEN];
        header[..4].copy_from_slice(MAGIC);
        header[4] = FLAG_ZSTD | FLAG_STORED_HASH;
        header[5..37].copy_from_slice(&hash.0);
        header[37..].copy_from_slice(&self.nonce);
        Ok((header, tag, hash))
    }
}

/// The Poly1305 tag (key `r`, `s`) of `aad ‖ pad ‖ M`, where `mac` is Poly1305 (key `r`,
/// s = 0) over the `blocks` 16-byte blocks of M. Poly1305 of blocks m1..mq is
/// `(Σ mi·r^(q-i+1) mod p) + s`, p = 2^130 - 5, so the aad's own sum A comes in as
/// `A·r^blocks`. `mac` yields its sum H only modulo 2^128 (a tag is 128 bits), so H is the
/// one of the up to four values below p with those low bits whose continuation by one more
/// block matches `mac` continued by that block. None if two of them match (odds ~2^-126).
fn prepend_aad(
    mac: &Poly1305,
    r: &[u8; 16],
    s: &[u8; 16],
    aad: &[u8],
    blocks: u64,
) -> Option<[u8; TAG_LEN]> {
    let low = |t: Tag| u128::from_le_bytes(t.into());
    let t0 = low(mac.clone().finalize());
    let mut probe = mac.clone();
    probe.update_padded(&[0u8; 16]);
    let t1 = low(probe.finalize());
    let r = Fe::from_u128(
        u128::from_le_bytes(*r) & 0x0fff_fffc_0fff_fffc_0fff_fffc_0fff_ffff,
        0,
    );
    let zero_block = Fe::from_u128(0, 1);
    let mut found = None;
    for k in 0..4u64 {
        // t0 + k·2^128 < p = 3·2^128 + 2^128 - 5
        if k == 3 && t0 > u128::MAX - 5 {
            continue;
        }
        let h = Fe::from_u128(t0, k);
        if h.add(zero_block).mul(r).low128() == t1 {
            if found.is_some() {
                return None;
            }
            found = Some(h);
        }
    }
    let h = found?;
    let mut a = Fe::from_u128(0, 0);
    for block in aad.chunks(16) {
        let mut b = [0u8; 16];
        b[..block.len()].copy_from_slice(block);
        a = a.add(Fe::from_u128(u128::from_le_bytes(b), 1)).mul(r);
    }
    let total = a.mul(r.pow(blocks)).add(h);
    Some(
        total
            .low128()
            .wrapping_add(u128::from_le_bytes(*s))
            .to_le_bytes(),
    )
}

/// An element of GF(2^130 - 5) in five 26-bit limbs (poly1305-donna's representation).
#[derive(Clone, Copy)]
struct Fe([u64; 5]);

impl Fe {
    const M: u64 = (1 << 26) - 1;

    /// `lo + hi·2^128` (hi < 4).
    fn from_u128(lo: u128, hi: u64) -> Fe {
        let l = |shift: u32| ((lo >> shift) as u64) & Self::M;
        Fe([l(0), l(26), l(52), l(78), ((lo >> 104) as u64) | (hi << 24)])
    }

    /// Carry every limb into the next (the top one back into the bottom times 5) until each
    /// holds 26 bits: the value is then below 2^130.
    fn carry(mut self) -> Fe {
        let h = &mut self.0;
        loop {
            for i in 0..4 {
                h[i + 1] += h[i] >> 26;
                h[i] &= Self::M;
            }
            let top = h[4] >> 26;
            if top == 0 {
                return self;
            }
            h[4] &= Self::M;
            h[0] += top * 5;
        }
    }

    fn add(self, o: Fe) -> Fe {
        let (a, b) = (self.0, o.0);
        Fe([
            a[0] + b[0],
            a[1] + b[1],
            a[2] + b[2],
            a[3] + b[3],
            a[4] + b[4],
        ])
        .carry()
    }

    /// Product modulo p; both operands carried (limbs below 2^27), as every result is.
    fn mul(self, o: Fe) -> Fe {
        let [a0, a1, a2, a3, a4] = self.0;
        let [b0, b1, b2, b3, b4] = o.0;
        let (s1, s2, s3, s4) = (b1 * 5, b2 * 5, b3 * 5, b4 * 5);
        let d = [
            a0 * b0 + a1 * s4 + a2 * s3 + a3 * s2 + a4 * s1,
            a0 * b1 + a1 * b0 + a2 * s4 + a3 * s3 + a4 * s2,
            a0 * b2 + a1 * b1 + a2 * b0 + a3 * s4 + a4 * s3,
            a0 * b3 + a1 * b2 + a2 * b1 + a3 * b0 + a4 * s4,
            a0 * b4 + a1 * b3 + a2 * b2 + a3 * b1 + a4 * b0,
        ];
        Fe(d).carry()
    }

    fn pow(self, mut e: u64) -> Fe {
        let mut acc = Fe::from_u128(1, 0);
        let mut base = self;
        while e > 0 {
            if e & 1 == 1 {
                acc = acc.mul(base);
            }
            base = base.mul(base);
            e >>= 1;
        }
        acc
    }

    /// The low 128 bits of the value reduced below p.
    fn low128(self) -> u128 {
        let h = self.carry().0;
        let v = |h: [u64; 5]| {
            u128::from(h[0])
                | u128::from(h[1]) << 26
                | u128::from(h[2]) << 52
                | u128::from(h[3]) << 78
                | u128::from(h[4]) << 104
        };
        // h - p = h + 5 - 2^130: use it when it does not go below zero.
        let mut g = h;
        g[0] += 5;
        for i in 0..4 {
            g[i + 1] += g[i] >> 26;
            g[i] &= Self::M;
        }
        if g[4] >> 26 != 0 {
            g[4] &= Self::M;
            v(g)
        } else {
            v(h)
        }
    }
}

thread_local! {
    // One zstd context per worker thread and level: creating a context per 1 MiB chunk
    // (zstd::bulk::compress) allocates and initialises several MiB of tables each time.
    static CCTX: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    static DCTX: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

pub(crate) fn compress(plain: &[u8], level: i32) -> BackupResult<Vec<u8>> {
    let err = |e| BackupError::io("zstd compress", e);
    CCTX.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().is_none_or(|(l, _)| *l != level) {
            *c = Some((level, zstd::bulk::Compressor::new(level).map_err(err)?));
        }
        match c.as_mut() {
            Some((_, z)) => z.compress(plain).map_err(err),
            None => zstd::bulk::compress(plain, level).map_err(err),
        }
    })
}

/// [`compress`] into `buf` (cleared, grown to zstd's bound when short; wal-push reuses a few
/// of them: a fresh bound-sized output per frame is an mmap, page faults and an munmap each).
pub(crate) fn compress_into(plain: &[u8], level: i32, buf: &mut Vec<u8>) -> BackupResult<()> {
    let err = |e| BackupError::io("zstd compress", e);
    buf.clear();
    buf.reserve(zstd::zstd_safe::compress_bound(plain.len()));
    CCTX.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().is_none_or(|(l, _)| *l != level) {
            *c = Some((level, zstd::bulk::Compressor::new(level).map_err(err)?));
        }
        match c.as_mut() {
            Some((_, z)) => z.compress_to_buffer(plain, &mut *buf).map_err(err),
            None => Err(BackupError::Invalid("no zstd context".into())),
        }
    })?;
    Ok(())
}

fn decompress(data: &[u8], max_plain: usize) -> std::io::Result<Vec<u8>> {
    DCTX.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(zstd::bulk::Decompressor::new()?);
        }
        match d.as_mut() {
            Some(z) => z.decompress(data, max_plain),
            None => zstd::bulk::decompress(data, max_plain),
        }
    })
}

fn aad(name: &str, hash: &ChunkId) -> Vec<u8> {
    let mut aad = Vec::with_capacity(4 + name.len() + 32);
    aad.extend_from_slice(MAGIC);
    aad.extend_from_slice(name.as_bytes());
    aad.extend_from_slice(&hash.0);
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> RepoKey {
        RepoKey::from_master(&[7u8; 32])
    }

    #[test]
    fn t10_roundtrip_compressible_and_random() {
        let k = key();
        let plain = vec![42u8; 100_000];
        let (s, h) = k.seal("data/x", &plain, 3, 1).unwrap();
        assert!(s.len() < 1000);
        let (p, h2) = k.open("data/x", s, 1 << 20).unwrap();
        assert_eq!((p, h2), (plain, h));

        let rnd: Vec<u8> = (0..50_000).map(|_| rand::random::<u8>()).collect();
        let (s, _) = k.seal("data/y", &rnd, 3, 1).unwrap();
        assert_eq!(s[4], 0, "incompressible data is stored raw");
        assert_eq!(k.open("data/y", s, 1 << 20).unwrap().0, rnd);
    }

    #[test]
    fn t20_parallel_frames_decode() {
        let k = key();
        let plain: Vec<u8> = (0..(16usize << 20)).map(|i| (i / 7 % 251) as u8).collect();
        let (s, h) = k.seal("wal/1/x", &plain, 1, 2).unwrap();
        let (p, h2) = k.open("wal/1/x", s, 32 << 20).unwrap();
        assert_eq!(h, h2);
        assert!(p == plain);
    }

    #[test]
    fn t30_tamper_rename_wrong_key_detected() {
        let k = key();
        let (mut s, _) = k.seal("data/a", b"hello world", 3, 1).unwrap();
        assert!(k.open("data/b", s.clone(), 100).is_err(), "moved object");
        assert!(
            RepoKey::from_master(&[8u8; 32])
                .open("data/a", s.clone(), 100)
                .is_err()
        );
        let n = s.len() - 20;
        s[n] ^= 1;
        assert!(matches!(
            k.open("data/a", s, 100),
            Err(BackupError::Corrupt { .. })
        ));
    }

    #[test]
    fn t50_adaptive_seal_and_open_chunk_into() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let k = key();
        // Compresses far better than FAST_ENOUGH_RATIO: level 1 kept, file not marked poor.
        let easy: Vec<u8> = (0..(1usize << 20)).map(|i| (i / 4096 % 3) as u8).collect();
        let poor = AtomicBool::new(false);
        let h = k.hash(&easy);
        let mut s = k.seal_adaptive("data/e", &easy, h, 3, &poor).unwrap();
        assert!(!poor.load(Ordering::Relaxed));
        let mut out = vec![0u8; easy.len()];
        assert_eq!(
            k.open_chunk_into("data/e", &mut s.clone(), &mut out)
                .unwrap(),
            h
        );
        assert!(out == easy);
        assert_eq!(
            k.open("data/e", s.clone(), 1 << 20).unwrap().1,
            h,
            "readers unchanged"
        );
        assert!(
            k.open_chunk_into("data/e", &mut s.clone(), &mut vec![0u8; easy.len() + 1])
                .is_err()
        );
        // Wrong expected length, tampering, another name: refused.
        assert!(
            k.open_chunk_into("data/e", &mut s.clone(), &mut out[1..])
                .is_err()
        );
        assert!(
            k.open_chunk_into("data/f", &mut s.clone(), &mut out)
                .is_err()
        );
        let n = s.len() / 2;
        s[n] ^= 1;
        assert!(matches!(
            k.open_chunk_into("data/e", &mut s, &mut out),
            Err(BackupError::Corrupt { .. })
        ));
        // Hard to compress: recompressed at the configured level, the file is marked poor.
        let hard: Vec<u8> = (0..100_000u32)
            .flat_map(|i| (i.wrapping_mul(2_654_435_761) >> 7).to_le_bytes())
            .collect();
        let poor = AtomicBool::new(false);
        let h = k.hash(&hard);
        let mut s = k.seal_adaptive("data/h", &hard, h, 3, &poor).unwrap();
        assert!(poor.load(Ordering::Relaxed));
        let mut out = vec![0u8; hard.len()];
        k.open_chunk_into("data/h", &mut s, &mut out).unwrap();
        assert!(out == hard);
    }

    #[test]
    fn t70_stream_seal_equals_seal_compressed() {
        let k = key();
        let plain: Vec<u8> = (0..(1usize << 20) + 333)
            .map(|i| if i % 5 == 0 { (i >> 7) as u8 } else { 1 })
            .collect();
        // Frame sizes around the 16-byte MAC blocks: empty, short, odd, exact multiples.
        for piece in [1usize, 7, 16, 17, 4096, 100_000, 256 << 10] {
            let frames: Vec<Vec<u8>> = plain
                .chunks(piece.max(1))
                .take(40)
                .map(|p| zstd::bulk::compress(p, 1).unwrap())
                .collect();
            let plain_len: usize = plain.chunks(piece).take(40).map(<[u8]>::len).sum();
            let mut s = k.seal_stream();
            let mut enc = frames.clone();
            for f in &mut enc {
                s.encrypt(f);
            }
            assert_eq!(s.len(), frames.iter().map(|f| f.len() as u64).sum::<u64>());
            let nonce = s.nonce;
            let (header, tag, hash) = s.finish("wal/00000001/x").unwrap();
            // The header's hash is of the stored bytes (flag bit 1), not of the plaintext.
            assert_eq!(hash, k.hash(&frames.concat()), "piece {piece}");
            assert_eq!(header[4], FLAG_ZSTD | FLAG_STORED_HASH);
            let mut obj = header.to_vec();
            for f in &enc {
                obj.extend_from_slice(f);
            }
            obj.extend_from_slice(&tag);
            // The reference: chacha20poly1305 over the concatenated frames, same nonce.
            let mut body: Vec<u8> = frames.concat();
            let aad = aad("wal/00000001/x", &hash);
            let reference = k
                .cipher
                .encrypt_in_place_detached(XNonce::from_slice(&nonce), &aad, &mut body)
                .unwrap();
            assert_eq!(
                &obj[HEADER_LEN..obj.len() - TAG_LEN],
                &body[..],
                "piece {piece}"
            );
            assert_eq!(&obj[obj.len() - TAG_LEN..], &reference[..], "piece {piece}");
            if frames.iter().map(Vec::len).sum::<usize>() < plain_len {
                let (p, h) = k.open("wal/00000001/x", obj.clone(), 2 << 20).unwrap();
                assert!(p == plain[..plain_len] && h == hash, "piece {piece}");
            }
            // A valid tag over a header whose hash is not the stored bytes' is refused: the
            // hash is checked before anything is decompressed.
            let wrong = ChunkId(rand::random());
            let mut forged = header;
            forged[5..37].copy_from_slice(&wrong.0);
            let mut body = frames.concat();
            let tag = k
                .cipher
                .encrypt_in_place_detached(
                    XNonce::from_slice(&nonce),
                    &super::aad("wal/00000001/x", &wrong),
                    &mut body,
                )
                .unwrap();
            let forged = [&forged[..], &body, &tag].concat();
            assert!(
                matches!(
                    k.open("wal/00000001/x", forged, 2 << 20),
                    Err(BackupError::Corrupt { ref reason, .. }) if reason.contains("stored bytes")
                ),
                "piece {piece}"
            );
            assert!(
                k.open("wal/00000001/y", obj, 2 << 20).is_err(),
                "bound to its name"
            );
        }
        // Many nonces (so many Poly1305 keys) and lengths, including none and block edges:
        // the tag put together in finish() is the one chacha20poly1305 computes.
        for i in 0..300usize {
            let n = match i % 6 {
                0 => 0,
                1 => 16 * (i % 5),
                2 => i,
                _ => rand::random::<u32>() as usize % 5000,
            };
            let data: Vec<u8> = (0..n).map(|_| rand::random::<u8>()).collect();
            let mut s = k.seal_stream();
            let nonce = s.nonce;
            let mut enc = data.clone();
            let cut = if n == 0 { 0 } else { i % n };
            let (a, b) = enc.split_at_mut(cut);
            s.encrypt(a);
            s.encrypt(b);
            let name = format!("wal/00000001/{i:024X}");
            let (_, tag, h) = s.finish(&name).unwrap();
            assert_eq!(h, k.hash(&data));
            let mut body = data.clone();
            let reference = k
                .cipher
                .encrypt_in_place_detached(XNonce::from_slice(&nonce), &aad(&name, &h), &mut body)
                .unwrap();
            assert_eq!(enc, body, "length {n}");
            assert_eq!(&tag[..], &reference[..], "length {n}, cut {cut}");
        }
    }

    #[test]
    fn t40_ids_are_keyed() {
        assert_ne!(
            key().hash(b"abc"),
            RepoKey::from_master(&[1u8; 32]).hash(b"abc")
        );
        let id = key().hash(b"abc");
        assert_eq!(id.to_string().parse::<ChunkId>().unwrap(), id);
    }
}
