//! A shard's part of a full backup, carried out by a node hosting it: the
//! coordinator asks the shard's leader first (the freshest cut), any other
//! replica if the leader cannot be reached; the work itself is
//! `crate::backup::Backups::backup_local`. Also a shard's content
//! checksum, read at its leader (what a restore drill compares), and this
//! node's replicas' checksums (what replicas of a shard are compared by).

use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use quiver_engine::digest::ContentDigest;
use quiver_raft::backup::ShardBackup;
use quiver_raft::state_machine::ReplicaDigest;
use quiver_raft::{GroupId, METADATA_GROUP, NodeId, ReplicaId};

use super::wire::{HashRange, PeerCall, PeerResult, ReadLevel};
use super::{Cluster, ClusterError};

impl Cluster {
    /// Gives the cluster this node's backup work (the peer service carries
    /// out other coordinators' shard backups with it).
    pub fn set_backups(&self, backups: Arc<crate::backup::Backups>) {
        let _ = self.backups.set(backups);
    }

    /// Backs up `shard` into backup `id` at `url` on a node hosting it;
    /// returns the part's directory and record.
    /// A node that cannot reach the target or fails midway ends the call
    /// (another replica would meet the same target); a node that does not
    /// answer or no longer hosts the shard is passed over.
    pub async fn backup_shard(
        &self,
        shard: GroupId,
        url: &str,
        id: &str,
        timeout: Duration,
    ) -> Result<(String, ShardBackup), ClusterError> {
        let call = PeerCall::BackupShard {
            url: url.to_owned(),
            backup_id: id.to_owned(),
        };
        let outcome = self
            .route(shard, self.first_target(shard), |target| {
                let call = &call;
                async move {
                    let local = self.backup_shard_local(shard, url, id);
                    match self
                        .call_or_local(target, shard, call, timeout, local)
                        .await
                    {
                        PeerResult::BackedUp { dir, record } => Ok(Ok((dir, *record))),
                        PeerResult::Refused(message) => Ok(Err(message)),
                        other => Err(other),
                    }
                }
            })
            .await?;
        outcome.map_err(|message| ClusterError::Refused {
            group: shard,
            message,
        })
    }

    /// This node's side of [`Self::backup_shard`].
    pub async fn backup_shard_local(&self, shard: GroupId, url: &str, id: &str) -> PeerResult {
        if self.group(shard).is_none() {
            return PeerResult::NoSuchGroup;
        }
        let Some(backups) = self.backups.get() else {
            return PeerResult::Failed("this node is not ready for backups".into());
        };
        match backups.backup_local(self, shard, url, id).await {
            Ok((dir, record)) => PeerResult::BackedUp {
                dir,
                record: Box::new(record),
            },
            Err(e) => PeerResult::Refused(e.to_string()),
        }
    }

    /// What a reader sees of `shard`'s rows, by content (names, event
    /// times and values; see `LogicalDigest::add_content`), read at its
    /// leader after a read barrier, so every write acknowledged before the
    /// call is counted. Rows written during the scan may or may not be.
    /// Returns the shard's own range with the digest (see
    /// [`PeerResult::Checksummed`]).
    pub async fn checksum_shard(
        &self,
        shard: GroupId,
        timeout: Duration,
    ) -> Result<(ContentDigest, Option<HashRange>), ClusterError> {
        let call = PeerCall::ChecksumShard;
        self.route(shard, self.first_target(shard), |target| {
            let call = &call;
            async move {
                let local = self.checksum_shard_local(shard);
                match self
                    .call_or_local(target, shard, call, timeout, local)
                    .await
                {
                    PeerResult::Checksummed { digest, range } => Ok(Ok((digest, range))),
                    // A damaged store: another replica is no leader to ask.
                    PeerResult::Refused(message) => Ok(Err(message)),
                    other => Err(other),
                }
            }
        })
        .await?
        .map_err(|message| ClusterError::Refused {
            group: shard,
            message,
        })
    }

    /// This node's side of [`Self::checksum_shard`]: only as the leader.
    pub async fn checksum_shard_local(&self, shard: GroupId) -> PeerResult {
        // Rows of a view applied a moment ago through another node must be
        // named: the registry first, then the shard.
        if let Err(e) = self.sync_metadata().await {
            return PeerResult::Failed(format!("bringing the feature views up to date: {e}"));
        }
        if let Err(result) = self.check_local_read(shard, ReadLevel::Strong).await {
            return result;
        }
        let Some(hosted) = self.group(shard) else {
            return PeerResult::NoSuchGroup;
        };
        let range = hosted.state.range().map(|range| (range.start, range.end));
        let (from, to) = range.unwrap_or((0, None));
        let store = hosted.state.store();
        match tokio::task::spawn_blocking(move || store.content_digest(from, to)).await {
            Ok(Ok(digest)) => PeerResult::Checksummed { digest, range },
            Ok(Err(e)) => PeerResult::Refused(format!("reading shard {shard}: {e}")),
            Err(e) => PeerResult::Failed(format!("the checksum task failed: {e}")),
        }
    }

    /// The content of every shard replica hosted here, one after another,
    /// each at one applied index of its own (see
    /// `StateMachine::replica_content`), with the version of the map this
    /// node routes by. The feature views are brought up to date first, so
    /// rows are named as the metadata leader names them.
    pub async fn checksum_local_replicas(
        &self,
    ) -> Result<(u64, Vec<(GroupId, ReplicaId, ReplicaDigest)>), ClusterError> {
        self.sync_metadata().await?;
        let placement = self.placement();
        let mut digests = Vec::new();
        for (shard, group) in self.groups() {
            if shard == METADATA_GROUP {
                continue;
            }
            let routed = placement
                .shard(shard)
                .map_or((0, None), |desc| (desc.start, desc.end));
            let state = group.state.clone();
            let digest = tokio::task::spawn_blocking(move || state.replica_content(routed))
                .await
                .map_err(|e| ClusterError::Refused {
                    group: shard,
                    message: format!("the checksum task failed: {e}"),
                })?
                .map_err(|e| ClusterError::Refused {
                    group: shard,
                    message: format!("reading shard {shard}'s replica here: {e}"),
                })?;
            digests.push((shard, group.replica, digest));
        }
        Ok((placement.map.version, digests))
    }

    /// [`Self::checksum_shard`] of every shard of the current map, a few
    /// at a time; returns the map's version and each shard's digest. Each
    /// shard's scanned range must be its range in the map, and the map
    /// must be the same after: a split during the call (or one applied
    /// but not yet in the map) would count some rows twice or not at all,
    /// and is refused.
    pub async fn checksum_all(
        &self,
        timeout: Duration,
    ) -> Result<(u64, Vec<(GroupId, ContentDigest)>), ClusterError> {
        /// Shards scanned at once (each is a blocking scan on its leader).
        const SHARDS_IN_FLIGHT_MAX: usize = 4;
        let ranges = |map: &quiver_raft::cluster_map::ClusterMap| -> Vec<_> {
            map.shards
                .iter()
                .map(|(&id, desc)| (id, desc.start, desc.end))
                .collect()
        };
        // A new cluster routes by its static layout until the metadata
        // group stores the first map: the same shards.
        let (map, _) = self.current_or_static_map().await?;
        let scanned: Vec<(GroupId, ContentDigest, Option<HashRange>)> =
            futures::stream::iter(map.shards.keys().copied())
                .map(|shard| async move {
                    self.checksum_shard(shard, timeout)
                        .await
                        .map(|(digest, range)| (shard, digest, range))
                })
                .buffered(SHARDS_IN_FLIGHT_MAX)
                .try_collect()
                .await?;
        for (shard, _, range) in &scanned {
            let (Some(desc), Some((start, end))) = (map.shards.get(shard), range) else {
                continue;
            };
            if (desc.start, desc.end) != (*start, *end) {
                return Err(ClusterError::Refused {
                    group: *shard,
                    message: format!(
                        "shard {shard} holds {start:#x}..{end:?} but map version {} says \
                         {:#x}..{:?} (a split is finishing): ask again",
                        map.version, desc.start, desc.end
                    ),
                });
            }
        }
        let (after, _) = self.current_or_static_map().await?;
        if ranges(&after) != ranges(&map) {
            return Err(ClusterError::Refused {
                group: METADATA_GROUP,
                message: format!(
                    "the shards changed during the checksum (map version {} -> {}): ask again",
                    map.version, after.version
                ),
            });
        }
        let digests = scanned
            .into_iter()
            .map(|(shard, digest, _)| (shard, digest))
            .collect();
        Ok((map.version, digests))
    }

    /// `call` for `shard` on `target` within `timeout`: `local` (this
    /// node's side of it) when this node is the target, else over the peer
    /// port.
    async fn call_or_local(
        &self,
        target: NodeId,
        shard: GroupId,
        call: &PeerCall,
        timeout: Duration,
        local: impl std::future::Future<Output = PeerResult>,
    ) -> PeerResult {
        if target == self.node_id {
            tokio::time::timeout(timeout, local)
                .await
                .unwrap_or_else(|_| PeerResult::Failed(format!("timed out after {timeout:?}")))
        } else {
            self.clients
                .call_with_timeout(target, shard, None, call, timeout)
                .await
                .unwrap_or_else(|e| PeerResult::Failed(e.to_string()))
        }
    }
}
