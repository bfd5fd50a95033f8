//! Both crates can be packaged for crates.io: the file lists resolve, and
//! each package carries its readme, licenses and (for the library) the
//! `.proto` its build script compiles.

use std::path::Path;
use std::process::Command;

#[test]
fn both_crates_package() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let output = Command::new(env!("CARGO"))
        .current_dir(&root)
        .args([
            "package",
            "--workspace",
            "--no-verify",
            "--list",
            "--allow-dirty",
            "--offline",
        ])
        .output()
        .expect("cargo runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "cargo package failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let files: Vec<&str> = stdout.lines().collect();
    for required in ["README.md", "LICENSE-MIT", "LICENSE-APACHE", "Cargo.toml"] {
        let copies = files.iter().filter(|f| **f == required).count();
        assert_eq!(copies, 2, "{required} in both packages: {files:?}");
    }
    for required in [
        "proto/record.proto",
        "build.rs",
        "src/main.rs",
        "src/lib.rs",
    ] {
        assert!(files.contains(&required), "{required} missing: {files:?}");
    }
}
