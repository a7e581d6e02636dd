//! Builds the C eBPF programs with clang (`scripts/setup.sh` installs it) into OUT_DIR.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap();
    // Debian keeps asm/types.h under the multiarch directory.
    let multiarch = format!("/usr/include/{arch}-linux-gnu");
    for name in ["dataplane", "bridge"] {
        let src = format!("bpf/{name}.bpf.c");
        println!("cargo:rerun-if-changed={src}");
        let obj = out.join(format!("{name}.bpf.o"));
        let status = Command::new(std::env::var("CLANG").unwrap_or_else(|_| "clang".into()))
            .args([
                "-O2", "-g", "-Wall", "-Werror", "-target", "bpf", "-I", &multiarch, "-c", &src,
                "-o",
            ])
            .arg(&obj)
            .status()
            .unwrap_or_else(|e| panic!("running clang for {src}: {e} (run scripts/setup.sh)"));
        assert!(status.success(), "clang failed on {src}");
    }
}
