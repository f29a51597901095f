//! The feature-view catalog: an immutable snapshot of every registered view,
//! swapped whole on each change so readers (the read path, the compaction
//! filter) never take a lock.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use crate::keys::ViewId;
use crate::view::FeatureView;

/// Most feature views one store may hold.
pub const VIEWS_MAX: usize = 10_000;

/// Every registered view, plus the ids of deleted views whose rows compaction
/// drops.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    views: HashMap<String, Arc<FeatureView>>,
    by_id: HashMap<ViewId, Arc<FeatureView>>,
    dropped: HashSet<ViewId>,
    /// The id the next new view gets. Ids are never reused.
    pub(crate) next_view_id: ViewId,
    /// When this process built it from a view change or from disk (`None`:
    /// the empty catalog nothing was ever applied to).
    changed_at: Option<Instant>,
}

impl Catalog {
    pub(crate) fn new(
        views: Vec<FeatureView>,
        dropped: HashSet<ViewId>,
        next_view_id: ViewId,
    ) -> Self {
        let mut catalog = Catalog {
            dropped,
            next_view_id,
            changed_at: Some(Instant::now()),
            ..Default::default()
        };
        for view in views {
            catalog.insert(Arc::new(view));
        }
        catalog
    }

    /// Marks the catalog as changed now.
    pub(crate) fn touch(&mut self) {
        self.changed_at = Some(Instant::now());
    }

    /// When this process built this catalog from a view change or from
    /// disk: a server holds back answers that depend on a change for a
    /// while after it (its client catalog catch-ups are reused that long).
    pub fn changed_at(&self) -> Option<Instant> {
        self.changed_at
    }

    pub(crate) fn insert(&mut self, view: Arc<FeatureView>) {
        self.by_id.insert(view.id, view.clone());
        self.views.insert(view.name.clone(), view);
    }

    pub(crate) fn remove(&mut self, name: &str) -> Option<Arc<FeatureView>> {
        let view = self.views.remove(name)?;
        self.by_id.remove(&view.id);
        self.dropped.insert(view.id);
        Some(view)
    }

    /// The view called `name`.
    pub fn view(&self, name: &str) -> Option<&Arc<FeatureView>> {
        self.views.get(name)
    }

    /// The view with storage id `id`.
    pub fn view_by_id(&self, id: ViewId) -> Option<&Arc<FeatureView>> {
        self.by_id.get(&id)
    }

    /// Whether `id` belonged to a deleted view.
    pub fn is_dropped(&self, id: ViewId) -> bool {
        self.dropped.contains(&id)
    }

    /// Every view, sorted by name.
    pub fn views(&self) -> Vec<Arc<FeatureView>> {
        let mut views: Vec<_> = self.views.values().cloned().collect();
        views.sort_by(|a, b| a.name.cmp(&b.name));
        views
    }

    /// Number of registered views.
    pub fn len(&self) -> usize {
        self.views.len()
    }

    /// Whether no view is registered.
    pub fn is_empty(&self) -> bool {
        self.views.is_empty()
    }
}

/// Handle to the live catalog, shared with background threads.
pub type Registry = Arc<arc_swap::ArcSwap<Catalog>>;
