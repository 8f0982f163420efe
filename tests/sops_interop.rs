//! sops files written by this tool open with an independent implementation of sops (the
//! `rops` crate), content and MAC checked; and files that sops itself wrote (clan-core's
//! checks) open here (`src/vars/sops.rs`'s unit tests).

use rops::cryptography::cipher::AES256GCM;
use rops::cryptography::hasher::SHA512;
use rops::file::RopsFile;
use rops::file::format::JsonFileFormat;
use rops::file::state::EncryptedFile;

#[test]
fn files_written_here_decrypt_with_an_independent_sops() {
    let identity = age::x25519::Identity::generate();
    let other = age::x25519::Identity::generate();
    let plaintext = "a generated password\nwith a second line";
    let text = clan::vars::sops::encrypt(
        plaintext.as_bytes(),
        &[other.to_public(), identity.to_public()],
        &clan::vars::sops::now(),
    )
    .unwrap();
    // rops reads its age identity from the environment; this test binary has no other test.
    // SAFETY: no other thread of this process reads the environment meanwhile.
    unsafe {
        use age::secrecy::ExposeSecret;
        std::env::set_var("ROPS_AGE", identity.to_string().expose_secret());
    }
    let decrypted = text
        .parse::<RopsFile<EncryptedFile<AES256GCM, SHA512>, JsonFileFormat>>()
        .expect("rops parses the file")
        .decrypt::<JsonFileFormat>()
        .expect("rops decrypts it and its MAC matches")
        .to_string();
    let value: serde_json::Value = serde_json::from_str(&decrypted).unwrap();
    assert_eq!(value["data"], plaintext, "{decrypted}");
}
