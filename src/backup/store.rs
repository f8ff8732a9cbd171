//! Where backups are kept: a filesystem path (a mounted PVC) or an
//! S3-compatible bucket, through the `object_store` crate.
//!
//! Takes the store URL (`file:///var/backups/tenants`,
//! `s3://bucket/prefix`) and, for S3, an endpoint, path-style addressing and
//! the standard AWS environment variables for credentials. Gives a
//! [`Store`] that names every object of a tenant under
//! `<prefix>/tenants/<uid>/`. Side effects: creates the directory of a
//! filesystem store; network calls to the bucket.

use std::sync::Arc;

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

/// How to reach the backup store (from flags or the environment).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreConfig {
    /// `file:///abs/path` or `s3://bucket[/prefix]`.
    pub url: String,
    /// S3 endpoint URL (MinIO, Ceph, moto ...); AWS's endpoint when None.
    pub s3_endpoint: Option<String>,
    /// Path-style requests (`endpoint/bucket/key`) instead of
    /// virtual-hosted-style (`bucket.endpoint/key`).
    pub s3_path_style: bool,
    /// The bucket's region (default: AWS_REGION, else us-east-1).
    pub s3_region: Option<String>,
}

/// Why the store could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("backup store URL {url:?}: {why}")]
    BadUrl { url: String, why: String },
    #[error("backup store: {0}")]
    ObjectStore(#[from] object_store::Error),
    #[error("backup store: creating {path}: {source}")]
    CreateDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// An open backup store.
#[derive(Clone, Debug)]
pub struct Store {
    pub(crate) inner: Arc<dyn ObjectStore>,
    prefix: Path,
    url: String,
    /// The directory of a filesystem store.
    local: Option<std::path::PathBuf>,
}

impl Store {
    /// Opens the store `cfg` names.
    pub fn open(cfg: &StoreConfig) -> Result<Store, StoreError> {
        let bad = |why: &str| StoreError::BadUrl {
            url: cfg.url.clone(),
            why: why.to_owned(),
        };
        let url = url::Url::parse(&cfg.url).map_err(|e| bad(&e.to_string()))?;
        match url.scheme() {
            "file" => {
                let dir = url.to_file_path().map_err(|_| bad("not an absolute file path"))?;
                std::fs::create_dir_all(&dir).map_err(|source| StoreError::CreateDir {
                    path: dir.display().to_string(),
                    source,
                })?;
                let fs = object_store::local::LocalFileSystem::new_with_prefix(&dir)?;
                Ok(Store {
                    inner: Arc::new(fs),
                    prefix: Path::default(),
                    url: cfg.url.clone(),
                    local: Some(dir),
                })
            }
            "s3" => {
                let bucket = url
                    .host_str()
                    .filter(|b| !b.is_empty())
                    .ok_or_else(|| bad("no bucket"))?;
                // reqwest is built without a default crypto provider: use
                // ring, like every other TLS client of the operator.
                let _ = rustls::crypto::ring::default_provider().install_default();
                let mut b = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_virtual_hosted_style_request(!cfg.s3_path_style);
                if let Some(region) = &cfg.s3_region {
                    b = b.with_region(region);
                }
                if let Some(ep) = &cfg.s3_endpoint {
                    b = b.with_endpoint(ep).with_allow_http(ep.starts_with("http://"));
                }
                let prefix = Path::from(url.path().trim_matches('/'));
                Ok(Store {
                    inner: Arc::new(b.build()?),
                    prefix,
                    url: cfg.url.clone(),
                    local: None,
                })
            }
            _ => Err(bad("the scheme must be file:// or s3://")),
        }
    }

    /// The underlying object store.
    pub fn object_store(&self) -> Arc<dyn ObjectStore> {
        self.inner.clone()
    }

    /// The URL the store was opened with (no credentials in it).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `<prefix>/tenants/<uid>`.
    pub fn tenant_dir(&self, uid: &str) -> Path {
        self.prefix.clone().join("tenants").join(uid)
    }

    /// The tenant's directory on disk, for a filesystem store (where
    /// uploads that never completed leave staging files that listing does
    /// not show).
    pub fn local_tenant_dir(&self, uid: &str) -> Option<std::path::PathBuf> {
        self.local.as_ref().map(|d| d.join("tenants").join(uid))
    }

    /// The dump object of backup `id`.
    pub fn dump_path(&self, uid: &str, id: &str) -> Path {
        self.tenant_dir(uid).join(format!("{id}.dump.enc"))
    }

    /// The manifest object of backup `id`.
    pub fn manifest_path(&self, uid: &str, id: &str) -> Path {
        self.tenant_dir(uid).join(format!("{id}.manifest.json"))
    }

    /// Every object under the tenant's prefix.
    pub async fn list_tenant(&self, uid: &str) -> Result<Vec<object_store::ObjectMeta>, StoreError> {
        let dir = self.tenant_dir(uid);
        match self.inner.list(Some(&dir)).try_collect().await {
            Ok(v) => Ok(v),
            Err(object_store::Error::NotFound { .. }) => Ok(Vec::new()),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes every object under the tenant's prefix; returns how many.
    pub async fn delete_tenant(&self, uid: &str) -> Result<usize, StoreError> {
        let objects = self.list_tenant(uid).await?;
        for o in &objects {
            self.delete_quiet(&o.location).await?;
        }
        Ok(objects.len())
    }

    /// Deletes one object; a missing one is not an error.
    pub async fn delete_quiet(&self, path: &Path) -> Result<(), StoreError> {
        match self.inner.delete(path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_objects_live_under_their_uid() {
        let dir = std::env::temp_dir().join(format!("store-test-{}", std::process::id()));
        let s = Store::open(&StoreConfig {
            url: format!("file://{}", dir.display()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            s.dump_path("u-1", "20260101T000000.000Z").as_ref(),
            "tenants/u-1/20260101T000000.000Z.dump.enc"
        );
        assert_eq!(s.manifest_path("u-1", "x").as_ref(), "tenants/u-1/x.manifest.json");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn s3_url_keeps_its_prefix() {
        let s = Store::open(&StoreConfig {
            url: "s3://bkt/some/prefix/".into(),
            s3_endpoint: Some("http://127.0.0.1:9".into()),
            s3_path_style: true,
            s3_region: Some("us-east-1".into()),
        })
        .unwrap();
        assert_eq!(s.dump_path("u", "i").as_ref(), "some/prefix/tenants/u/i.dump.enc");
    }

    #[test]
    fn other_schemes_are_refused() {
        assert!(Store::open(&StoreConfig {
            url: "gs://x".into(),
            ..Default::default()
        })
        .is_err());
        assert!(Store::open(&StoreConfig {
            url: "s3:///nobucket".into(),
            ..Default::default()
        })
        .is_err());
    }
}
