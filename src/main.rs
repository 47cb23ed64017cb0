//! The `ciphershard` command-line tool (the real CLI lives on main; this branch only needs the library).
fn main() {}
