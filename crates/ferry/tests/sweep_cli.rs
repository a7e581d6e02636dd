//! End to end: the `ferry sweep` binary's exit status (0 clean, 1 literals remain, 2 error), its
//! JSON document, and a rewrite through the command line.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const PG: &str = "fdaa:0:18:8000:7d:f066:b83b:2";
const PG_OLD: &str = "fdaa:0:18:8000:12:f066:b83b:2";

/// A fresh directory for one test under cargo's per-target temporary directory.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("sweep_cli")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A port nothing listens on (bound, then released): where these sweeps look for an API, so
/// they run offline whatever else runs on this machine.
fn dead_api() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", l.local_addr().unwrap())
}

fn ferry(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("sweep")
        .args(args)
        .env("FERRY_API", dead_api())
        .output()
        .unwrap()
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited normally")
}

fn owners_file(dir: &Path) -> PathBuf {
    let p = dir.join("owners.json");
    let json = format!(
        r#"{{"machines":[{{"id":"d8dd625fed5568","app":"pg","private_ip":"{PG}","old_ips":["{PG_OLD}"]}}]}}"#
    );
    std::fs::write(&p, json).unwrap();
    p
}

#[test]
fn clean_tree_exits_zero() {
    let dir = scratch("clean");
    std::fs::write(
        dir.join("app.env"),
        "DB_HOST=pg.internal\nOTHER=fd00::1\nMAC=00:1a:2b:3c:4d:5e\n",
    )
    .unwrap();
    let o = ferry(&[dir.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    assert!(o.stdout.is_empty());
}

#[test]
fn literals_exit_one_with_json() {
    let dir = scratch("literals");
    let tree = dir.join("tree");
    std::fs::create_dir(&tree).unwrap();
    std::fs::write(
        tree.join("db.env"),
        format!("PRIMARY=[{PG}]:5432\nDNS=fdaa::3\n"),
    )
    .unwrap();
    std::fs::write(tree.join("blob"), b"\0\0fdaa::2").unwrap();
    let owners = owners_file(&dir);
    let o = ferry(&[
        "--json",
        "--owners",
        owners.to_str().unwrap(),
        tree.to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 1, "{}", String::from_utf8_lossy(&o.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(doc["owners"]["source"], "file", "{doc}");
    assert_eq!(doc["fleet"], serde_json::Value::Null);
    let doc = &doc["files"];
    let hits = doc["hits"].as_array().unwrap();
    assert_eq!(hits.len(), 2);
    assert_eq!(hits[0]["line"], 1);
    assert_eq!(hits[0]["column"], 10);
    assert_eq!(hits[0]["text"], PG);
    assert_eq!(hits[0]["form"], "guest");
    assert_eq!(hits[0]["owner"]["kind"], "current");
    assert_eq!(hits[0]["owner"]["machine_id"], "d8dd625fed5568");
    assert_eq!(hits[1]["address"], "fdaa::3");
    assert_eq!(hits[1]["form"], "service");
    assert_eq!(hits[1]["owner"]["kind"], "unknown");
    assert_eq!(
        doc["skipped"][0]["reason"].as_str().unwrap(),
        "binary (NUL byte in the first 8 KiB)"
    );
    assert_eq!(doc["summary"]["remaining"], 2);

    // Human output: one line per hit.
    let o = ferry(&["--owners", owners.to_str().unwrap(), tree.to_str().unwrap()]);
    assert_eq!(code(&o), 1);
    let out = String::from_utf8(o.stdout).unwrap();
    assert!(
        out.contains(&format!(
            "db.env:1:10: {PG}  -> current address of machine d8dd625fed5568 (app pg)"
        )),
        "{out}"
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("note: skipped"));
}

/// Without --owners, a sweep asks the API; one that does not answer makes it run offline, and
/// it says so (in the JSON, whose shape does not change, and as a note).
#[test]
fn offline_sweeps_say_so() {
    let dir = scratch("offline");
    std::fs::write(dir.join("db.env"), format!("PRIMARY=[{PG}]:5432\n")).unwrap();
    let o = ferry(&["--json", dir.to_str().unwrap()]);
    assert_eq!(code(&o), 1, "{}", String::from_utf8_lossy(&o.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(doc["owners"]["source"], "none", "{doc}");
    let detail = doc["owners"]["detail"].as_str().unwrap();
    assert!(
        detail.contains("no ferry API answered at http://127.0.0.1:"),
        "{detail}"
    );
    assert_eq!(doc["files"]["hits"][0]["owner"]["kind"], "unknown");
    let o = ferry(&["--offline", "--json", dir.to_str().unwrap()]);
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        doc["owners"]["detail"]
            .as_str()
            .unwrap()
            .contains("--offline"),
        "{doc}"
    );
    let o = ferry(&[dir.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("note: owners: ran offline"), "{err}");
    // Rewriting needs owners: refused, nothing changed.
    let o = ferry(&["--rewrite", dir.to_str().unwrap()]);
    assert_eq!(code(&o), 2);
    assert_eq!(
        std::fs::read_to_string(dir.join("db.env")).unwrap(),
        format!("PRIMARY=[{PG}]:5432\n")
    );
}

#[test]
fn rewrite_through_the_cli() {
    let dir = scratch("rewrite");
    let file = dir.join("pg.yaml");
    let original = format!("primary: http://[{PG_OLD}]:5432/db\n");
    std::fs::write(&file, &original).unwrap();
    let owners = owners_file(&dir);
    let args = [
        "--owners",
        owners.to_str().unwrap(),
        "--rewrite",
        dir.to_str().unwrap(),
    ];

    let o = ferry(&[&args[..], &["--dry-run"]].concat());
    assert_eq!(code(&o), 1, "a dry run leaves the literal in place");
    assert!(String::from_utf8_lossy(&o.stdout)
        .contains("+primary: http://d8dd625fed5568.vm.pg.internal:5432/db"));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), original);

    let o = ferry(&args);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "primary: http://d8dd625fed5568.vm.pg.internal:5432/db\n"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("pg.yaml.ferry-bak")).unwrap(),
        original
    );
    assert!(
        std::fs::read_to_string(&owners).unwrap().contains(PG),
        "the owners file is never rewritten"
    );
    assert_eq!(
        code(&ferry(&[
            "--owners",
            owners.to_str().unwrap(),
            file.to_str().unwrap()
        ])),
        0
    );
}

#[test]
fn errors_exit_two_and_change_nothing() {
    let dir = scratch("errors");
    let file = dir.join("db.env");
    std::fs::write(&file, format!("X={PG}\n")).unwrap();
    let bad = dir.join("bad.json");
    std::fs::write(
        &bad,
        r#"{"machines":[{"id":"nope","app":"pg","private_ip":"fdaa::2"}]}"#,
    )
    .unwrap();
    for args in [
        vec![dir.join("missing").to_str().unwrap().to_owned()],
        vec![
            "--owners".into(),
            bad.to_str().unwrap().into(),
            "--rewrite".into(),
            file.to_str().unwrap().into(),
        ],
        vec![
            "--owners".into(),
            dir.join("none.json").to_str().unwrap().into(),
            file.to_str().unwrap().into(),
        ],
        vec!["--rewrite".into(), file.to_str().unwrap().into()],
        vec![
            "--fleet".into(),
            "--api".into(),
            "http://127.0.0.1:1".into(),
        ],
        vec!["--dry-run".into(), file.to_str().unwrap().into()],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = ferry(&args);
        assert_eq!(
            code(&o),
            2,
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(!o.stderr.is_empty());
        assert_eq!(std::fs::read_to_string(&file).unwrap(), format!("X={PG}\n"));
    }
    let o = ferry(&["--fleet", "--api", "http://127.0.0.1:1"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot reach the ferry API"));
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "no backup or temp file: {names:?}");
}
