//! Compiles kernels/aes_core.h as plain C with `cc` and runs its known-answer test
//! (kernels/core_kat.c): the GPU kernels' AES and segmented GHASH logic, checked on every CI run.

use std::path::Path;
use std::process::Command;

#[test]
fn aes_core_header_passes_known_answers_as_c() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let kernels = root.join("kernels");
    let dir = tempfile::tempdir().expect("temp dir");
    let exe = dir.path().join("core_kat");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = match Command::new(&cc)
        .args(["-std=c99", "-O1", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(&kernels)
        .arg(kernels.join("core_kat.c"))
        .arg("-o")
        .arg(&exe)
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            eprintln!("SKIPPED: no C compiler '{cc}' ({e})");
            return;
        }
    };
    assert!(
        out.status.success(),
        "cc failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&exe).output().expect("run core_kat");
    let text = String::from_utf8_lossy(&run.stdout);
    println!("{text}");
    assert!(
        run.status.success() && text.contains("all passed"),
        "aes_core.h known-answer test failed:\n{text}"
    );
}
