//! No stray "error:" lines from Mesa's Vulkan layers on a run that succeeds.

mod cli_common;

use cli_common::*;

/// Mesa's device-select layer prints "error: XDG_RUNTIME_DIR is invalid or not set" when the
/// `auto` backend probes wgpu without a runtime directory (containers, CI, ssh): not on a run
/// that succeeded. (Meaningful where a Vulkan driver is installed, as lavapipe is in CI.)
#[test]
fn no_error_lines_without_xdg_runtime_dir() {
    for args in [vec!["demo", "--rows", "2000"], vec!["backends"]] {
        let out = run(cs()
            .args(&args)
            .env_remove("XDG_RUNTIME_DIR")
            .env_remove("NODEVICE_SELECT")
            .env_remove("MESA_VK_DEVICE_SELECT")
            .env_remove("DRI_PRIME"));
        assert_eq!(code(&out), 0, "{args:?}: {}", stderr(&out));
        let all = format!("{}{}", stdout(&out), stderr(&out));
        assert!(
            !all.lines().any(|l| l.starts_with("error:")),
            "{args:?}: {all}"
        );
    }
}
