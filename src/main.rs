//! The `ciphershard` command-line tool: a thin layer over the library.
//!
//! Lint policy: `unsafe` is denied here and forbidden in every module (`cli/` forbids it); the
//! one exception is [`quiet_mesa_device_select`], which sets an environment variable before
//! any thread exists (see its `SAFETY:` comment).

#![deny(unsafe_code)]

use std::process::ExitCode;

mod cli;

fn main() -> ExitCode {
    quiet_mesa_device_select();
    // A corrupt Parquet input is reported as an error naming the file; the decoder's panic
    // message (caught) is not printed beside it.
    ciphershard::format::quiet_guarded_panics();
    cli::main()
}

/// Keeps Mesa's Vulkan device-select layer from printing `error: XDG_RUNTIME_DIR is invalid or
/// not set in the environment.` (once per adapter probe) on a run that succeeds. The layer asks
/// Wayland which GPU drives the display, and libwayland prints that line when
/// `XDG_RUNTIME_DIR` is unset or not an absolute path (containers, CI, ssh, cron). Probing
/// cannot be skipped (`--backend auto` must see a real GPU to pass it over or use it), and the
/// line comes from C code writing to our stderr, so the layer is switched off the documented
/// way, `NODEVICE_SELECT=1`, only in that case: without a runtime directory there is no display
/// whose GPU it could prefer, and wgpu picks the adapter by power preference anyway. A user who
/// configured device selection (`NODEVICE_SELECT`, `MESA_VK_DEVICE_SELECT`, `DRI_PRIME`) keeps
/// what they set.
#[allow(unsafe_code)]
fn quiet_mesa_device_select() {
    let runtime_dir_ok = std::env::var_os("XDG_RUNTIME_DIR")
        .is_some_and(|d| d.as_encoded_bytes().first() == Some(&b'/'));
    let configured = ["NODEVICE_SELECT", "MESA_VK_DEVICE_SELECT", "DRI_PRIME"]
        .iter()
        .any(|v| std::env::var_os(v).is_some());
    if runtime_dir_ok || configured {
        return;
    }
    // SAFETY: `set_var` is unsafe only because another thread could read or write the
    // environment at the same time. This is the first statement of `main`: the Rust runtime
    // starts no thread before it, and neither does any dependency's initializer (aws-lc,
    // wgpu, cudarc and the rest start threads, if at all, only when called), so this thread is
    // the process's only one.
    unsafe { std::env::set_var("NODEVICE_SELECT", "1") };
}
