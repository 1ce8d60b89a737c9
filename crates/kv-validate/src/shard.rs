//! Which windows of the plan one process evaluates: all of them, a
//! `--windows START..END` slice, or a `--shard I/N` (one of N balanced
//! shards, for a Slurm job array or a Kubernetes Indexed Job), further
//! split over the devices of `--devices` (each worker gets `--worker-shard
//! J/D` of its parent's windows). The window count is known only once the
//! text is tokenized, so a [`Slice`] is resolved then ([`Slice::resolve`]).

use std::ops::Range;

use crate::records::WindowRange;

/// `--shard I/N`: shard `index` (0-based) of `count` balanced shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?}: expected I/N, e.g. 0/4 (shard I of N, 0-based)");
        let (index, count) = text.split_once('/').ok_or_else(bad)?;
        let index: usize = index.trim().parse().map_err(|_| bad())?;
        let count: usize = count.trim().parse().map_err(|_| bad())?;
        if count == 0 {
            return Err(format!("{text:?}: N must be at least 1"));
        }
        if index >= count {
            return Err(format!(
                "{text:?}: I must be below N (shards are numbered 0..{count})"
            ));
        }
        Ok(Shard { index, count })
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Shard {
    /// This shard's part of `range`: the first `len % count` shards take one
    /// window more, so sizes differ by at most one and the shards cover
    /// `range` in order, each window once. A shard may be empty when there
    /// are fewer windows than shards.
    pub fn of(self, range: Range<usize>) -> Range<usize> {
        let len = range.len();
        let (base, extra) = (len / self.count, len % self.count);
        let start = range.start + self.index * base + self.index.min(extra);
        let size = base + usize::from(self.index < extra);
        start..start + size
    }
}

/// The windows one process evaluates, before the plan's count is known.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Slice {
    /// `--windows` or `--shard`; `None`: the whole plan.
    pub base: Option<SliceBase>,
    /// `--worker-shard`: a worker's part of `base` (set by `--devices`).
    pub worker: Option<Shard>,
}

/// How a command line picks its windows of the plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SliceBase {
    Windows(WindowRange),
    Shard(Shard),
}

impl Slice {
    /// Whether this process evaluates part of the plan only (its records
    /// are then its only output).
    pub fn is_partial(&self) -> bool {
        self.base.is_some() || self.worker.is_some()
    }

    /// The windows of a plan of `planned` windows this process evaluates.
    pub fn resolve(&self, planned: usize) -> Result<Range<usize>, String> {
        let base = match self.base {
            None => 0..planned,
            Some(SliceBase::Windows(range)) => range.within(planned)?,
            Some(SliceBase::Shard(shard)) => shard.of(0..planned),
        };
        Ok(match self.worker {
            Some(worker) => worker.of(base),
            None => base,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_parse_and_refuse_what_names_no_shard() {
        assert_eq!("2/5".parse(), Ok(Shard { index: 2, count: 5 }));
        assert_eq!("0/1".parse(), Ok(Shard { index: 0, count: 1 }));
        for (bad, why) in [
            ("3", "expected I/N"),
            ("a/4", "expected I/N"),
            ("-1/4", "expected I/N"),
            ("1/0", "N must be at least 1"),
            ("4/4", "I must be below N"),
        ] {
            let error = bad.parse::<Shard>().unwrap_err();
            assert!(error.contains(why), "{bad}: {error}");
        }
    }

    #[test]
    fn shards_are_balanced_disjoint_and_cover_the_range_in_order() {
        for len in 0..40 {
            for count in 1..12 {
                let parts: Vec<Range<usize>> = (0..count)
                    .map(|index| Shard { index, count }.of(5..5 + len))
                    .collect();
                let sizes: Vec<usize> = parts.iter().map(|p| p.len()).collect();
                let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
                assert!(max - min <= 1, "{len} in {count}: {sizes:?}");
                let covered: Vec<usize> = parts.into_iter().flatten().collect();
                assert_eq!(
                    covered,
                    (5..5 + len).collect::<Vec<_>>(),
                    "{len} in {count}"
                );
            }
        }
        // Hand-computed: 10 windows in 3 shards are 4, 3, 3.
        let of = |index| Shard { index, count: 3 }.of(0..10);
        assert_eq!([of(0), of(1), of(2)], [0..4, 4..7, 7..10]);
    }

    #[test]
    fn a_worker_splits_its_parents_slice() {
        let slice = Slice {
            base: Some(SliceBase::Shard(Shard { index: 1, count: 2 })),
            worker: Some(Shard { index: 1, count: 2 }),
        };
        // Shard 1/2 of 11 windows is 6..11; its second half 9..11.
        assert_eq!(slice.resolve(11), Ok(9..11));
        let windows = Slice {
            base: Some(SliceBase::Windows(WindowRange { start: 2, end: 9 })),
            worker: None,
        };
        assert_eq!(windows.resolve(9), Ok(2..9));
        assert!(windows.resolve(8).unwrap_err().contains("only 8 windows"));
        assert!(!Slice::default().is_partial());
        assert_eq!(Slice::default().resolve(3), Ok(0..3));
    }
}
