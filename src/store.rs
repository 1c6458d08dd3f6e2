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

impl Store {
    /// Opens `location`: a local path, `file:///abs/path`, or `s3://bucket/prefix`.
    ///
    /// For S3 the usual variables apply (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
    /// `AWS_ENDPOINT_URL` for non-AWS stores, `AWS_ALLOW_HTTP=true` for a plain-HTTP endpoint).
    pub fn open(location: &str) -> Result<Store> {
        let bad = |reason: &str| StoreError::BadUrl { url: location.to_string(), reason: reason.into() };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| bad(&format!("cannot start I/O runtime: {e}")))?;
        let (inner, url): (Arc<dyn ObjectStore>, String) = if let Some(rest) = location.strip_prefix("s3://") {
            Self::open_s3(location, rest)?
        } else if location.starts_with("http://") || location.starts_with("https://") {
            Self::open_http(location)?
        } else {
            let path = location.strip_prefix("file://").unwrap_or(location);
            if path.is_empty() {
                return Err(bad("empty path"));
            }
            std::fs::create_dir_all(path).map_err(|e| bad(&format!("cannot create folder: {e}")))?;
            let abs = std::fs::canonicalize(path).map_err(|e| bad(&e.to_string()))?;
            let fs = object_store::local::LocalFileSystem::new_with_prefix(&abs)
                .map_err(|e| bad(&e.to_string()))?
                .with_automatic_cleanup(true);
            (Arc::new(fs), format!("file://{}", abs.display()))
        };
        Ok(Store { url, inner, runtime: Arc::new(runtime), retries: 5 })
    }

    #[cfg(feature = "s3")]
    fn open_s3(location: &str, rest: &str) -> Result<(Arc<dyn ObjectStore>, String)> {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(StoreError::BadUrl { url: location.into(), reason: "no bucket name".into() });
        }
        let mut builder = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
        if std::env::var("AWS_REGION").is_err() && std::env::var("AWS_DEFAULT_REGION").is_err() {
            builder = builder.with_region("us-east-1");
        }
        let s3 = builder.build().map_err(|e| StoreError::BadUrl { url: location.into(), reason: e.to_string() })?;
        let prefix = prefix.trim_matches('/');
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
    fn open_s3(location: &str, _rest: &str) -> Result<(Arc<dyn ObjectStore>, String)> {
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

    pub fn delete(&self, key: &str) -> Result<()> {
        let path = ObjectPath::from(key);
        match self.with_retries(key, || self.inner.delete(&path)) {
            Ok(()) | Err(StoreError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
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
    }
}
