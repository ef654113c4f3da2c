//! Prints or writes the CustomResourceDefinitions generated from the Rust types.
//!
//! `crdgen` prints both CRDs as one YAML stream; `crdgen --out DIR` writes `DIR/<group>_<plural>.yaml`, one file per
//! CRD; `crdgen --check DIR` exits non-zero when the files in DIR differ from what the types generate.

use std::path::PathBuf;
use std::process::ExitCode;

use projectionist_crds::crd;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => {
            for file in crd::files() {
                print!("---\n{}", file.yaml);
            }
            ExitCode::SUCCESS
        }
        [flag, dir] if flag == "--out" => {
            let dir = PathBuf::from(dir);
            for file in crd::files() {
                let path = dir.join(&file.file_name);
                if let Err(e) = std::fs::write(&path, &file.yaml) {
                    eprintln!("crdgen: cannot write {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
                eprintln!("crdgen: wrote {}", path.display());
            }
            ExitCode::SUCCESS
        }
        [flag, dir] if flag == "--check" => {
            let stale = crd::stale_files(&PathBuf::from(dir));
            for name in &stale {
                eprintln!(
                    "crdgen: {name} is out of date; run `cargo run -p projectionist-crds --bin crdgen -- --out crds`"
                );
            }
            if stale.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        _ => {
            eprintln!(
                "usage: crdgen [--out DIR | --check DIR]\n\nWithout arguments, prints both CRDs as one YAML stream."
            );
            ExitCode::from(2)
        }
    }
}
