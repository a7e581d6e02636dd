//! Fuzz target for ferry-volume's wire parser: arbitrary bytes are read as a stream of frames
//! (`[kind][u32 BE len][payload]`) and decoded, manifests validated. It must never panic or
//! allocate beyond the hard limits; every failure is a typed `VolumeError`.
#![no_main]

use ferry_volume::wire::{decode_all, Msg};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (msgs, _err) = decode_all(data);
    for m in msgs {
        if let Msg::Manifest(m) = m {
            // A manifest that passed validation has a root and consistent chunk counts.
            let _ = m.root();
            for e in &m.entries {
                assert_eq!(e.chunks.len() as u64, ferry_volume::chunk_count(e.size));
                assert!(ferry_volume::validate_rel(&e.path).is_ok());
            }
        }
    }
});
