//! Host addresses: `[ssh://][user@]host[:port][?SSH_OPTION=VALUE&SSH_OPTION_2=VALUE_2]`.
//!
//! This is the format of `deploy.targetHost`, `deploy.buildHost` and the `--build-host` /
//! `--target-host` flags. Parsing is strict on purpose: every accepted value ends up as
//! arguments of `ssh` (on the workstation and, for the target, on the build host inside
//! `NIX_SSHOPTS`), so nothing accepted here may start with `-`, hold whitespace or control
//! characters, or carry shell metacharacters.
//!
//! ```
//! use clan::host::HostAddress;
//! let addr: HostAddress = "root@builder.example.com:22?IdentityFile=/path/to/key".parse().unwrap();
//! assert_eq!(addr.user.as_deref(), Some("root"));
//! assert_eq!(addr.host, "builder.example.com");
//! assert_eq!(addr.port, Some(22));
//! assert_eq!(addr.to_string(), "root@builder.example.com:22?IdentityFile=/path/to/key");
//! ```

use std::fmt;
use std::str::FromStr;

use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};

/// A parsed host address. `user` is `None` when the address names none; see
/// [`crate::resolve`] for how the user is then chosen.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostAddress {
    /// Login user, if the address names one.
    pub user: Option<String>,
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// SSH port, if not the default.
    pub port: Option<u16>,
    /// `ssh -o NAME=VALUE` options, in the order given, values percent-decoded.
    pub options: Vec<(String, String)>,
}

/// What is wrong with a host address. The caller adds the value and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("it is empty")]
    Empty,
    #[error("the host name is empty")]
    EmptyHost,
    #[error("the user name is empty")]
    EmptyUser,
    #[error("the {what} {value:?} starts with '-', which ssh would read as a flag")]
    LeadingDash { what: &'static str, value: String },
    #[error("the {what} {value:?} contains whitespace or a control character")]
    Whitespace { what: &'static str, value: String },
    #[error("the {what} {value:?} contains {ch:?}; allowed are letters, digits, '.', '_' and '-'")]
    BadChar {
        what: &'static str,
        value: String,
        ch: char,
    },
    #[error("the port {0:?} is not a number from 1 to 65535")]
    BadPort(String),
    #[error("the IPv6 address is missing its closing ']'")]
    UnclosedBracket,
    #[error("{0:?} is not a valid IPv6 address")]
    BadIpv6(String),
    #[error("unexpected {0:?} after the host")]
    TrailingText(String),
    #[error("the ssh option {0:?} has no '=' (write NAME=VALUE)")]
    OptionWithoutValue(String),
    #[error("the ssh option name {0:?} is not an ssh option word (letters and digits only)")]
    BadOptionName(String),
    #[error(
        "the ssh option {0} runs a local command and is not accepted in a host address; put it in ~/.ssh/config instead"
    )]
    CommandOption(String),
    #[error(
        "the ssh option {0} would set the host key policy; it comes only from --host-key-check (strict, ask, accept-new, none), for every hop"
    )]
    HostKeyOption(String),
    #[error(
        "the ssh option {0} would forward your ssh agent; that comes only from --forward-agent / --no-forward-agent or deploy.forwardAgent / clan.core.networking.forwardAgent, which warn when it is on"
    )]
    AgentOption(String),
    #[error(
        "the ssh option {0} is not one a host address may set (the README lists them); put it in ~/.ssh/config under a Host entry for this host, where you decide, not the flake"
    )]
    NotAllowed(String),
    #[error("the value of ssh option {0} starts with '-', which ssh could read as a flag")]
    OptionValueDash(String),
    #[error(
        "the value of ssh option {name} contains {ch:?}; whitespace, quotes, backslashes and shell metacharacters are refused"
    )]
    BadOptionValue { name: String, ch: char },
    #[error("the value of ssh option {0} is not valid percent-encoded UTF-8")]
    BadEncoding(String),
}

/// The ssh options a host address may set: what a deploy address legitimately needs to
/// reach a host (port, user, keys, jumps, timeouts, algorithms). Anything else belongs in
/// `~/.ssh/config`, where the user decides, not the flake. Canonical spelling; matched
/// case-insensitively.
pub const ALLOWED_OPTIONS: &[&str] = &[
    "AddressFamily",
    "BindAddress",
    "BindInterface",
    "CertificateFile",
    "Ciphers",
    "Compression",
    "ConnectTimeout",
    "ConnectionAttempts",
    "GSSAPIAuthentication",
    "HostKeyAlgorithms",
    "HostKeyAlias",
    "HostName",
    "IPQoS",
    "IdentitiesOnly",
    "IdentityFile",
    "KbdInteractiveAuthentication",
    "KexAlgorithms",
    "LogLevel",
    "MACs",
    "NumberOfPasswordPrompts",
    "PasswordAuthentication",
    "Port",
    "PreferredAuthentications",
    "ProxyJump",
    "PubkeyAcceptedAlgorithms",
    "PubkeyAcceptedKeyTypes",
    "PubkeyAuthentication",
    "RekeyLimit",
    "ServerAliveCountMax",
    "ServerAliveInterval",
    "TCPKeepAlive",
    "User",
];

/// Options that make ssh run a command or load code (said so when refused).
const COMMAND_OPTIONS: &[&str] = &[
    "proxycommand",
    "localcommand",
    "permitlocalcommand",
    "knownhostscommand",
    "remotecommand",
    "match",
    "pkcs11provider",
    "securitykeyprovider",
];

/// Options that set the host key policy: only `--host-key-check` does.
const HOST_KEY_OPTIONS: &[&str] = &[
    "stricthostkeychecking",
    "userknownhostsfile",
    "globalknownhostsfile",
    "verifyhostkeydns",
    "updatehostkeys",
    "checkhostip",
    "hashknownhosts",
];

/// Options that forward the agent: only the forwardAgent settings and flags do.
const AGENT_OPTIONS: &[&str] = &["forwardagent", "identityagent", "addkeystoagent"];

/// The canonical name of an allowed option, or why `name` is refused.
fn allowed_option(name: &str) -> Result<&'static str, AddressError> {
    let lower = name.to_ascii_lowercase();
    if let Some(canonical) = ALLOWED_OPTIONS
        .iter()
        .find(|o| o.eq_ignore_ascii_case(name))
    {
        return Ok(canonical);
    }
    let name = name.to_string();
    Err(if COMMAND_OPTIONS.contains(&lower.as_str()) {
        AddressError::CommandOption(name)
    } else if HOST_KEY_OPTIONS.contains(&lower.as_str()) {
        AddressError::HostKeyOption(name)
    } else if AGENT_OPTIONS.contains(&lower.as_str()) {
        AddressError::AgentOption(name)
    } else {
        AddressError::NotAllowed(name)
    })
}

/// Characters refused in option values: they would be re-split or re-interpreted by
/// `NIX_SSHOPTS` handling (plain whitespace splitting in old Nix, shell-like in new Nix).
const REFUSED_IN_VALUES: &[char] = &[
    '\'', '"', '\\', '`', '$', ';', '&', '|', '<', '>', '(', ')', '{', '}', '#',
];

/// What `Display` percent-encodes in option values, so that they parse back.
const ENCODE_IN_VALUES: &AsciiSet = &CONTROLS.add(b'%').add(b'&').add(b' ');

impl HostAddress {
    /// `user@host` (brackets around IPv6), as ssh's destination argument and in `ssh://` URLs.
    pub fn destination(&self) -> String {
        let host = self.host_for_url();
        match &self.user {
            Some(user) => format!("{user}@{host}"),
            None => host,
        }
    }

    /// The host, bracketed when it is an IPv6 address.
    pub fn host_for_url(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        }
    }

    /// True for the names that mean "this machine, without ssh": `localhost`, `127.0.0.1`
    /// or `::1`, with no port, no options, and no user other than `local_user`.
    /// `root@localhost:2222` (a forwarded VM port) stays a remote ssh host.
    pub fn is_local(&self, local_user: &str) -> bool {
        matches!(self.host.as_str(), "localhost" | "127.0.0.1" | "::1")
            && self.port.is_none()
            && self.options.is_empty()
            && self.user.as_deref().is_none_or(|u| u == local_user)
    }

    /// The same address with `user` filled in when it named none.
    pub fn with_default_user(&self, user: &str) -> HostAddress {
        let mut addr = self.clone();
        if addr.user.is_none() {
            addr.user = Some(user.to_string());
        }
        addr
    }
}

impl FromStr for HostAddress {
    type Err = AddressError;

    fn from_str(input: &str) -> Result<Self, AddressError> {
        let rest = input.strip_prefix("ssh://").unwrap_or(input);
        if rest.is_empty() {
            return Err(AddressError::Empty);
        }
        let (authority, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let (user, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => {
                check_word("user name", u)?;
                (Some(u.to_string()), h)
            }
            None => (None, authority),
        };
        let (host, port) = split_host_port(hostport)?;
        let options = match query {
            Some(q) => parse_options(q)?,
            None => Vec::new(),
        };
        Ok(HostAddress {
            user,
            host,
            port,
            options,
        })
    }
}

fn split_host_port(hostport: &str) -> Result<(String, Option<u16>), AddressError> {
    if let Some(bracketed) = hostport.strip_prefix('[') {
        let (ip, after) = bracketed
            .split_once(']')
            .ok_or(AddressError::UnclosedBracket)?;
        check_ipv6(ip)?;
        let port = match after {
            "" => None,
            _ => match after.strip_prefix(':') {
                Some(p) => Some(parse_port(p)?),
                None => return Err(AddressError::TrailingText(after.to_string())),
            },
        };
        return Ok((ip.to_string(), port));
    }
    // Two or more colons without brackets: a bare IPv6 address, which cannot carry a port.
    if hostport.matches(':').count() >= 2 {
        check_ipv6(hostport)?;
        return Ok((hostport.to_string(), None));
    }
    let (host, port) = match hostport.split_once(':') {
        Some((h, p)) => (h, Some(parse_port(p)?)),
        None => (hostport, None),
    };
    if host.is_empty() {
        return Err(AddressError::EmptyHost);
    }
    check_word("host name", host)?;
    Ok((host.to_string(), port))
}

fn check_ipv6(ip: &str) -> Result<(), AddressError> {
    // A zone suffix (`fe80::1%eth0`) is not accepted: it does not survive `ssh://` URLs.
    ip.parse::<std::net::Ipv6Addr>()
        .map(|_| ())
        .map_err(|_| AddressError::BadIpv6(ip.to_string()))
}

fn parse_port(p: &str) -> Result<u16, AddressError> {
    match p.parse::<u16>() {
        Ok(port) if port > 0 && p.bytes().all(|b| b.is_ascii_digit()) => Ok(port),
        _ => Err(AddressError::BadPort(p.to_string())),
    }
}

/// User and host names: letters, digits, `.`, `_`, `-`, not starting with `-`.
fn check_word(what: &'static str, value: &str) -> Result<(), AddressError> {
    if value.is_empty() {
        return Err(if what == "user name" {
            AddressError::EmptyUser
        } else {
            AddressError::EmptyHost
        });
    }
    if let Some(ch) = value.chars().find(|c| c.is_whitespace() || c.is_control()) {
        let _ = ch;
        return Err(AddressError::Whitespace {
            what,
            value: value.to_string(),
        });
    }
    if value.starts_with('-') {
        return Err(AddressError::LeadingDash {
            what,
            value: value.to_string(),
        });
    }
    if let Some(ch) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(AddressError::BadChar {
            what,
            value: value.to_string(),
            ch,
        });
    }
    Ok(())
}

fn parse_options(query: &str) -> Result<Vec<(String, String)>, AddressError> {
    let mut options = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, raw_value) = pair
            .split_once('=')
            .ok_or_else(|| AddressError::OptionWithoutValue(pair.to_string()))?;
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(AddressError::BadOptionName(name.to_string()));
        }
        if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
            return Err(AddressError::BadOptionName(name.to_string()));
        }
        // The strictest host key policy never weakens the one in force (ssh takes the first
        // value given, and an address's options come first): clan-core's own example.
        let strict = name.eq_ignore_ascii_case("StrictHostKeyChecking")
            && raw_value.eq_ignore_ascii_case("yes");
        let name = if strict {
            "StrictHostKeyChecking"
        } else {
            allowed_option(name)?
        };
        let value = percent_decode_str(raw_value)
            .decode_utf8()
            .map_err(|_| AddressError::BadEncoding(name.to_string()))?
            .into_owned();
        if let Some(ch) = value
            .chars()
            .find(|c| c.is_whitespace() || c.is_control() || REFUSED_IN_VALUES.contains(c))
        {
            return Err(AddressError::BadOptionValue {
                name: name.to_string(),
                ch,
            });
        }
        if value.starts_with('-') {
            return Err(AddressError::OptionValueDash(name.to_string()));
        }
        options.push((name.to_string(), value));
    }
    Ok(options)
}

impl fmt::Display for HostAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.destination())?;
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        for (i, (name, value)) in self.options.iter().enumerate() {
            let sep = if i == 0 { '?' } else { '&' };
            write!(
                f,
                "{sep}{name}={}",
                utf8_percent_encode(value, ENCODE_IN_VALUES)
            )?;
        }
        Ok(())
    }
}

/// `user@host:port`, what identifies one ssh connection.
pub fn connection_key(address: &HostAddress) -> String {
    format!("{}:{}", address.destination(), address.port.unwrap_or(22))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(s: &str) -> Result<HostAddress, AddressError> {
        s.parse()
    }

    #[test]
    fn guide_examples() {
        let a = parse("root@builder.example.com").unwrap();
        assert_eq!(
            (a.user.as_deref(), a.host.as_str(), a.port),
            (Some("root"), "builder.example.com", None)
        );
        let b = parse("builder.example.com:2222").unwrap();
        assert_eq!((b.user, b.port), (None, Some(2222)));
        let c = parse("root@builder.example.com:22?IdentityFile=/path/to/key").unwrap();
        assert_eq!(c.port, Some(22));
        assert_eq!(
            c.options,
            vec![("IdentityFile".into(), "/path/to/key".into())]
        );
    }

    #[test]
    fn ssh_scheme_ipv6_and_several_options() {
        let a = parse("ssh://root@[2001:db8::1]:2222?IdentityFile=a&proxyjump=b%2Cc").unwrap();
        assert_eq!(a.host, "2001:db8::1");
        assert_eq!(a.port, Some(2222));
        assert_eq!(a.destination(), "root@[2001:db8::1]");
        // Names are spelled canonically, whatever case the address used.
        assert_eq!(a.options[1], ("ProxyJump".into(), "b,c".into()));
        let bare = parse("::1").unwrap();
        assert_eq!((bare.host.as_str(), bare.port), ("::1", None));
    }

    #[test]
    fn only_allowed_options_and_each_refusal_names_the_right_place() {
        for ok in [
            "h?IdentityFile=/k&IdentitiesOnly=yes&ConnectTimeout=5&ServerAliveInterval=10",
            "h?ProxyJump=jump.example.com:2222&HostKeyAlias=web&Compression=yes&Port=22",
        ] {
            assert!(parse(ok).is_ok(), "{ok}");
        }
        let refused = |s: &str| parse(s).unwrap_err();
        for code in [
            "PKCS11Provider=/tmp/x.so",
            "SecurityKeyProvider=/tmp/x.so",
            "ProxyCommand=nc",
            "LocalCommand=x",
            "KnownHostsCommand=x",
        ] {
            assert!(
                matches!(
                    refused(&format!("h?{code}")),
                    AddressError::CommandOption(_)
                ),
                "{code}"
            );
        }
        // The strictest policy weakens nothing: accepted, as clan-core's docs write it.
        assert_eq!(
            parse("root@h?StrictHostKeyChecking=yes").unwrap().options,
            [("StrictHostKeyChecking".to_string(), "yes".to_string())]
        );
        assert!(parse("root@h?stricthostkeychecking=YES").is_ok());
        for policy in [
            "StrictHostKeyChecking=no",
            "StrictHostKeyChecking=accept-new",
            "StrictHostKeyChecking=ask",
            "UserKnownHostsFile=/dev/null",
            "stricthostkeychecking=no",
            "GlobalKnownHostsFile=/x",
        ] {
            let e = refused(&format!("h?{policy}"));
            assert!(matches!(e, AddressError::HostKeyOption(_)), "{policy}");
            assert!(e.to_string().contains("--host-key-check"));
        }
        let e = refused("h?ForwardAgent=yes");
        assert!(matches!(e, AddressError::AgentOption(_)));
        assert!(e.to_string().contains("--forward-agent"));
        let e = refused("h?ControlPath=/tmp/x");
        assert!(matches!(e, AddressError::NotAllowed(_)));
        assert!(e.to_string().contains("~/.ssh/config"));
        assert!(matches!(
            refused("h?ProxyJump=-oProxyCommand%3Dx"),
            AddressError::OptionValueDash(_)
        ));
    }

    #[test]
    fn percent_encoded_values_round_trip() {
        let a = parse("h?IdentityFile=/keys/a%25b%2Cc").unwrap();
        assert_eq!(a.options[0].1, "/keys/a%b,c");
        assert_eq!(parse(&a.to_string()).unwrap(), a);
    }

    #[test]
    fn rejects_bad_input_with_the_reason() {
        let cases: &[(&str, AddressError)] = &[
            ("", AddressError::Empty),
            ("root@", AddressError::EmptyHost),
            ("@host", AddressError::EmptyUser),
            ("host:abc", AddressError::BadPort("abc".into())),
            ("host:0", AddressError::BadPort("0".into())),
            ("host:70000", AddressError::BadPort("70000".into())),
            ("host:+22", AddressError::BadPort("+22".into())),
            (
                "host?IdentityFile",
                AddressError::OptionWithoutValue("IdentityFile".into()),
            ),
            (
                "host?-oProxy=x",
                AddressError::BadOptionName("-oProxy".into()),
            ),
            (
                "host?ProxyCommand=nc",
                AddressError::CommandOption("ProxyCommand".into()),
            ),
            ("[::1", AddressError::UnclosedBracket),
            ("[::1]x", AddressError::TrailingText("x".into())),
        ];
        for (input, expected) in cases {
            assert_eq!(parse(input).as_ref(), Err(expected), "input {input:?}");
        }
    }

    #[test]
    fn rejects_flags_whitespace_and_metacharacters() {
        for input in [
            "-oProxyCommand=x",
            "root@-host",
            "-root@host",
            "ro ot@host",
            "host\n",
            "host;touch /tmp/x",
            "h$(id)",
            "host?IdentityFile=$(touch%20x)",
            "host?IdentityFile=a;b",
            "host?IdentityFile=a%0Ab",
            "host?IdentityFile=a%20b",
        ] {
            assert!(parse(input).is_err(), "accepted {input:?}");
        }
    }

    #[test]
    fn what_counts_as_local() {
        for local in ["localhost", "root@localhost", "127.0.0.1", "::1"] {
            assert!(parse(local).unwrap().is_local("root"), "{local}");
        }
        for remote in [
            "localhost:2222",
            "alice@localhost",
            "localhost?IdentityFile=/k",
            "127.0.0.2",
            "builder",
        ] {
            assert!(!parse(remote).unwrap().is_local("root"), "{remote}");
        }
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC*") {
            let _ = parse(&s);
        }

        #[test]
        fn never_panics_on_address_like_input(s in "(ssh://)?([a-z@:\\[\\]-]{0,6})(:[0-9a-z]{0,6})?(\\?[A-Za-z=&%0-9$;/ -]{0,20})?") {
            let _ = parse(&s);
        }

        /// Whatever is accepted round-trips and cannot be read by ssh as a flag.
        #[test]
        fn accepted_addresses_are_safe(s in "(ssh://)?([a-z-]{1,5}@)?([a-z0-9.-]{1,8}|\\[::[0-9]{1,3}\\])(:[0-9]{1,6})?(\\?(IdentityFile|proxyjump|Port|HostKeyAlias|[A-Za-z]{1,6})=[A-Za-z0-9/%,.-]{0,8}(&(ConnectTimeout|User|[A-Za-z]{1,6})=[a-z0-9%/-]{0,6})?)?") {
            if let Ok(addr) = parse(&s) {
                prop_assert!(!addr.host.starts_with('-'));
                prop_assert!(!addr.destination().starts_with('-'));
                if let Some(user) = &addr.user { prop_assert!(!user.starts_with('-')); }
                for (name, value) in &addr.options {
                    prop_assert!(ALLOWED_OPTIONS.contains(&name.as_str()), "{} is not allowed", name);
                    prop_assert!(!value.starts_with('-'));
                    prop_assert!(!value.chars().any(|c| c.is_whitespace() || REFUSED_IN_VALUES.contains(&c)));
                }
                prop_assert_eq!(parse(&addr.to_string()).unwrap(), addr);
            }
        }
    }
}
