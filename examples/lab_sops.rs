//! The lab's `sops` on targets: the one command this repository's activation runs,
//! `sops --decrypt --input-type binary --output-type binary FILE` with the machine's key in
//! `SOPS_AGE_KEY_FILE`, carried out by `rops`, an implementation of sops independent of this
//! repository (real systems run nixpkgs' sops: `clan.core.vars.sops.command`). The lab
//! cannot build sops, and the Debian registry has none. Anything else is refused.

use rops::cryptography::cipher::AES256GCM;
use rops::cryptography::hasher::SHA512;
use rops::file::RopsFile;
use rops::file::format::JsonFileFormat;
use rops::file::state::EncryptedFile;
use std::io::Write;

fn fail(message: &str) -> ! {
    eprintln!("sops (lab stand-in): {message}");
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let file = match args.as_slice() {
        [d, it, binary, ot, binary2, file]
            if (d == "--decrypt" || d == "-d")
                && it == "--input-type"
                && ot == "--output-type"
                && binary == "binary"
                && binary2 == "binary" =>
        {
            file
        }
        _ => fail(&format!(
            "only `--decrypt --input-type binary --output-type binary FILE` is implemented, not {args:?}"
        )),
    };
    let Some(key_file) = std::env::var_os("SOPS_AGE_KEY_FILE") else {
        fail("SOPS_AGE_KEY_FILE is not set")
    };
    let keys = std::fs::read_to_string(&key_file)
        .unwrap_or_else(|e| fail(&format!("cannot read {}: {e}", key_file.to_string_lossy())));
    let keys: Vec<&str> = keys
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    // SAFETY: single-threaded, before anything reads the environment.
    unsafe {
        std::env::set_var("ROPS_AGE", keys.join(","));
        // rops would also read a key file of its own under $HOME.
        std::env::set_var("ROPS_AGE_KEY_FILE", "/nonexistent/rops-age-keys");
    }
    let text =
        std::fs::read_to_string(file).unwrap_or_else(|e| fail(&format!("cannot read {file}: {e}")));
    let decrypted = text
        .parse::<RopsFile<EncryptedFile<AES256GCM, SHA512>, JsonFileFormat>>()
        .unwrap_or_else(|e| fail(&format!("{file} is no sops file: {e}")))
        .decrypt::<JsonFileFormat>()
        .unwrap_or_else(|e| fail(&format!("cannot decrypt {file}: {e}")))
        .to_string();
    let value: serde_json::Value = serde_json::from_str(&decrypted)
        .unwrap_or_else(|e| fail(&format!("{file} decrypted to no JSON: {e}")));
    let Some(data) = value["data"].as_str() else {
        fail(&format!("{file} has no `data` (sops' binary store)"))
    };
    std::io::stdout()
        .write_all(data.as_bytes())
        .unwrap_or_else(|e| fail(&format!("cannot write: {e}")));
}
