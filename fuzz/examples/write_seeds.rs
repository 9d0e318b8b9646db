//! Writes the seed corpora under `fuzz/corpus/<target>/`.
//!
//! `cargo run --manifest-path fuzz/Cargo.toml --example write_seeds` (scripts/fuzz.sh runs it).
//! Seeds are deterministic, so rewriting them changes nothing unless the encoders changed.

use std::fs;
use std::path::Path;

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let targets = [
        ("frame_decoder", shardlog_fuzz::seeds::frame_decoder()),
        ("segment_scanner", shardlog_fuzz::seeds::segment_scanner()),
        // The same input layout: a segment image, here opened as a whole shard.
        ("recovery", shardlog_fuzz::seeds::segment_scanner()),
    ];
    for (target, seeds) in targets {
        let dir = root.join(target);
        fs::create_dir_all(&dir)?;
        for (name, bytes) in &seeds {
            fs::write(dir.join(format!("seed-{name}")), bytes)?;
        }
        println!("{}: {} seeds in {}", target, seeds.len(), dir.display());
    }
    Ok(())
}
