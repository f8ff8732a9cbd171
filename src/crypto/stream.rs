//! Chunked streaming encryption for backups (many GiB, constant memory).
//!
//! Layout: a 29-byte header `"TNBK" | 0x01 | key version u32 BE | 16-byte
//! random stream id | chunk size u32 BE`, then chunks. Every chunk but the
//! last holds exactly `chunk size` plaintext bytes; the last holds fewer
//! (possibly none), and is always present. Each chunk is AES-256-GCM
//! ciphertext followed by its 16-byte tag.
//!
//! Keys and nonces: each stream gets its own key, HKDF-SHA256(ikm = tenant
//! key, salt = stream id, info = `tenancy.dev/v1 stream-chunk-key`), and chunk
//! `i` uses the nonce `00 00 00 00 | i as u64 BE`. Nonces are unique per key
//! because the counter never repeats within a stream, and keys are unique per
//! stream because the stream id is 128 random bits.
//!
//! AAD of chunk `i`: header bytes | `i` u64 BE | last flag (0x00/0x01) |
//! lp(tenant uid) | lp(purpose). Truncation, reordering, duplication,
//! splicing, trailing data and header edits all fail to authenticate.
//!
//! Takes plaintext or ciphertext bytes pushed incrementally, or a `Write`/
//! `Read` to wrap; gives sealed bytes or plaintext of authenticated chunks
//! only. No I/O of its own: the adapters only call the wrapped reader/writer.

use std::io::{self, BufRead, Read, Write};

use hkdf::Hkdf;
use rand::RngCore;
use sha2::Sha256;
use zeroize::Zeroizing;

use super::derive::{Purpose, TenantKey, TenantSalt};
use super::gcm::Gcm;
use super::keyring::{KeyVersion, Keyring};
use super::{put_len_prefixed, validate_tenant_uid, CryptoError, NONCE_LEN, TAG_LEN};

/// First four bytes of every stream.
pub const STREAM_MAGIC: [u8; 4] = *b"TNBK";
/// Format version byte of streams.
pub const STREAM_FORMAT_V1: u8 = 0x01;
/// Header length in bytes.
pub const STREAM_HEADER_LEN: usize = 4 + 1 + 4 + STREAM_ID_LEN + 4;
/// Default plaintext bytes per chunk (1 MiB).
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;
/// Largest chunk size accepted, bounding a reader's memory (64 MiB).
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;

const STREAM_ID_LEN: usize = 16;
const STREAM_KEY_INFO: &[u8] = b"tenancy.dev/v1 stream-chunk-key";
/// Offset of the chunk index in the AAD; the last flag follows it.
const AAD_INDEX_OFFSET: usize = STREAM_HEADER_LEN;
const AAD_FLAG_OFFSET: usize = AAD_INDEX_OFFSET + 8;

/// The parsed header of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamHeader {
    /// Root key version the stream was sealed under.
    pub key_version: KeyVersion,
    /// Random per-stream id (salt of the per-stream key).
    pub stream_id: [u8; STREAM_ID_LEN],
    /// Plaintext bytes per non-final chunk.
    pub chunk_size: u32,
}

impl StreamHeader {
    /// The header's bytes.
    pub fn to_bytes(&self) -> [u8; STREAM_HEADER_LEN] {
        let mut out = [0u8; STREAM_HEADER_LEN];
        out[..4].copy_from_slice(&STREAM_MAGIC);
        out[4] = STREAM_FORMAT_V1;
        out[5..9].copy_from_slice(&self.key_version.get().to_be_bytes());
        out[9..25].copy_from_slice(&self.stream_id);
        out[25..29].copy_from_slice(&self.chunk_size.to_be_bytes());
        out
    }

    /// Parses the first [`STREAM_HEADER_LEN`] bytes of `bytes` (more may follow).
    /// Checks magic, format version and chunk size; does not authenticate
    /// (every chunk's tag does, since the header is in every AAD).
    pub fn parse(bytes: &[u8]) -> Result<Self, CryptoError> {
        let prefix = &bytes[..bytes.len().min(4)];
        if prefix != &STREAM_MAGIC[..prefix.len()] {
            return Err(CryptoError::BadMagic);
        }
        if let Some(&format) = bytes.get(4) {
            if format != STREAM_FORMAT_V1 {
                return Err(CryptoError::UnsupportedFormat {
                    kind: "stream",
                    version: format,
                });
            }
        }
        if bytes.len() < STREAM_HEADER_LEN {
            return Err(CryptoError::Truncated {
                kind: "stream header",
                len: bytes.len(),
                min: STREAM_HEADER_LEN,
            });
        }
        let u32_at = |at: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&bytes[at..at + 4]);
            u32::from_be_bytes(b)
        };
        let mut stream_id = [0u8; STREAM_ID_LEN];
        stream_id.copy_from_slice(&bytes[9..25]);
        let chunk_size = u32_at(25);
        if chunk_size == 0 || chunk_size > MAX_CHUNK_SIZE {
            return Err(CryptoError::BadChunkSize(chunk_size));
        }
        Ok(Self {
            key_version: KeyVersion::from_wire(u32_at(5)),
            stream_id,
            chunk_size,
        })
    }
}

/// The root key version a stream was sealed under, read from its header
/// without decrypting anything (for retention and rotation bookkeeping).
pub fn stream_key_version(header: &[u8]) -> Result<KeyVersion, CryptoError> {
    StreamHeader::parse(header).map(|h| h.key_version)
}

fn check_chunk_size(chunk_size: u32) -> Result<usize, CryptoError> {
    if chunk_size == 0 || chunk_size > MAX_CHUNK_SIZE {
        return Err(CryptoError::BadChunkSize(chunk_size));
    }
    Ok(chunk_size as usize)
}

/// Per-stream AEAD state: the stream key, the AAD buffer (rewritten in place
/// per chunk) and the chunk counter.
struct ChunkCipher {
    aead: Gcm,
    aad: Vec<u8>,
    index: u64,
    done: bool,
}

impl ChunkCipher {
    fn new(tenant_key: &TenantKey, header: &StreamHeader, tenant_uid: &str, purpose: Purpose) -> Self {
        let hk = Hkdf::<Sha256>::new(Some(&header.stream_id), tenant_key.bytes());
        let mut stream_key = Zeroizing::new([0u8; 32]);
        // 32 bytes never exceeds HKDF's output limit, so this cannot fail.
        let _ = hk.expand(STREAM_KEY_INFO, stream_key.as_mut());
        let aead = Gcm::new(&stream_key);

        let mut aad = Vec::with_capacity(STREAM_HEADER_LEN + 9 + 8 + tenant_uid.len() + 7);
        aad.extend_from_slice(&header.to_bytes());
        aad.extend_from_slice(&[0u8; 9]); // chunk index and last flag, set per chunk
        put_len_prefixed(&mut aad, tenant_uid.as_bytes());
        put_len_prefixed(&mut aad, purpose.as_str().as_bytes());
        Self {
            aead,
            aad,
            index: 0,
            done: false,
        }
    }

    /// Sets the AAD and nonce for the current chunk.
    fn prepare(&mut self, last: bool) -> Result<[u8; NONCE_LEN], CryptoError> {
        if self.done {
            return Err(CryptoError::StreamPoisoned);
        }
        self.aad[AAD_INDEX_OFFSET..AAD_FLAG_OFFSET].copy_from_slice(&self.index.to_be_bytes());
        self.aad[AAD_FLAG_OFFSET] = u8::from(last);
        let mut nonce = [0u8; NONCE_LEN];
        nonce[4..].copy_from_slice(&self.index.to_be_bytes());
        Ok(nonce)
    }

    fn advance(&mut self, last: bool) -> Result<(), CryptoError> {
        if last {
            self.done = true;
            return Ok(());
        }
        self.index = self.index.checked_add(1).ok_or(CryptoError::StreamTooLong)?;
        Ok(())
    }

    /// Encrypts `buf` in place and returns the tag.
    fn seal(&mut self, buf: &mut [u8], last: bool) -> Result<[u8; TAG_LEN], CryptoError> {
        let nonce = self.prepare(last)?;
        let tag = self
            .aead
            .seal(&nonce, &self.aad, buf)
            .map_err(|_| CryptoError::BadChunkSize(u32::try_from(buf.len()).unwrap_or(u32::MAX)))?;
        self.advance(last)?;
        Ok(tag)
    }

    /// Decrypts `chunk` (ciphertext then tag) in place; returns the plaintext length.
    fn open(&mut self, chunk: &mut [u8], last: bool) -> Result<usize, CryptoError> {
        let nonce = self.prepare(last)?;
        let Some(pt_len) = chunk.len().checked_sub(TAG_LEN) else {
            return Err(CryptoError::StreamTruncated);
        };
        let (ciphertext, tag) = chunk.split_at_mut(pt_len);
        let tag: &[u8; TAG_LEN] = (&*tag).try_into().map_err(|_| CryptoError::StreamTruncated)?;
        self.aead
            .open(&nonce, &self.aad, ciphertext, tag)
            .map_err(|_| CryptoError::Authentication)?;
        self.advance(last)?;
        Ok(pt_len)
    }
}

/// Incremental sealer. Push plaintext in any split; sealed bytes (header
/// first) come out as whole chunks fill up; [`finish`](Self::finish) seals
/// the final chunk. Memory: one chunk buffer, reused.
///
/// Dropping it without `finish` leaves a stream that every reader rejects as
/// truncated.
pub struct StreamEncryptor {
    header: [u8; STREAM_HEADER_LEN],
    parsed_header: StreamHeader,
    header_sent: bool,
    cipher: ChunkCipher,
    chunk_size: usize,
    /// Plaintext of the chunk being filled; capacity chunk size + tag.
    buf: Zeroizing<Vec<u8>>,
    failed: bool,
}

impl StreamEncryptor {
    /// A sealer under the active root key with the default 1 MiB chunks.
    pub fn new(keyring: &Keyring, salt: &TenantSalt, tenant_uid: &str, purpose: Purpose) -> Result<Self, CryptoError> {
        Self::with_chunk_size(keyring, salt, tenant_uid, purpose, DEFAULT_CHUNK_SIZE)
    }

    /// A sealer with a chosen chunk size (1 ..= [`MAX_CHUNK_SIZE`]).
    pub fn with_chunk_size(
        keyring: &Keyring,
        salt: &TenantSalt,
        tenant_uid: &str,
        purpose: Purpose,
        chunk_size: u32,
    ) -> Result<Self, CryptoError> {
        let chunk = check_chunk_size(chunk_size)?;
        let key = keyring.derive_active_tenant_key(salt, tenant_uid, purpose)?;
        let mut stream_id = [0u8; STREAM_ID_LEN];
        rand::rng().fill_bytes(&mut stream_id);
        let header = StreamHeader {
            key_version: key.version(),
            stream_id,
            chunk_size,
        };
        Ok(Self {
            header: header.to_bytes(),
            parsed_header: header,
            header_sent: false,
            cipher: ChunkCipher::new(&key, &header, tenant_uid, purpose),
            chunk_size: chunk,
            buf: Zeroizing::new(Vec::with_capacity(chunk + TAG_LEN)),
            failed: false,
        })
    }

    /// A sealer under a tenant key handed over directly (a backup Job holds
    /// its tenant's backup key, not the root keys), default chunk size.
    pub fn with_tenant_key(key: &TenantKey, tenant_uid: &str, purpose: Purpose) -> Result<Self, CryptoError> {
        validate_tenant_uid(tenant_uid)?;
        if key.purpose() != purpose {
            return Err(CryptoError::WrongKeyPurpose {
                expected: purpose,
                got: key.purpose(),
            });
        }
        Ok(Self::from_key(
            key,
            tenant_uid,
            purpose,
            DEFAULT_CHUNK_SIZE as usize,
            DEFAULT_CHUNK_SIZE,
        ))
    }

    fn from_key(key: &TenantKey, tenant_uid: &str, purpose: Purpose, chunk: usize, chunk_size: u32) -> Self {
        let mut stream_id = [0u8; STREAM_ID_LEN];
        rand::rng().fill_bytes(&mut stream_id);
        let header = StreamHeader {
            key_version: key.version(),
            stream_id,
            chunk_size,
        };
        Self {
            header: header.to_bytes(),
            parsed_header: header,
            header_sent: false,
            cipher: ChunkCipher::new(key, &header, tenant_uid, purpose),
            chunk_size: chunk,
            buf: Zeroizing::new(Vec::with_capacity(chunk + TAG_LEN)),
            failed: false,
        }
    }

    /// The header this stream starts with.
    pub fn header(&self) -> StreamHeader {
        self.parsed_header
    }

    /// Pushes plaintext; appends the header (on first use) and every chunk
    /// that fills up to `out`.
    pub fn push(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), CryptoError> {
        self.push_with(data, |bytes| {
            out.extend_from_slice(bytes);
            Ok(())
        })
    }

    /// Pushes plaintext; hands the header (on first use) and every sealed
    /// chunk to `emit`, in order. After any error the encryptor is poisoned.
    pub fn push_with<E: From<CryptoError>>(
        &mut self,
        data: &[u8],
        mut emit: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        if self.failed {
            return Err(CryptoError::StreamPoisoned.into());
        }
        self.failed = true;
        self.send_header(&mut emit)?;
        let mut rest = data;
        while !rest.is_empty() {
            let take = (self.chunk_size - self.buf.len()).min(rest.len());
            self.buf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.buf.len() == self.chunk_size {
                // A full chunk is never the last: the final chunk always holds
                // fewer than chunk-size bytes (possibly zero).
                self.seal_buffered(false)?;
                emit(&self.buf)?;
                self.buf.clear();
            }
        }
        self.failed = false;
        Ok(())
    }

    /// Seals the final chunk and appends it (and the header, if nothing was
    /// pushed) to `out`.
    pub fn finish(self, out: &mut Vec<u8>) -> Result<(), CryptoError> {
        self.finish_with(|bytes| {
            out.extend_from_slice(bytes);
            Ok(())
        })
    }

    /// Seals the final chunk and hands it (and the header, if nothing was
    /// pushed) to `emit`.
    pub fn finish_with<E: From<CryptoError>>(mut self, mut emit: impl FnMut(&[u8]) -> Result<(), E>) -> Result<(), E> {
        if self.failed {
            return Err(CryptoError::StreamPoisoned.into());
        }
        self.failed = true;
        self.send_header(&mut emit)?;
        self.seal_buffered(true)?;
        emit(&self.buf)?;
        Ok(())
    }

    fn send_header<E>(&mut self, emit: &mut impl FnMut(&[u8]) -> Result<(), E>) -> Result<(), E> {
        if !self.header_sent {
            emit(&self.header)?;
            self.header_sent = true;
        }
        Ok(())
    }

    /// Encrypts the buffered plaintext in place and appends its tag.
    fn seal_buffered(&mut self, last: bool) -> Result<(), CryptoError> {
        let tag = self.cipher.seal(&mut self.buf, last)?;
        self.buf.extend_from_slice(&tag);
        Ok(())
    }
}

impl std::fmt::Debug for StreamEncryptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamEncryptor")
            .field("header", &self.header())
            .field("chunk_index", &self.cipher.index)
            .finish_non_exhaustive()
    }
}

/// Decryption state once the header is known.
struct Body {
    header: StreamHeader,
    cipher: ChunkCipher,
    /// One chunk (ciphertext + tag); filled up to `filled`.
    buf: Zeroizing<Vec<u8>>,
    filled: usize,
}

impl Body {
    fn full_len(&self) -> usize {
        self.buf.len()
    }
}

/// Incremental opener. Feed it ciphertext in any split; it returns plaintext
/// only of chunks whose tag verified. [`finish`](Self::finish) authenticates
/// the final chunk and fails if the stream was cut short.
///
/// Plaintext of earlier chunks is released before the end is known to be
/// intact: a consumer must not commit anything until `finish` succeeds.
pub struct StreamDecryptor {
    /// Tenant keys for every held version; the header picks one.
    candidates: Vec<TenantKey>,
    tenant_uid: String,
    purpose: Purpose,
    header_buf: [u8; STREAM_HEADER_LEN],
    header_filled: usize,
    body: Option<Body>,
    failed: bool,
}

impl StreamDecryptor {
    /// An opener for a stream of tenant `tenant_uid` and `purpose`, sealed
    /// under any version the keyring holds.
    pub fn new(keyring: &Keyring, salt: &TenantSalt, tenant_uid: &str, purpose: Purpose) -> Result<Self, CryptoError> {
        validate_tenant_uid(tenant_uid)?;
        // Derive for every version now, so the decryptor owns no reference to
        // the keyring; the unused keys are dropped (and wiped) at the header.
        let candidates = keyring
            .versions()
            .map(|v| keyring.derive_tenant_key(v, salt, tenant_uid, purpose))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            candidates,
            tenant_uid: tenant_uid.to_owned(),
            purpose,
            header_buf: [0u8; STREAM_HEADER_LEN],
            header_filled: 0,
            body: None,
            failed: false,
        })
    }

    /// An opener given the tenant keys themselves (a restore Job holds the
    /// key of the backup's version, not the root keys); the header picks one.
    pub fn with_tenant_keys(keys: Vec<TenantKey>, tenant_uid: &str, purpose: Purpose) -> Result<Self, CryptoError> {
        validate_tenant_uid(tenant_uid)?;
        if let Some(k) = keys.iter().find(|k| k.purpose() != purpose) {
            return Err(CryptoError::WrongKeyPurpose {
                expected: purpose,
                got: k.purpose(),
            });
        }
        Ok(Self {
            candidates: keys,
            tenant_uid: tenant_uid.to_owned(),
            purpose,
            header_buf: [0u8; STREAM_HEADER_LEN],
            header_filled: 0,
            body: None,
            failed: false,
        })
    }

    /// The header, once it has been read.
    pub fn header(&self) -> Option<StreamHeader> {
        self.body.as_ref().map(|b| b.header)
    }

    /// Feeds ciphertext; appends plaintext of every chunk that completed and
    /// authenticated to `out`.
    pub fn push(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), CryptoError> {
        self.push_with(data, |pt| {
            out.extend_from_slice(pt);
            Ok(())
        })
    }

    /// Feeds ciphertext; hands plaintext of every authenticated chunk to
    /// `emit`. After any error the decryptor is poisoned.
    pub fn push_with<E: From<CryptoError>>(
        &mut self,
        data: &[u8],
        mut emit: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        self.guard()?;
        self.failed = true;
        let mut rest = data;
        while !rest.is_empty() {
            let Some(body) = self.body.as_mut() else {
                let take = (STREAM_HEADER_LEN - self.header_filled).min(rest.len());
                self.header_buf[self.header_filled..self.header_filled + take].copy_from_slice(&rest[..take]);
                self.header_filled += take;
                rest = &rest[take..];
                self.accept_header_bytes()?;
                continue;
            };
            let full = body.full_len();
            let take = (full - body.filled).min(rest.len());
            body.buf[body.filled..body.filled + take].copy_from_slice(&rest[..take]);
            body.filled += take;
            rest = &rest[take..];
            if body.filled == full {
                // A full-size chunk is never the final one.
                let pt_len = body.cipher.open(&mut body.buf, false)?;
                body.filled = 0;
                emit(&body.buf[..pt_len])?;
            }
        }
        self.failed = false;
        Ok(())
    }

    /// Authenticates the final chunk and appends its plaintext to `out`.
    /// Errors when the stream ended early or anything was altered.
    pub fn finish(self, out: &mut Vec<u8>) -> Result<(), CryptoError> {
        self.finish_with(|pt| {
            out.extend_from_slice(pt);
            Ok(())
        })
    }

    /// Authenticates the final chunk and hands its plaintext to `emit`.
    pub fn finish_with<E: From<CryptoError>>(mut self, mut emit: impl FnMut(&[u8]) -> Result<(), E>) -> Result<(), E> {
        let pt_len = self.open_final()?;
        if let Some(body) = self.body.as_ref() {
            emit(&body.buf[..pt_len])?;
        }
        Ok(())
    }

    fn guard(&self) -> Result<(), CryptoError> {
        if self.failed {
            return Err(CryptoError::StreamPoisoned);
        }
        Ok(())
    }

    /// Checks the header as soon as its bytes arrive (a bad magic fails on the
    /// first byte) and sets up the body once all of them are in.
    fn accept_header_bytes(&mut self) -> Result<(), CryptoError> {
        let have = &self.header_buf[..self.header_filled];
        if self.header_filled < STREAM_HEADER_LEN {
            // Reports bad magic or format early; a short header is expected here.
            return match StreamHeader::parse(have) {
                Err(CryptoError::Truncated { .. }) | Ok(_) => Ok(()),
                Err(e) => Err(e),
            };
        }
        let header = StreamHeader::parse(have)?;
        let position = self
            .candidates
            .iter()
            .position(|k| k.version() == header.key_version)
            .ok_or(CryptoError::UnknownKeyVersion(header.key_version))?;
        let key = self.candidates.swap_remove(position);
        self.candidates.clear();
        let cipher = ChunkCipher::new(&key, &header, &self.tenant_uid, self.purpose);
        let full = header.chunk_size as usize + TAG_LEN;
        self.body = Some(Body {
            header,
            cipher,
            buf: Zeroizing::new(vec![0u8; full]),
            filled: 0,
        });
        Ok(())
    }

    /// Opens what is buffered as the final chunk; returns its plaintext length
    /// (the plaintext is at the start of the body buffer).
    fn open_final(&mut self) -> Result<usize, CryptoError> {
        self.guard()?;
        self.failed = true;
        let Some(body) = self.body.as_mut() else {
            if self.header_filled == 0 {
                return Err(CryptoError::Truncated {
                    kind: "stream",
                    len: 0,
                    min: STREAM_HEADER_LEN + TAG_LEN,
                });
            }
            return Err(CryptoError::Truncated {
                kind: "stream header",
                len: self.header_filled,
                min: STREAM_HEADER_LEN,
            });
        };
        if body.filled < TAG_LEN {
            return Err(CryptoError::StreamTruncated);
        }
        let filled = body.filled;
        let pt_len = body.cipher.open(&mut body.buf[..filled], true)?;
        body.filled = 0;
        self.failed = false;
        Ok(pt_len)
    }
}

impl std::fmt::Debug for StreamDecryptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamDecryptor")
            .field("header", &self.header())
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

/// A `Write` that seals everything written to it into `inner` as a stream.
/// Call [`finish`](Self::finish) at the end: without it the stream has no
/// final chunk and will be rejected as truncated.
pub struct SealingWriter<W: Write> {
    inner: W,
    enc: StreamEncryptor,
}

impl<W: Write> SealingWriter<W> {
    /// Seals into `inner` under the active root key with 1 MiB chunks.
    pub fn new(
        inner: W,
        keyring: &Keyring,
        salt: &TenantSalt,
        tenant_uid: &str,
        purpose: Purpose,
    ) -> Result<Self, CryptoError> {
        Self::with_chunk_size(inner, keyring, salt, tenant_uid, purpose, DEFAULT_CHUNK_SIZE)
    }

    /// Seals into `inner` with a chosen chunk size.
    pub fn with_chunk_size(
        inner: W,
        keyring: &Keyring,
        salt: &TenantSalt,
        tenant_uid: &str,
        purpose: Purpose,
        chunk_size: u32,
    ) -> Result<Self, CryptoError> {
        let enc = StreamEncryptor::with_chunk_size(keyring, salt, tenant_uid, purpose, chunk_size)?;
        Ok(Self { inner, enc })
    }

    /// The stream's header.
    pub fn header(&self) -> StreamHeader {
        self.enc.header()
    }

    /// The wrapped writer.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// Writes the final chunk, flushes, and returns the wrapped writer.
    pub fn finish(self) -> io::Result<W> {
        let Self { mut inner, enc } = self;
        enc.finish_with(|bytes| inner.write_all(bytes))?;
        inner.flush()?;
        Ok(inner)
    }
}

impl<W: Write> Write for SealingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Self { inner, enc } = self;
        enc.push_with(buf, |bytes| inner.write_all(bytes))?;
        Ok(buf.len())
    }

    /// Flushes the wrapped writer. A partly filled chunk stays buffered: the
    /// format only has whole chunks until `finish`.
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<W: Write> std::fmt::Debug for SealingWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealingWriter")
            .field("enc", &self.enc)
            .finish_non_exhaustive()
    }
}

/// A `Read` that opens a stream read from `inner`. It returns plaintext of
/// authenticated chunks only, and reports end of file only after the final
/// chunk authenticated; a cut-short or altered stream gives an
/// `InvalidData` error whose inner error is a [`CryptoError`].
pub struct OpeningReader<R: Read> {
    inner: R,
    dec: StreamDecryptor,
    /// Plaintext waiting in the decryptor's body buffer.
    out_start: usize,
    out_end: usize,
    done: bool,
}

impl<R: Read> OpeningReader<R> {
    /// Opens a stream of tenant `tenant_uid` and `purpose` read from `inner`.
    pub fn new(
        inner: R,
        keyring: &Keyring,
        salt: &TenantSalt,
        tenant_uid: &str,
        purpose: Purpose,
    ) -> Result<Self, CryptoError> {
        let dec = StreamDecryptor::new(keyring, salt, tenant_uid, purpose)?;
        Ok(Self {
            inner,
            dec,
            out_start: 0,
            out_end: 0,
            done: false,
        })
    }

    /// Opens a stream read from `inner` with the tenant keys given
    /// ([`StreamDecryptor::with_tenant_keys`]).
    pub fn with_tenant_keys(
        inner: R,
        keys: Vec<TenantKey>,
        tenant_uid: &str,
        purpose: Purpose,
    ) -> Result<Self, CryptoError> {
        let dec = StreamDecryptor::with_tenant_keys(keys, tenant_uid, purpose)?;
        Ok(Self {
            inner,
            dec,
            out_start: 0,
            out_end: 0,
            done: false,
        })
    }

    /// The header, once read.
    pub fn header(&self) -> Option<StreamHeader> {
        self.dec.header()
    }

    /// The wrapped reader.
    pub fn into_inner(self) -> R {
        self.inner
    }

    fn read_retrying(inner: &mut R, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match inner.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }

    /// Reads until a chunk's plaintext is ready (or the stream ended).
    fn fill(&mut self) -> io::Result<()> {
        self.dec.guard()?;
        loop {
            let Some(body) = self.dec.body.as_mut() else {
                let dec = &mut self.dec;
                let n = Self::read_retrying(&mut self.inner, &mut dec.header_buf[dec.header_filled..])?;
                if n == 0 {
                    dec.open_final()?;
                    // `open_final` without a body always errors.
                    return Err(CryptoError::StreamTruncated.into());
                }
                dec.header_filled += n;
                dec.failed = true;
                dec.accept_header_bytes()?;
                dec.failed = false;
                continue;
            };
            // Read straight into the chunk buffer: no copy besides the caller's.
            let full = body.full_len();
            let n = Self::read_retrying(&mut self.inner, &mut body.buf[body.filled..full])?;
            if n == 0 {
                let pt_len = self.dec.open_final()?;
                self.out_start = 0;
                self.out_end = pt_len;
                self.done = true;
                return Ok(());
            }
            body.filled += n;
            if body.filled == full {
                self.dec.failed = true;
                let pt_len = body.cipher.open(&mut body.buf, false)?;
                body.filled = 0;
                self.dec.failed = false;
                self.out_start = 0;
                self.out_end = pt_len;
                return Ok(());
            }
        }
    }
}

impl<R: Read> Read for OpeningReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let available = self.fill_buf()?;
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

/// Zero-copy access: `fill_buf` lends the authenticated plaintext straight
/// from the chunk buffer (for example to `write_all` it into `psql`'s stdin).
impl<R: Read> BufRead for OpeningReader<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.out_start == self.out_end && !self.done {
            self.fill()?;
        }
        match self.dec.body.as_ref() {
            Some(body) => Ok(&body.buf[self.out_start..self.out_end]),
            None => Ok(&[]),
        }
    }

    fn consume(&mut self, amt: usize) {
        self.out_start = self.out_start.saturating_add(amt).min(self.out_end);
    }
}

impl<R: Read> std::fmt::Debug for OpeningReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpeningReader")
            .field("dec", &self.dec)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::testutil::{keyring, salt};
    use proptest::prelude::*;

    const UID: &str = "7d0c6a52-1111-4222-8333-444455556666";
    const CHUNK: u32 = 16;
    const C: usize = CHUNK as usize;

    fn payload(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 131 + 7) as u8).collect()
    }

    /// Seals `data` pushing it in pieces of `piece` bytes.
    fn seal_with(ring: &Keyring, data: &[u8], chunk: u32, piece: usize) -> Vec<u8> {
        let mut enc = StreamEncryptor::with_chunk_size(ring, &salt(1), UID, Purpose::Backup, chunk).unwrap();
        let mut out = Vec::new();
        for part in data.chunks(piece.max(1)) {
            enc.push(part, &mut out).unwrap();
        }
        enc.finish(&mut out).unwrap();
        out
    }

    #[test]
    fn a_tenant_key_handed_over_seals_and_opens_like_the_keyring() {
        let ring = keyring(&[1, 2], 2);
        let data = payload(3 * DEFAULT_CHUNK_SIZE as usize / 2);
        let key = ring.derive_active_tenant_key(&salt(1), UID, Purpose::Backup).unwrap();
        let mut enc = StreamEncryptor::with_tenant_key(&key, UID, Purpose::Backup).unwrap();
        let mut sealed = Vec::new();
        enc.push(&data, &mut sealed).unwrap();
        enc.finish(&mut sealed).unwrap();
        // The keyring opens what the key sealed ...
        let mut r = OpeningReader::new(&sealed[..], &ring, &salt(1), UID, Purpose::Backup).unwrap();
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, data);
        // ... and the key opens what the keyring sealed; another version's
        // key, another purpose's or another tenant's does not.
        let by_ring = seal_default(&ring, &data);
        let mut r = OpeningReader::with_tenant_keys(&by_ring[..], vec![key.clone()], UID, Purpose::Backup).unwrap();
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, data);
        let v1 = ring
            .derive_tenant_key(KeyVersion::new(1).unwrap(), &salt(1), UID, Purpose::Backup)
            .unwrap();
        let mut r = OpeningReader::with_tenant_keys(&by_ring[..], vec![v1], UID, Purpose::Backup).unwrap();
        assert!(r.read_to_end(&mut Vec::new()).is_err(), "a v1 key opened a v2 stream");
        let secrets = ring.derive_active_tenant_key(&salt(1), UID, Purpose::Secrets).unwrap();
        assert!(matches!(
            OpeningReader::with_tenant_keys(&by_ring[..], vec![secrets.clone()], UID, Purpose::Backup),
            Err(CryptoError::WrongKeyPurpose { .. })
        ));
        assert!(StreamEncryptor::with_tenant_key(&secrets, UID, Purpose::Backup).is_err());
        let mut r = OpeningReader::with_tenant_keys(&by_ring[..], vec![key], "another-uid", Purpose::Backup).unwrap();
        assert!(
            r.read_to_end(&mut Vec::new()).is_err(),
            "another tenant's uid opened the stream"
        );
    }

    fn seal_default(ring: &Keyring, data: &[u8]) -> Vec<u8> {
        seal_with(ring, data, CHUNK, 5)
    }

    fn open_as(
        ring: &Keyring,
        uid: &str,
        purpose: Purpose,
        salt_seed: u8,
        sealed: &[u8],
        piece: usize,
    ) -> Result<Vec<u8>, CryptoError> {
        let mut dec = StreamDecryptor::new(ring, &salt(salt_seed), uid, purpose)?;
        let mut out = Vec::new();
        for part in sealed.chunks(piece.max(1)) {
            dec.push(part, &mut out)?;
        }
        dec.finish(&mut out)?;
        Ok(out)
    }

    fn open_all(ring: &Keyring, sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        open_as(ring, UID, Purpose::Backup, 1, sealed, 1 << 20)
    }

    /// Opens through `OpeningReader` with an inner reader that returns at
    /// most `step` bytes per call and reads into a buffer of `read_len`.
    fn open_reader(ring: &Keyring, sealed: &[u8], step: usize, read_len: usize) -> io::Result<Vec<u8>> {
        struct Trickle<'a>(&'a [u8], usize);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = self.0.len().min(self.1).min(buf.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut reader = OpeningReader::new(Trickle(sealed, step), ring, &salt(1), UID, Purpose::Backup).unwrap();
        let mut out = Vec::new();
        let mut buf = vec![0u8; read_len];
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                return Ok(out);
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    /// Splits a sealed stream into header and chunk byte ranges.
    fn split(sealed: &[u8], chunk: usize) -> (Vec<u8>, Vec<Vec<u8>>) {
        let header = sealed[..STREAM_HEADER_LEN].to_vec();
        let chunks = sealed[STREAM_HEADER_LEN..]
            .chunks(chunk + TAG_LEN)
            .map(<[u8]>::to_vec)
            .collect();
        (header, chunks)
    }

    fn join(header: &[u8], chunks: &[Vec<u8>]) -> Vec<u8> {
        let mut out = header.to_vec();
        for c in chunks {
            out.extend_from_slice(c);
        }
        out
    }

    const SIZES: [usize; 6] = [0, 1, C - 1, C, C + 1, 3 * C + 5];

    #[test]
    fn round_trips_at_chunk_edges_through_every_api() {
        let ring = keyring(&[1, 2], 2);
        for len in SIZES {
            let data = payload(len);
            for piece in [1, 3, C, C + 1, 1000] {
                let sealed = seal_with(&ring, &data, CHUNK, piece);
                let chunks = len / C + 1; // the final chunk holds len % C bytes
                assert_eq!(sealed.len(), STREAM_HEADER_LEN + len + chunks * TAG_LEN, "len {len}");
                assert_eq!(stream_key_version(&sealed).unwrap().get(), 2);
                for open_piece in [1, 7, C + TAG_LEN, 1 << 20] {
                    assert_eq!(
                        open_as(&ring, UID, Purpose::Backup, 1, &sealed, open_piece).unwrap(),
                        data,
                        "len {len} piece {piece} open_piece {open_piece}"
                    );
                }
                for (step, read_len) in [(1, 1), (5, 3), (1 << 20, 1 << 20), (C + TAG_LEN, 7)] {
                    assert_eq!(open_reader(&ring, &sealed, step, read_len).unwrap(), data);
                }
            }
        }
    }

    #[test]
    fn writer_and_reader_round_trip_with_default_chunks() {
        let ring = keyring(&[1], 1);
        let data = payload(3 * DEFAULT_CHUNK_SIZE as usize + 12345);
        let mut writer = SealingWriter::new(Vec::new(), &ring, &salt(1), UID, Purpose::Backup).unwrap();
        for part in data.chunks(100_000) {
            writer.write_all(part).unwrap();
        }
        writer.flush().unwrap();
        let sealed = writer.finish().unwrap();
        let mut reader = OpeningReader::new(&sealed[..], &ring, &salt(1), UID, Purpose::Backup).unwrap();
        let mut out = Vec::new();
        reader.read_to_end(&mut out).unwrap();
        assert!(out == data, "default-chunk round trip changed the data");
        assert_eq!(reader.header().unwrap().chunk_size, DEFAULT_CHUNK_SIZE);
    }

    #[test]
    fn truncation_at_every_length_fails() {
        let ring = keyring(&[1], 1);
        for len in SIZES {
            let sealed = seal_default(&ring, &payload(len));
            for cut in 0..sealed.len() {
                let prefix = &sealed[..cut];
                assert!(
                    open_all(&ring, prefix).is_err(),
                    "len {len}: prefix of {cut} bytes opened"
                );
                let err =
                    open_reader(&ring, prefix, 1 << 20, 1 << 20).expect_err("reader reached EOF on a truncated stream");
                assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            }
        }
    }

    #[test]
    fn truncation_at_a_chunk_boundary_is_reported_as_truncated() {
        let ring = keyring(&[1], 1);
        let sealed = seal_default(&ring, &payload(3 * C + 5));
        let (header, chunks) = split(&sealed, C);
        assert_eq!(chunks.len(), 4);
        for keep in 0..chunks.len() {
            assert_eq!(
                open_all(&ring, &join(&header, &chunks[..keep])).unwrap_err(),
                CryptoError::StreamTruncated,
                "kept {keep} chunks"
            );
        }
        // Exactly-full plaintext: its empty final chunk is all that marks the end.
        let full = seal_default(&ring, &payload(2 * C));
        let (header, chunks) = split(&full, C);
        assert_eq!(chunks.last().unwrap().len(), TAG_LEN, "empty final chunk");
        assert_eq!(
            open_all(&ring, &join(&header, &chunks[..2])).unwrap_err(),
            CryptoError::StreamTruncated
        );
    }

    #[test]
    fn reordered_duplicated_and_dropped_chunks_fail() {
        let ring = keyring(&[1], 1);
        let sealed = seal_default(&ring, &payload(3 * C + 5));
        let (header, chunks) = split(&sealed, C);
        let mut cases: Vec<(&str, Vec<Vec<u8>>)> = Vec::new();
        let mut swapped = chunks.clone();
        swapped.swap(0, 1);
        cases.push(("swap 0,1", swapped));
        let mut swapped_last = chunks.clone();
        swapped_last.swap(2, 3);
        cases.push(("swap last two", swapped_last));
        let mut dup = chunks.clone();
        dup.insert(1, chunks[1].clone());
        cases.push(("duplicate 1", dup));
        let mut dup_last = chunks.clone();
        dup_last.push(chunks[3].clone());
        cases.push(("duplicate final", dup_last));
        let mut dropped = chunks.clone();
        dropped.remove(1);
        cases.push(("drop 1", dropped));
        for (what, changed) in cases {
            assert!(open_all(&ring, &join(&header, &changed)).is_err(), "{what} opened");
        }
    }

    #[test]
    fn splicing_between_streams_of_the_same_tenant_and_key_fails() {
        let ring = keyring(&[1], 1);
        let data = payload(3 * C + 5);
        let (ha, ca) = split(&seal_default(&ring, &data), C);
        let (hb, cb) = split(&seal_default(&ring, &data), C);
        assert_ne!(ha, hb, "two streams share a stream id");
        let mut mixed = ca.clone();
        mixed[1] = cb[1].clone();
        assert_eq!(
            open_all(&ring, &join(&ha, &mixed)).unwrap_err(),
            CryptoError::Authentication
        );
        assert_eq!(
            open_all(&ring, &join(&hb, &ca)).unwrap_err(),
            CryptoError::Authentication
        );
        let mut tail_swapped = ca.clone();
        tail_swapped[3] = cb[3].clone();
        assert_eq!(
            open_all(&ring, &join(&ha, &tail_swapped)).unwrap_err(),
            CryptoError::Authentication
        );
    }

    #[test]
    fn trailing_data_after_the_final_chunk_fails() {
        let ring = keyring(&[1], 1);
        for len in SIZES {
            let sealed = seal_default(&ring, &payload(len));
            for extra in [1usize, 15, 16, 17, C + TAG_LEN, 3 * (C + TAG_LEN)] {
                let mut longer = sealed.clone();
                longer.extend(std::iter::repeat_n(0xA5u8, extra));
                assert!(
                    open_all(&ring, &longer).is_err(),
                    "len {len}: {extra} trailing bytes accepted"
                );
                assert!(open_reader(&ring, &longer, 1 << 20, 1 << 20).is_err());
            }
            let mut twice = sealed.clone();
            twice.extend_from_slice(&sealed[STREAM_HEADER_LEN..]);
            assert!(
                open_all(&ring, &twice).is_err(),
                "len {len}: chunks appended twice accepted"
            );
        }
    }

    #[test]
    fn every_byte_flip_fails() {
        let ring = keyring(&[1, 2], 2);
        let sealed = seal_default(&ring, &payload(2 * C + 3));
        for pos in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[pos] ^= 0x01;
            let err = open_all(&ring, &bad).expect_err("a flipped stream opened");
            if pos < 4 {
                assert_eq!(err, CryptoError::BadMagic);
            } else if pos == 4 {
                assert!(matches!(err, CryptoError::UnsupportedFormat { .. }));
            } else if pos >= STREAM_HEADER_LEN || (9..25).contains(&pos) {
                assert_eq!(err, CryptoError::Authentication, "byte {pos}");
            }
        }
    }

    #[test]
    fn header_fields_are_checked() {
        let ring = keyring(&[1, 2], 2);
        let sealed = seal_default(&ring, &payload(C + 1));
        let mut v9 = sealed.clone();
        v9[5..9].copy_from_slice(&9u32.to_be_bytes());
        assert_eq!(
            open_all(&ring, &v9).unwrap_err(),
            CryptoError::UnknownKeyVersion(KeyVersion::new(9).unwrap())
        );
        let mut relabel = sealed.clone();
        relabel[5..9].copy_from_slice(&1u32.to_be_bytes());
        assert_eq!(open_all(&ring, &relabel).unwrap_err(), CryptoError::Authentication);
        for size in [0u32, MAX_CHUNK_SIZE + 1] {
            let mut bad = sealed.clone();
            bad[25..29].copy_from_slice(&size.to_be_bytes());
            assert_eq!(open_all(&ring, &bad).unwrap_err(), CryptoError::BadChunkSize(size));
        }
        let mut other_size = sealed.clone();
        other_size[25..29].copy_from_slice(&(CHUNK + 1).to_be_bytes());
        assert!(open_all(&ring, &other_size).is_err());
        assert_eq!(
            open_all(&ring, b"PK\x03\x04 not a backup").unwrap_err(),
            CryptoError::BadMagic
        );
        assert!(matches!(
            open_all(&ring, &[]).unwrap_err(),
            CryptoError::Truncated { .. }
        ));
        assert!(matches!(
            stream_key_version(&sealed[..10]),
            Err(CryptoError::Truncated { .. })
        ));
    }

    #[test]
    fn bad_magic_is_reported_on_the_first_byte() {
        let ring = keyring(&[1], 1);
        let mut dec = StreamDecryptor::new(&ring, &salt(1), UID, Purpose::Backup).unwrap();
        assert_eq!(dec.push(b"X", &mut Vec::new()).unwrap_err(), CryptoError::BadMagic);
        assert_eq!(
            dec.push(b"TNBK", &mut Vec::new()).unwrap_err(),
            CryptoError::StreamPoisoned
        );
    }

    #[test]
    fn wrong_tenant_purpose_or_salt_fails_and_rotation_keeps_old_streams_readable() {
        let ring = keyring(&[1], 1);
        let sealed = seal_default(&ring, &payload(C + 2));
        for (what, result) in [
            (
                "tenant",
                open_as(&ring, "another-uid", Purpose::Backup, 1, &sealed, 100),
            ),
            ("purpose", open_as(&ring, UID, Purpose::Secrets, 1, &sealed, 100)),
            ("salt", open_as(&ring, UID, Purpose::Backup, 2, &sealed, 100)),
        ] {
            assert_eq!(result.unwrap_err(), CryptoError::Authentication, "wrong {what} opened");
        }
        let rotated = keyring(&[1, 2], 2);
        assert_eq!(open_all(&rotated, &sealed).unwrap(), payload(C + 2));
        let only_v2 = keyring(&[2], 2);
        assert_eq!(
            open_all(&only_v2, &sealed).unwrap_err(),
            CryptoError::UnknownKeyVersion(KeyVersion::new(1).unwrap())
        );
    }

    #[test]
    fn decryptor_emits_only_authenticated_chunks() {
        let ring = keyring(&[1], 1);
        let data = payload(3 * C + 5);
        let mut sealed = seal_default(&ring, &data);
        let mut dec = StreamDecryptor::new(&ring, &salt(1), UID, Purpose::Backup).unwrap();
        let mut out = Vec::new();
        // Header plus all but the last byte of chunk 0: nothing released yet.
        dec.push(&sealed[..STREAM_HEADER_LEN + C + TAG_LEN - 1], &mut out)
            .unwrap();
        assert!(out.is_empty());
        // Corrupt chunk 1, then feed the rest: chunk 0 comes out, then an error.
        let chunk1 = STREAM_HEADER_LEN + C + TAG_LEN;
        sealed[chunk1 + 3] ^= 0x40;
        let err = dec
            .push(&sealed[STREAM_HEADER_LEN + C + TAG_LEN - 1..], &mut out)
            .unwrap_err();
        assert_eq!(err, CryptoError::Authentication);
        assert_eq!(out, data[..C]);
        assert_eq!(dec.finish(&mut out).unwrap_err(), CryptoError::StreamPoisoned);
    }

    #[test]
    fn encryptor_rejects_bad_chunk_sizes_and_debug_has_no_key() {
        let ring = keyring(&[1], 1);
        for size in [0, MAX_CHUNK_SIZE + 1] {
            assert_eq!(
                StreamEncryptor::with_chunk_size(&ring, &salt(1), UID, Purpose::Backup, size).unwrap_err(),
                CryptoError::BadChunkSize(size)
            );
        }
        let enc = StreamEncryptor::new(&ring, &salt(1), UID, Purpose::Backup).unwrap();
        let shown = format!("{enc:?}");
        let key = ring
            .derive_tenant_key(KeyVersion::new(1).unwrap(), &salt(1), UID, Purpose::Backup)
            .unwrap();
        crate::crypto::testutil::assert_no_key_bytes(&shown, key.bytes());
        crate::crypto::testutil::assert_no_key_bytes(&shown, &crate::crypto::testutil::key_bytes(1));
    }

    #[test]
    fn buf_read_lends_plaintext_and_errors_on_truncation() {
        let ring = keyring(&[1], 1);
        let data = payload(2 * C + 3);
        let sealed = seal_default(&ring, &data);
        let mut reader = OpeningReader::new(&sealed[..], &ring, &salt(1), UID, Purpose::Backup).unwrap();
        let mut out = Vec::new();
        loop {
            let available = reader.fill_buf().unwrap();
            if available.is_empty() {
                break;
            }
            let n = available.len().min(5);
            out.extend_from_slice(&available[..n]);
            reader.consume(n);
        }
        assert_eq!(out, data);
        let cut = &sealed[..sealed.len() - TAG_LEN - 3];
        let mut reader = OpeningReader::new(cut, &ring, &salt(1), UID, Purpose::Backup).unwrap();
        let mut sink = Vec::new();
        let err = io::copy(&mut reader, &mut sink).expect_err("a truncated stream was copied to the end");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let inner = err.into_inner().unwrap().downcast::<CryptoError>().unwrap();
        assert_eq!(
            *inner,
            CryptoError::StreamTruncated,
            "the final chunk was cut off whole"
        );
        assert_eq!(sink, data[..2 * C], "only authenticated chunks were released");
    }

    #[test]
    fn sealing_writer_propagates_inner_errors_and_then_refuses_writes() {
        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::new(io::ErrorKind::StorageFull, "disk full"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let ring = keyring(&[1], 1);
        let mut writer = SealingWriter::with_chunk_size(Full, &ring, &salt(1), UID, Purpose::Backup, CHUNK).unwrap();
        assert_eq!(writer.write(b"x").unwrap_err().kind(), io::ErrorKind::StorageFull);
        assert_eq!(writer.write(b"y").unwrap_err().kind(), io::ErrorKind::InvalidData);
        assert!(writer.finish().is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]
        #[test]
        fn stream_round_trips(
            data in proptest::collection::vec(any::<u8>(), 0..1500),
            chunk in 1u32..200,
            cuts in proptest::collection::vec(0usize..1500, 0..8),
            open_piece in 1usize..400,
        ) {
            let ring = keyring(&[1, 2], 2);
            let mut enc = StreamEncryptor::with_chunk_size(&ring, &salt(4), UID, Purpose::Backup, chunk).unwrap();
            let mut sealed = Vec::new();
            let mut points: Vec<usize> = cuts.into_iter().map(|c| c.min(data.len())).collect();
            points.sort_unstable();
            let mut at = 0;
            for p in points {
                enc.push(&data[at..p], &mut sealed).unwrap();
                at = p;
            }
            enc.push(&data[at..], &mut sealed).unwrap();
            enc.finish(&mut sealed).unwrap();
            let chunks = data.len() / chunk as usize + 1;
            prop_assert_eq!(sealed.len(), STREAM_HEADER_LEN + data.len() + chunks * TAG_LEN);

            let mut dec = StreamDecryptor::new(&ring, &salt(4), UID, Purpose::Backup).unwrap();
            let mut out = Vec::new();
            for part in sealed.chunks(open_piece) {
                dec.push(part, &mut out).unwrap();
            }
            dec.finish(&mut out).unwrap();
            prop_assert_eq!(&out, &data);

            let mut via_reader = Vec::new();
            OpeningReader::new(&sealed[..], &ring, &salt(4), UID, Purpose::Backup)
                .unwrap()
                .read_to_end(&mut via_reader)
                .unwrap();
            prop_assert_eq!(&via_reader, &data);
        }
    }
}
