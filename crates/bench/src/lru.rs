//! Exact LRU simulation of an access trace: the yardstick for the runtime's eviction policy,
//! which sees only misses and first writes, not every access.

const NONE: u32 = u32::MAX;

/// Hit rate of an LRU cache of `capacity` pages over `trace` (page indices below `pages`).
pub(crate) fn hit_rate(trace: &[u32], pages: usize, capacity: usize) -> f64 {
    if trace.is_empty() {
        return 0.0;
    }
    // A doubly linked list threaded through arrays indexed by page: O(1) per access.
    let mut prev = vec![NONE; pages];
    let mut next = vec![NONE; pages];
    let mut resident = vec![false; pages];
    let (mut head, mut tail) = (NONE, NONE); // head: most recent
    let mut len = 0usize;
    let mut hits = 0u64;
    let unlink = |p: u32, prev: &mut [u32], next: &mut [u32], head: &mut u32, tail: &mut u32| {
        let (a, b) = (prev[p as usize], next[p as usize]);
        if a == NONE {
            *head = b;
        } else {
            next[a as usize] = b;
        }
        if b == NONE {
            *tail = a;
        } else {
            prev[b as usize] = a;
        }
    };
    for &p in trace {
        if resident[p as usize] {
            hits += 1;
            unlink(p, &mut prev, &mut next, &mut head, &mut tail);
        } else {
            if len == capacity {
                let victim = tail;
                unlink(victim, &mut prev, &mut next, &mut head, &mut tail);
                resident[victim as usize] = false;
                len -= 1;
            }
            resident[p as usize] = true;
            len += 1;
        }
        prev[p as usize] = NONE;
        next[p as usize] = head;
        if head != NONE {
            prev[head as usize] = p;
        }
        head = p;
        if tail == NONE {
            tail = p;
        }
    }
    hits as f64 / trace.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_hand_computed_traces() {
        // Capacity 2: 0 1 0 2 1 -> miss miss hit miss(evicts 1) miss
        assert_eq!(hit_rate(&[0, 1, 0, 2, 1], 3, 2), 1.0 / 5.0);
        // Everything fits: only cold misses.
        assert_eq!(hit_rate(&[0, 1, 2, 0, 1, 2], 3, 3), 3.0 / 6.0);
        // A loop one larger than the cache never hits under LRU.
        assert_eq!(hit_rate(&[0, 1, 2, 0, 1, 2, 0, 1, 2], 3, 2), 0.0);
    }
}
