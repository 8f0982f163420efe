//! The user's age identity, the machines' recipients, and age encryption.

use std::io::Read;
use std::path::PathBuf;

use zeroize::Zeroizing;

use super::{Secret, VarsSettings};
use crate::error::{Error, Hint};

/// The machine's recipients from the settings, parsed; none is an error.
pub fn parse_recipients(
    settings: &VarsSettings,
    machine: &str,
) -> Result<Vec<age::x25519::Recipient>, Error> {
    let (keys, from) = settings.recipients_of(machine);
    if keys.is_empty() {
        return Err(Error::usage(format!(
            "no one may decrypt machine {machine}'s secrets: {from} is empty"
        ))
        .hint(Hint::text(
            "set vars.settings.recipients.default = [ \"age1…\" ] in the clan (your public key: `age-keygen -y` of your identity file)",
        )));
    }
    keys.iter()
        .map(|k| {
            k.trim().parse::<age::x25519::Recipient>().map_err(|_| {
                Error::usage(format!(
                    "invalid age public key {:?} (from the flake, {from}): an age X25519 recipient, age1…",
                    crate::boundary::terminal_safe(k)
                ))
            })
        })
        .collect()
}

/// Encrypts `plaintext` to every recipient.
pub fn encrypt(recipients: &[age::x25519::Recipient], plaintext: &[u8]) -> Result<Vec<u8>, Error> {
    let encryptor =
        age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
            .map_err(|_| Error::new("cannot encrypt: no usable recipient"))?;
    let mut out = Vec::new();
    let mut writer = encryptor
        .wrap_output(&mut out)
        .map_err(|e| Error::new(format!("cannot encrypt: {e}")))?;
    std::io::Write::write_all(&mut writer, plaintext)
        .and_then(|()| writer.finish().map(|_| ()))
        .map_err(|e| Error::new(format!("cannot encrypt: {e}")))?;
    Ok(out)
}

/// Why a decryption failed, in words (age's own messages go through a localizer that can
/// panic in some environments, so they are never formatted).
fn decrypt_failure(e: &age::DecryptError) -> String {
    match e {
        age::DecryptError::NoMatchingKeys => "no identity given matches its recipients".into(),
        age::DecryptError::Io(io) => format!("cannot read it: {}", io.kind()),
        age::DecryptError::UnknownFormat | age::DecryptError::InvalidHeader => {
            "it is not an age file".into()
        }
        _ => "it is damaged or not for these identities".into(),
    }
}

/// Decrypts `ciphertext` with any of `identities`.
pub fn decrypt_with(
    identities: &[age::x25519::Identity],
    ciphertext: &[u8],
) -> Result<Secret, String> {
    let decryptor = age::Decryptor::new_buffered(ciphertext).map_err(|e| decrypt_failure(&e))?;
    let mut reader = decryptor
        .decrypt(identities.iter().map(|i| i as &dyn age::Identity))
        .map_err(|e| decrypt_failure(&e))?;
    let mut plain = Zeroizing::new(Vec::new());
    reader
        .read_to_end(&mut plain)
        .map_err(|_| "it is damaged (its payload does not authenticate)".to_string())?;
    Ok(plain)
}

/// Where `clan vars keygen` makes the user's key, as clan-core's does: `SOPS_AGE_KEY_FILE`,
/// else `~/.config/sops/age/keys.txt`.
pub fn new_identity_file() -> Option<PathBuf> {
    if let Some(file) = std::env::var_os("SOPS_AGE_KEY_FILE").filter(|f| !f.is_empty()) {
        return Some(PathBuf::from(file));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config/sops/age/keys.txt"))
}

/// The user's age identity, as clan-core looks for it.
pub struct UserIdentity {
    /// Where it came from, for messages (never its content).
    pub source: String,
    pub(crate) identities: Vec<age::x25519::Identity>,
}

impl UserIdentity {
    /// Decrypts with it.
    pub fn decrypt(&self, ciphertext: &[u8]) -> Result<Secret, String> {
        decrypt_with(&self.identities, ciphertext)
    }

    /// Its public keys.
    pub fn recipients(&self) -> Vec<String> {
        self.identities
            .iter()
            .map(|i| i.to_public().to_string())
            .collect()
    }

    /// Parses an identity file's text (comments and empty lines skipped).
    pub fn parse(source: String, text: &str) -> Result<UserIdentity, Error> {
        let mut identities = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if line.starts_with("AGE-PLUGIN-") {
                return Err(Error::usage(format!(
                    "{source}, line {}: age plugin identities are not supported by this tool",
                    n + 1
                ))
                .hint(Hint::text("use an X25519 identity (age-keygen)")));
            }
            match line.parse::<age::x25519::Identity>() {
                Ok(identity) => identities.push(identity),
                Err(_) => {
                    return Err(Error::usage(format!(
                        "{source}, line {}: not an age identity (AGE-SECRET-KEY-1…)",
                        n + 1
                    )));
                }
            }
        }
        if identities.is_empty() {
            return Err(Error::usage(format!("{source} holds no age identity")));
        }
        Ok(UserIdentity { source, identities })
    }

    /// The user's identity, made when there is none (`clan vars keygen`): a new X25519 key,
    /// appended to [`new_identity_file`] (made 0600; an existing file is never replaced).
    /// Returns it, and the file it was made in, if it was made.
    pub fn find_or_make() -> Result<(UserIdentity, Option<PathBuf>), Error> {
        let found = UserIdentity::find();
        let Some(path) = new_identity_file() else {
            return found.map(|user| (user, None));
        };
        match found {
            Ok(user) => Ok((user, None)),
            Err(_) if !path.exists() => {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let identity = age::x25519::Identity::generate();
                let secret = Zeroizing::new(
                    age::secrecy::ExposeSecret::expose_secret(&identity.to_string()).to_string(),
                );
                let dir = path.parent().expect("a file in a directory");
                let fail =
                    |e: std::io::Error| Error::new(format!("cannot write {}: {e}", path.display()));
                std::fs::create_dir_all(dir).map_err(fail)?;
                let mut file = std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(fail)?;
                file.write_all(
                    format!("# public key: {}\n{}\n", identity.to_public(), *secret).as_bytes(),
                )
                .map_err(fail)?;
                Ok((
                    UserIdentity {
                        source: path.display().to_string(),
                        identities: vec![identity],
                    },
                    Some(path),
                ))
            }
            Err(e) => Err(e),
        }
    }

    /// From `AGE_KEY`, `AGE_KEYFILE`, `SOPS_AGE_KEY`, `SOPS_AGE_KEY_FILE` (where sops and
    /// clan-core's sops store look), `~/.config/age/identities`,
    /// `~/.config/sops/age/keys.txt` or `~/.age/key.txt`: the first that is set or exists.
    pub fn find() -> Result<UserIdentity, Error> {
        for (key_var, file_var) in [
            ("AGE_KEY", "AGE_KEYFILE"),
            ("SOPS_AGE_KEY", "SOPS_AGE_KEY_FILE"),
        ] {
            if let Ok(key) = std::env::var(key_var)
                && !key.trim().is_empty()
            {
                return UserIdentity::parse(key_var.into(), &key);
            }
            if let Ok(file) = std::env::var(file_var)
                && !file.is_empty()
            {
                let path = PathBuf::from(file);
                let text = Zeroizing::new(std::fs::read_to_string(&path).map_err(|e| {
                    Error::usage(format!(
                        "{file_var}={}: cannot read it: {e}",
                        path.display()
                    ))
                })?);
                return UserIdentity::parse(format!("{file_var}={}", path.display()), &text);
            }
        }
        let mut candidates = Vec::new();
        if let Some(home) = std::env::var_os("HOME") {
            let home = PathBuf::from(home);
            candidates.push(home.join(".config/age/identities"));
            candidates.push(home.join(".config/sops/age/keys.txt"));
            candidates.push(home.join(".age/key.txt"));
        }
        for path in &candidates {
            if path.is_file() {
                let text =
                    Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
                        Error::usage(format!("cannot read {}: {e}", path.display()))
                    })?);
                return UserIdentity::parse(path.display().to_string(), &text);
            }
        }
        Err(Error::usage(
            "no age identity: AGE_KEY, AGE_KEYFILE, SOPS_AGE_KEY and SOPS_AGE_KEY_FILE are unset, and none of ~/.config/age/identities, ~/.config/sops/age/keys.txt, ~/.age/key.txt exists",
        )
        .hint(Hint::text(
            "make one with `age-keygen -o ~/.config/sops/age/keys.txt`, and put its public key in vars.settings.recipients",
        )))
    }
}
