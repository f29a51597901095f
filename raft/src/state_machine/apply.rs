//! Applying committed entries: data commands through the engine, the
//! request-id ring that deduplicates retried proposals, refusals recorded
//! against their request id, log holds and the leader's clock. Cluster-map
//! commands are `metadata.rs`'s, splits `split.rs`'s.

use super::*;

impl StateMachine {
    /// Applies committed entries in log order, recording each one's log id
    /// and the membership in the same RocksDB batch as its data, and returns
    /// what each one answers (what `apply` hands openraft's responders).
    /// Blocks on RocksDB: call it off the async workers.
    pub fn apply_entries(&self, entries: Vec<Entry>) -> io::Result<Vec<Response>> {
        let mut responses = Vec::with_capacity(entries.len());
        for entry in entries {
            let log_id = entry.log_id;
            let mut membership = self.shared.applied.lock().1.clone();
            let command = match entry.payload {
                EntryPayload::Blank => None,
                EntryPayload::Normal(command) => Some(command),
                EntryPayload::Membership(m) => {
                    membership = StoredMembership::new(Some(log_id), m);
                    None
                }
            };
            let meta = encode_applied(&Some(log_id), &membership)?;
            // The entry's time, as `apply_proposal` counts it.
            let leader_ts_us = command
                .as_ref()
                .map(|proposal| proposal.leader_ts_us.max(self.leader_time_us()));
            let response = match command {
                Some(proposal) => self.apply_proposal(log_id, proposal, &meta)?,
                None => {
                    self.store()
                        .put_meta(&[(APPLIED_KEY, Some(meta.as_slice()))])
                        .map_err(engine_io)?;
                    Response::Empty
                }
            };
            {
                // Position and time change together: a reader of
                // `applied_position` never pairs an index with a later
                // entry's time.
                let mut applied = self.shared.applied.lock();
                *applied = (Some(log_id), membership);
                if let Some(leader_ts_us) = leader_ts_us {
                    self.set_leader_time(leader_ts_us);
                }
            }
            responses.push(response);
        }
        Ok(responses)
    }

    fn apply_proposal(
        &self,
        log_id: LogId,
        proposal: Proposal,
        meta: &[u8],
    ) -> io::Result<Response> {
        let store = self.store();
        let Proposal {
            request_id,
            leader_ts_us: stamped_us,
            command,
        } = proposal;
        // The entry's time: its leader's clock, or the shard's leader time
        // if that clock is behind it (a new leader with a slower clock).
        let previous_us = self.leader_time_us();
        let leader_ts_us = stamped_us.max(previous_us);
        let time_bytes = leader_ts_us.to_be_bytes();
        let time_put =
            (leader_ts_us > previous_us).then_some((LEADER_TIME_KEY, Some(&time_bytes[..])));
        let request_key = [REQUEST_PREFIX, &request_id.to_be_bytes()[..]].concat();
        if request_id != 0
            && let Some(outcome) = store.get_meta(&request_key).map_err(engine_io)?
        {
            let mut ops = vec![(APPLIED_KEY, Some(meta))];
            ops.extend(time_put);
            store.put_meta(&ops).map_err(engine_io)?;
            // A retry gets the first attempt's refusal again; a retry of
            // something that was done is told it was.
            return Ok(if outcome.is_empty() {
                Response::AlreadyApplied
            } else {
                postcard::from_bytes(&outcome)
                    .map_err(|e| invalid(format!("request {request_id:x}: stored outcome: {e}")))?
            });
        }
        // Keys a split gave away are refused, and the refusal is not kept
        // against the request id: the router retries it on the shard that
        // owns them now.
        if let Some(refusal) = self.wrong_shard(&command) {
            let mut ops = vec![(APPLIED_KEY, Some(meta))];
            ops.extend(time_put);
            store.put_meta(&ops).map_err(engine_io)?;
            return Ok(refusal);
        }
        let slot_key = [
            REQUEST_SLOT_PREFIX,
            &(log_id.index % REQUEST_IDS_KEPT).to_be_bytes()[..],
        ]
        .concat();
        // Entries without an id (blank, internal) touch no dedup state.
        let evicted = if request_id == 0 {
            None
        } else {
            store
                .get_meta(&slot_key)
                .map_err(engine_io)?
                .map(|old| [REQUEST_PREFIX, old.as_slice()].concat())
        };
        let id_bytes = request_id.to_be_bytes();
        let mut ops: Vec<(&[u8], Option<&[u8]>)> = vec![(APPLIED_KEY, Some(meta))];
        ops.extend(time_put);
        if request_id != 0 {
            if let Some(evicted) = &evicted {
                ops.push((evicted.as_slice(), None));
            }
            ops.push((request_key.as_slice(), Some(&[][..])));
            ops.push((slot_key.as_slice(), Some(&id_bytes[..])));
        }
        let meta_puts = ops.as_slice();
        let response = match command {
            Command::Write { view_id, rows } => {
                let outcome = store
                    .write_rows_at(view_id, &rows, leader_ts_us, meta_puts)
                    .map_err(engine_io)?;
                self.shared.observer.keys_changed(&outcome.changed_keys);
                Response::Written {
                    rows_applied: outcome.rows_applied,
                    rows_stale: outcome.rows_stale,
                }
            }
            Command::Delete {
                view_id,
                entity_keys,
            } => {
                let deleted = store
                    .delete_rows_with(view_id, &entity_keys, leader_ts_us, meta_puts)
                    .map_err(engine_io)?;
                self.shared.observer.keys_changed(&deleted);
                Response::Deleted {
                    rows_deleted: deleted.len() as u64,
                }
            }
            Command::Invalidate {
                view_id,
                entity_keys,
            } => {
                store.put_meta(meta_puts).map_err(engine_io)?;
                let entries_dropped = if entity_keys.is_empty() {
                    self.shared.observer.view_invalidated(view_id)
                } else {
                    let keys: Vec<Vec<u8>> = entity_keys
                        .iter()
                        .map(|k| quiver_engine::keys::storage_key(view_id, k.as_bytes()))
                        .collect();
                    self.shared.observer.keys_changed(&keys)
                };
                Response::Invalidated { entries_dropped }
            }
            Command::ApplyView { spec } => match store.apply_view_with(spec, meta_puts) {
                Ok((view, changed)) => Response::ViewApplied {
                    view: Box::new((*view).clone()),
                    changed,
                },
                Err(error) => self.reject(error, meta_puts)?,
            },
            Command::Expire { retention } => {
                // The floor is the shard leader's clock (stamped on this
                // entry) minus the retention: the proposer's clock plays no
                // part. Cached rows need no invalidation: the read path
                // checks the floor on every cache hit.
                let floors: Vec<(u32, i64)> = retention
                    .iter()
                    .map(|&(view_id, retention_us)| {
                        (view_id, leader_ts_us.saturating_sub(retention_us.max(0)))
                    })
                    .collect();
                let moved = store
                    .advance_expiry(&floors, meta_puts)
                    .map_err(engine_io)?;
                Response::Expired {
                    views_advanced: moved.len() as u64,
                }
            }
            Command::Map(command) => self.apply_map(log_id, command, leader_ts_us, meta_puts)?,
            Command::Fence => {
                store.put_meta(meta_puts).map_err(engine_io)?;
                Response::Fenced
            }
            Command::HoldLog { consumer, index } => {
                self.apply_log_hold(&consumer, Some(index), meta_puts)?
            }
            Command::ReleaseLog { consumer } => self.apply_log_hold(&consumer, None, meta_puts)?,
            Command::Split {
                child,
                at,
                start,
                end,
                version,
            } => self.apply_split(
                log_id,
                SplitAt {
                    child,
                    at,
                    start,
                    end,
                    version,
                },
                leader_ts_us,
                meta_puts,
            )?,
            Command::DeleteView { name } => match store.delete_view_with(&name, meta_puts) {
                Ok(view) => {
                    self.shared.observer.view_invalidated(view.id);
                    Response::ViewDeleted
                }
                Err(error) => self.reject(error, meta_puts)?,
            },
        };
        // Written with the entry's batch (or refused with it); published
        // with the applied position by `apply_entries`.
        tracing::trace!(group = self.shared.group, %log_id, "applied");
        Ok(response)
    }

    /// Sets (only forward) or releases a consumer's log hold.
    fn apply_log_hold(
        &self,
        consumer: &str,
        index: Option<u64>,
        meta_puts: quiver_engine::store::MetaPuts<'_>,
    ) -> io::Result<Response> {
        if let Err(message) = crate::change_stream::check_consumer_name(consumer) {
            return self.refuse(
                Response::Rejected {
                    kind: RejectKind::Invalid,
                    message,
                },
                meta_puts,
            );
        }
        let mut holds = self.shared.log_holds.lock().clone();
        let held = match index {
            Some(index) => {
                if !holds.contains_key(consumer)
                    && holds.len() >= crate::change_stream::LOG_CONSUMERS_MAX
                {
                    return self.refuse(
                        Response::Rejected {
                            kind: RejectKind::LimitExceeded,
                            message: format!(
                                "shard {} has {} log consumers already, the most it keeps",
                                self.shared.group,
                                holds.len()
                            ),
                        },
                        meta_puts,
                    );
                }
                let held = holds.entry(consumer.to_owned()).or_insert(index);
                *held = (*held).max(index);
                Some(*held)
            }
            None => {
                holds.remove(consumer);
                None
            }
        };
        let bytes = postcard::to_stdvec(&holds).map_err(io::Error::other)?;
        let mut puts = meta_puts.to_vec();
        puts.push((LOG_HOLDS_KEY, Some(bytes.as_slice())));
        self.store().put_meta(&puts).map_err(engine_io)?;
        *self.shared.log_holds.lock() = holds;
        Ok(Response::LogHold { index: held })
    }

    fn set_leader_time(&self, leader_ts_us: i64) {
        self.shared
            .leader_time_us
            .fetch_max(leader_ts_us, std::sync::atomic::Ordering::SeqCst);
    }
}

impl StateMachine {
    /// A command the store refused deterministically still counts as applied:
    /// its log position is recorded, and its request id with the refusal
    /// itself (so a retry is answered with the same refusal, not judged
    /// again, and never with "done"), and the refusal is the response.
    pub(super) fn reject(
        &self,
        error: EngineError,
        meta_puts: quiver_engine::store::MetaPuts<'_>,
    ) -> io::Result<Response> {
        self.refuse(rejection(error)?, meta_puts)
    }

    /// Records `response` (a refusal) as the outcome of the entry's request
    /// id, with the entry's position.
    pub(super) fn refuse(
        &self,
        response: Response,
        meta_puts: quiver_engine::store::MetaPuts<'_>,
    ) -> io::Result<Response> {
        let outcome = postcard::to_stdvec(&response).map_err(io::Error::other)?;
        let puts: Vec<(&[u8], Option<&[u8]>)> = meta_puts
            .iter()
            .map(|&(key, value)| {
                // The request's own record (a put) takes the refusal; the
                // eviction of an old id from the ring (a delete) stays one.
                if key.starts_with(REQUEST_PREFIX) && value.is_some() {
                    (key, Some(outcome.as_slice()))
                } else {
                    (key, value)
                }
            })
            .collect();
        self.store().put_meta(&puts).map_err(engine_io)?;
        Ok(response)
    }
}

fn rejection(error: EngineError) -> io::Result<Response> {
    let kind = match &error {
        EngineError::View(quiver_engine::ViewError::IncompatibleChange { .. }) => {
            RejectKind::Conflict
        }
        EngineError::View(_) => RejectKind::Invalid,
        EngineError::UnknownView(_) => RejectKind::NotFound,
        EngineError::RegistryFull(_) => RejectKind::LimitExceeded,
        // Storage failures are not a deterministic refusal: the replica
        // cannot go on applying.
        _ => return Err(engine_io(error)),
    };
    Ok(Response::Rejected {
        kind,
        message: error.to_string(),
    })
}
