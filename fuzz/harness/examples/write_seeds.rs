//! Writes the hand-made seeds of `ember_fuzz_harness::seeds` to
//! `fuzz/corpus/<target>/<name>` (replacing files of the same name, leaving
//! others, such as minimised inputs a fuzzer found, alone).
//!
//! `cargo run -p ember-fuzz-harness --example write_seeds`

use std::path::Path;

fn main() -> std::io::Result<()> {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../corpus");
    for (target, seeds) in ember_fuzz_harness::seeds::all() {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir)?;
        for (name, bytes) in seeds {
            std::fs::write(dir.join(name), bytes)?;
        }
        println!("{target}: {} seeds", std::fs::read_dir(&dir)?.count());
    }
    Ok(())
}
