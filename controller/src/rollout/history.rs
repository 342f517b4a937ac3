//! Workload revisions: every change to what a workload's pods run is a
//! numbered revision, kept with when and why it was made (the last
//! [`HISTORY_LIMIT`]); undo brings one back as a new revision.

use std::collections::BTreeMap;

use crate::manifest::Workload;

use super::RolloutError;

/// Revisions kept per workload; older ones are dropped.
pub const HISTORY_LIMIT: usize = 10;

/// One revision of a workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revision {
    /// 1, 2, …, per workload.
    pub number: u64,
    /// When it was made (ms since the epoch).
    pub created_ms: u64,
    /// Why: `apply`, or `undo to revision N`.
    pub cause: String,
    /// The workload as it was then.
    pub workload: Workload,
}

/// Every workload's revisions, oldest first.
#[derive(Debug, Default)]
pub struct History {
    by_workload: BTreeMap<String, Vec<Revision>>,
}

impl History {
    /// Rebuilds the history from stored revisions, in any order.
    pub fn restore(revisions: impl IntoIterator<Item = Revision>) -> Self {
        let mut by_workload: BTreeMap<String, Vec<Revision>> = BTreeMap::new();
        for r in revisions {
            by_workload
                .entry(r.workload.name.clone())
                .or_default()
                .push(r);
        }
        for list in by_workload.values_mut() {
            list.sort_by_key(|r| r.number);
        }
        Self { by_workload }
    }

    /// A workload's revisions, oldest first.
    pub fn list(&self, workload: &str) -> &[Revision] {
        self.by_workload.get(workload).map_or(&[], Vec::as_slice)
    }

    /// The newest revision of a workload.
    pub fn current(&self, workload: &str) -> Option<&Revision> {
        self.list(workload).last()
    }

    /// The revision `w` makes, if it changes what the pods run compared
    /// with the newest revision (or there is none yet).
    pub fn next(&self, w: &Workload, cause: &str, now_ms: u64) -> Option<Revision> {
        let last = self.current(&w.name);
        if last.is_some_and(|r| r.workload.same_template(w)) {
            return None;
        }
        Some(Revision {
            number: last.map_or(1, |r| r.number + 1),
            created_ms: now_ms,
            cause: cause.to_owned(),
            workload: w.clone(),
        })
    }

    /// Adds a revision; returns the numbers dropped past [`HISTORY_LIMIT`].
    pub fn push(&mut self, revision: Revision) -> Vec<u64> {
        let list = self
            .by_workload
            .entry(revision.workload.name.clone())
            .or_default();
        list.push(revision);
        let excess = list.len().saturating_sub(HISTORY_LIMIT);
        list.drain(..excess).map(|r| r.number).collect()
    }

    /// The numbers that [`History::push`] of one more revision would drop.
    pub fn would_drop(&self, workload: &str) -> Vec<u64> {
        let list = self.list(workload);
        let excess = (list.len() + 1).saturating_sub(HISTORY_LIMIT);
        list[..excess].iter().map(|r| r.number).collect()
    }

    /// Forgets a deleted workload; returns the numbers it had.
    pub fn remove(&mut self, workload: &str) -> Vec<u64> {
        self.by_workload
            .remove(workload)
            .unwrap_or_default()
            .into_iter()
            .map(|r| r.number)
            .collect()
    }

    /// The workload `current` with the pods of revision `to` (default: the
    /// one before the newest), keeping where the pods go as it is now.
    pub fn undo(&self, current: &Workload, to: Option<u64>) -> Result<Workload, RolloutError> {
        let list = self.list(&current.name);
        let target = match to {
            Some(number) => list.iter().find(|r| r.number == number).ok_or_else(|| {
                RolloutError::NoRevision {
                    workload: current.name.clone(),
                    number,
                }
            })?,
            None => list
                .iter()
                .rev()
                .nth(1)
                .ok_or_else(|| RolloutError::NoPrevious(current.name.clone()))?,
        };
        let mut out = current.clone();
        let (spec, old) = (&mut out.spec, &target.workload.spec);
        spec.restart_policy = old.restart_policy;
        spec.termination_grace_secs = old.termination_grace_secs;
        spec.volumes.clone_from(&old.volumes);
        spec.containers.clone_from(&old.containers);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(image: &str, replicas: u32) -> Workload {
        let text = format!(
            "apiVersion: flotilla.dev/v1\nkind: Workload\nmetadata: {{name: web}}\n\
             spec:\n  replicas: {replicas}\n  containers: [{{name: main, image: {image}}}]\n"
        );
        crate::manifest::parse(&text).unwrap().remove(0)
    }

    #[test]
    fn a_revision_per_change_of_the_pods_and_undo_brings_one_back() {
        let mut h = History::default();
        let v1 = workload("app:1", 2);
        let r1 = h.next(&v1, "apply", 10).unwrap();
        assert_eq!((r1.number, r1.cause.as_str()), (1, "apply"));
        assert!(h.push(r1).is_empty());
        // Where the pods go is not a revision.
        assert!(h.next(&workload("app:1", 5), "apply", 11).is_none());
        let v2 = workload("app:2", 5);
        let r2 = h.next(&v2, "apply", 12).unwrap();
        assert_eq!(r2.number, 2);
        h.push(r2);

        // Undo: revision 1's pods, today's replicas.
        let back = h.undo(&v2, None).unwrap();
        assert_eq!(back.spec.containers[0].image, "app:1");
        assert_eq!(back, workload("app:1", 5));
        assert_eq!(h.undo(&v2, Some(2)).unwrap(), v2);
        assert_eq!(
            h.undo(&v2, Some(7)).unwrap_err().to_string(),
            "workload web has no revision 7 (see `flotilla rollout history web`)"
        );
        let lone = History::restore([h.list("web")[0].clone()]);
        assert_eq!(
            lone.undo(&v1, None).unwrap_err().to_string(),
            "workload web has no revision before the current one"
        );

        // The history is capped, oldest dropped first.
        for i in 3..=12 {
            let w = workload(&format!("app:{i}"), 5);
            let r = h.next(&w, "apply", 20 + i).unwrap();
            assert_eq!(r.number, i);
            let expect = h.would_drop("web");
            assert_eq!(h.push(r), expect);
        }
        let numbers: Vec<u64> = h.list("web").iter().map(|r| r.number).collect();
        assert_eq!(numbers, (3..=12).collect::<Vec<_>>());
        let restored = History::restore(h.list("web").iter().rev().cloned());
        assert_eq!(restored.list("web"), h.list("web"));
        assert_eq!(h.remove("web").len(), HISTORY_LIMIT);
        assert!(h.current("web").is_none());
    }
}
