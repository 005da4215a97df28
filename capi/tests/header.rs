//! `include/t2i_rt.h` is what cbindgen makes of `src/lib.rs` today: a change to the API that is not
//! in the checked-in header fails here. `T2I_WRITE_HEADER=1 cargo test -p t2i-rt-capi --test header`
//! rewrites it.

use std::path::Path;

#[test]
fn header_is_current() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("cbindgen.toml parses");
    let bindings = cbindgen::Builder::new()
        .with_crate(crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header");
    let mut generated = Vec::new();
    bindings.write(&mut generated);
    let path = crate_dir.join("include/t2i_rt.h");
    if std::env::var_os("T2I_WRITE_HEADER").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let checked_in = std::fs::read(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "{} is stale: run `T2I_WRITE_HEADER=1 cargo test -p t2i-rt-capi --test header` and commit it",
        path.display()
    );
}
