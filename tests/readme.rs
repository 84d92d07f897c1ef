//! The README's configuration reference is generated from the typed settings; this keeps the
//! two from drifting apart.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic here is a failed assertion

mod common;

#[test]
fn readme_contains_the_generated_configuration_reference() {
    let out = common::oodgate()
        .args(["config", "reference"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let reference = String::from_utf8(out.stdout).unwrap();
    assert!(reference.lines().count() > 40);
    let readme = std::fs::read_to_string(common::root().join("README.md")).unwrap();
    assert!(
        readme.contains(reference.trim()),
        "README.md's configuration table is stale: paste the output of `oodgate config reference`"
    );
}

#[test]
fn every_command_of_the_contract_exists() {
    for cmd in [
        vec!["info", "--help"],
        vec!["embed", "--help"],
        vec!["bank", "build", "--help"],
        vec!["bank", "import", "--help"],
        vec!["bank", "inspect", "--help"],
        vec!["score", "--help"],
        vec!["eval", "--help"],
        vec!["calibrate", "--help"],
        vec!["serve", "--help"],
        vec!["publish", "--help"],
        vec!["filter", "--help"],
        vec!["collect", "--help"],
        vec!["bench", "--help"],
        vec!["debug", "tokenize", "--help"],
        vec!["debug", "preprocess", "--help"],
    ] {
        let out = common::oodgate().args(&cmd).output().unwrap();
        assert!(out.status.success(), "oodgate {} failed", cmd.join(" "));
    }
}
