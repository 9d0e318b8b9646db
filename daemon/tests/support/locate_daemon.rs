//! Where this workspace's `shardlogd` binary is, for the test crates outside `daemon` (whose
//! `CARGO_BIN_EXE_*` cannot name it): `$SHARDLOGD`, else beside the test's own binary (a
//! workspace build puts it there), else built once into a target dir of its own. Included with
//! `#[path]` by those test crates.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub fn shardlogd() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Ok(p) = std::env::var("SHARDLOGD") {
            return PathBuf::from(p);
        }
        // .../target/<profile>/deps/<this test> -> .../target/<profile>/shardlogd
        let exe = std::env::current_exe().expect("current_exe");
        let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps");
        let beside = profile_dir.join("shardlogd");
        if beside.exists() {
            return beside;
        }
        let target = profile_dir.parent().expect("target dir").join("test-daemon");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "daemon", "--bin", "shardlogd", "--target-dir"])
            .arg(&target)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build -p daemon");
        assert!(status.success(), "cargo build -p daemon failed");
        target.join("debug").join("shardlogd")
    })
}
