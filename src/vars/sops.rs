//! sops' file format, as clan-core's sops store writes every secret: sops' "binary" store,
//! a JSON document `{"data": "ENC[AES256_GCM,…]", "sops": {…}}`. The content is encrypted
//! with a data key (AES-256-GCM, 32-byte nonces, the key path `data:` as additional data);
//! the data key is age-encrypted (ASCII-armored) to each recipient; a MAC (SHA-512 of the
//! plaintext, encrypted with the data key and the `lastmodified` time as additional data)
//! proves that nobody swapped the content. Files written here decrypt with sops, and files
//! sops wrote decrypt here (tests use files written by sops in clan-core's repository, and an
//! independent implementation).

use std::io::{Read, Write};

use aes_gcm::aead::consts::U32;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{AesGcm, aes::Aes256};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha512};
use zeroize::Zeroizing;

use super::Secret;

/// AES-256-GCM with sops' 32-byte nonces.
type Cipher = AesGcm<Aes256, U32>;

/// The version this tool writes into `sops.version` (the format of sops 3.x).
const VERSION: &str = "3.9.4";

/// What can go wrong reading a sops file, in words (never the secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SopsError {
    /// Not sops' JSON binary store.
    #[error("not a sops file of clan's kind (JSON with \"data\" and \"sops\"): {0}")]
    Format(String),
    /// None of the identities is among its age recipients.
    #[error("none of the given age identities is one of its recipients ({0})")]
    NotARecipient(String),
    /// Its content or MAC does not authenticate with its data key.
    #[error("it is damaged or was changed: {0}")]
    Damaged(&'static str),
}

#[derive(Serialize, Deserialize)]
struct File {
    data: String,
    sops: Metadata,
}

#[derive(Serialize, Deserialize)]
struct Metadata {
    #[serde(default)]
    age: Vec<AgeEntry>,
    lastmodified: String,
    mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    unencrypted_suffix: Option<String>,
    version: String,
    /// Whatever else sops wrote (other key services): kept, never read.
    #[serde(flatten)]
    other: serde_json::Map<String, serde_json::Value>,
}

#[derive(Serialize, Deserialize)]
struct AgeEntry {
    recipient: String,
    enc: String,
}

/// One `ENC[AES256_GCM,data:…,iv:…,tag:…,type:…]` value.
struct Sealed {
    data: Vec<u8>,
    iv: Vec<u8>,
    tag: Vec<u8>,
}

impl Sealed {
    fn parse(text: &str) -> Result<Sealed, SopsError> {
        let inner = text
            .strip_prefix("ENC[AES256_GCM,")
            .and_then(|t| t.strip_suffix(']'))
            .ok_or_else(|| SopsError::Format("a value is not ENC[AES256_GCM,…]".into()))?;
        let mut data = None;
        let mut iv = None;
        let mut tag = None;
        for part in inner.split(',') {
            let (key, value) = part
                .split_once(':')
                .ok_or_else(|| SopsError::Format(format!("a value has a field {part:?}")))?;
            let decode = || {
                BASE64
                    .decode(value)
                    .map_err(|_| SopsError::Format(format!("its {key} is not base64")))
            };
            match key {
                "data" => data = Some(decode()?),
                "iv" => iv = Some(decode()?),
                "tag" => tag = Some(decode()?),
                "type" if value == "str" => {}
                "type" => {
                    return Err(SopsError::Format(format!(
                        "a value of type {value} (clan's secrets are strings)"
                    )));
                }
                _ => {}
            }
        }
        match (data, iv, tag) {
            (Some(data), Some(iv), Some(tag)) if iv.len() == 32 && tag.len() == 16 => {
                Ok(Sealed { data, iv, tag })
            }
            _ => Err(SopsError::Format(
                "a value lacks its data, a 32-byte iv or a 16-byte tag".into(),
            )),
        }
    }

    fn open(&self, key: &[u8], aad: &str) -> Result<Secret, SopsError> {
        let cipher = Cipher::new_from_slice(key).map_err(|_| SopsError::Damaged("data key"))?;
        let mut sealed = self.data.clone();
        sealed.extend_from_slice(&self.tag);
        cipher
            .decrypt(
                self.iv.as_slice().into(),
                Payload {
                    msg: &sealed,
                    aad: aad.as_bytes(),
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| SopsError::Damaged("a value does not authenticate"))
    }

    fn seal(key: &[u8], plaintext: &[u8], aad: &str) -> String {
        let cipher = Cipher::new_from_slice(key).expect("a 32-byte key");
        let mut iv = [0u8; 32];
        getrandom::fill(&mut iv).expect("the kernel's random source");
        let mut sealed = cipher
            .encrypt(
                (&iv).into(),
                Payload {
                    msg: plaintext,
                    aad: aad.as_bytes(),
                },
            )
            .expect("AES-GCM encrypts any length clan writes");
        let tag = sealed.split_off(sealed.len() - 16);
        format!(
            "ENC[AES256_GCM,data:{},iv:{},tag:{},type:str]",
            BASE64.encode(&sealed),
            BASE64.encode(iv),
            BASE64.encode(tag)
        )
    }
}

/// sops' MAC of a binary-store file: SHA-512 of its one value, upper-case hex.
fn mac_of(plaintext: &[u8]) -> String {
    Sha512::digest(plaintext)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect()
}

/// The age recipients a sops file is encrypted to (`age1…`), as it lists them.
pub fn recipients(text: &str) -> Result<Vec<String>, SopsError> {
    let file: File = serde_json::from_str(text).map_err(|e| SopsError::Format(format!("{e}")))?;
    Ok(file.sops.age.into_iter().map(|e| e.recipient).collect())
}

/// Decrypts a sops file with any of `identities`; its MAC is checked.
pub fn decrypt(text: &str, identities: &[age::x25519::Identity]) -> Result<Secret, SopsError> {
    let file: File = serde_json::from_str(text).map_err(|e| SopsError::Format(format!("{e}")))?;
    let key = data_key(&file, identities)?;
    let plaintext = Sealed::parse(&file.data)?.open(&key, "data:")?;
    let mac = Sealed::parse(&file.sops.mac)?.open(&key, &file.sops.lastmodified)?;
    if mac.as_slice() != mac_of(&plaintext).as_bytes() {
        return Err(SopsError::Damaged("its MAC does not match its content"));
    }
    Ok(plaintext)
}

/// The data key, from the first age entry one of `identities` opens.
fn data_key(file: &File, identities: &[age::x25519::Identity]) -> Result<Secret, SopsError> {
    for entry in &file.sops.age {
        let armored = age::armor::ArmoredReader::new(entry.enc.as_bytes());
        let Ok(decryptor) = age::Decryptor::new(armored) else {
            continue;
        };
        let Ok(mut reader) = decryptor.decrypt(identities.iter().map(|i| i as &dyn age::Identity))
        else {
            continue;
        };
        let mut key = Zeroizing::new(Vec::new());
        if reader.read_to_end(&mut key).is_ok() && key.len() == 32 {
            return Ok(key);
        }
    }
    let listed: Vec<&str> = file.sops.age.iter().map(|e| e.recipient.as_str()).collect();
    Err(SopsError::NotARecipient(if listed.is_empty() {
        "it has no age recipient".to_string()
    } else {
        format!("it is for {}", listed.join(", "))
    }))
}

/// Encrypts `plaintext` as a sops binary-store file for `recipients`, modified `now`
/// (RFC 3339, UTC, to the second: what sops writes).
pub fn encrypt(
    plaintext: &[u8],
    recipients: &[age::x25519::Recipient],
    now: &str,
) -> Result<String, String> {
    if recipients.is_empty() {
        return Err("no recipient".into());
    }
    let mut key = Zeroizing::new([0u8; 32]);
    getrandom::fill(key.as_mut_slice()).map_err(|e| format!("no random data key: {e}"))?;
    let mut age_entries = Vec::new();
    for recipient in recipients {
        let encryptor =
            age::Encryptor::with_recipients(std::iter::once(recipient as &dyn age::Recipient))
                .map_err(|_| "no usable recipient".to_string())?;
        let mut out = Vec::new();
        let armored =
            age::armor::ArmoredWriter::wrap_output(&mut out, age::armor::Format::AsciiArmor)
                .map_err(|e| e.to_string())?;
        let mut writer = encryptor.wrap_output(armored).map_err(|e| e.to_string())?;
        writer
            .write_all(key.as_slice())
            .and_then(|()| writer.finish())
            .and_then(|armored| armored.finish())
            .map_err(|e| e.to_string())?;
        age_entries.push(AgeEntry {
            recipient: recipient.to_string(),
            enc: String::from_utf8(out).map_err(|e| e.to_string())?,
        });
    }
    let file = File {
        data: Sealed::seal(key.as_slice(), plaintext, "data:"),
        sops: Metadata {
            age: age_entries,
            lastmodified: now.to_string(),
            mac: Sealed::seal(key.as_slice(), mac_of(plaintext).as_bytes(), now),
            unencrypted_suffix: Some("_unencrypted".into()),
            version: VERSION.into(),
            other: serde_json::Map::new(),
        },
    };
    // As sops writes it: tab-indented.
    let mut out = Vec::new();
    let formatter = serde_json::ser::PrettyFormatter::with_indent(b"\t");
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, formatter);
    file.serialize(&mut serializer).map_err(|e| e.to_string())?;
    out.push(b'\n');
    String::from_utf8(out).map_err(|e| e.to_string())
}

/// The time now as sops writes `lastmodified`: RFC 3339, UTC, to the second.
pub fn now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    rfc3339(secs)
}

/// `secs` since the epoch as `YYYY-MM-DDThh:mm:ssZ` (the proleptic Gregorian calendar).
fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rest = secs % 86_400;
    // Days to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// clan-core's test key (`checks/assets/test-age-key.txt` at d7c35d912), the `admin`
    /// user of its checks' sops repositories.
    pub const ADMIN_KEY: &str =
        "AGE-SECRET-KEY-1PL0M9CWRCG3PZ9DXRTTLMCVD57U6JDFE8K7DNVQ35F4JENZ6G3MQ0RQLRV";

    fn fixture(path: &str) -> String {
        std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/clan-core-sops")
                .join(path),
        )
        .unwrap()
    }

    fn identity(key: &str) -> age::x25519::Identity {
        key.trim().parse().unwrap()
    }

    #[test]
    fn files_sops_wrote_for_clan_core_decrypt() {
        let admin = identity(ADMIN_KEY);
        // The machine's key, encrypted to the admin…
        let machine_key = decrypt(
            &fixture("sops/secrets/peer1-age.key/secret"),
            std::slice::from_ref(&admin),
        )
        .expect("the machine key decrypts with the admin's key");
        let machine_key = String::from_utf8(machine_key.to_vec()).unwrap();
        let machine = identity(&machine_key);
        // …is the one whose public key the repository names for the machine.
        assert!(fixture("sops/machines/peer1/key.json").contains(&machine.to_public().to_string()));
        // A secret var opens with either.
        let path = "vars/per-machine/peer1/dummy-generator/generated-password/secret";
        let by_admin = decrypt(&fixture(path), &[admin]).unwrap();
        let by_machine = decrypt(&fixture(path), &[machine]).unwrap();
        assert_eq!(by_admin, by_machine);
        assert!(!by_admin.is_empty());
        assert_eq!(recipients(&fixture(path)).unwrap().len(), 2);
    }

    #[test]
    fn a_wrong_key_or_a_changed_file_is_refused() {
        let path = "vars/per-machine/peer1/dummy-generator/generated-password/secret";
        let stranger = age::x25519::Identity::generate();
        assert!(matches!(
            decrypt(&fixture(path), &[stranger]),
            Err(SopsError::NotARecipient(_))
        ));
        // Another lastmodified: the MAC no longer opens.
        let text = fixture(path);
        let moved = text.replace("2025-05-04T12:44:18Z", "2025-05-04T12:44:19Z");
        assert_ne!(text, moved);
        assert!(matches!(
            decrypt(&moved, &[identity(ADMIN_KEY)]),
            Err(SopsError::Damaged(_))
        ));
        assert!(matches!(
            decrypt("{}", &[identity(ADMIN_KEY)]),
            Err(SopsError::Format(_))
        ));
    }

    #[test]
    fn files_written_here_round_trip_for_each_recipient() {
        let a = age::x25519::Identity::generate();
        let b = age::x25519::Identity::generate();
        let plaintext = b"line one\nline two\0binary\xff";
        let text = encrypt(plaintext, &[a.to_public(), b.to_public()], &now()).unwrap();
        assert_eq!(decrypt(&text, &[a]).unwrap().as_slice(), plaintext);
        assert_eq!(decrypt(&text, &[b]).unwrap().as_slice(), plaintext);
        assert!(text.starts_with("{\n\t\"data\": \"ENC[AES256_GCM,data:"));
        assert!(!text.contains("line one"));
    }

    #[test]
    fn times_are_written_as_sops_writes_them() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_746_362_658), "2025-05-04T12:44:18Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(now().len(), 20);
    }
}
