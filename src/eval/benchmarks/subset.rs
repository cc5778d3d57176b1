//! How many items of each part of a benchmark to ask (`ItemLimit`, `--limit-of`), and
//! random subsets of a benchmark that keep what its score needs: MME items stay in pairs per
//! image (acc+), POPE items keep their file's yes/no proportions.

use std::collections::{BTreeMap, HashMap};

use anyhow::{Context, Result, bail};

use super::item::{Item, Truth};
use crate::util::rng::Rng;

/// The parts a benchmark's items come in (shapes has all four; POPE's limit is per file).
pub const PARTS: [&str; 4] = ["vqa", "pope", "mme", "captions"];

/// How many items `load_items` keeps of each part: the part's own limit, else `all`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ItemLimit {
    pub all: Option<usize>,
    pub parts: BTreeMap<String, usize>,
}

impl ItemLimit {
    pub fn of(&self, part: &str) -> Option<usize> {
        self.parts.get(part).copied().or(self.all)
    }
}

/// `PART=N` (`--limit-of`): a part of `PARTS` and a positive count.
pub fn parse_part_limit(flag: &str, text: &str) -> Result<(String, usize)> {
    let (part, n) = text
        .split_once('=')
        .with_context(|| format!("{flag} {text}: expected PART=N"))?;
    if !PARTS.contains(&part) {
        bail!(
            "{flag} {text}: unknown part {part:?} (one of {})",
            PARTS.join(", ")
        );
    }
    let n: usize = n
        .parse()
        .ok()
        .filter(|&n| n > 0)
        .with_context(|| format!("{flag} {text}: N must be a positive integer"))?;
    Ok((part.to_string(), n))
}

/// At most `n` items, chosen at random with `seed` but kept in their order. MME items are
/// kept or dropped per image so that acc+ stays defined, and POPE items are drawn per label
/// in the file's proportions (a random 40 of a balanced file could be 26 "yes" and 14 "no",
/// where answering "yes" to everything would score 65%).
pub fn subset(items: Vec<Item>, n: Option<usize>, seed: u64) -> Vec<Item> {
    let Some(n) = n else { return items };
    if items.len() <= n {
        return items;
    }
    let group = |it: &Item| match &it.truth {
        Truth::Mme {
            subtask,
            image_name,
            ..
        } => format!("{subtask}/{image_name}"),
        _ => it.id.clone(),
    };
    let stratum = |it: &Item| match &it.truth {
        Truth::Pope { label, .. } => label.trim().to_lowercase(),
        _ => String::new(),
    };
    let mut groups: Vec<String> = Vec::new();
    let mut size: HashMap<String, usize> = HashMap::new();
    let mut stratum_of: HashMap<String, String> = HashMap::new();
    let mut in_stratum: BTreeMap<String, usize> = BTreeMap::new();
    for it in &items {
        let g = group(it);
        let e = size.entry(g.clone()).or_insert(0);
        if *e == 0 {
            stratum_of.insert(g.clone(), stratum(it));
            groups.push(g);
        }
        *e += 1;
        *in_stratum.entry(stratum(it)).or_insert(0) += 1;
    }
    // each stratum's share of n, largest remainders first so that the quotas sum to n
    let total_items = items.len();
    let mut quota: BTreeMap<String, usize> = in_stratum
        .iter()
        .map(|(k, &c)| (k.clone(), c * n / total_items))
        .collect();
    let mut remainders: Vec<(usize, String)> = in_stratum
        .iter()
        .map(|(k, &c)| (c * n % total_items, k.clone()))
        .collect();
    remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let short = n - quota.values().sum::<usize>();
    for (_, k) in remainders.into_iter().take(short) {
        *quota.get_mut(&k).expect("a stratum") += 1;
    }
    Rng::new(seed).shuffle(&mut groups);
    let mut keep = std::collections::HashSet::new();
    let mut taken: HashMap<String, usize> = HashMap::new();
    for g in groups {
        let st = &stratum_of[&g];
        let t = taken.entry(st.clone()).or_insert(0);
        if *t >= quota[st] {
            continue;
        }
        *t += size[&g];
        keep.insert(g);
    }
    items
        .into_iter()
        .filter(|it| keep.contains(&group(it)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::path::PathBuf;

    fn pope(i: usize, label: &str) -> Item {
        Item {
            id: format!("pope/random/{i}"),
            image: PathBuf::from(format!("{}.png", i / 2)),
            question: "Is there a cat in the image?".into(),
            truth: Truth::Pope {
                split: "random".into(),
                question_id: Value::from(i),
                label: label.into(),
            },
        }
    }

    #[test]
    fn pope_subsets_keep_the_label_balance() {
        // a balanced file: every seed's subset of 40 has 20 of each label, in file order
        let items: Vec<Item> = (0..300)
            .map(|i| pope(i, if i % 2 == 0 { "yes" } else { "no" }))
            .collect();
        for seed in 0..20 {
            let s = subset(items.clone(), Some(40), seed);
            let yes = s
                .iter()
                .filter(|it| matches!(&it.truth, Truth::Pope { label, .. } if label == "yes"))
                .count();
            assert_eq!((s.len(), yes), (40, 20), "seed {seed}");
            let ids: Vec<&String> = s.iter().map(|it| &it.id).collect();
            let mut sorted = ids.clone();
            sorted.sort_by_key(|id| id.rsplit('/').next().unwrap().parse::<usize>().unwrap());
            assert_eq!(ids, sorted);
        }
        // 3:1 proportions, 10 of 40 items: quotas 7.5 "yes" and 2.5 "no"; the one item left
        // goes to the largest remainder, here a tie, broken by label name ("no")
        let skewed: Vec<Item> = (0..40)
            .map(|i| pope(i, if i % 4 == 0 { "no" } else { "yes" }))
            .collect();
        let s = subset(skewed, Some(10), 1);
        let no = s
            .iter()
            .filter(|it| matches!(&it.truth, Truth::Pope { label, .. } if label == "no"))
            .count();
        assert_eq!((s.len(), no), (10, 3));
    }

    #[test]
    fn mme_subsets_keep_both_questions_of_an_image() {
        let items: Vec<Item> = (0..40)
            .map(|i| Item {
                id: format!("mme/color/{}/{}", i / 2, i % 2),
                image: PathBuf::from(format!("{}.png", i / 2)),
                question: "Is the car red?".into(),
                truth: Truth::Mme {
                    subtask: "color".into(),
                    image_name: format!("{}.png", i / 2),
                    answer: if i % 2 == 0 { "Yes" } else { "No" }.into(),
                },
            })
            .collect();
        let s = subset(items, Some(9), 3);
        // groups of two: the last one taken may pass n by one
        assert_eq!(s.len(), 10);
        for pair in s.chunks(2) {
            assert_eq!(pair[0].image, pair[1].image);
        }
    }
}
