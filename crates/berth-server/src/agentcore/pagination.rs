//! `maxResults` / `nextToken` for the three list operations. Lists are read whole (they
//! are small: runtimes, versions, endpoints) and cut here. A token is the hex of
//! `<operation>\n<sort key of the last item returned>`, so a page continues after that
//! key even if items were added or deleted in between.

use std::collections::HashMap;

use super::validate::{self, Checker};
use super::AwsError;

/// A validated page request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub max_results: usize,
    /// The sort key to continue after.
    pub after: Option<String>,
}

/// Read `maxResults` and `nextToken` from the query of list operation `op`.
pub fn page(op: &str, query: &HashMap<String, String>) -> Result<Page, AwsError> {
    let mut c = Checker::new();
    let max_results = validate::max_results(&mut c, query.get("maxResults").map(String::as_str));
    let token = query.get("nextToken").map(String::as_str);
    validate::next_token(&mut c, token);
    c.finish()?;
    let after = match token {
        None => None,
        Some(t) => Some(decode(op, t).ok_or_else(|| {
            AwsError::field(
                "nextToken",
                "Member must be a nextToken this operation returned",
            )
        })?),
    };
    Ok(Page { max_results, after })
}

fn encode(op: &str, key: &str) -> String {
    hex::encode(format!("{op}\n{key}"))
}

fn decode(op: &str, token: &str) -> Option<String> {
    let raw = String::from_utf8(hex::decode(token).ok()?).ok()?;
    let (kind, key) = raw.split_once('\n')?;
    (kind == op).then(|| key.to_string())
}

/// One page of `items` (sorted ascending by `key`) and the token for the next, if any.
pub fn paginate<T>(
    op: &str,
    items: Vec<T>,
    key: impl Fn(&T) -> String,
    page: &Page,
) -> (Vec<T>, Option<String>) {
    let mut rest: Vec<T> = match &page.after {
        None => items,
        Some(after) => items.into_iter().filter(|i| key(i) > *after).collect(),
    };
    if rest.len() <= page.max_results {
        return (rest, None);
    }
    rest.truncate(page.max_results);
    let next = rest.last().map(|last| encode(op, &key(last)));
    (rest, next)
}

/// A sort key from a time and a name: zero-padded so that string order is time order.
pub fn time_key(ms: i64, name: &str) -> String {
    format!("{:020}\u{1}{name}", ms.max(0))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn pages_walk_the_whole_list_once() {
        let items: Vec<u32> = (1..=7).collect();
        let key = |i: &u32| format!("{i:05}");
        let mut seen = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut query = vec![("maxResults", "3")];
            if let Some(t) = &token {
                query.push(("nextToken", t));
            }
            let page = page("List", &q(&query)).unwrap();
            let (got, next) = paginate("List", items.clone(), key, &page);
            assert!(got.len() <= 3);
            seen.extend(got);
            match next {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        assert_eq!(seen, items);
    }

    #[test]
    fn a_page_continues_after_a_deleted_item() {
        let key = |i: &u32| format!("{i:05}");
        let page1 = page("List", &q(&[("maxResults", "2")])).unwrap();
        let (got, next) = paginate("List", vec![1, 2, 3, 4], key, &page1);
        assert_eq!(got, [1, 2]);
        let next = next.unwrap();
        let page2 = page("List", &q(&[("nextToken", &next)])).unwrap();
        let (got, next) = paginate("List", vec![1, 3, 4], key, &page2);
        assert_eq!((got, next), (vec![3, 4], None));
    }

    #[test]
    fn exact_fit_has_no_next_token() {
        let p = page("List", &q(&[("maxResults", "2")])).unwrap();
        let (got, next) = paginate("List", vec![1, 2], |i: &i32| i.to_string(), &p);
        assert_eq!((got.len(), next), (2, None));
    }

    #[test]
    fn bad_parameters_are_validation_errors() {
        for query in [
            q(&[("maxResults", "0")]),
            q(&[("maxResults", "101")]),
            q(&[("maxResults", "ten")]),
            q(&[("nextToken", "zz")]),
            q(&[("nextToken", &encode("OtherOp", "x"))]),
        ] {
            let err = page("List", &query).unwrap_err();
            assert_eq!(
                err.shape,
                crate::agentcore::ErrorShape::Validation,
                "{query:?}"
            );
        }
        assert_eq!(page("List", &q(&[])).unwrap().max_results, 100);
    }

    #[test]
    fn time_keys_sort_by_time_then_name() {
        assert!(time_key(9, "b") < time_key(10, "a"));
        assert!(time_key(10, "a") < time_key(10, "b"));
    }
}
