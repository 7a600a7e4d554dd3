// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Generates the Rust view of the guest ABI from `include/pvdma_abi.h`, the
//! one definition of the wire format (guest drivers include the same file).

use std::env;
use std::path::PathBuf;

fn main() {
    let header = "include/pvdma_abi.h";
    println!("cargo:rerun-if-changed={header}");
    println!("cargo:rerun-if-changed=build.rs");

    let bindings = bindgen::Builder::default()
        .header(header)
        .use_core()
        .allowlist_type("pvdma_.*")
        .allowlist_var("PVDMA_.*")
        .derive_default(true)
        .derive_debug(true)
        .derive_copy(true)
        .layout_tests(true)
        .default_macro_constant_type(bindgen::MacroTypeVariation::Unsigned)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
        .generate()
        .unwrap_or_else(|e| panic!("bindgen failed on {header}: {e}"));

    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    bindings
        .write_to_file(out.join("abi_bindings.rs"))
        .expect("writing the generated ABI bindings");
}
