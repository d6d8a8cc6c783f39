//! A node's home directory: where its identity and its store live, and how it is created.
//!
//! Layout: `node.key` (the node's ed25519 identity: libp2p peer id and answer signatures;
//! mode 0600) and `store/` (the sled database). `init` creates both, records the dataset
//! schema and a fresh pseudonymisation secret; it never overwrites an existing node.

use std::path::{Path, PathBuf};

use libp2p::PeerId;
use renkei_protocol::SecretKey;

use crate::error::NodeError;
use crate::store::NodeStore;

const IDENTITY_FILE: &str = "node.key";
const STORE_DIR: &str = "store";

/// Meta key owned by this module.
pub(crate) const META_PSEUDONYM_SECRET: &[u8] = b"pseudonym-secret";

/// An initialised node directory.
#[derive(Debug, Clone)]
pub struct NodeHome {
    dir: PathBuf,
}

impl NodeHome {
    /// Creates a node in `dir` (created if missing) with the default `covid19` schema.
    pub fn init(dir: &Path) -> Result<(Self, PeerId), NodeError> {
        Self::init_with_schema(dir, renkei_engine::schema::COVID19)
    }

    /// Creates a node in `dir` for the dataset schema given as TOML text: identity key,
    /// store, pseudonymisation secret.
    pub fn init_with_schema(dir: &Path, schema: &str) -> Result<(Self, PeerId), NodeError> {
        renkei_engine::schema::DatasetSchema::from_toml(schema)?;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| NodeError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        // The node's key, store and control socket: for the node's user only.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io(dir))?;
        }
        let home = Self {
            dir: dir.to_path_buf(),
        };
        // A store without a key file is an interrupted init: finish it. A key without a
        // store is a node that lost its store: never a fresh start under the same identity.
        if home.identity_path().exists() {
            return Err(if home.store_path().exists() {
                NodeError::AlreadyInitialised {
                    dir: dir.to_path_buf(),
                }
            } else {
                NodeError::StoreMissing {
                    dir: dir.to_path_buf(),
                }
            });
        }
        let key = SecretKey::generate()?;
        let store = crate::store::open(&home.store_path())?;
        store
            .meta
            .insert(crate::store::META_SCHEMA, schema.as_bytes())?;
        if store.meta.get(META_PSEUDONYM_SECRET)?.is_none() {
            let mut secret = [0u8; 32];
            getrandom::fill(&mut secret)
                .map_err(|e| renkei_protocol::KeyError::Randomness(e.to_string()))?;
            store.meta.insert(META_PSEUDONYM_SECRET, &secret[..])?;
            store.flush()?;
        }
        drop(store);
        // The key file is written last: its presence marks a complete initialisation.
        key.write_file(&home.identity_path())?;
        let peer_id = key.public_key().to_peer_id()?;
        Ok((home, peer_id))
    }

    /// An existing node directory.
    pub fn open(dir: &Path) -> Result<Self, NodeError> {
        let home = Self {
            dir: dir.to_path_buf(),
        };
        match (home.identity_path().exists(), home.store_path().exists()) {
            (true, true) => {}
            (true, false) => {
                return Err(NodeError::StoreMissing {
                    dir: dir.to_path_buf(),
                });
            }
            (false, _) => {
                return Err(NodeError::NotInitialised {
                    dir: dir.to_path_buf(),
                });
            }
        }
        Ok(home)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn identity_path(&self) -> PathBuf {
        self.dir.join(IDENTITY_FILE)
    }

    fn store_path(&self) -> PathBuf {
        self.dir.join(STORE_DIR)
    }

    pub fn identity(&self) -> Result<SecretKey, NodeError> {
        Ok(SecretKey::read_file(&self.identity_path())?)
    }

    pub fn peer_id(&self) -> Result<PeerId, NodeError> {
        Ok(self.identity()?.public_key().to_peer_id()?)
    }

    pub fn open_store(&self) -> Result<NodeStore, NodeError> {
        crate::store::open(&self.store_path())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_without_its_store_is_the_same_problem_to_init_and_open() {
        let dir = tempfile::tempdir().unwrap();
        NodeHome::init(dir.path()).unwrap();
        std::fs::remove_dir_all(dir.path().join(STORE_DIR)).unwrap();
        assert!(matches!(
            NodeHome::init(dir.path()),
            Err(NodeError::StoreMissing { .. })
        ));
        assert!(matches!(
            NodeHome::open(dir.path()),
            Err(NodeError::StoreMissing { .. })
        ));
    }

    #[test]
    fn init_creates_a_node_once() {
        let dir = tempfile::tempdir().unwrap();
        let (home, peer) = NodeHome::init(dir.path()).unwrap();
        assert_eq!(home.peer_id().unwrap(), peer);
        assert!(matches!(
            NodeHome::init(dir.path()),
            Err(NodeError::AlreadyInitialised { .. })
        ));
        let store = home.open_store().unwrap();
        assert_eq!(
            crate::ingest::pseudonym::pseudonym_secret(&store)
                .unwrap()
                .len(),
            32
        );
    }

    #[test]
    fn an_uninitialised_directory_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = NodeHome::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("renkei-node init"), "{err}");
    }
}
