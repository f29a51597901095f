//! The Raft groups this node hosts, opened, stopped and destroyed while the
//! node runs.
//!
//! Each hosted group is one replica, with its own directory under
//! `<data_dir>/groups/`: `<group>` for a replica of incarnation 0 (what a
//! static cluster's first start creates; the layout before replica ids
//! existed) and `<group>.<incarnation>` for a replica created on a running
//! cluster. A node hosts at most one replica of a group.
//!
//! A replica is created empty only where the caller says it may be: at a
//! static cluster's first start, or as the learner a move operator adds.
//! A replica whose directory is gone is never re-created under its id (it
//! may have voted; see [`quiver_raft::ReplicaId`]): `groups/HOSTED` records,
//! per group, the highest incarnation this node ever hosted, fsynced before
//! a replica directory is created, and a replica at or below it is never
//! created again, whatever a (possibly stale) cluster map says. A split
//! child's directory is built whole (staged, then renamed) by its parent's
//! apply and recorded when first opened: until then no Raft instance ran
//! it, so it cannot have voted. Destroying
//! a replica renames its directory into `groups/.trash/` (so a crash midway
//! leaves no half-deleted replica that could be opened again) and deletes
//! it there; `.trash` is emptied at start.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use quiver_engine::StoreOptions;
use quiver_engine::durable::sync_dir;
use quiver_engine::seglog::LogOptions;
use quiver_raft::{
    ApplyObserver, GroupId, LogStore, METADATA_GROUP, Raft, ReplicaId, StateMachine,
};

use super::ClusterError;
use super::hibernate::Pulse;
use super::network::{GroupNetwork, PeerClients};

/// The directory holding every replica's directory.
pub const GROUPS_DIR: &str = "groups";
/// Where destroyed replicas wait for deletion.
const TRASH_DIR: &str = ".trash";
/// The highest incarnation hosted per group (see the module doc).
const HOSTED_FILE: &str = "HOSTED";
/// Largest `HOSTED` file read.
const HOSTED_FILE_BYTES_MAX: u64 = 16 << 20;

/// One group replica hosted here.
pub struct Group {
    /// The group.
    pub group: GroupId,
    /// This replica's id in the group.
    pub replica: ReplicaId,
    /// Its Raft handle.
    pub raft: Raft,
    /// Its state machine (the live store).
    pub state: StateMachine,
    /// Its log.
    pub log: LogStore,
    /// Its activity and hibernation state.
    pub pulse: Pulse,
    /// The last term in which this replica, as leader, started a handover
    /// (0: never): its lease for that term is void (see `transfer`).
    pub(super) handed_over_term: std::sync::atomic::AtomicU64,
    /// While this replica, as leader in the given term, has a split in
    /// flight that its store (at the given range version) has not applied:
    /// no lease reads (the new shard may take writes before this leader
    /// applies the split).
    pub(super) splitting: parking_lot::Mutex<Option<(u64, u64)>>,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("group", &self.group)
            .field("replica", &self.replica)
            .finish_non_exhaustive()
    }
}

/// What opening a replica needs.
pub struct GroupFactory {
    /// `<data_dir>/groups`.
    pub root: PathBuf,
    /// openraft's configuration, shared by every group.
    pub raft_config: Arc<openraft::Config>,
    /// Log options.
    pub log_options: LogOptions,
    /// The most log a shard keeps for change-stream consumers.
    pub log_hold_bytes_max: u64,
    /// Store options (the node's shared block cache and registry).
    pub store: StoreOptions,
    /// Cache coherence.
    pub observer: Arc<dyn ApplyObserver>,
    /// Peer channels.
    pub clients: Arc<PeerClients>,
    /// Where split children are announced (the cluster opens them).
    pub splits: tokio::sync::mpsc::Sender<SplitEvent>,
    /// The highest incarnation hosted per group.
    pub hosted: Arc<HostedLedger>,
}

/// `groups/HOSTED`: per group, the highest incarnation this node ever
/// hosted (see the module doc). Checked and written on blocking threads.
#[derive(Debug)]
pub struct HostedLedger {
    root: PathBuf,
    hosted: parking_lot::Mutex<BTreeMap<GroupId, u32>>,
}

impl HostedLedger {
    /// The ledger of `root` (`<data_dir>/groups`), read from disk (absent:
    /// nothing hosted yet).
    pub fn load(root: &Path) -> Result<HostedLedger, ClusterError> {
        let path = root.join(HOSTED_FILE);
        let hosted = match std::fs::metadata(&path) {
            Ok(meta) if meta.len() > HOSTED_FILE_BYTES_MAX => {
                return Err(start_error(&path, std::io::Error::other("too large")));
            }
            Ok(_) => {
                let bytes = std::fs::read(&path).map_err(|e| start_error(&path, e))?;
                serde_json::from_slice(&bytes)
                    .map_err(|e| start_error(&path, std::io::Error::other(e)))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(start_error(&path, e)),
        };
        Ok(HostedLedger {
            root: root.to_path_buf(),
            hosted: parking_lot::Mutex::new(hosted),
        })
    }

    /// The highest incarnation of `group` hosted here, if any.
    pub fn highest(&self, group: GroupId) -> Option<u32> {
        self.hosted.lock().get(&group).copied()
    }

    /// Whether `replica` of `group` may be created empty here: this node
    /// never hosted the group at that incarnation or a later one.
    pub fn may_create(&self, group: GroupId, replica: ReplicaId) -> bool {
        self.highest(group)
            .is_none_or(|known| known < replica.incarnation())
    }

    /// Records, durably, that `replica` of `group` is (about to be) hosted
    /// here, if it raises the group's highest incarnation. Blocks (fsync).
    pub fn record(&self, group: GroupId, replica: ReplicaId) -> std::io::Result<()> {
        let mut hosted = self.hosted.lock();
        if hosted
            .get(&group)
            .is_some_and(|&known| known >= replica.incarnation())
        {
            return Ok(());
        }
        let mut next = hosted.clone();
        next.insert(group, replica.incarnation());
        std::fs::create_dir_all(&self.root)?;
        let bytes = serde_json::to_vec(&next).map_err(std::io::Error::other)?;
        quiver_engine::durable::write_atomic(&self.root.join(HOSTED_FILE), &bytes)?;
        *hosted = next;
        Ok(())
    }
}

impl GroupFactory {
    /// A replica's directory.
    pub fn dir(&self, group: GroupId, replica: ReplicaId) -> PathBuf {
        self.root.join(dir_name(group, replica))
    }

    /// The replicas whose directories exist, by group (a group with two
    /// directories, which this node never creates, is an error).
    pub fn existing(
        &self,
        node: quiver_raft::NodeId,
    ) -> Result<BTreeMap<GroupId, ReplicaId>, ClusterError> {
        let mut found = BTreeMap::new();
        let entries = match std::fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
            Err(e) => return Err(start_error(&self.root, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| start_error(&self.root, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((group, incarnation)) = parse_dir_name(&name) else {
                if name != TRASH_DIR && name != HOSTED_FILE && !name.starts_with(".split-") {
                    tracing::warn!(dir = %entry.path().display(), "not a replica directory; ignored");
                }
                continue;
            };
            let replica = ReplicaId::new(node, incarnation);
            if let Some(other) = found.insert(group, replica) {
                return Err(ClusterError::Start(format!(
                    "{} holds two replicas of group {group} ({other} and {replica})",
                    self.root.display()
                )));
            }
        }
        Ok(found)
    }

    /// Opens (creating if `create` and missing) a replica and starts its
    /// Raft instance (asleep: hibernation wakes it when the pings say so).
    /// A missing replica this node hosted before, or hosted a later
    /// incarnation of, is never created (see the module doc).
    pub async fn open(
        &self,
        group: GroupId,
        replica: ReplicaId,
        create: bool,
    ) -> Result<Group, ClusterError> {
        let dir = self.dir(group, replica);
        let ledger = self.hosted.clone();
        let root = self.root.clone();
        let log_options = self.log_options;
        let store_options = StoreOptions {
            load_catalog: group == METADATA_GROUP,
            ..self.store.clone()
        };
        let observer = self.observer.clone();
        // Disk work (the ledger's fsync, opening RocksDB and the log) off
        // the async workers every group's heartbeats share.
        let (log, state) = tokio::task::spawn_blocking(move || {
            let exists = dir.is_dir();
            if !exists {
                if !create {
                    return Err(ClusterError::Start(format!(
                        "replica {replica} of group {group}: {} is missing",
                        dir.display()
                    )));
                }
                if !ledger.may_create(group, replica) {
                    return Err(ClusterError::Start(format!(
                        "replica {replica} of group {group} is gone from {} but this node hosted \
                         incarnation {} of the group: it is never created again under an id \
                         that may have voted",
                        dir.display(),
                        ledger.highest(group).unwrap_or(0)
                    )));
                }
            }
            ledger
                .record(group, replica)
                .map_err(|e| start_error(&root, e))?;
            let log = LogStore::open(dir.join("log"), log_options)
                .map_err(|e| ClusterError::Start(format!("group {group} log: {e}")))?;
            let state = StateMachine::open(group, dir.join("state"), store_options, observer)
                .map_err(|e| ClusterError::Start(format!("group {group} state: {e}")))?;
            if !exists {
                sync_dir(&root).map_err(|e| start_error(&root, e))?;
            }
            Ok((log, state))
        })
        .await
        .map_err(|e| ClusterError::Start(format!("group {group}: {e}")))??;
        // Entries change-stream consumers have not confirmed stay in the
        // log (within the cap) when openraft purges it.
        log.set_purge_hold(Arc::new(state.clone()), self.log_hold_bytes_max);
        state.set_split_handler(Arc::new(SplitChildren {
            parent: group,
            root: self.root.clone(),
            replica,
            splits: self.splits.clone(),
            hosted: self.hosted.clone(),
        }));
        let network = GroupNetwork {
            group,
            clients: self.clients.clone(),
        };
        let raft = Raft::new(
            replica,
            self.raft_config.clone(),
            network,
            log.clone(),
            state.clone(),
        )
        .await
        .map_err(|e| ClusterError::Start(format!("group {group} raft: {e}")))?;
        Ok(Group {
            group,
            replica,
            raft,
            state,
            log,
            pulse: Pulse::asleep(),
            handed_over_term: std::sync::atomic::AtomicU64::new(0),
            splitting: parking_lot::Mutex::new(None),
        })
    }

    /// Deletes what earlier runs left in the trash, and split children a
    /// crash left half built (`.split-*`: no split is under way at start;
    /// a replayed split builds its child again).
    pub fn empty_trash(&self) {
        let trash = self.root.join(TRASH_DIR);
        if let Err(e) = std::fs::remove_dir_all(&trash)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %trash.display(), error = %e, "cannot empty the trash");
        }
        let staging = std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten();
        for entry in staging {
            if entry.file_name().to_string_lossy().starts_with(".split-")
                && let Err(e) = std::fs::remove_dir_all(entry.path())
            {
                tracing::warn!(dir = %entry.path().display(), error = %e, "cannot remove a half-built split child");
            }
        }
    }
}

fn start_error(path: &Path, e: std::io::Error) -> ClusterError {
    ClusterError::Start(format!("{}: {e}", path.display()))
}

/// A replica's directory name.
fn dir_name(group: GroupId, replica: ReplicaId) -> String {
    match replica.incarnation() {
        0 => group.to_string(),
        incarnation => format!("{group}.{incarnation}"),
    }
}

/// The group and incarnation a directory name stands for.
fn parse_dir_name(name: &str) -> Option<(GroupId, u32)> {
    let (group, incarnation) = match name.split_once('.') {
        Some((group, incarnation)) => (group, incarnation.parse().ok().filter(|&i| i > 0)?),
        None => (name, 0),
    };
    // Canonical digits only: "07" or "+7" would name a second directory.
    let group: GroupId = group.parse().ok()?;
    (dir_name(group, ReplicaId::new(1, incarnation)) == name).then_some((group, incarnation))
}

/// The groups hosted now. Lookups take a read lock for a map access and
/// clone an `Arc`: never held across an await.
pub struct GroupHost {
    groups: RwLock<BTreeMap<GroupId, Arc<Group>>>,
    /// Serializes opening, stopping and destroying (each awaits openraft).
    changes: tokio::sync::Mutex<()>,
    /// Woken whenever a replica is hosted.
    opened: tokio::sync::Notify,
    /// How to open one.
    pub factory: GroupFactory,
}

impl std::fmt::Debug for GroupHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupHost")
            .field("groups", &self.groups.read().keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl GroupHost {
    /// A host with no group yet.
    pub fn new(factory: GroupFactory) -> GroupHost {
        GroupHost {
            groups: RwLock::new(BTreeMap::new()),
            changes: tokio::sync::Mutex::new(()),
            opened: tokio::sync::Notify::new(),
            factory,
        }
    }

    /// The replica of `group` hosted here.
    pub fn get(&self, group: GroupId) -> Option<Arc<Group>> {
        self.groups.read().get(&group).cloned()
    }

    /// The replica of `group`, once it is hosted here: waits up to
    /// `timeout` for it (a split's child, which this node's replica of the
    /// parent builds moments after the split applies here).
    pub async fn wait_hosted(
        &self,
        group: GroupId,
        timeout: std::time::Duration,
    ) -> Option<Arc<Group>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Registered before the lookup: an open between the two still
            // wakes this.
            let opened = self.opened.notified();
            tokio::pin!(opened);
            opened.as_mut().enable();
            if let Some(hosted) = self.get(group) {
                return Some(hosted);
            }
            if tokio::time::timeout_at(deadline, opened).await.is_err() {
                return self.get(group);
            }
        }
    }

    /// Whether a replica of `group` is hosted here.
    pub fn contains(&self, group: GroupId) -> bool {
        self.groups.read().contains_key(&group)
    }

    /// Every hosted replica, by group.
    pub fn all(&self) -> Vec<(GroupId, Arc<Group>)> {
        self.groups
            .read()
            .iter()
            .map(|(&group, hosted)| (group, hosted.clone()))
            .collect()
    }

    /// Opens a replica and hosts it (see [`GroupFactory::open`]). Refused if
    /// another replica of the group is hosted.
    pub async fn open(
        &self,
        group: GroupId,
        replica: ReplicaId,
        create: bool,
    ) -> Result<Arc<Group>, ClusterError> {
        let _changes = self.changes.lock().await;
        if let Some(hosted) = self.get(group) {
            return if hosted.replica == replica {
                Ok(hosted)
            } else {
                Err(ClusterError::Start(format!(
                    "group {group}: replica {} is hosted here, cannot open {replica}",
                    hosted.replica
                )))
            };
        }
        let hosted = Arc::new(self.factory.open(group, replica, create).await?);
        self.groups.write().insert(group, hosted.clone());
        self.opened.notify_waiters();
        if create {
            // Rows of this shard cached while another replica (or none) was
            // here are not kept coherent by this one's apply.
            self.factory.observer.replica_changed();
        }
        tracing::info!(group, %replica, create, "replica opened");
        if create && replica.incarnation() > 0 {
            // Fault tests stop a move's target right after it made its
            // learner.
            quiver_raft::failpoint::failpoint("replica.learner_opened");
        }
        Ok(hosted)
    }

    /// Stops hosting `group`: its Raft instance shuts down and its store is
    /// flushed. Returns the stopped replica.
    pub async fn stop(&self, group: GroupId) -> Option<Arc<Group>> {
        let _changes = self.changes.lock().await;
        self.stop_locked(group).await
    }

    async fn stop_locked(&self, group: GroupId) -> Option<Arc<Group>> {
        let hosted = self.groups.write().remove(&group)?;
        stop_group(&hosted).await;
        Some(hosted)
    }

    /// Stops `replica` of `group` if it is hosted, and deletes its
    /// directory for good (the rename into the trash under the host's lock,
    /// the deletion after it: a large replica does not hold up the others).
    pub async fn destroy(&self, group: GroupId, replica: ReplicaId) -> std::io::Result<()> {
        let trashed = {
            let _changes = self.changes.lock().await;
            if self
                .get(group)
                .is_some_and(|hosted| hosted.replica == replica)
            {
                self.stop_locked(group).await;
                self.factory.observer.replica_changed();
            }
            // A crash here leaves the stopped replica's directory in place:
            // the tombstone in the map has it destroyed after the restart.
            quiver_raft::failpoint::failpoint("replica.destroying");
            let dir = self.factory.dir(group, replica);
            let root = self.factory.root.clone();
            tokio::task::spawn_blocking(move || move_to_trash(&root, &dir))
                .await
                .map_err(std::io::Error::other)??
        };
        if let Some(trashed) = trashed {
            tokio::task::spawn_blocking(move || std::fs::remove_dir_all(trashed))
                .await
                .map_err(std::io::Error::other)??;
        }
        tracing::info!(group, %replica, "replica destroyed");
        Ok(())
    }

    /// Stops every group (shutdown).
    pub async fn stop_all(&self) {
        let _changes = self.changes.lock().await;
        let all: Vec<Arc<Group>> = std::mem::take(&mut *self.groups.write())
            .into_values()
            .collect();
        for hosted in all {
            stop_group(&hosted).await;
        }
    }
}

/// Moves a replica's directory into the trash, durably (once this returns,
/// the replica is never opened again), and returns where it went. Blocks.
fn move_to_trash(root: &Path, dir: &Path) -> std::io::Result<Option<PathBuf>> {
    if !dir.exists() {
        return Ok(None);
    }
    let trash = root.join(TRASH_DIR);
    std::fs::create_dir_all(&trash)?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let to = trash.join(format!("{name}-{nanos}"));
    std::fs::rename(dir, &to)?;
    sync_dir(root)?;
    Ok(Some(to))
}

/// Where this node's replica of a split child goes, and who is told: the
/// child's replica has the parent replica's id (ids are unique per group,
/// and the child group has never used any).
struct SplitChildren {
    parent: GroupId,
    root: PathBuf,
    replica: ReplicaId,
    splits: tokio::sync::mpsc::Sender<SplitEvent>,
    hosted: Arc<HostedLedger>,
}

/// A split child's replica is on disk and must be hosted.
#[derive(Debug, Clone, Copy)]
pub struct SplitEvent {
    /// The shard that split.
    pub parent: GroupId,
    /// The new shard.
    pub child: GroupId,
    /// This node's replica of both.
    pub replica: ReplicaId,
}

impl quiver_raft::state_machine::SplitHandler for SplitChildren {
    fn prepare_child(&self, child: GroupId) -> std::io::Result<Option<PathBuf>> {
        let dir = self.root.join(dir_name(child, self.replica));
        if dir.exists() {
            return Ok(Some(dir));
        }
        if !self.hosted.may_create(child, self.replica) {
            tracing::info!(child, replica = %self.replica, "a replayed split's child was hosted here before; not built again");
            return Ok(None);
        }
        // Not recorded here: the child is recorded when it is first opened
        // (`GroupFactory::open`), before its Raft instance runs. A crash
        // while it is built leaves no directory and no record, so the
        // replayed split builds it again; recording first made the replay
        // take the half-built child for one that had moved away, and this
        // node never hosted it.
        Ok(Some(dir))
    }

    fn replica(&self) -> ReplicaId {
        self.replica
    }

    fn child_created(&self, child: GroupId) {
        // A full queue only delays the child: the map follower opens replica
        // directories it finds for the shards the map lists here.
        let event = SplitEvent {
            parent: self.parent,
            child,
            replica: self.replica,
        };
        if self.splits.try_send(event).is_err() {
            tracing::warn!(
                child,
                "split queue full; the child opens on the next map round"
            );
        }
    }
}

async fn stop_group(hosted: &Group) {
    if let Err(e) = hosted.raft.shutdown().await {
        tracing::warn!(group = hosted.group, error = %e, "raft shutdown");
    }
    if let Err(e) = hosted.state.flush() {
        tracing::warn!(group = hosted.group, error = %e, "flush on stop");
    }
    hosted.log.close();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_names_round_trip_and_odd_names_are_not_replicas() {
        for (group, incarnation) in [(0, 0), (7, 0), (7, 3), (4096, u32::MAX)] {
            let name = dir_name(group, ReplicaId::new(9, incarnation));
            assert_eq!(parse_dir_name(&name), Some((group, incarnation)), "{name}");
        }
        for odd in [
            "", ".trash", "07", "+7", "7.", "7.0", "7.x", "7.3.1", "x", "-1",
        ] {
            assert_eq!(parse_dir_name(odd), None, "{odd:?}");
        }
    }

    #[test]
    fn a_split_child_is_recorded_when_hosted_so_a_crash_while_building_it_is_replayed() {
        use quiver_raft::state_machine::SplitHandler;
        let root = tempfile::tempdir().unwrap();
        let hosted = Arc::new(HostedLedger::load(root.path()).unwrap());
        let (splits, _events) = tokio::sync::mpsc::channel(1);
        let replica = ReplicaId::new(2, 5);
        let children = SplitChildren {
            parent: 1,
            root: root.path().to_path_buf(),
            replica,
            splits,
            hosted: hosted.clone(),
        };
        // Prepared, then a crash before the staged child was renamed in:
        // nothing on disk, nothing recorded, so the replay builds it.
        let child_dir = children.prepare_child(3).unwrap().unwrap();
        assert!(!child_dir.exists());
        assert_eq!(hosted.highest(3), None);
        assert_eq!(children.prepare_child(3).unwrap(), Some(child_dir.clone()));
        // Built whole: used as it is.
        std::fs::create_dir_all(&child_dir).unwrap();
        assert_eq!(children.prepare_child(3).unwrap(), Some(child_dir.clone()));
        // Hosted (opening records it), then moved away: never built again,
        // nor under an earlier incarnation.
        hosted.record(3, replica).unwrap();
        std::fs::remove_dir_all(&child_dir).unwrap();
        assert_eq!(children.prepare_child(3).unwrap(), None);
        let reloaded = HostedLedger::load(root.path()).unwrap();
        assert!(!reloaded.may_create(3, ReplicaId::new(2, 4)));
        assert!(reloaded.may_create(3, ReplicaId::new(2, 6)));
    }
}
