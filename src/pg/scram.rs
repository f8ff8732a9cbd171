//! SCRAM-SHA-256 password verifiers (RFC 5802, RFC 7677) in Postgres's text form.
//!
//! Takes a password, gives `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
//! Computing the verifier here means the plaintext password never travels to
//! the server, so no statement log can ever hold it. Pure; no I/O.

use base64::{engine::general_purpose::STANDARD, Engine};
use hmac::{Hmac, KeyInit, Mac};
use rand::{distr::Alphanumeric, Rng, RngCore};
use sha2::{Digest, Sha256};

/// Postgres's default iteration count (`scram_iterations`).
pub const ITERATIONS: u32 = 4096;

/// A new random password: 32 alphanumeric characters (about 190 bits), which
/// needs no SASLprep and no quoting in a URI.
pub fn generate_password() -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(32)
        .map(char::from)
        .collect()
}

/// The verifier Postgres stores for `password`, with a random 16-byte salt.
pub fn verifier(password: &str) -> String {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    verifier_with(password, &salt, ITERATIONS)
}

/// Iterations for a verifier of a machine-made 256-bit secret (the ops
/// logins' derived passwords): key stretching protects guessable passwords
/// and adds nothing against a 2^256 search, while every login pays it on
/// both ends (a migration rollout opens one login per tenant).
pub const RANDOM_SECRET_ITERATIONS: u32 = 16;

/// The verifier for a high-entropy machine-made secret (never a person's
/// password), with [`RANDOM_SECRET_ITERATIONS`].
pub fn verifier_for_random_secret(secret: &str) -> String {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    verifier_with(secret, &salt, RANDOM_SECRET_ITERATIONS)
}

fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

fn verifier_with(password: &str, salt: &[u8], iterations: u32) -> String {
    let mut salted = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), salt, iterations, &mut salted);
    let client_key = hmac(&salted, b"Client Key");
    let stored_key = Sha256::digest(client_key);
    let server_key = hmac(&salted, b"Server Key");
    format!(
        "SCRAM-SHA-256${iterations}:{}${}:{}",
        STANDARD.encode(salt),
        STANDARD.encode(stored_key),
        STANDARD.encode(server_key)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_verifier_postgres_computed() {
        // RFC 7677 section 3's example: password "pencil", this salt, 4096
        // iterations; StoredKey and ServerKey as the RFC's exchange implies
        // (checked independently with Python's hashlib and hmac).
        let salt = STANDARD.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let v = verifier_with("pencil", &salt, 4096);
        assert_eq!(
            v,
            "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="
        );
    }

    #[test]
    fn generated_passwords_are_long_random_and_uri_safe() {
        let a = generate_password();
        let b = generate_password();
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
    }
}
