//! The trust boundary: every value that comes from the flake or the command line and ends
//! up in a command, a path, a file name or the terminal is parsed here, once, into a type
//! that cannot hold a bad value. Host addresses have their own parser ([`crate::host`]);
//! everything else is here: machine names, tags, store paths, Nix system strings, the store
//! directory.
//!
//! What each type accepts is small on purpose: none of them can start with `-` (so none can
//! become an option), hold whitespace or control characters (so none can become a second
//! shell word or rewrite a terminal line), or hold `/` except where a path is meant (so none
//! can name a file outside its directory).

use std::fmt;
use std::ops::Deref;

/// Where a value came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The command line (`--flag` or an argument).
    CommandLine(&'static str),
    /// The flake, at the attribute path given.
    Flake(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::CommandLine(what) => write!(f, "from {what}"),
            Origin::Flake(attr) => write!(f, "from the flake, {attr}"),
        }
    }
}

/// A value refused at the boundary: what it is, the value (escaped), where it came from,
/// and the rule it breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?} ({origin}): {rule}")]
pub struct Refused {
    /// What kind of value (e.g. "machine name").
    pub what: &'static str,
    /// The value as given.
    pub value: String,
    /// Where it came from.
    pub origin: Origin,
    /// The rule it breaks.
    pub rule: &'static str,
}

fn refuse(what: &'static str, value: &str, origin: &Origin, rule: &'static str) -> Refused {
    Refused {
        what,
        value: value.to_string(),
        origin: origin.clone(),
        rule,
    }
}

/// Whether `s` is a name: 1 to 63 characters, letters, digits, `-`, `_` and `.`, starting
/// with a letter or digit (so never `-x`, `.`, `..` or a hidden file).
fn is_name(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

const NAME_RULE: &str =
    "names are 1 to 63 letters, digits, '-', '_' and '.', starting with a letter or digit";

/// A machine name: the same rules for names typed on the command line and names defined in
/// the flake. Safe as a file name, a shell word and a terminal line.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MachineName(String);

impl MachineName {
    /// Checks `value` (from `origin`).
    pub fn parse(value: &str, origin: &Origin) -> Result<MachineName, Refused> {
        if is_name(value) {
            Ok(MachineName(value.to_string()))
        } else {
            Err(refuse("machine name", value, origin, NAME_RULE))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Deref for MachineName {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MachineName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl serde::Serialize for MachineName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// An inventory tag: the same rules as machine names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tag(String);

impl Tag {
    /// Checks `value` (from `origin`).
    pub fn parse(value: &str, origin: &Origin) -> Result<Tag, Refused> {
        if is_name(value) {
            Ok(Tag(value.to_string()))
        } else {
            Err(refuse("tag", value, origin, NAME_RULE))
        }
    }

    /// The tag.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The Nix store directory (`builtins.storeDir`, `/nix/store` almost everywhere): an
/// absolute path of plain path characters, without `.` or `..` components.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreDir(String);

impl StoreDir {
    /// Checks `value` (from `origin`).
    pub fn parse(value: &str, origin: &Origin) -> Result<StoreDir, Refused> {
        let ok = value.starts_with('/')
            && value.len() > 1
            && !value.ends_with('/')
            && value[1..].split('/').all(is_path_component);
        if ok {
            Ok(StoreDir(value.to_string()))
        } else {
            Err(refuse(
                "store directory",
                value,
                origin,
                "it must be an absolute path of letters, digits, '-', '_' and '.'",
            ))
        }
    }

    /// The directory.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for StoreDir {
    fn default() -> StoreDir {
        StoreDir("/nix/store".into())
    }
}

fn is_path_component(c: &str) -> bool {
    !c.is_empty()
        && c != "."
        && c != ".."
        && c.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Nix's base-32 alphabet (no e, o, u, t).
const NIX_BASE32: &str = "0123456789abcdfghijklmnpqrsvwxyz";

/// A store path: `<store dir>/<32 nix-base32 characters>-<name>`, the name made of the
/// characters Nix allows (`A-Za-z0-9+-._?=`) and not starting with `.`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StorePath(String);

impl StorePath {
    /// Checks `value` (from `origin`) as a path in `store`.
    pub fn parse(value: &str, store: &StoreDir, origin: &Origin) -> Result<StorePath, Refused> {
        let rule = "a store path is <store dir>/<32 base-32 characters>-<name>";
        let base = value
            .strip_prefix(store.as_str())
            .and_then(|rest| rest.strip_prefix('/'))
            .ok_or_else(|| refuse("store path", value, origin, rule))?;
        let (hash, name) = base
            .split_at_checked(32)
            .ok_or_else(|| refuse("store path", value, origin, rule))?;
        let name = name
            .strip_prefix('-')
            .ok_or_else(|| refuse("store path", value, origin, rule))?;
        let ok = hash.chars().all(|c| NIX_BASE32.contains(c))
            && !name.is_empty()
            && name.len() <= 211
            && !name.starts_with('.')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-._?=".contains(c));
        if ok {
            Ok(StorePath(value.to_string()))
        } else {
            Err(refuse("store path", value, origin, rule))
        }
    }

    /// Checks `value` as a derivation: a store path whose name ends in `.drv`.
    pub fn parse_drv(value: &str, store: &StoreDir, origin: &Origin) -> Result<StorePath, Refused> {
        let path = StorePath::parse(value, store, origin)?;
        if path.0.ends_with(".drv") {
            Ok(path)
        } else {
            Err(refuse(
                "derivation path",
                value,
                origin,
                "a derivation is a store path ending in .drv",
            ))
        }
    }

    /// The path.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Deref for StorePath {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A Nix system string such as `x86_64-linux` or `aarch64-darwin`: `<cpu>-<os>` (or
/// `<cpu>-<vendor>-<os>`), lower-case letters, digits and `_`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NixSystem(String);

impl NixSystem {
    /// Checks `value` (from `origin`).
    pub fn parse(value: &str, origin: &Origin) -> Result<NixSystem, Refused> {
        let parts: Vec<&str> = value.split('-').collect();
        let ok = (2..=4).contains(&parts.len())
            && value.len() <= 64
            && parts.iter().all(|p| {
                !p.is_empty()
                    && p.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            });
        if ok {
            Ok(NixSystem(value.to_string()))
        } else {
            Err(refuse(
                "Nix system",
                value,
                origin,
                "a system is <cpu>-<os> such as x86_64-linux",
            ))
        }
    }

    /// The system.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Deref for NixSystem {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NixSystem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Nix remote builders in Nix's `builders` syntax, checked: specifications separated by `;`
/// or newlines, each `ssh://[user@]host[:port]` (or `ssh-ng://`) followed by at most seven
/// fields (systems, ssh key, max jobs, speed factor, features, mandatory features, base64
/// host key), each of plain characters or `-`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Builders(Vec<BuilderSpec>);

/// One remote builder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuilderSpec {
    /// `ssh` or `ssh-ng`.
    pub scheme: String,
    /// Where the build host reaches it (no `?` options: Nix would not pass them).
    pub address: crate::host::HostAddress,
    /// The fields after the URI, as given (checked).
    pub fields: Vec<String>,
}

impl Builders {
    /// Checks `value` (from `origin`).
    pub fn parse(value: &str, origin: &Origin) -> Result<Builders, Refused> {
        let bad = |rule: &'static str| refuse("builders", value, origin, rule);
        let mut specs = Vec::new();
        for spec in value
            .split([';', '\n'])
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            let mut words = spec.split_whitespace();
            let uri = words
                .next()
                .ok_or_else(|| bad("a builder starts with its ssh:// URI"))?;
            let (scheme, rest) = uri
                .split_once("://")
                .filter(|(s, _)| *s == "ssh" || *s == "ssh-ng")
                .ok_or_else(|| bad("a builder starts with ssh://[user@]host or ssh-ng://"))?;
            if rest.contains('?') {
                return Err(bad(
                    "builder URIs take no ?options: set them in the build host's ~/.ssh/config",
                ));
            }
            let address: crate::host::HostAddress = rest
                .parse()
                .map_err(|_| bad("the builder's address is [user@]host[:port]"))?;
            let fields: Vec<String> = words.map(str::to_string).collect();
            if fields.len() > 7 {
                return Err(bad("a builder has at most 7 fields after its URI"));
            }
            let plain = |f: &str, extra: &str| {
                f == "-"
                    || (!f.starts_with('-')
                        && f.chars()
                            .all(|c| c.is_ascii_alphanumeric() || extra.contains(c)))
            };
            let ok = fields.iter().enumerate().all(|(i, f)| match i {
                0 | 4 | 5 => plain(f, "_,-"),
                1 => f == "-" || (f.starts_with('/') && plain(&f[1..], "/._-")),
                2 | 3 => f == "-" || f.chars().all(|c| c.is_ascii_digit()),
                _ => plain(f, "+/="),
            });
            if !ok {
                return Err(bad(
                    "builder fields: systems, an absolute key path, numbers, features, a base64 host key, or -",
                ));
            }
            specs.push(BuilderSpec {
                scheme: scheme.to_string(),
                address,
                fields,
            });
        }
        if specs.is_empty() {
            return Err(bad("no builder is given"));
        }
        Ok(Builders(specs))
    }

    /// The builders.
    pub fn specs(&self) -> &[BuilderSpec] {
        &self.0
    }

    /// Nix's `builders` value.
    pub fn to_nix(&self) -> String {
        self.0
            .iter()
            .map(|b| {
                let mut words = vec![format!("{}://{}", b.scheme, b.address)];
                words.extend(b.fields.iter().cloned());
                words.join(" ")
            })
            .collect::<Vec<_>>()
            .join(" ; ")
    }
}

/// How the closure reaches a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum CopyMode {
    /// The build host copies it to each target over ssh (the second hop).
    #[default]
    Ssh,
    /// The build host signs it and copies it to a binary cache; each target substitutes
    /// it from there.
    Cache,
}

impl CopyMode {
    /// Checks a value from the flake.
    pub fn parse(value: &str, origin: &Origin) -> Result<CopyMode, Refused> {
        match value {
            "ssh" => Ok(CopyMode::Ssh),
            "cache" => Ok(CopyMode::Cache),
            _ => Err(refuse("copy mode", value, origin, "it is ssh or cache")),
        }
    }
}

/// A binary cache for `--copy-mode cache`: where the build host copies to (a Nix store URL),
/// where targets substitute from, and the public key they must trust.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheSettings {
    /// `file:///…`, `http(s)://…` or `s3://…`: the build host's `nix copy --to`.
    pub upload: String,
    /// `file:///…` or `http(s)://…`: the targets' substituter.
    pub url: String,
    /// `name:base64`: what targets must have in `trusted-public-keys`.
    pub public_key: String,
}

impl CacheSettings {
    /// Checks the three values (from `origin`).
    pub fn parse(
        upload: &str,
        url: &str,
        public_key: &str,
        origin: &Origin,
    ) -> Result<CacheSettings, Refused> {
        let url_ok = |u: &str, schemes: &[&str]| {
            schemes.iter().any(|s| {
                u.strip_prefix(s).is_some_and(|rest| {
                    !rest.is_empty()
                        && rest
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "/.-_:".contains(c))
                        && !rest.split('/').any(|c| c == "..")
                })
            })
        };
        if !url_ok(upload, &["file:///", "http://", "https://", "s3://"]) {
            return Err(refuse(
                "cache upload URL",
                upload,
                origin,
                "a Nix store URL: file:///path, http(s)://host/path or s3://bucket, plain characters",
            ));
        }
        if !url_ok(url, &["file:///", "http://", "https://"]) {
            return Err(refuse(
                "cache URL",
                url,
                origin,
                "a substituter URL: file:///path or http(s)://host[:port]/path, plain characters",
            ));
        }
        let key_ok = public_key.split_once(':').is_some_and(|(name, key)| {
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
                && key.len() >= 40
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+/=".contains(c))
        });
        if !key_ok {
            return Err(refuse(
                "cache public key",
                public_key,
                origin,
                "a Nix signing public key, name:base64 (clan machines setup-cache prints it)",
            ));
        }
        Ok(CacheSettings {
            upload: upload.to_string(),
            url: url.to_string(),
            public_key: public_key.to_string(),
        })
    }
}

/// `text` made safe for one terminal line: control characters (ESC, CR, newline…) shown
/// as escapes, so a value can never move the cursor or rewrite what is on screen.
pub fn terminal_safe(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<char>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn flake() -> Origin {
        Origin::Flake("machines".into())
    }

    #[test]
    fn machine_names() {
        for ok in ["web1", "a", "db-2.eu_west", "0x"] {
            assert!(MachineName::parse(ok, &flake()).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "../../../../tmp/x",
            "a/b",
            "-rf",
            ".",
            "..",
            ".hidden",
            "x\ny",
            "x\u{1b}[2K",
            "a\rb",
            "web;curl x|sh",
            "a b",
            &"x".repeat(64),
        ] {
            let e = MachineName::parse(bad, &flake()).unwrap_err();
            assert_eq!(e.value, bad);
        }
        let e = MachineName::parse("a/b", &Origin::CommandLine("the command line")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid machine name \"a/b\" (from the command line): names are 1 to 63 letters, digits, '-', '_' and '.', starting with a letter or digit"
        );
    }

    #[test]
    fn store_paths() {
        let store = StoreDir::default();
        let o = flake();
        let good = "/nix/store/k7xwak8a1mz37bc4xxnpqvw2k43i9zrp-nixos-system-m";
        assert!(StorePath::parse(good, &store, &o).is_ok());
        let drv = "/nix/store/xk0jbcmgicclzsk50p02kizxjdhp84d3-nixos-system-m.drv";
        assert!(StorePath::parse_drv(drv, &store, &o).is_ok());
        assert!(StorePath::parse_drv(good, &store, &o).is_err());
        for bad in [
            "--option post-build-hook /tmp/x",
            "/tmp/x",
            "/nix/store/../../tmp/x",
            "/nix/store/k7xwak8a1mz37bc4xxnpqvw2k43i9zrp-a/../../x",
            "/nix/store/k7xwak8a1mz37bc4xxnpqvw2k43i9zrp-a b",
            "/nix/store/k7xwak8a1mz37bc4xxnpqvw2k43i9zrp",
            "/nix/store/e7xwak8a1mz37bc4xxnpqvw2k43i9zrp-x",
            "/nix/store/k7xwak8a1mz37bc4xxnpqvw2k43i9zrp-.x",
            "/nix/storeX/k7xwak8a1mz37bc4xxnpqvw2k43i9zrp-x",
            "/nix/store/k7xwak8a1mz37bc4xxnpqvw2k43i9zr-x",
        ] {
            assert!(StorePath::parse(bad, &store, &o).is_err(), "{bad}");
        }
        assert!(StoreDir::parse("/nix/../tmp", &o).is_err());
        assert!(StoreDir::parse("relative", &o).is_err());
        assert!(StoreDir::parse("/gnu/store", &o).is_ok());
    }

    #[test]
    fn systems() {
        for ok in [
            "x86_64-linux",
            "aarch64-darwin",
            "armv7l-linux",
            "i686-unknown-linux",
        ] {
            assert!(NixSystem::parse(ok, &flake()).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "linux",
            "x86_64-linux; rm",
            "X86-linux",
            "-x-linux",
            "a--b",
        ] {
            assert!(NixSystem::parse(bad, &flake()).is_err(), "{bad}");
        }
    }

    #[test]
    fn builders() {
        let o = flake();
        let b = Builders::parse(
            "ssh://root@b1 x86_64-linux /root/.ssh/id 2 1 big-parallel - ; ssh-ng://b2:2222",
            &o,
        )
        .unwrap();
        assert_eq!(b.specs().len(), 2);
        assert_eq!(
            b.to_nix(),
            "ssh://root@b1 x86_64-linux /root/.ssh/id 2 1 big-parallel - ; ssh-ng://b2:2222"
        );
        for bad in [
            "",
            "http://b1",
            "ssh://-oProxyCommand=x",
            "ssh://b1?ProxyCommand=x",
            "ssh://b1 x86_64-linux relative/key",
            "ssh://b1 x86_64-linux /k two",
            "ssh://b1 $(x)",
            "ssh://b1 a b c d e f g h",
        ] {
            assert!(Builders::parse(bad, &o).is_err(), "{bad}");
        }
    }

    #[test]
    fn terminal_lines_cannot_be_rewritten() {
        assert_eq!(terminal_safe("a\u{1b}[2Kb\rc\n"), "a\\u{1b}[2Kb\\rc\\n");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        // Whatever is accepted cannot become an option, a second shell word, a path outside
        // its directory, or a terminal escape.
        #[test]
        fn accepted_names_are_inert(s in "\\PC{0,70}|[a-z0-9./_-]{0,12}") {
            if let Ok(name) = MachineName::parse(&s, &flake()) {
                prop_assert!(!name.starts_with('-') && !name.starts_with('.'));
                prop_assert!(!name.contains('/'));
                prop_assert_eq!(crate::ssh::quote(&name), name.to_string());
                prop_assert!(!name.chars().any(char::is_control));
            }
            if let Ok(tag) = Tag::parse(&s, &flake()) {
                prop_assert_eq!(crate::ssh::quote(tag.as_str()), tag.as_str().to_string());
            }
        }

        #[test]
        fn accepted_store_paths_stay_in_the_store(
            s in "/nix/store/[0-9a-z]{30,34}-\\PC{0,20}|/nix/store/[0-9a-z]{32}-[a-z./+?=-]{0,12}"
        ) {
            if let Ok(path) = StorePath::parse(&s, &StoreDir::default(), &flake()) {
                let rest = path.strip_prefix("/nix/store/").unwrap();
                prop_assert!(!rest.contains('/') && !rest.starts_with('.'));
                prop_assert!(!path.chars().any(|c| c.is_whitespace() || c.is_control()));
            }
        }
    }
}
