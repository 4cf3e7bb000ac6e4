//! The SQL predicates LanceDB filters and deletes take.

use semantis_cache::entry::EntryFilter;

/// A SQL string literal.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// True for the rows whose id is one of `ids`.
pub fn ids_in(ids: &[String]) -> String {
    let list: Vec<String> = ids.iter().map(|i| quote(i)).collect();
    format!("id IN ({})", list.join(","))
}

/// True for the rows `filter` matches.
pub fn filter(filter: &EntryFilter) -> String {
    match filter {
        EntryFilter::All => "true".to_owned(),
        EntryFilter::Scope(s) => format!("scope = {}", quote(s)),
        EntryFilter::Namespace(n) => format!("namespace = {}", quote(n)),
    }
}

/// True for the rows that are live at `now_ms`.
pub fn live(now_ms: i64) -> String {
    format!("expires_at > {now_ms}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_are_escaped_so_an_id_cannot_widen_a_delete() {
        assert_eq!(
            ids_in(&["a".into(), "x') OR ('1'='1".into()]),
            "id IN ('a','x'') OR (''1''=''1')"
        );
        assert_eq!(filter(&EntryFilter::Scope("o'k".into())), "scope = 'o''k'");
        assert_eq!(filter(&EntryFilter::All), "true");
    }
}
