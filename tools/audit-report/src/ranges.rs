//! Maps over page numbers that store runs, not pages: `[start, end) -> value`, with absent runs
//! meaning the default value. The replay keeps page attributes and pin counts in these, so its
//! memory grows with the number of distinct runs of pages (at most the distinct pages), and an
//! operation on a range costs the runs it covers, not its pages.

use std::collections::BTreeMap;

/// Non-overlapping runs of pages with a value other than `V::default()`.
#[derive(Clone, Debug, Default)]
pub struct RangeMap<V> {
    /// Run start -> (run end, value).
    runs: BTreeMap<u64, (u64, V)>,
}

impl<V: Copy + Eq + Default> RangeMap<V> {
    /// An empty map: every page has the default value.
    pub fn new() -> Self {
        RangeMap {
            runs: BTreeMap::new(),
        }
    }

    /// How many runs are stored.
    pub fn runs(&self) -> usize {
        self.runs.len()
    }

    /// The value of `page`.
    pub fn get(&self, page: u64) -> V {
        match self.runs.range(..=page).next_back() {
            Some((_, &(end, value))) if end > page => value,
            _ => V::default(),
        }
    }

    /// The runs with a non-default value that overlap `[start, end)`, clipped to it, in order.
    pub fn overlapping(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, u64, V)> + '_ {
        let before = self
            .runs
            .range(..start)
            .next_back()
            .filter(|(_, &(run_end, _))| run_end > start)
            .map(|(&s, &(e, v))| (s, e, v));
        let inside = self
            .runs
            .range(start..end.max(start))
            .map(|(&s, &(e, v))| (s, e, v));
        before
            .into_iter()
            .chain(inside)
            .map(move |(s, e, v)| (s.max(start), e.min(end), v))
            .filter(|(s, e, _)| s < e)
    }

    /// The first page of `[start, end)` whose value satisfies `test` (which may be true of the
    /// default value).
    pub fn find(&self, start: u64, end: u64, test: impl Fn(V) -> bool) -> Option<u64> {
        let mut at = start;
        for (s, e, v) in self.overlapping(start, end) {
            if s > at && test(V::default()) {
                return Some(at);
            }
            if test(v) {
                return Some(s);
            }
            at = e;
        }
        (at < end && test(V::default())).then_some(at)
    }

    /// Sets every page of `[start, end)` to `change(its value)`.
    pub fn update(&mut self, start: u64, end: u64, mut change: impl FnMut(V) -> V) {
        if start >= end {
            return;
        }
        self.split(start);
        self.split(end);
        let old: Vec<(u64, u64, V)> = self
            .runs
            .range(start..end)
            .map(|(&s, &(e, v))| (s, e, v))
            .collect();
        for (s, _, _) in &old {
            self.runs.remove(s);
        }
        let mut at = start;
        let mut pieces = Vec::with_capacity(old.len() * 2 + 1);
        for (s, e, v) in old {
            if s > at {
                pieces.push((at, s, change(V::default())));
            }
            pieces.push((s, e, change(v)));
            at = e;
        }
        if at < end {
            pieces.push((at, end, change(V::default())));
        }
        for (s, e, v) in pieces {
            if v != V::default() {
                self.runs.insert(s, (e, v));
            }
        }
        // Join equal neighbours inside the range and across both of its edges.
        let keys: Vec<u64> = {
            let first = self.runs.range(..start).next_back().map(|(&s, _)| s);
            first
                .into_iter()
                .chain(self.runs.range(start..=end).map(|(&s, _)| s))
                .collect()
        };
        let mut previous: Option<u64> = None;
        for key in keys {
            let Some(&(end_here, value)) = self.runs.get(&key) else {
                continue;
            };
            if let Some(p) = previous {
                let (p_end, p_value) = self.runs[&p];
                if p_end == key && p_value == value {
                    self.runs.remove(&key);
                    self.runs.insert(p, (end_here, value));
                    continue;
                }
            }
            previous = Some(key);
        }
    }

    /// Sets every page of `[start, end)` to `value`.
    pub fn set(&mut self, start: u64, end: u64, value: V) {
        self.update(start, end, |_| value);
    }

    /// Splits the run that contains `at` (if any) into two runs at `at`.
    fn split(&mut self, at: u64) {
        if let Some((&s, &(e, v))) = self.runs.range(..at).next_back() {
            if e > at {
                self.runs.insert(s, (at, v));
                self.runs.insert(at, (e, v));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny deterministic generator, enough to shuffle test cases.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn agrees_with_a_page_array() {
        let mut map: RangeMap<u32> = RangeMap::new();
        let mut pages = [0u32; 64];
        let mut state = 0x1234_5678_9abc_def1;
        for _ in 0..5000 {
            let a = next(&mut state) % 64;
            let b = next(&mut state) % 65;
            let (start, end) = (a.min(b), a.max(b));
            match next(&mut state) % 3 {
                0 => {
                    map.update(start, end, |v| v + 1);
                    pages[start as usize..end as usize]
                        .iter_mut()
                        .for_each(|p| *p += 1);
                }
                1 => {
                    map.update(start, end, |v| v.saturating_sub(1));
                    pages[start as usize..end as usize]
                        .iter_mut()
                        .for_each(|p| *p = p.saturating_sub(1));
                }
                _ => {
                    let value = (next(&mut state) % 2) as u32;
                    map.set(start, end, value);
                    pages[start as usize..end as usize].fill(value);
                }
            }
            for (page, expected) in pages.iter().enumerate() {
                assert_eq!(map.get(page as u64), *expected, "page {page}");
            }
            let mut runs = 0;
            let mut last: Option<u32> = None;
            for value in pages {
                if Some(value) != last && value != 0 {
                    runs += 1;
                }
                last = Some(value);
            }
            assert_eq!(map.runs(), runs, "runs are joined: {map:?}");
            let found = map.find(start, end, |v| v > 0);
            let expected = (start..end).find(|&p| pages[p as usize] > 0);
            assert_eq!(found, expected);
            let found = map.find(start, end, |v| v == 0);
            let expected = (start..end).find(|&p| pages[p as usize] == 0);
            assert_eq!(found, expected);
        }
    }
}
