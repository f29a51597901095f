//! A shard's part of a full backup, carried out by a node hosting it: the
//! coordinator asks the shard's leader first (the freshest cut), any other
//! replica if the leader cannot be reached; the work itself is
//! `crate::backup::Backups::backup_local`.

use std::sync::Arc;
use std::time::Duration;

use quiver_raft::GroupId;
use quiver_raft::backup::ShardBackup;

use super::wire::{PeerCall, PeerResult};
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
                    let result = if target == self.node_id {
                        tokio::time::timeout(timeout, self.backup_shard_local(shard, url, id))
                            .await
                            .unwrap_or_else(|_| {
                                PeerResult::Failed("the shard's backup timed out".into())
                            })
                    } else {
                        self.clients
                            .call_with_timeout(target, shard, None, call, timeout)
                            .await
                            .unwrap_or_else(|e| PeerResult::Failed(e.to_string()))
                    };
                    match result {
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
}
