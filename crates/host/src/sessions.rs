//! Session resumption: a client whose TCP connection drops gets its slabs back.
//!
//! A connection that sends `Resume { session }` is *bound* to that client-chosen token. When a
//! bound connection ends, its slabs are not freed but become *orphans* of the session; a later
//! connection resuming the same session adopts them. Orphans nobody adopts within the grace
//! period are freed by [`Sessions::reap`], which the accept loop calls at least every 100 ms,
//! so a client that never comes back leaks nothing for longer than the grace period.
//!
//! A client reconnects when it believes its connection dead, but the host may not have noticed
//! yet (no FIN or RST arrived). So a `Resume` of a session that a live connection holds takes
//! the session over: it bumps the session's generation, which the old connection's loop checks
//! on every iteration (at least every 100 ms) and stops serving when it changed; the old
//! connection's slabs become orphans as it ends and the new one adopts them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use clustermem_proto::ErrorCode;

use crate::store::{Refusal, Store};

/// How long a `Resume` taking a session over waits for the old connection to end. The old
/// connection notices within one poll (100 ms) unless it is stuck sending to a dead peer; two
/// seconds covers the first case with margin without leaving the client waiting long in the
/// second (it gets an error and may send `Resume` again).
const TAKEOVER_WAIT: Duration = Duration::from_secs(2);

/// A connection's binding to a session.
#[derive(Debug)]
pub(crate) struct Binding {
    token: u64,
    generation: u64,
    current: Arc<AtomicU64>,
}

impl Binding {
    /// Whether a newer `Resume` of the session took it over: this connection must stop.
    pub(crate) fn superseded(&self) -> bool {
        self.current.load(Ordering::Acquire) != self.generation
    }
}

#[derive(Debug)]
struct Entry {
    /// Bumped by every `Resume`; only the connection holding the latest value may serve.
    generation: Arc<AtomicU64>,
    /// Connections bound to the session that have not ended yet.
    live: usize,
    /// Orphaned slabs and when they were orphaned.
    orphans: Vec<(u64, Instant)>,
    /// The highest request id the session's ended connections handled: a resumed connection
    /// acknowledges a replayed write up to it without applying it again.
    handled_through: u64,
    /// What became of the requests a replay must answer as they were first answered.
    outcomes: Outcomes,
}

/// How many outcomes of each kind a session remembers: a client replays only what was not
/// answered, the end of its stream.
const MAX_OUTCOMES: usize = 1024;

/// The latest outcomes, by request id, that a replayed request must get again rather than be
/// handled afresh: writes that were refused (acknowledging a replay would tell the client the
/// host holds data it never wrote) and slabs allocated (a second allocation would leak the
/// first, whose id the client never learnt).
#[derive(Debug, Default, Clone)]
pub(crate) struct Outcomes {
    refused: BTreeMap<u64, Refusal>,
    allocated: BTreeMap<u64, u64>,
}

impl Outcomes {
    /// Request `id`, a write, was refused.
    pub(crate) fn refused(&mut self, id: u64, why: Refusal) {
        self.refused.insert(id, why);
        trim(&mut self.refused);
    }

    /// Request `id` allocated slab `slab_id`.
    pub(crate) fn allocated(&mut self, id: u64, slab_id: u64) {
        self.allocated.insert(id, slab_id);
        trim(&mut self.allocated);
    }

    /// Why request `id` was refused, if it was.
    pub(crate) fn refusal(&self, id: u64) -> Option<&Refusal> {
        self.refused.get(&id)
    }

    /// The slab request `id` allocated, if it did.
    pub(crate) fn allocation(&self, id: u64) -> Option<u64> {
        self.allocated.get(&id).copied()
    }

    fn merge(&mut self, other: &Outcomes) {
        self.refused.extend(other.refused.iter().map(|(&id, why)| (id, why.clone())));
        self.allocated.extend(&other.allocated);
        trim(&mut self.refused);
        trim(&mut self.allocated);
    }
}

/// Keeps the latest `MAX_OUTCOMES` entries.
fn trim<V>(map: &mut BTreeMap<u64, V>) {
    while map.len() > MAX_OUTCOMES {
        map.pop_first();
    }
}

/// What a resumed connection takes over from the session's earlier ones.
#[derive(Debug, Default)]
pub(crate) struct Resumed {
    /// Slabs it now owns.
    pub(crate) adopted: Vec<u64>,
    /// The highest request id the earlier connections handled (0 for a new session).
    pub(crate) handled_through: u64,
    /// What became of their requests that a replay must get again.
    pub(crate) outcomes: Outcomes,
}

/// Every session of one host.
#[derive(Debug)]
pub(crate) struct Sessions {
    grace: Duration,
    table: Mutex<HashMap<u64, Entry>>,
    changed: Condvar,
}

impl Sessions {
    pub(crate) fn new(grace: Duration) -> Self {
        Self { grace, table: Mutex::new(HashMap::new()), changed: Condvar::new() }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Entry>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Binds the connection holding `bound` to session `token` (taking it over from any other
    /// live connection) and returns what it takes over from the session's earlier connections.
    pub(crate) fn resume(
        &self,
        token: u64,
        bound: &mut Option<Binding>,
        store: &Store,
    ) -> Result<Resumed, Refusal> {
        if token == 0 {
            return Err((ErrorCode::BadRequest, "session token 0 is reserved".to_string()));
        }
        if let Some(b) = bound.as_ref().filter(|b| b.token != token) {
            return Err((
                ErrorCode::BadRequest,
                format!("this connection is already bound to another session ({:#x})", b.token),
            ));
        }
        let mut table = self.lock();
        let entry = table.entry(token).or_insert_with(|| Entry {
            generation: Arc::new(AtomicU64::new(0)),
            live: 0,
            orphans: Vec::new(),
            handled_through: 0,
            outcomes: Outcomes::default(),
        });
        if bound.is_none() {
            entry.live += 1;
        }
        let generation = entry.generation.fetch_add(1, Ordering::AcqRel) + 1;
        *bound = Some(Binding { token, generation, current: Arc::clone(&entry.generation) });
        let deadline = Instant::now() + TAKEOVER_WAIT;
        loop {
            let entry = table.get_mut(&token).expect("a session with a live connection stays");
            if entry.generation.load(Ordering::Acquire) != generation {
                return Err((ErrorCode::BadRequest, "superseded by a newer Resume of this session".into()));
            }
            // Adopt only once every earlier connection has ended, so its slabs are among the
            // orphans and none is still being written by it.
            if entry.live == 1 {
                let adopted: Vec<u64> = entry.orphans.drain(..).map(|(id, _)| id).collect();
                store.orphaned.fetch_sub(adopted.len() as u64, Ordering::Relaxed);
                let outcomes = entry.outcomes.clone();
                return Ok(Resumed { adopted, handled_through: entry.handled_through, outcomes });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err((
                    ErrorCode::HostFault,
                    format!(
                        "the session's previous connection has not ended within {TAKEOVER_WAIT:?}; \
                         send Resume again to adopt its slabs"
                    ),
                ));
            }
            table = self.changed.wait_timeout(table, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// A bound connection ended, having handled requests up to id `handled_through` with
    /// `outcomes`: its slabs become orphans of the session, or are freed at once when the
    /// grace period is zero and no newer connection of the session waits for them.
    pub(crate) fn end(
        &self,
        binding: Binding,
        owned: HashSet<u64>,
        store: &Store,
        handled_through: u64,
        outcomes: &Outcomes,
    ) {
        let mut table = self.lock();
        let entry = table.get_mut(&binding.token).expect("a session with a live connection stays");
        entry.live -= 1;
        entry.handled_through = entry.handled_through.max(handled_through);
        entry.outcomes.merge(outcomes);
        if self.grace.is_zero() && entry.live == 0 {
            for id in owned {
                store.free(id);
            }
        } else {
            let now = Instant::now();
            store.orphaned.fetch_add(owned.len() as u64, Ordering::Relaxed);
            entry.orphans.extend(owned.into_iter().map(|id| (id, now)));
        }
        if entry.live == 0 && entry.orphans.is_empty() {
            table.remove(&binding.token);
        }
        drop(table);
        self.changed.notify_all();
    }

    /// Frees orphans older than the grace period.
    pub(crate) fn reap(&self, store: &Store) {
        let now = Instant::now();
        let mut table = self.lock();
        table.retain(|_, entry| {
            entry.orphans.retain(|&(id, since)| {
                let keep = now.duration_since(since) < self.grace;
                if !keep {
                    store.free(id);
                    store.orphaned.fetch_sub(1, Ordering::Relaxed);
                }
                keep
            });
            entry.live > 0 || !entry.orphans.is_empty()
        });
    }
}
