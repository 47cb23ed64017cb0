# Sourced by the scripts, before they change directory: makes a relative CARGO_TARGET_DIR
# absolute (relative to where the script was started, as cargo would read it there) and
# exported, so every cargo call and child script agrees on it, and defines cargo_target_dir.
if [ -n "${CARGO_TARGET_DIR:-}" ]; then
  CARGO_TARGET_DIR=$(realpath -m -- "$CARGO_TARGET_DIR")
  export CARGO_TARGET_DIR
fi

# Cargo's target directory for the package in the current directory ($CARGO_TARGET_DIR when
# set, else that workspace's target/), as cargo itself reports it.
cargo_target_dir() {
  cargo metadata --format-version 1 --no-deps \
    | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p'
}
