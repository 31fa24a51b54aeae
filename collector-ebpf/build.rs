//! Compiles `src/probe.bpf.c` to a BPF object in `OUT_DIR` with clang, so the
//! daemon embeds its probe and `cargo build` is all it takes.
//!
//! Without clang (or without the libbpf headers) the crate still builds: it
//! prints a cargo warning and leaves the `voltail_probe` cfg unset, which makes
//! `COMPILED_IN` false and `Probe::load` return `ProbeError::NotCompiledIn`.
//! A clang that is present but fails on the C source fails the build: that is
//! a bug in the probe, not a missing tool.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCE: &str = "src/probe.bpf.c";
const HEADER: &str = "src/vmlinux_min.h";
/// Where `libbpf-dev` puts `bpf_helpers.h`; `LIBBPF_INCLUDE` overrides it.
const DEFAULT_LIBBPF_INCLUDE: &str = "/usr/include";

fn main() {
    println!("cargo::rustc-check-cfg=cfg(voltail_probe)");
    println!("cargo::rerun-if-changed={SOURCE}");
    println!("cargo::rerun-if-changed={HEADER}");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=CLANG");
    println!("cargo::rerun-if-env-changed=LIBBPF_INCLUDE");

    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_string());
    if !runs(&clang) {
        println!("cargo::warning=clang not found: the eBPF probe is compiled out");
        return;
    }
    let include = env::var("LIBBPF_INCLUDE").unwrap_or_else(|_| DEFAULT_LIBBPF_INCLUDE.to_string());
    if !Path::new(&include).join("bpf/bpf_helpers.h").exists() {
        println!(
            "cargo::warning=libbpf headers not found in {include} (install libbpf-dev): the eBPF probe is compiled out"
        );
        return;
    }
    let arch = match env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("x86_64") => "x86",
        Ok("aarch64") => "arm64",
        Ok("riscv64") => "riscv",
        Ok("powerpc64") => "powerpc",
        Ok("s390x") => "s390",
        Ok(other) => {
            println!("cargo::warning=no eBPF probe for target arch {other}: the eBPF probe is compiled out");
            return;
        }
        Err(_) => {
            println!("cargo::warning=unknown target arch: the eBPF probe is compiled out");
            return;
        }
    };

    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR for build scripts"));
    let object = out.join("probe.bpf.o");
    let output = Command::new(&clang)
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
        .arg(format!("-D__TARGET_ARCH_{arch}"))
        .arg(format!("-I{include}"))
        .arg("-c")
        .arg(SOURCE)
        .arg("-o")
        .arg(&object)
        .output()
        .expect("clang ran a moment ago");
    if !output.status.success() {
        panic!(
            "clang failed to compile {SOURCE}:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    println!("cargo::rustc-cfg=voltail_probe");
}

/// True when `clang --version` runs and succeeds.
fn runs(clang: &str) -> bool {
    Command::new(clang)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}
