//! Retention as a pure function: given the images the log knows (job, name, when the build
//! finished, bytes, pinned), the rules (`keep_days`, `keep_last`), the time now and the disk
//! (free bytes under base_dir against `min_free_mb`), which images expire, in order, and why.
//!
//! Invariants: a pinned image is never chosen; the same inputs give the same list (so `gc
//! --dry-run` prints what the daemon's pass does); an image is chosen at most once; the disk
//! budget takes the images past the policy first (oldest first), then the oldest other unpinned
//! images, and stops as soon as the budget is met.

use std::collections::BTreeMap;

/// An image the log knows and has not expired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub job: u64,
    /// The image name (`keep_last` counts per name).
    pub name: String,
    /// When its build finished, seconds since the epoch.
    pub finished: u64,
    /// What its files hold.
    pub bytes: u64,
    pub pinned: bool,
}

/// The retention rules (0 turns a rule off).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rules {
    pub keep_days: u64,
    pub keep_last: u64,
    /// Bytes that must stay free under base_dir.
    pub min_free: u64,
}

/// One image chosen, with the rule that chose it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chosen {
    pub job: u64,
    pub bytes: u64,
    pub reason: String,
}

const DAY: u64 = 86_400;

/// The images to expire, in the order they are to go. `free` is the bytes free under base_dir
/// now (None: not known, the budget is not applied).
pub fn plan(images: &[Image], rules: Rules, now: u64, free: Option<u64>) -> Vec<Chosen> {
    // newest first within each name, ties by job number (the later job is newer)
    let mut by_name: BTreeMap<&str, Vec<&Image>> = BTreeMap::new();
    for i in images {
        by_name.entry(&i.name).or_default().push(i);
    }
    let mut rank: BTreeMap<u64, usize> = BTreeMap::new();
    for list in by_name.values_mut() {
        list.sort_by_key(|i| std::cmp::Reverse((i.finished, i.job)));
        for (n, i) in list.iter().enumerate() {
            rank.insert(i.job, n);
        }
    }
    let mut oldest_first: Vec<&Image> = images.iter().filter(|i| !i.pinned).collect();
    oldest_first.sort_by_key(|i| (i.finished, i.job));

    let past_policy = |i: &Image| -> Option<String> {
        let age = now.saturating_sub(i.finished);
        if rules.keep_days > 0 && age > rules.keep_days * DAY {
            return Some(format!(
                "older than keep_days = {} (finished {} day(s) ago)",
                rules.keep_days,
                age / DAY
            ));
        }
        let r = rank.get(&i.job).copied().unwrap_or(0);
        if rules.keep_last > 0 && r as u64 >= rules.keep_last {
            return Some(format!(
                "not among the newest keep_last = {} image(s) named {} (it is number {})",
                rules.keep_last,
                i.name,
                r + 1
            ));
        }
        None
    };

    let mut chosen = Vec::new();
    let mut taken = std::collections::HashSet::new();
    for i in &oldest_first {
        if let Some(reason) = past_policy(i) {
            taken.insert(i.job);
            chosen.push(Chosen {
                job: i.job,
                bytes: i.bytes,
                reason,
            });
        }
    }
    if let Some(free) = free
        && rules.min_free > 0
    {
        let freed: u64 = chosen.iter().map(|c| c.bytes).sum();
        let mut have = free.saturating_add(freed);
        for i in &oldest_first {
            if have >= rules.min_free {
                break;
            }
            if taken.contains(&i.job) {
                continue;
            }
            chosen.push(Chosen {
                job: i.job,
                bytes: i.bytes,
                reason: format!(
                    "disk budget: base_dir had {} MiB free, min_free_mb = {} (the oldest unpinned image)",
                    free >> 20,
                    rules.min_free >> 20
                ),
            });
            have = have.saturating_add(i.bytes);
        }
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn img(job: u64, name: &str, days_ago: u64, bytes: u64, pinned: bool) -> Image {
        Image {
            job,
            name: name.into(),
            finished: NOW - days_ago * DAY,
            bytes,
            pinned,
        }
    }

    fn jobs(c: &[Chosen]) -> Vec<u64> {
        c.iter().map(|c| c.job).collect()
    }

    #[test]
    fn no_rules_keep_everything() {
        let images = [img(1, "a", 400, 10, false), img(2, "a", 1, 10, false)];
        assert!(plan(&images, Rules::default(), NOW, Some(0)).is_empty());
    }

    #[test]
    fn keep_days_expires_exactly_the_older_images_never_a_pinned_one() {
        let images = [
            img(1, "a", 10, 1, false),
            img(2, "a", 8, 1, true),
            img(3, "b", 7, 1, false),
            img(4, "b", 6, 1, false),
        ];
        let rules = Rules {
            keep_days: 7,
            ..Rules::default()
        };
        // 7 days and a second is past; exactly 7 days is not
        let mut images = images.to_vec();
        images[2].finished -= 1;
        let c = plan(&images, rules, NOW, None);
        assert_eq!(jobs(&c), [1, 3]);
        assert!(c[0].reason.contains("keep_days = 7"), "{}", c[0].reason);
    }

    #[test]
    fn keep_last_counts_per_name_pinned_ones_included() {
        let images = [
            img(1, "a", 5, 1, false),
            img(2, "a", 4, 1, true),
            img(3, "a", 3, 1, false),
            img(4, "a", 2, 1, false),
            img(5, "b", 9, 1, false),
        ];
        let rules = Rules {
            keep_last: 2,
            ..Rules::default()
        };
        // a's newest two are 4 and 3; 2 is pinned; 1 goes. b has one.
        assert_eq!(jobs(&plan(&images, rules, NOW, None)), [1]);
        let rules = Rules {
            keep_last: 1,
            ..Rules::default()
        };
        assert_eq!(jobs(&plan(&images, rules, NOW, None)), [1, 3]);
    }

    #[test]
    fn the_budget_takes_past_policy_first_then_the_oldest_and_stops_when_met() {
        let images = [
            img(1, "a", 30, 100, false),
            img(2, "b", 20, 100, true),
            img(3, "c", 10, 100, false),
            img(4, "d", 5, 100, false),
            img(5, "d", 1, 100, false),
        ];
        let rules = Rules {
            keep_last: 1,
            min_free: 250,
            ..Rules::default()
        };
        // past policy: 4 (d's second). free 0 + 100 -> still short: 1 (oldest), 3.
        let c = plan(&images, rules, NOW, Some(0));
        assert_eq!(jobs(&c), [4, 1, 3]);
        assert!(c[1].reason.contains("disk budget"), "{}", c[1].reason);
        // room enough: only the policy's
        assert_eq!(jobs(&plan(&images, rules, NOW, Some(1000))), [4]);
        // everything unpinned is not enough: all of it, never the pinned one
        let rules = Rules {
            min_free: 10_000,
            ..rules
        };
        assert_eq!(jobs(&plan(&images, rules, NOW, Some(0))), [4, 1, 3, 5]);
    }

    #[test]
    fn the_same_inputs_give_the_same_list() {
        let images: Vec<Image> = (1..50)
            .map(|j| {
                img(
                    j,
                    ["a", "b", "c"][(j % 3) as usize],
                    j % 17,
                    j * 7,
                    j % 5 == 0,
                )
            })
            .collect();
        let rules = Rules {
            keep_days: 10,
            keep_last: 3,
            min_free: 2000,
        };
        let a = plan(&images, rules, NOW, Some(100));
        let mut shuffled = images.clone();
        shuffled.reverse();
        assert_eq!(a, plan(&shuffled, rules, NOW, Some(100)));
        let mut seen = std::collections::HashSet::new();
        assert!(a.iter().all(|c| seen.insert(c.job)));
        assert!(
            a.iter()
                .all(|c| images.iter().any(|i| i.job == c.job && !i.pinned))
        );
    }
}
