//! c10d key-value stores: the rendezvous of process groups, and a place for ranks to compare
//! small values (config hashes) or leave word (which rank was lost).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{context, Result};
use crate::ffi;

/// c10d's default store timeout (`c10d::Store::kDefaultTimeout`).
pub const DEFAULT_STORE_TIMEOUT: Duration = Duration::from_secs(300);

/// Where and how a TCPStore connects.
///
/// One process is the server; every process, the server included, is a client. Under
/// torchrun with `TORCHELASTIC_USE_AGENT_STORE=True` the elastic agent already serves the
/// store at MASTER_ADDR:MASTER_PORT, so every worker, rank 0 too, must be a client
/// ([`TcpStoreOptions::for_rank`] and [`torchelastic_agent_store`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpStoreOptions {
    /// Address or name of the server.
    pub host: String,
    /// Server port; 0 on a server picks a free one ([`Store::port`] tells which).
    pub port: u16,
    /// Number of processes that will use the store. With `wait_workers`, the server's
    /// constructor returns only once that many have connected.
    pub world_size: Option<usize>,
    /// Whether this process runs the server.
    pub is_server: bool,
    /// Count this process in and (on the server) wait for `world_size` of them. Every
    /// process must agree: a client that does not count itself in leaves the server waiting.
    pub wait_workers: bool,
    /// How long connecting, and every later `get`, may wait.
    pub timeout: Duration,
}

impl TcpStoreOptions {
    /// A client of the server at `host:port`.
    pub fn client(host: impl Into<String>, port: u16) -> Self {
        Self {
            host: host.into(),
            port,
            world_size: None,
            is_server: false,
            wait_workers: true,
            timeout: DEFAULT_STORE_TIMEOUT,
        }
    }

    /// The server at `host:port`, for `world_size` processes.
    pub fn server(host: impl Into<String>, port: u16, world_size: usize) -> Self {
        Self {
            world_size: Some(world_size),
            is_server: true,
            ..Self::client(host, port)
        }
    }

    /// What rank `rank` of `world_size` uses: rank 0 serves, unless an agent already does.
    pub fn for_rank(host: impl Into<String>, port: u16, rank: usize, world_size: usize, agent_store: bool) -> Self {
        Self {
            world_size: Some(world_size),
            is_server: rank == 0 && !agent_store,
            ..Self::client(host, port)
        }
    }
}

/// Whether torchrun's agent serves the store (`TORCHELASTIC_USE_AGENT_STORE=True`).
pub fn torchelastic_agent_store() -> bool {
    std::env::var("TORCHELASTIC_USE_AGENT_STORE").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
}

/// A c10d store (TCPStore, FileStore, or a PrefixStore over one). Cheap to clone; all clones
/// are one store.
#[derive(Clone)]
pub struct Store {
    handle: Arc<ffi::StoreHandle>,
    port: Option<u16>,
    description: Arc<str>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.description)
    }
}

impl Store {
    /// A TCPStore. As server it binds `host:port` (failing, e.g., if the port is in use); as
    /// client it retries connecting until `timeout`.
    pub fn tcp(options: &TcpStoreOptions) -> Result<Self> {
        let role = if options.is_server { "server" } else { "client" };
        let (handle, port) = context(
            ffi::tcp_store(
                &options.host,
                options.port,
                options.world_size,
                options.is_server,
                options.wait_workers,
                options.timeout,
            ),
            || format!("TCPStore {role} on {}:{}", options.host, options.port),
        )?;
        Ok(Self {
            handle: Arc::new(handle),
            port: Some(port),
            description: format!("TCPStore({}:{port}, {role})", options.host).into(),
        })
    }

    /// A FileStore: a file on a file system every process can reach (a local temp dir, or a
    /// shared one across machines). c10d removes the file when the last of `world_size`
    /// processes drops its store. `get` waits up to `timeout`.
    pub fn file(path: &Path, world_size: usize, timeout: Duration) -> Result<Self> {
        let shown = path.display().to_string();
        let handle = context(ffi::file_store(&shown, world_size, timeout), || {
            format!("FileStore at {shown}")
        })?;
        Ok(Self {
            handle: Arc::new(handle),
            port: None,
            description: format!("FileStore({shown})").into(),
        })
    }

    /// The same store seen through a PrefixStore: every key gets `prefix` and `/` in front,
    /// so process groups or runs sharing one server do not see each other's keys.
    pub fn with_prefix(&self, prefix: &str) -> Result<Self> {
        let handle = context(self.handle.prefixed(prefix), || {
            format!("PrefixStore {prefix:?} over {self:?}")
        })?;
        Ok(Self {
            handle: Arc::new(handle),
            port: self.port,
            description: format!("{}/{prefix}", self.description).into(),
        })
    }

    /// Sets `key` to `value` for every process.
    pub fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        context(self.handle.set(key, value), || format!("{self:?}: set {key:?}"))
    }

    /// The value of `key`, waiting for some process to set it up to the store's timeout.
    pub fn get(&self, key: &str) -> Result<Vec<u8>> {
        context(self.handle.get(key), || format!("{self:?}: get {key:?}"))
    }

    /// Whether some process has set `key`, answered at once (`get` waits for it).
    pub fn check(&self, key: &str) -> Result<bool> {
        context(self.handle.check(key), || format!("{self:?}: check {key:?}"))
    }

    /// The TCP port (the one bound when 0 was asked); `None` for a FileStore.
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    pub(crate) fn handle(&self) -> &ffi::StoreHandle {
        &self.handle
    }
}
