//! Hostile input, generated: manifest parsing never panics on any bytes, and unpacking any
//! sequence of entries built from dangerous pieces (`..`, absolute paths, symlinks to outside,
//! hard links, whiteouts) never creates anything outside the layer directory.

use ferry_image::manifest::parse_manifest;
use ferry_image::Limits;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

    #[test]
    fn manifest_parsing_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_manifest(&bytes, &Limits::default());
    }

    #[test]
    fn manifest_like_json_never_panics(
        layers in proptest::collection::vec((".{0,40}", any::<u64>()), 0..4),
        mt in prop_oneof![Just("application/vnd.oci.image.manifest.v1+json".to_string()), ".{0,20}"],
    ) {
        let doc = serde_json::json!({"schemaVersion": 2, "mediaType": mt,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": format!("sha256:{}", "a".repeat(64)), "size": 10},
            "layers": layers.iter().map(|(d, s)| serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": s})).collect::<Vec<_>>()});
        let _ = parse_manifest(doc.to_string().as_bytes(), &Limits::default());
    }
}

#[derive(Debug, Clone)]
enum Entry {
    File(String),
    Dir(String),
    Symlink(String, String),
    Hardlink(String, String),
}

fn piece() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("..".to_string()),
        Just(".".to_string()),
        Just("a".to_string()),
        Just("b".to_string()),
        Just(".wh.a".to_string()),
        Just(".wh..wh..opq".to_string()),
        Just("OUT".to_string()), // replaced by the outside directory's path
    ]
}

fn path() -> impl Strategy<Value = String> {
    (any::<bool>(), proptest::collection::vec(piece(), 1..4))
        .prop_map(|(abs, p)| format!("{}{}", if abs { "/" } else { "" }, p.join("/")))
}

fn entry() -> impl Strategy<Value = Entry> {
    prop_oneof![
        path().prop_map(Entry::File),
        path().prop_map(Entry::Dir),
        (path(), path()).prop_map(|(a, b)| Entry::Symlink(a, b)),
        (path(), path()).prop_map(|(a, b)| Entry::Hardlink(a, b)),
    ]
}

fn tar_of(entries: &[Entry], outside: &str) -> Vec<u8> {
    let fix = |s: &str| s.replace("OUT", outside.trim_start_matches('/'));
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let (kind, name, link) = match e {
            Entry::File(p) => (tar::EntryType::Regular, fix(p), None),
            Entry::Dir(p) => (tar::EntryType::Directory, fix(p), None),
            Entry::Symlink(p, t) => (tar::EntryType::Symlink, fix(p), Some(fix(t))),
            Entry::Hardlink(p, t) => (tar::EntryType::Link, fix(p), Some(fix(t))),
        };
        if name.len() > 99 || link.as_ref().is_some_and(|l| l.len() > 99) {
            continue;
        }
        let data: &[u8] = if kind == tar::EntryType::Regular {
            b"x"
        } else {
            b""
        };
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(0o755);
        h.set_size(data.len() as u64);
        h.as_ustar_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(l) = link {
            h.as_ustar_mut().unwrap().linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, .. ProptestConfig::default() })]

    #[test]
    fn unpacking_never_writes_outside(entries in proptest::collection::vec(entry(), 1..8)) {
        let outside = tempfile::tempdir().unwrap();
        let layer = tempfile::tempdir().unwrap();
        let o = outside.path().display().to_string();
        let tar = tar_of(&entries, &o);
        let _ = ferry_image::unpack::unpack(&tar[..], layer.path(), "prop", 1 << 20);
        let left: Vec<_> = std::fs::read_dir(outside.path()).unwrap().flatten().map(|e| e.path()).collect();
        prop_assert!(left.is_empty(), "wrote outside: {:?}", left);
    }
}
