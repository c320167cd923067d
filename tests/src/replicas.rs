//! Several real keyholder processes on one PostgreSQL database (each test its own database), and a
//! real nginx load balancer in front of them (configured in a temporary folder, on loopback).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyholder::config::Config;
use keyholder::storage::postgres::testing::TestDatabase;
use keyholder_protocol::paths::PATH_HEALTH;
use keyholder_protocol::HmacSecret;

use crate::{Keyholder, PUBLIC_URL};

/// Tests that use the local PostgreSQL hold this shared; the one that restarts it holds it
/// exclusively, so that no other test's replicas lose their database meanwhile.
fn postgres_use() -> Arc<tokio::sync::RwLock<()>> {
    static LOCK: std::sync::OnceLock<Arc<tokio::sync::RwLock<()>>> = std::sync::OnceLock::new();
    Arc::clone(LOCK.get_or_init(|| Arc::new(tokio::sync::RwLock::new(()))))
}

/// How a cluster holds the PostgreSQL it uses.
enum Use {
    Shared(#[allow(dead_code)] tokio::sync::OwnedRwLockReadGuard<()>),
    Exclusive(#[allow(dead_code)] tokio::sync::OwnedRwLockWriteGuard<()>),
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One keyholder process.
pub struct Replica {
    child: Option<Child>,
    /// Where it listens (kept across restarts).
    pub addr: SocketAddr,
    /// Its node id (its audit chain).
    pub node: String,
    data_dir: PathBuf,
}

impl Replica {
    /// Whether the process runs.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Replicas sharing one database and one master key file.
pub struct Cluster {
    /// The test's database.
    pub db: TestDatabase,
    dir: tempfile::TempDir,
    /// The master key every replica reads.
    pub master_key: PathBuf,
    bin: PathBuf,
    /// The replicas, in start order.
    pub replicas: Vec<Replica>,
    /// The binding's HMAC secret, once bound.
    pub secret: Option<HmacSecret>,
    http: reqwest::Client,
    /// The database URL the replicas use (the test database's, or a relay's in front of it).
    database_url: String,
    /// The relay between the replicas and PostgreSQL, for [`Cluster::start_relayed`].
    pub relay: Option<PgRelay>,
    _use: Use,
}

impl Cluster {
    /// Starts `n` replicas of `bin` (the `keyholder` command) on a new database; `None` when no
    /// PostgreSQL is reachable (the test then skips, with the message printed).
    pub async fn start(bin: &Path, n: usize) -> Option<Cluster> {
        let held = Use::Shared(postgres_use().read_owned().await);
        Self::start_holding(bin, n, held).await
    }

    /// Like [`Cluster::start`], alone on the PostgreSQL server (tests that restart it).
    pub async fn start_exclusive(bin: &Path, n: usize) -> Option<Cluster> {
        let held = Use::Exclusive(postgres_use().write_owned().await);
        Self::start_holding(bin, n, held).await
    }

    /// Like [`Cluster::start`], the replicas reaching PostgreSQL through a [`PgRelay`] the test
    /// can freeze (a database host lost without a reset).
    pub async fn start_relayed(bin: &Path, n: usize) -> Option<Cluster> {
        let held = Use::Shared(postgres_use().read_owned().await);
        Self::start_with(bin, n, held, true).await
    }

    async fn start_holding(bin: &Path, n: usize, held: Use) -> Option<Cluster> {
        Self::start_with(bin, n, held, false).await
    }

    async fn start_with(bin: &Path, n: usize, held: Use, relayed: bool) -> Option<Cluster> {
        let db = TestDatabase::create().await?;
        let mut database_url = db.url();
        let relay = if relayed {
            let mut url = url::Url::parse(&database_url).expect("database URL");
            let host = url.host_str().unwrap_or("127.0.0.1").to_string();
            let target = tokio::net::lookup_host((host.as_str(), url.port().unwrap_or(5432)))
                .await
                .expect("PostgreSQL host")
                .next()
                .expect("an address");
            let relay = PgRelay::start(target);
            url.set_host(Some("127.0.0.1")).expect("host");
            url.set_port(Some(relay.addr.port())).expect("port");
            database_url = url.to_string();
            Some(relay)
        } else {
            None
        };
        let dir = tempfile::tempdir().unwrap();
        let master_key = dir.path().join("master.key");
        {
            use base64::Engine as _;
            use rand::RngCore;
            let mut key = [0u8; 32];
            rand::thread_rng().fill_bytes(&mut key);
            std::fs::write(
                &master_key,
                base64::engine::general_purpose::STANDARD.encode(key),
            )
            .unwrap();
        }
        let mut cluster = Cluster {
            db,
            dir,
            master_key,
            bin: bin.to_path_buf(),
            replicas: Vec::new(),
            secret: None,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            database_url,
            relay,
            _use: held,
        };
        for i in 0..n {
            let node = format!("replica-{}", (b'a' + i as u8) as char);
            let data_dir = cluster.dir.path().join(&node);
            std::fs::create_dir_all(&data_dir).unwrap();
            let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            cluster.replicas.push(Replica {
                child: None,
                addr,
                node,
                data_dir,
            });
        }
        // All at once: their migrations meet at the advisory lock.
        for i in 0..n {
            cluster.spawn(i);
        }
        for i in 0..n {
            cluster.wait_healthy(i).await;
        }
        Some(cluster)
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.env("KEYHOLDER_MASTER_KEY_FILE", &self.master_key)
            .env("KEYHOLDER_DATABASE_URL", &self.database_url)
            .env("KEYHOLDER_PUBLIC_URL", PUBLIC_URL)
            .env("KEYHOLDER_EGRESS_ALLOW_PRIVATE", "true")
            .env_remove("KEYHOLDER_NODE_ID")
            .stdin(Stdio::null());
        cmd
    }

    fn spawn(&mut self, i: usize) {
        let log = std::env::var("KEYHOLDER_REPLICA_LOG").ok();
        let replica = &self.replicas[i];
        let mut cmd = self.command();
        cmd.arg("serve")
            .env("KEYHOLDER_DATA_DIR", &replica.data_dir)
            .env("KEYHOLDER_LISTEN", replica.addr.to_string())
            .env("KEYHOLDER_NODE_ID", &replica.node)
            .env("KEYHOLDER_WORKERS", "2")
            .env("KEYHOLDER_LOG", log.as_deref().unwrap_or("warn"))
            .stdout(Stdio::null())
            .stderr(if log.is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            });
        let child = cmd.spawn().expect("replica starts");
        self.replicas[i].child = Some(child);
    }

    /// Waits until replica `i` answers `/v1/health` with 200 (at most 30 s).
    pub async fn wait_healthy(&mut self, i: usize) {
        let url = format!("http://{}{PATH_HEALTH}", self.replicas[i].addr);
        let started = Instant::now();
        loop {
            if let Ok(r) = self.http.get(&url).send().await {
                if r.status().as_u16() == 200 {
                    return;
                }
            }
            assert!(self.replicas[i].running(), "replica {i} exited");
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "replica {i} not healthy"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// kill -9 of replica `i`.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut child) = self.replicas[i].child.take() {
            child.kill().unwrap(); // SIGKILL
            let _ = child.wait();
        }
    }

    /// Starts replica `i` again (same port, same node id) and waits until it is healthy.
    pub async fn restart(&mut self, i: usize) {
        self.kill9(i);
        self.spawn(i);
        self.wait_healthy(i).await;
    }

    /// An owner command (`keyholder <args>`) against the shared database, whatever its exit.
    pub fn owner_output(&self, args: &[&str]) -> std::process::Output {
        let data = self.dir.path().join("cli");
        std::fs::create_dir_all(&data).unwrap();
        self.command()
            .args(args)
            .env("KEYHOLDER_DATA_DIR", data)
            .output()
            .unwrap()
    }

    /// An owner command that must succeed; its output.
    pub fn owner(&self, args: &[&str]) -> std::process::Output {
        let out = self.owner_output(args);
        assert!(
            out.status.success(),
            "keyholder {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// The harness's client helpers aimed at replica `i` (or any base URL), with the binding's
    /// secret.
    pub fn view(&self, i: usize) -> Keyholder {
        self.view_at(&format!("http://{}", self.replicas[i].addr))
    }

    /// The helpers aimed at `base` (the balancer).
    pub fn view_at(&self, base: &str) -> Keyholder {
        Keyholder {
            server: None,
            data_dir: self.dir.path().join("cli"),
            _temp: None,
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            base: base.trim_end_matches('/').to_string(),
            secret: self
                .secret
                .as_ref()
                .map(|s| HmacSecret::from_bytes(*s.expose())),
            config: Config::new(self.dir.path().join("cli"), "127.0.0.1:0".parse().unwrap()),
        }
    }

    /// Binds the cluster: a code from the owner CLI, exchanged through replica `i`.
    pub async fn bind(&mut self, i: usize) {
        let out = self.owner(&["bind", "--json"]);
        let issued: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let code = issued["code"].as_str().unwrap().to_string();
        let answer = self.view(i).exchange(&code).await;
        assert_eq!(
            answer.status,
            200,
            "{}",
            String::from_utf8_lossy(&answer.body)
        );
        let secret =
            HmacSecret::from_base64(answer.json()["hmacSecret"].as_str().unwrap()).unwrap();
        self.secret = Some(secret);
        // Every replica follows the binding (the exchange's owner change) within a second.
        let started = Instant::now();
        for r in 0..self.replicas.len() {
            let view = self.view(r);
            loop {
                let answer = view
                    .storage(serde_json::json!({"operation": "list", "collection": "tokens"}))
                    .await;
                if answer.status == 200 {
                    break;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(1),
                    "replica {r} did not follow the binding: {}",
                    String::from_utf8_lossy(&answer.body)
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    /// The replicas' addresses.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.replicas.iter().map(|r| r.addr).collect()
    }
}

/// Stops the local PostgreSQL cluster for `pause`, then starts it again (as root, with
/// `pg_ctlcluster`). `Err` when that is not possible here (the test then skips).
pub fn restart_postgres(pause: Duration) -> Result<(), String> {
    let version = std::fs::read_dir("/etc/postgresql")
        .map_err(|e| format!("/etc/postgresql: {e}"))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .max_by_key(|v| v.parse::<u32>().unwrap_or(0))
        .ok_or("no PostgreSQL cluster here")?;
    let ctl = |action: &str| {
        Command::new("pg_ctlcluster")
            .args([version.as_str(), "main", action, "-m", "fast"])
            .output()
            .map_err(|e| e.to_string())
            .and_then(|o| {
                if o.status.success() {
                    Ok(())
                } else {
                    Err(String::from_utf8_lossy(&o.stderr).into_owned())
                }
            })
    };
    ctl("stop")?;
    std::thread::sleep(pause);
    Command::new("pg_ctlcluster")
        .args([version.as_str(), "main", "start"])
        .output()
        .map_err(|e| e.to_string())
        .and_then(|o| {
            if o.status.success() {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&o.stderr).into_owned())
            }
        })
}

/// Whether this process may stop and start the local PostgreSQL (root with `pg_ctlcluster`).
pub fn can_restart_postgres() -> bool {
    std::path::Path::new("/etc/postgresql").is_dir()
        && Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        && Command::new("pg_ctlcluster").arg("--help").output().is_ok()
}

/// A real nginx load balancer in front of the replicas: its configuration written to a temporary
/// folder, listening on a free loopback port, the replicas as one upstream group taken in turn.
/// `proxy_next_upstream error timeout` moves a request whose replica refuses the connection on to
/// the next one; a request already sent to a replica that then dies is not sent again (nginx never
/// replays a POST without `non_idempotent`), so the client sees that failure. `max_fails=0` keeps
/// nginx from marking a replica down: no passive health check hides anything.
pub struct Nginx {
    /// Where it listens.
    pub addr: SocketAddr,
    child: Child,
    dir: tempfile::TempDir,
}

impl Nginx {
    /// The nginx binary: `KEYHOLDER_NGINX`, else `nginx` on the PATH or in /usr/sbin.
    fn binary() -> Option<PathBuf> {
        if let Some(path) = std::env::var_os("KEYHOLDER_NGINX").filter(|p| !p.is_empty()) {
            return Some(PathBuf::from(path));
        }
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
            .map(|dir| dir.join("nginx"))
            .find(|candidate| candidate.is_file())
    }

    /// Starts one in front of `backends` and waits until it accepts connections.
    ///
    /// # Panics
    /// When nginx is not installed (CI installs the Debian package `nginx-light`): the test
    /// that needs it fails with that message rather than passing without it.
    pub async fn start(backends: &[SocketAddr]) -> Nginx {
        let bin = Self::binary().unwrap_or_else(|| {
            panic!(
                "nginx not found (neither KEYHOLDER_NGINX, nor nginx on the PATH or in /usr/sbin): \
                 install it (`apt-get install -y nginx-light`; .ci/run does) to run the replica \
                 kill test through a real load balancer"
            )
        });
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        let d = dir.path().display();
        let servers: String = backends
            .iter()
            .map(|b| format!("        server {b} max_fails=0;\n"))
            .collect();
        let config = format!(
            "{user}worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    upstream replicas {{
{servers}        keepalive 16;
    }}
    server {{
        listen {addr};
        location / {{
            proxy_pass http://replicas;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_next_upstream error timeout;
            proxy_connect_timeout 1s;
            proxy_read_timeout 10s;
        }}
    }}
}}
",
            // The temporary folder is the test user's (0700): workers run as that user.
            user = if root { "user root;\n" } else { "" },
        );
        std::fs::write(dir.path().join("nginx.conf"), config).unwrap();
        let mut child = Command::new(&bin)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let started = Instant::now();
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                if let Some(mut stderr) = child.stderr.take() {
                    use std::io::Read as _;
                    let _ = stderr.read_to_string(&mut err);
                }
                let log = std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default();
                panic!("nginx exited ({status}): {err} {log}");
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "nginx did not listen on {addr}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Nginx { addr, child, dir }
    }

    /// Its base URL.
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Its error log so far (what it said about the replicas).
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP relay on loopback in front of PostgreSQL that the test can freeze: frozen, it keeps
/// every connection open and accepts new ones but passes no byte either way, as a database host
/// lost without a reset (no RST, no FIN) looks to the keyholder.
pub struct PgRelay {
    /// Where the relay listens.
    pub addr: SocketAddr,
    state: tokio::sync::watch::Sender<RelayState>,
    /// Connections accepted so far (each one's number is its place in this count).
    accepted: Arc<std::sync::atomic::AtomicU64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

#[derive(Clone, Copy, Default)]
struct RelayState {
    frozen: bool,
    /// Connections numbered below this never pass a byte again.
    lost_below: u64,
}

impl PgRelay {
    /// Starts relaying to `target`, on a thread of its own (the tests block their runtime while
    /// an owner command runs, and that command's connection goes through the relay too).
    pub fn start(target: SocketAddr) -> PgRelay {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (state, watch) = tokio::sync::watch::channel(RelayState::default());
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let accepted = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let count = Arc::clone(&accepted);
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let inbound = tokio::select! {
                        accepted = listener.accept() => match accepted {
                            Ok((inbound, _)) => inbound,
                            Err(_) => return,
                        },
                        _ = &mut stopped => return,
                    };
                    let watch = watch.clone();
                    let number = count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    tokio::spawn(async move {
                        let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                            return;
                        };
                        let (ri, wi) = inbound.into_split();
                        let (ro, wo) = outbound.into_split();
                        tokio::join!(
                            relay_one_way(ri, wo, watch.clone(), number),
                            relay_one_way(ro, wi, watch, number)
                        );
                    });
                }
            });
        });
        PgRelay {
            addr,
            state,
            accepted,
            stop: Some(stop),
        }
    }

    /// Stops passing bytes (connections stay open).
    pub fn freeze(&self) {
        self.state.send_modify(|s| s.frozen = true);
    }

    /// Passes bytes again, those held meanwhile first.
    pub fn thaw(&self) {
        self.state.send_modify(|s| s.frozen = false);
    }

    /// The host is back as a new machine: new connections pass, the ones made before stay open and
    /// silent for good (their server side is gone).
    pub fn replace_host(&self) {
        let below = self.accepted.load(std::sync::atomic::Ordering::SeqCst);
        self.state.send_modify(|s| {
            s.frozen = false;
            s.lost_below = below;
        });
    }
}

impl Drop for PgRelay {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn relay_one_way(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut state: tokio::sync::watch::Receiver<RelayState>,
    number: u64,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let passes = move |s: &RelayState| !s.frozen && number >= s.lost_below;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if state.wait_for(passes).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        if state.wait_for(passes).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
