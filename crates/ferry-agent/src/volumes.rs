//! The agent's half of a volume fork (migration): it receives copies on a TCP listener inside
//! its host's network namespace (so bytes really cross the fabric between hosts), and sends
//! copies of local volumes to another host's listener. The copy itself (chunks, BLAKE3,
//! verification, resumable receiver state) is `ferry-volume`'s job.

use crate::AgentError;
use ferry_core::proto::{VolumeExpect, VolumeExpected, VolumeProgress, VolumeRound, VolumeSend};
use ferry_net::NetNs;
use std::collections::HashMap;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Sessions the server announced: session -> (token, destination directory).
type Expected = HashMap<String, (String, PathBuf)>;

pub struct Volumes {
    host_ns: NetNs,
    /// Where this host keeps the volumes it received.
    dir: PathBuf,
    /// The sender's last manifest per session, so a round after an agent restart only rehashes
    /// files that changed.
    sync_dir: PathBuf,
    addr: SocketAddr,
    expected: Mutex<Expected>,
    progress: Arc<Mutex<HashMap<String, VolumeProgress>>>,
    /// Serializes making and mounting volumes (two machines, or a machine and a copy, may ask
    /// for one volume at once).
    making: Mutex<()>,
}

/// Session, volume and target names become file names: a safe alphabet only.
fn safe_name(what: &str, s: &str) -> Result<(), AgentError> {
    let ok = !s.is_empty()
        && s.len() <= 80
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(AgentError::Invalid(format!("{what} {s:?}")))
    }
}

impl Volumes {
    /// Binds the receiver at `addr` inside `host_ns` and serves it on threads of its own.
    pub fn start(
        host_ns: &NetNs,
        state_dir: &Path,
        addr: SocketAddr,
    ) -> Result<Arc<Self>, AgentError> {
        let dir = state_dir.join("volumes");
        let sync_dir = state_dir.join("sync");
        for d in [&dir, &sync_dir] {
            std::fs::create_dir_all(d)
                .map_err(|e| AgentError::io(format!("creating {}", d.display()), e))?;
        }
        let listener = ferry_net::netns::run_in(host_ns, move || TcpListener::bind(addr))?
            .map_err(|e| AgentError::io(format!("listening on {addr} in {}", host_ns.name()), e))?;
        let v = Arc::new(Volumes {
            host_ns: host_ns.clone(),
            dir,
            sync_dir,
            addr,
            expected: Mutex::new(HashMap::new()),
            progress: Arc::new(Mutex::new(HashMap::new())),
            making: Mutex::new(()),
        });
        v.mount_all();
        let me = v.clone();
        std::thread::Builder::new()
            .name("volume-recv".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    let me = me.clone();
                    let _ = std::thread::Builder::new()
                        .name("volume-conn".into())
                        .spawn(move || me.serve(conn));
                }
            })
            .map_err(|e| AgentError::io("starting the volume receiver", e))?;
        Ok(v)
    }

    fn serve(&self, conn: TcpStream) {
        let _ = conn.set_nodelay(true);
        // A silent peer must not hold a thread forever.
        let _ = conn.set_read_timeout(Some(Duration::from_secs(60)));
        let peer = conn.peer_addr().ok();
        let mut stream = CrashAfter {
            inner: conn,
            seen: 0,
        };
        let r = ferry_volume::serve_one(&mut stream, |hello| {
            let exp = self.expected.lock().unwrap();
            exp.get(&hello.session)
                .filter(|(token, _)| *token == hello.token)
                .map(|(_, dir)| dir.clone())
        });
        match r {
            Ok(rep) => tracing::info!(
                "volume session {} from {peer:?}: {} chunks written, verified {}",
                rep.session,
                rep.chunks_written,
                rep.verified
            ),
            Err(e) => tracing::warn!("volume session from {peer:?}: {e}"),
        }
    }

    /// Mounts every volume image of this host that is not mounted (agent start: after a reboot,
    /// or a `ferry dev` that unmounted them when it stopped).
    fn mount_all(&self) {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            let Some(id) = p
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".img"))
            else {
                continue;
            };
            if safe_name("volume", id).is_ok() {
                if let Err(e) = crate::disk::mount(&p, &self.dir.join(id)) {
                    tracing::warn!("mounting volume {id}: {e}");
                }
            }
        }
    }

    /// The mounted directory of size-limited volume `id`: made (an ext4 image of `size_mb`
    /// MiB) on first use, mounted if it is not.
    pub fn ensure(&self, id: &str, size_mb: u64) -> Result<PathBuf, AgentError> {
        safe_name("volume", id)?;
        let _g = self.making.lock().unwrap();
        let img = self.dir.join(format!("{id}.img"));
        let dir = self.dir.join(id);
        let fresh = !img.exists();
        if fresh {
            crate::disk::create(&img, size_mb)
                .map_err(|e| AgentError::io(format!("making volume {id} ({size_mb} MiB)"), e))?;
        }
        crate::disk::mount(&img, &dir)
            .map_err(|e| AgentError::io(format!("mounting volume {id}"), e))?;
        if fresh {
            // mkfs's lost+found would be the first thing a machine finds in its "empty" volume
            // (and `initdb` refuses a non-empty directory); e2fsck makes it again if needed.
            let _ = std::fs::remove_dir(dir.join("lost+found"));
        }
        Ok(dir)
    }

    /// The server announces a copy: where it goes and the secret the sender will show.
    pub fn expect(&self, req: VolumeExpect) -> Result<VolumeExpected, AgentError> {
        safe_name("session", &req.session)?;
        safe_name("volume", &req.volume_id)?;
        if req.token.len() < 16 {
            return Err(AgentError::Invalid("token too short".into()));
        }
        let dir = match &req.dir {
            Some(d) if Path::new(d).is_absolute() => PathBuf::from(d),
            Some(d) => return Err(AgentError::Invalid(format!("dir {d:?} is not absolute"))),
            None => match req.size_mb {
                Some(mb) => self.ensure(&req.volume_id, mb)?,
                None => self.dir.join(&req.volume_id),
            },
        };
        std::fs::create_dir_all(&dir)
            .map_err(|e| AgentError::io(format!("creating {}", dir.display()), e))?;
        self.expected
            .lock()
            .unwrap()
            .insert(req.session.clone(), (req.token.clone(), dir.clone()));
        Ok(VolumeExpected {
            dir: dir.display().to_string(),
            addr: self.addr.to_string(),
        })
    }

    /// One copy round of a local directory to another host (blocking).
    pub fn send(&self, req: VolumeSend) -> Result<VolumeRound, AgentError> {
        safe_name("session", &req.session)?;
        safe_name("target", &req.target)?;
        let addr: SocketAddr = req
            .addr
            .parse()
            .map_err(|_| AgentError::Invalid(format!("address {:?}", req.addr)))?;
        let src = PathBuf::from(&req.src_dir);
        if !src.is_absolute() || !src.is_dir() {
            return Err(AgentError::Invalid(format!(
                "source {:?} is not an existing absolute directory",
                req.src_dir
            )));
        }
        let mut stream = ferry_net::netns::run_in(&self.host_ns, move || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        })?
        .map_err(|e| AgentError::io(format!("connecting to {addr}"), e))?;
        let _ = stream.set_nodelay(true);
        let manifest_path = self.sync_dir.join(format!("{}.manifest", req.session));
        // Only a hint for the quick check: a missing, old or torn file just means more files
        // are hashed again, never a wrong copy (the receiver checks every chunk).
        let last = std::fs::read(&manifest_path)
            .ok()
            .and_then(|b| ferry_volume::Manifest::decode(&b).ok());
        let mut sender = ferry_volume::Sender::new(&src, last);
        let faults = ferry_volume::Faults::from_env()
            .map_err(|e| AgentError::Invalid(format!("FERRY_TEST_VOLUME_FAULT: {e}")))?;
        let session = req.session.clone();
        let progress: Arc<dyn Fn(ferry_volume::Progress) + Send + Sync> = {
            let prog = self.progress.clone();
            Arc::new(move |p: ferry_volume::Progress| {
                if p.bytes_total > 0 && p.bytes_done * 2 > p.bytes_total {
                    ferry_core::crash_point("agent-send");
                }
                prog.lock().unwrap().insert(
                    session.clone(),
                    VolumeProgress {
                        phase: format!("{:?}", p.phase).to_lowercase(),
                        bytes_done: p.bytes_done,
                        bytes_total: p.bytes_total,
                    },
                );
            })
        };
        let opts = ferry_volume::SendOptions {
            faults,
            progress: Some(progress),
        };
        let hello = ferry_volume::Hello {
            session: req.session.clone(),
            token: req.token.clone(),
            target: req.target.clone(),
        };
        let result = sender.round(&mut stream, &hello, &opts);
        self.progress.lock().unwrap().remove(&req.session);
        let r = result.map_err(|e| {
            if e.is_permanent() {
                AgentError::VolumeUnsupported(format!("volume copy: {e}"))
            } else {
                AgentError::Invalid(format!("volume copy: {e}"))
            }
        })?;
        if let Some(m) = sender.last_manifest() {
            // No fsync (see above): this is on the path of a migration's downtime.
            let tmp = manifest_path.with_extension("tmp");
            std::fs::write(&tmp, m.encode())
                .and_then(|()| std::fs::rename(&tmp, &manifest_path))
                .map_err(|e| AgentError::io(format!("writing {}", manifest_path.display()), e))?;
        }
        Ok(VolumeRound {
            entries: r.entries,
            bytes_total: r.bytes_total,
            chunks_total: r.chunks_total,
            chunks_sent: r.chunks_sent,
            bytes_sent: r.bytes_sent,
            chunks_resent: r.chunks_resent,
            files_rehashed: r.files_rehashed,
            root: r.root,
            verified: r.verified,
            scan_ms: r.scan_ms,
            transfer_ms: r.transfer_ms,
        })
    }

    pub fn progress(&self, session: &str) -> VolumeProgress {
        self.progress
            .lock()
            .unwrap()
            .get(session)
            .cloned()
            .unwrap_or_default()
    }

    /// Deletes a volume this host received (only below its own volumes directory).
    pub fn remove(&self, dir: &str) -> Result<(), AgentError> {
        let p = PathBuf::from(dir);
        let canon = p.canonicalize();
        let root = self
            .dir
            .canonicalize()
            .map_err(|e| AgentError::io("volumes dir", e))?;
        match canon {
            Ok(c) if c.starts_with(&root) && c != root => {
                let _g = self.making.lock().unwrap();
                // A size-limited volume: its file system goes with its image (a machine still
                // holding it keeps it until it ends: the unmount is lazy).
                crate::disk::unmount(&c)
                    .map_err(|e| AgentError::io(format!("unmounting {}", c.display()), e))?;
                std::fs::remove_dir_all(&c)
                    .map_err(|e| AgentError::io(format!("removing {}", c.display()), e))?;
                for extra in [
                    c.with_extension("img"),
                    ferry_volume::state_path(&c).unwrap_or_default(),
                ] {
                    match std::fs::remove_file(&extra) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            return Err(AgentError::io(format!("removing {}", extra.display()), e))
                        }
                    }
                }
                Ok(())
            }
            Ok(_) => Err(AgentError::Invalid(format!(
                "{dir} is not a volume of this host"
            ))),
            Err(_) => Ok(()), // already gone
        }
    }
}

/// Test hook: the receiving agent dies (SIGKILL) in the middle of a copy, after 8 MiB arrived.
struct CrashAfter {
    inner: TcpStream,
    seen: u64,
}

impl Read for CrashAfter {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.seen += n as u64;
        if self.seen > 8 << 20 {
            ferry_core::crash_point("agent-receive");
        }
        Ok(n)
    }
}

impl std::io::Write for CrashAfter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
