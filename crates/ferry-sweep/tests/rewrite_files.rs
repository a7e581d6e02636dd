//! Sweeps and rewrites on real files in a temporary directory: backups equal the originals, diffs
//! are shown, dry runs change nothing, and what must not be touched (binary files, symlink loops,
//! huge files, hard-linked files) is left alone with a note.

use ferry_sweep::{
    sweep, Backup, MachineIndex, MachineRecord, NoOwners, Options, Owner, Report, RewriteOptions,
    SweepError,
};
use std::collections::hash_map::DefaultHasher;
use std::fs;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

const PG: &str = "fdaa:0:18:8000:7d:f066:b83b:2";
const PG_OLD: &str = "fdaa:0:18:8000:12:f066:b83b:2";
const STRANGER: &str = "fdaa:0:18:8000:99:1234:5678:2";
const PG_NAME: &str = "d8dd625fed5568.vm.pg.internal";

fn owners() -> MachineIndex {
    MachineIndex::from_machines(vec![MachineRecord {
        id: "d8dd625fed5568".into(),
        app: "pg".into(),
        private_ip: PG.into(),
        old_ips: vec![PG_OLD.into()],
    }])
    .unwrap()
}

fn hash(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

fn rewrite_opts(dry_run: bool) -> Options {
    Options {
        rewrite: Some(RewriteOptions {
            dry_run,
            backup: Backup::Beside,
        }),
        ..Options::default()
    }
}

fn env_text() -> String {
    format!("PRIMARY=[{PG}]:5432\nOLD_PRIMARY=http://[{PG_OLD}]:8080/x\nOTHER={STRANGER}\nPLAIN=value\n")
}

/// Runs a sweep on another thread so a hang (a symlink loop followed forever) fails the test.
fn sweep_with_timeout(
    paths: Vec<PathBuf>,
    opts: Options,
    owners: MachineIndex,
) -> Result<Report, SweepError> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(sweep(&paths, &opts, &owners));
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("sweep hung")
}

#[test]
fn rewrite_keeps_a_backup_equal_to_the_original_and_shows_a_diff() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("db.env");
    fs::write(&file, env_text()).unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o640)).unwrap();
    let original = fs::read(&file).unwrap();

    let report = sweep(&[dir.path().to_owned()], &rewrite_opts(false), &owners()).unwrap();

    let backup = dir.path().join("db.env.ferry-bak");
    let backup_bytes = fs::read(&backup).unwrap();
    assert_eq!(hash(&backup_bytes), hash(&original));
    assert_eq!(backup_bytes, original);
    let now = fs::read_to_string(&file).unwrap();
    assert_eq!(
        now,
        format!("PRIMARY={PG_NAME}:5432\nOLD_PRIMARY=http://{PG_NAME}:8080/x\nOTHER={STRANGER}\nPLAIN=value\n")
    );
    assert_eq!(
        fs::metadata(&file).unwrap().mode() & 0o7777,
        0o640,
        "mode kept"
    );

    assert_eq!(report.changes.len(), 1);
    let diff = &report.changes[0].diff;
    assert!(diff.contains(&format!("-PRIMARY=[{PG}]:5432")), "{diff}");
    assert!(diff.contains(&format!("+PRIMARY={PG_NAME}:5432")), "{diff}");
    assert!(report.changes[0].applied);
    assert_eq!(report.summary.hits, 3);
    assert_eq!(report.summary.rewritten, 2);
    assert_eq!(report.summary.remaining, 1, "the unknown one stays");
    assert_eq!(report.exit_code(), 1);
    assert!(matches!(report.hits[0].owner, Owner::Current { .. }));
    assert!(matches!(report.hits[1].owner, Owner::Old { .. }));
    assert_eq!(report.hits[2].owner, Owner::Unknown);
    assert_eq!((report.hits[2].line, report.hits[2].column), (3, 7));

    // A second run sees only the unknown literal and does not scan the backup.
    let again = sweep(&[dir.path().to_owned()], &rewrite_opts(false), &owners()).unwrap();
    assert_eq!(again.summary.hits, 1);
    assert!(again.changes.is_empty());
    assert!(
        again.skipped.is_empty(),
        "backups are left out silently: {:?}",
        again.skipped
    );
    // No temporary files left behind.
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn all_known_rewritten_means_exit_zero_and_backups_do_not_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("app.yaml");
    fs::write(&file, format!("db:\n  host: {PG}\n")).unwrap();
    let r = sweep(std::slice::from_ref(&file), &rewrite_opts(false), &owners()).unwrap();
    assert_eq!(r.exit_code(), 0);
    assert_eq!(
        fs::read_to_string(&file).unwrap(),
        format!("db:\n  host: {PG_NAME}\n")
    );

    // Someone puts a literal back; the next rewrite keeps the first backup and adds `.1`.
    fs::write(&file, format!("db:\n  host: {PG_OLD}\n")).unwrap();
    sweep(std::slice::from_ref(&file), &rewrite_opts(false), &owners()).unwrap();
    assert_eq!(
        fs::read_to_string(dir.path().join("app.yaml.ferry-bak")).unwrap(),
        format!("db:\n  host: {PG}\n")
    );
    assert_eq!(
        fs::read_to_string(dir.path().join("app.yaml.ferry-bak.1")).unwrap(),
        format!("db:\n  host: {PG_OLD}\n")
    );
}

#[test]
fn dry_run_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("db.env");
    fs::write(&file, env_text()).unwrap();
    let before = fs::metadata(&file).unwrap();
    let report = sweep(&[dir.path().to_owned()], &rewrite_opts(true), &owners()).unwrap();
    assert_eq!(fs::read_to_string(&file).unwrap(), env_text());
    let after = fs::metadata(&file).unwrap();
    assert_eq!(
        (before.ino(), before.mtime(), before.mtime_nsec()),
        (after.ino(), after.mtime(), after.mtime_nsec())
    );
    assert_eq!(
        fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no backup, no temp file"
    );
    assert_eq!(report.changes.len(), 1);
    assert!(!report.changes[0].applied);
    assert!(report.changes[0]
        .diff
        .contains(&format!("+PRIMARY={PG_NAME}:5432")));
    assert_eq!(report.summary.remaining, 3);
    assert_eq!(report.exit_code(), 1);
}

#[test]
fn binary_file_is_skipped_and_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("blob.bin");
    let mut bytes = b"\x7fELF\0\0\0".to_vec();
    bytes.extend_from_slice(format!("host={PG}\n").as_bytes());
    fs::write(&file, &bytes).unwrap();
    let report = sweep(&[dir.path().to_owned()], &rewrite_opts(false), &owners()).unwrap();
    assert_eq!(fs::read(&file).unwrap(), bytes);
    assert_eq!(report.summary.hits, 0);
    assert_eq!(report.skipped.len(), 1);
    assert!(
        report.skipped[0].reason.starts_with("binary"),
        "{:?}",
        report.skipped
    );
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn symlink_loop_does_not_hang_and_is_noted() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("conf");
    fs::create_dir(&sub).unwrap();
    fs::write(sub.join("a.env"), format!("X={PG}\n")).unwrap();
    symlink("..", sub.join("up")).unwrap();
    symlink("self", dir.path().join("self")).unwrap(); // a link to itself
    let report =
        sweep_with_timeout(vec![dir.path().to_owned()], Options::default(), owners()).unwrap();
    assert_eq!(report.summary.hits, 1);
    assert!(
        report
            .skipped
            .iter()
            .any(|s| s.reason.contains("symlink loop")),
        "{:?}",
        report.skipped
    );
    assert!(
        report.skipped.iter().any(|s| s.path.ends_with("self")),
        "{:?}",
        report.skipped
    );
}

#[test]
fn symlinked_file_is_scanned_once_and_stays_a_link() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real.toml");
    fs::write(&real, format!("host = \"{PG}\"\n")).unwrap();
    let link = dir.path().join("link.toml");
    symlink("real.toml", &link).unwrap();
    let report =
        sweep_with_timeout(vec![dir.path().to_owned()], rewrite_opts(false), owners()).unwrap();
    assert_eq!(report.summary.hits, 1);
    assert!(fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(
        fs::read_to_string(&real).unwrap(),
        format!("host = \"{PG_NAME}\"\n")
    );
}

#[test]
fn huge_files_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("big.json");
    let text = format!("{{\"host\": \"{PG}\", \"pad\": \"{}\"}}", "x".repeat(4096));
    fs::write(&file, &text).unwrap();
    let opts = Options {
        max_file_size: 1024,
        ..rewrite_opts(false)
    };
    let report = sweep(std::slice::from_ref(&file), &opts, &owners()).unwrap();
    assert_eq!(fs::read_to_string(&file).unwrap(), text);
    assert_eq!(report.summary.hits, 0);
    assert!(report.skipped[0].reason.contains("max-file-size"));
}

#[test]
fn hard_linked_files_are_not_split() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.ini");
    fs::write(&a, format!("[db]\nhost={PG}\n")).unwrap();
    fs::hard_link(&a, dir.path().join("b.ini")).unwrap();
    let report = sweep(std::slice::from_ref(&a), &rewrite_opts(false), &owners()).unwrap();
    assert_eq!(
        fs::read_to_string(&a).unwrap(),
        format!("[db]\nhost={PG}\n")
    );
    assert_eq!(report.summary.remaining, 1);
    assert!(
        report.skipped[0].reason.contains("hard links"),
        "{:?}",
        report.skipped
    );
}

#[test]
fn unreadable_files_are_noted() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secret.env");
    fs::write(&file, format!("X={PG}\n")).unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o000)).unwrap();
    if fs::File::open(&file).is_ok() {
        return; // running as root: permissions do not stop us, nothing to test
    }
    let report = sweep(&[dir.path().to_owned()], &Options::default(), &owners()).unwrap();
    assert!(report.skipped[0].reason.starts_with("unreadable"));
}

#[test]
fn backup_dir_mirrors_the_absolute_path() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    fs::create_dir(&tree).unwrap();
    fs::write(tree.join("db.env"), env_text()).unwrap();
    let backups = tree.join("backups"); // inside the swept tree: must not be swept
    let opts = Options {
        rewrite: Some(RewriteOptions {
            dry_run: false,
            backup: Backup::Dir(backups.clone()),
        }),
        ..Options::default()
    };
    sweep(std::slice::from_ref(&tree), &opts, &owners()).unwrap();
    let real = fs::canonicalize(tree.join("db.env")).unwrap();
    let mirrored = backups.join(format!(
        "{}.ferry-bak",
        real.strip_prefix("/").unwrap().display()
    ));
    assert_eq!(fs::read_to_string(&mirrored).unwrap(), env_text());
    let again = sweep(std::slice::from_ref(&tree), &opts, &owners()).unwrap();
    assert_eq!(again.summary.hits, 1, "the backup directory is not swept");
}

#[test]
fn bad_input_is_an_error_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("db.env");
    fs::write(&file, env_text()).unwrap();
    let missing = dir.path().join("nope");
    let err = sweep(&[file.clone(), missing], &rewrite_opts(false), &owners()).unwrap_err();
    assert!(matches!(err, SweepError::NoSuchPath { .. }), "{err}");
    assert_eq!(fs::read_to_string(&file).unwrap(), env_text());
    assert!(matches!(
        sweep(&[], &Options::default(), &NoOwners),
        Err(SweepError::NoPaths)
    ));
    let not_dir = Options {
        rewrite: Some(RewriteOptions {
            dry_run: false,
            backup: Backup::Dir(file.clone()),
        }),
        ..Options::default()
    };
    assert!(matches!(
        sweep(&[dir.path().to_owned()], &not_dir, &owners()),
        Err(SweepError::BackupDir { .. })
    ));
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn git_directories_are_skipped_but_gitignored_files_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    fs::create_dir(root.join(".git")).unwrap();
    fs::write(root.join(".git/config"), format!("url = http://[{PG}]/\n")).unwrap();
    fs::write(root.join(".gitignore"), "secret.env\n").unwrap();
    fs::write(root.join("secret.env"), format!("X={PG}\n")).unwrap();
    fs::write(root.join(".hidden.env"), format!("X={PG}\n")).unwrap();
    let report = sweep(&[root.to_owned()], &Options::default(), &NoOwners).unwrap();
    let mut paths: Vec<_> = report
        .hits
        .iter()
        .map(|h| h.path.file_name().unwrap().to_owned())
        .collect();
    paths.sort();
    assert_eq!(paths, [".hidden.env", "secret.env"]);
}

#[test]
fn excluded_files_are_noted_and_never_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let owners_file = dir.path().join("owners.json");
    let json =
        format!(r#"{{"machines":[{{"id":"d8dd625fed5568","app":"pg","private_ip":"{PG}"}}]}}"#);
    fs::write(&owners_file, &json).unwrap();
    let opts = Options {
        exclude: vec![(owners_file.clone(), "the owners list".into())],
        ..rewrite_opts(false)
    };
    let report = sweep(&[dir.path().to_owned()], &opts, &owners()).unwrap();
    assert_eq!(fs::read_to_string(&owners_file).unwrap(), json);
    assert_eq!(report.summary.hits, 0);
    assert_eq!(report.skipped[0].reason, "the owners list");
}
