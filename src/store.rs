//! The object store under every durable fact of a run (DESIGN §3): a local folder by default,
//! any S3-compatible store for real runs, both through `object_store`.
//!
//! The rest of skytrain is synchronous (training loops, CLI commands), so this wraps the async
//! `object_store` API behind a small blocking interface driven by a private Tokio runtime.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use sha2::{Digest, Sha256};

/// Errors from the store, always naming the object and the store they concern.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid store location `{url}`: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("no store at `{url}`: the folder does not exist")]
    NoStore { url: String },
    #[error(
        "store `{url}`: no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for \
         a non-AWS store); AWS_SKIP_SIGNATURE=true for a public bucket, or SKYTRAIN_S3_INSTANCE_METADATA=1 to let \
         the AWS client ask the EC2 instance-metadata address"
    )]
    NoCredentials { url: String },
    #[error("store {store}: bucket `{bucket}` does not exist")]
    NoSuchBucket { store: String, bucket: String },
    #[error(
        "store {store} does not honour create-only writes (a second conditional PUT of `{key}` succeeded): \
         the round protocol needs them so that two coordinators cannot both commit a round; use a store \
         that supports If-None-Match (AWS S3, R2, MinIO, SeaweedFS)"
    )]
    NoCreateOnly { store: String, key: String },
    #[error("object `{key}` not found in store {store}")]
    NotFound { store: String, key: String },
    #[error("object `{key}` already exists in store {store}")]
    AlreadyExists { store: String, key: String },
    #[error("store {store}, object `{key}`: {source}")]
    Backend {
        store: String,
        key: String,
        #[source]
        source: object_store::Error,
    },
    #[error("store {store}, object `{key}`: sha256 {actual} does not match the expected {expected}")]
    HashMismatch { store: String, key: String, expected: String, actual: String },
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// A run's store: an object store plus the prefix the run lives under.
#[derive(Clone)]
pub struct Store {
    url: String,
    inner: Arc<dyn ObjectStore>,
    runtime: Arc<tokio::runtime::Runtime>,
    /// Attempts per operation against transient backend errors (network, 5xx).
    retries: u32,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("url", &self.url).finish()
    }
}

/// Where a store lives, parsed once from what the user typed: the one parser every command uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A local folder (a plain path or `file:///abs/path`).
    Local(std::path::PathBuf),
    /// `s3://bucket/prefix` on any S3-compatible store.
    S3 { bucket: String, prefix: String },
    /// A read-only web server (`http(s)://…`), for image URLs in metadata tables.
    Http(String),
}

/// The schemes `Location::parse` accepts, for error messages.
pub const SCHEMES: &str = "a local path, file:///abs/path, s3://bucket/prefix, http(s)://host/path (read-only)";

impl Location {
    /// Parses a store location. Schemes are case-insensitive (RFC 3986); anything that looks like a
    /// URL with another scheme, or a malformed one (`s3:/x`), is refused rather than taken for a
    /// local folder of that name.
    pub fn parse(location: &str) -> Result<Location> {
        let bad = |reason: String| StoreError::BadUrl { url: location.to_string(), reason };
        if location.trim().is_empty() {
            return Err(bad("empty location".into()));
        }
        let scheme_len = location
            .find(':')
            .filter(|&i| i > 1 && location[..i].chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)))
            .filter(|_| location.as_bytes()[0].is_ascii_alphabetic());
        let Some(i) = scheme_len else {
            return Ok(Location::Local(location.into()));
        };
        let scheme = location[..i].to_ascii_lowercase();
        let Some(rest) = location[i + 1..].strip_prefix("//") else {
            return Err(bad(format!("`{scheme}:` without `//`; supported: {SCHEMES}")));
        };
        match scheme.as_str() {
            "file" => {
                if !rest.starts_with('/') {
                    return Err(bad("file:// needs an absolute path (file:///abs/path)".into()));
                }
                Ok(Location::Local(rest.into()))
            }
            "s3" => {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(bad("no bucket name (s3://bucket/prefix)".into()));
                }
                Ok(Location::S3 { bucket: bucket.into(), prefix: prefix.trim_matches('/').into() })
            }
            "http" | "https" => Ok(Location::Http(format!("{scheme}://{rest}"))),
            other => Err(bad(format!("scheme `{other}://` is not supported; supported: {SCHEMES}"))),
        }
    }

    /// Whether a relative spelling (no scheme, no leading `/`) was given: `[data] shards` reads it
    /// as a prefix inside the run's own store.
    pub fn is_relative(location: &str) -> bool {
        matches!(Location::parse(location), Ok(Location::Local(p)) if p.is_relative())
    }
}

impl Store {
    /// Opens an existing store at `location` (see [`Location::parse`]); never creates anything, so
    /// read-only commands leave no trace. A missing local folder is an error naming it.
    ///
    /// For S3 the usual variables apply (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
    /// `AWS_ENDPOINT_URL` for non-AWS stores, `AWS_ALLOW_HTTP=true` for a plain-HTTP endpoint).
    pub fn open(location: &str) -> Result<Store> {
        Self::open_with(location, false)
    }

    /// Opens the store at `location`, creating a local folder if there is none (for commands that
    /// write: `run init`, `curate`, `encode`, `demo`).
    pub fn create(location: &str) -> Result<Store> {
        Self::open_with(location, true)
    }

    fn open_with(location: &str, create: bool) -> Result<Store> {
        let bad = |reason: &str| StoreError::BadUrl { url: location.to_string(), reason: reason.into() };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| bad(&format!("cannot start I/O runtime: {e}")))?;
        let (inner, url): (Arc<dyn ObjectStore>, String) = match Location::parse(location)? {
            Location::S3 { bucket, prefix } => Self::open_s3(location, &bucket, &prefix)?,
            Location::Http(url) => Self::open_http(&url)?,
            Location::Local(path) => {
                if create {
                    std::fs::create_dir_all(&path).map_err(|e| bad(&format!("cannot create folder: {e}")))?;
                } else if !path.is_dir() {
                    return Err(StoreError::NoStore { url: location.into() });
                }
                let abs = std::fs::canonicalize(&path).map_err(|e| bad(&e.to_string()))?;
                let fs = object_store::local::LocalFileSystem::new_with_prefix(&abs)
                    .map_err(|e| bad(&e.to_string()))?
                    .with_automatic_cleanup(true);
                (Arc::new(fs), format!("file://{}", abs.display()))
            }
        };
        Ok(Store { url, inner, runtime: Arc::new(runtime), retries: 5 })
    }

    /// S3 with the credentials the environment names. Without them object_store would ask the EC2
    /// instance-metadata address, which the user never named: refused unless they opt in.
    #[cfg(feature = "s3")]
    fn open_s3(location: &str, bucket: &str, prefix: &str) -> Result<(Arc<dyn ObjectStore>, String)> {
        let set = |v: &str| std::env::var(v).is_ok_and(|x| !x.is_empty());
        let anonymous = std::env::var("AWS_SKIP_SIGNATURE").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
        let metadata_opt_in = std::env::var("SKYTRAIN_S3_INSTANCE_METADATA").is_ok_and(|v| v == "1");
        let keys = set("AWS_ACCESS_KEY_ID") && set("AWS_SECRET_ACCESS_KEY");
        if !(keys || anonymous || metadata_opt_in) {
            return Err(StoreError::NoCredentials { url: location.into() });
        }
        let mut builder = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
        if !set("AWS_REGION") && !set("AWS_DEFAULT_REGION") {
            builder = builder.with_region("us-east-1");
        }
        let s3 = builder.build().map_err(|e| StoreError::BadUrl { url: location.into(), reason: e.to_string() })?;
        let inner: Arc<dyn ObjectStore> =
            if prefix.is_empty() { Arc::new(s3) } else { Arc::new(PrefixStore::new(s3, prefix)) };
        Ok((inner, location.trim_end_matches('/').to_string()))
    }

    /// A read-only view of a web server (for image URLs in metadata tables).
    #[cfg(feature = "s3")]
    fn open_http(location: &str) -> Result<(Arc<dyn ObjectStore>, String)> {
        // Plain http:// is what the location asks for (object_store refuses it unless told).
        let options = object_store::ClientOptions::new().with_allow_http(location.starts_with("http://"));
        let http = object_store::http::HttpBuilder::new()
            .with_url(location)
            .with_client_options(options)
            .build()
            .map_err(|e| StoreError::BadUrl { url: location.into(), reason: e.to_string() })?;
        Ok((Arc::new(http), location.trim_end_matches('/').to_string()))
    }

    #[cfg(not(feature = "s3"))]
    fn open_http(location: &str) -> Result<(Arc<dyn ObjectStore>, String)> {
        Err(StoreError::BadUrl { url: location.into(), reason: "built without the `s3` feature (HTTP)".into() })
    }

    #[cfg(not(feature = "s3"))]
    fn open_s3(location: &str, _bucket: &str, _prefix: &str) -> Result<(Arc<dyn ObjectStore>, String)> {
        Err(StoreError::BadUrl { url: location.into(), reason: "built without the `s3` feature".into() })
    }

    /// The store's location as given to `open` (normalised).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A view of this store under `prefix`, sharing the connection.
    pub fn sub(&self, prefix: &str) -> Store {
        let prefix = prefix.trim_matches('/');
        Store {
            url: format!("{}/{}", self.url, prefix),
            inner: Arc::new(PrefixStore::new(self.inner.clone(), prefix)),
            runtime: self.runtime.clone(),
            retries: self.retries,
        }
    }

    fn backend(&self, key: &str, source: object_store::Error) -> StoreError {
        if let Some(bucket) = missing_bucket(&source) {
            return StoreError::NoSuchBucket { store: self.url.clone(), bucket };
        }
        match source {
            object_store::Error::NotFound { .. } => StoreError::NotFound { store: self.url.clone(), key: key.into() },
            object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. } => {
                StoreError::AlreadyExists { store: self.url.clone(), key: key.into() }
            }
            source => StoreError::Backend { store: self.url.clone(), key: key.into(), source },
        }
    }

    /// Runs `op` with retries and exponential backoff on errors that may be transient.
    fn with_retries<T, F, Fut>(&self, key: &str, op: F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = object_store::Result<T>>,
    {
        let mut delay = Duration::from_millis(200);
        let mut attempt = 0;
        loop {
            match self.runtime.block_on(op()) {
                Ok(v) => return Ok(v),
                Err(e) => {
                    let permanent = matches!(
                        e,
                        object_store::Error::NotFound { .. }
                            | object_store::Error::AlreadyExists { .. }
                            | object_store::Error::Precondition { .. }
                            | object_store::Error::NotImplemented { .. }
                            | object_store::Error::InvalidPath { .. }
                            | object_store::Error::PermissionDenied { .. }
                            | object_store::Error::Unauthenticated { .. }
                    );
                    let permanent = permanent || missing_bucket(&e).is_some();
                    attempt += 1;
                    if permanent || attempt >= self.retries {
                        return Err(self.backend(key, e));
                    }
                    tracing::warn!(store = %self.url, key, attempt, "store error, retrying in {delay:?}: {e}");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    /// Writes `data` at `key`, replacing any earlier object atomically (readers see old or new).
    pub fn put(&self, key: &str, data: impl Into<Bytes>) -> Result<()> {
        let data: Bytes = data.into();
        let path = ObjectPath::from(key);
        self.with_retries(key, || self.inner.put(&path, PutPayload::from_bytes(data.clone())))?;
        Ok(())
    }

    /// Writes `data` at `key` only if nothing is there yet: the store decides, so of two writers
    /// racing for the same key exactly one succeeds and the other gets `AlreadyExists`.
    pub fn put_create(&self, key: &str, data: impl Into<Bytes>) -> Result<()> {
        let data: Bytes = data.into();
        let path = ObjectPath::from(key);
        let opts = || PutOptions { mode: PutMode::Create, ..Default::default() };
        self.with_retries(key, || self.inner.put_opts(&path, PutPayload::from_bytes(data.clone()), opts()))?;
        Ok(())
    }

    /// Reads the whole object at `key`.
    pub fn get(&self, key: &str) -> Result<Bytes> {
        let path = ObjectPath::from(key);
        self.with_retries(key, || async { self.inner.get(&path).await?.bytes().await })
    }

    /// Reads `key` and checks it against the sha256 recorded by whoever pointed to it.
    pub fn get_verified(&self, key: &str, sha256: &str) -> Result<Bytes> {
        let data = self.get(key)?;
        let actual = sha256_hex(&data);
        if actual != sha256 {
            return Err(StoreError::HashMismatch {
                store: self.url.clone(),
                key: key.into(),
                expected: sha256.into(),
                actual,
            });
        }
        Ok(data)
    }

    /// Reads `key` if it exists.
    pub fn get_opt(&self, key: &str) -> Result<Option<Bytes>> {
        match self.get(key) {
            Ok(b) => Ok(Some(b)),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn exists(&self, key: &str) -> Result<bool> {
        let path = ObjectPath::from(key);
        match self.with_retries(key, || self.inner.head(&path)) {
            Ok(_) => Ok(true),
            Err(StoreError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// When the object at `key` was last written, Unix milliseconds (the store's clock).
    pub fn modified_ms(&self, key: &str) -> Result<u64> {
        let path = ObjectPath::from(key);
        let meta = self.with_retries(key, || self.inner.head(&path))?;
        Ok(meta.last_modified.timestamp_millis().max(0) as u64)
    }

    /// Keys under `prefix` (recursively), sorted.
    pub fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let path = ObjectPath::from(prefix);
        let mut keys: Vec<String> = self.with_retries(prefix, || async {
            let metas: Vec<_> = self.inner.list(Some(&path)).try_collect().await?;
            Ok(metas.into_iter().map(|m| m.location.to_string()).collect())
        })?;
        keys.sort();
        Ok(keys)
    }

    /// Checks that the store refuses a second create-only write of the same key, which commits and
    /// plans rely on, by writing a probe object twice (then deleting it). The key is unique per
    /// call: process, time and a counter (two threads of one process can probe in the same µs).
    pub fn probe_create_only(&self) -> Result<()> {
        static PROBES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let micros = chrono::Utc::now().timestamp_micros();
        let key = format!("probes/create-only-{}-{micros}-{n}.json", std::process::id());
        self.put_create(&key, "1")?;
        let second = self.put_create(&key, "2");
        self.delete(&key)?;
        match second {
            Err(StoreError::AlreadyExists { .. }) => Ok(()),
            Ok(()) => Err(StoreError::NoCreateOnly { store: self.url.clone(), key }),
            Err(e) => Err(e),
        }
    }

    pub fn delete(&self, key: &str) -> Result<()> {
        let path = ObjectPath::from(key);
        match self.with_retries(key, || self.inner.delete(&path)) {
            Ok(()) | Err(StoreError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// The bucket an S3 error says does not exist (its `NoSuchBucket` code), if that is what it says.
fn missing_bucket(e: &object_store::Error) -> Option<String> {
    let text = format!("{e:?}");
    if !text.contains("NoSuchBucket") {
        return None;
    }
    let after = text.split("<BucketName>").nth(1).and_then(|t| t.split('<').next());
    Some(after.unwrap_or("(named in the URL)").to_string())
}

/// Lowercase hex sha256, the hash every record uses to point at an object.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_put_get_create_list() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().to_str().unwrap()).unwrap();
        store.put("a/b.json", "hello").unwrap();
        assert_eq!(&store.get("a/b.json").unwrap()[..], b"hello");
        store.put_create("a/c.json", "one").unwrap();
        assert!(matches!(store.put_create("a/c.json", "two"), Err(StoreError::AlreadyExists { .. })));
        assert_eq!(&store.get("a/c.json").unwrap()[..], b"one");
        assert_eq!(store.list("a").unwrap(), vec!["a/b.json", "a/c.json"]);
        assert!(matches!(store.get("nope"), Err(StoreError::NotFound { .. })));
        let sub = store.sub("a");
        assert_eq!(&sub.get("b.json").unwrap()[..], b"hello");
        let h = sha256_hex(b"hello");
        assert!(store.get_verified("a/b.json", &h).is_ok());
        assert!(matches!(store.get_verified("a/c.json", &h), Err(StoreError::HashMismatch { .. })));
        store.probe_create_only().unwrap();
        assert!(store.list("probes").unwrap().is_empty(), "the probe is deleted");
    }

    #[test]
    fn locations_parse_once_and_unknown_schemes_are_refused() {
        assert_eq!(Location::parse("runs/a").unwrap(), Location::Local("runs/a".into()));
        assert_eq!(Location::parse("file:///tmp/x").unwrap(), Location::Local("/tmp/x".into()));
        assert_eq!(Location::parse("S3://b/p/q/").unwrap(), Location::S3 { bucket: "b".into(), prefix: "p/q".into() });
        for bad in ["gs://b/r", "az://c/r", "ftp://h/x", "s3:/b/r", "s3://", "file://rel", "", "gs:bucket"] {
            let err = Location::parse(bad).unwrap_err().to_string();
            assert!(err.contains("invalid store location"), "{bad}: {err}");
            if bad.contains("://") && !bad.starts_with("s3") && !bad.starts_with("file") {
                assert!(err.contains(SCHEMES), "{bad}: {err}");
            }
        }
        assert!(Location::is_relative("data/enc") && !Location::is_relative("/data/enc"));
        assert!(!Location::is_relative("s3://b/enc"));
        // Opening never creates: a missing folder is named, and nothing appears.
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let err = Store::open(missing.to_str().unwrap()).unwrap_err();
        assert!(matches!(err, StoreError::NoStore { .. }), "{err}");
        assert!(!missing.exists());
        Store::create(missing.to_str().unwrap()).unwrap();
        assert!(missing.is_dir());
    }
}
