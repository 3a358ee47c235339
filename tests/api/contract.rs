//! docs/api.md is the contract in words, `/openapi.json` its machine-readable half, and
//! `src/http/error.rs` the one list of problem codes: these tests keep the three telling
//! the same story on paths and codes. docs/api.md gives each endpoint a heading
//! `### METHOD /path` and each code a row of the table under `## Problem codes`.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::helpers::spawn_app;

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// `(method, path)` of every `### GET /data`-style heading, the method in lower case as
/// OpenAPI writes it.
fn endpoints_in_words(doc: &str) -> BTreeSet<(String, String)> {
    doc.lines()
        .filter_map(|line| line.strip_prefix("### "))
        .filter_map(|heading| heading.trim().split_once(' '))
        .filter(|(method, path)| ["GET", "POST", "PUT", "PATCH", "DELETE"].contains(method) && path.starts_with('/'))
        .map(|(method, path)| (method.to_lowercase(), path.trim().to_owned()))
        .collect()
}

/// The codes of the table under `## Problem codes`: its second column, in backticks,
/// below the header.
fn codes_in_words(doc: &str) -> BTreeSet<String> {
    let section = doc
        .split_once("\n## Problem codes\n")
        .map(|(_, rest)| rest.split("\n## ").next().unwrap_or(rest))
        .expect("docs/api.md has a `## Problem codes` section");
    section
        .lines()
        .filter(|line| line.starts_with('|') && !line.starts_with("|---"))
        .skip(1) // the header
        .filter_map(|row| row.split('|').nth(2))
        .flat_map(backticked)
        .collect()
}

/// The codes `ApiError::status_and_code` answers: each string after a `StatusCode::X,`.
fn codes_in_code(source: &str) -> BTreeSet<String> {
    source
        .split("StatusCode::")
        .skip(1)
        .filter_map(|rest| {
            let rest = rest.trim_start_matches(|c: char| c.is_ascii_uppercase() || c == '_');
            let rest = rest.strip_prefix(',')?.trim_start().strip_prefix('"')?;
            rest.split_once('"').map(|(code, _)| code.to_owned())
        })
        .filter(|code| !code.is_empty() && code.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .collect()
}

fn backticked(text: &str) -> Vec<String> {
    text.split('`').skip(1).step_by(2).map(str::to_owned).collect()
}

#[tokio::test]
async fn docs_api_md_names_exactly_the_paths_of_the_openapi_document() {
    let app = spawn_app().await;
    let document: Value = app.get_json("/openapi.json").await;

    let described: BTreeSet<(String, String)> = document["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| item.as_object().unwrap().keys().map(move |m| (m.clone(), path.clone())))
        .collect();
    let written = endpoints_in_words(&read("docs/api.md"));

    let missing: Vec<_> = described.difference(&written).collect();
    let extra: Vec<_> = written.difference(&described).collect();
    assert!(
        missing.is_empty(),
        "in /openapi.json but without a `### METHOD /path` in docs/api.md: {missing:?}"
    );
    assert!(extra.is_empty(), "in docs/api.md but not in /openapi.json: {extra:?}");
}

#[tokio::test]
async fn docs_api_md_lists_exactly_the_problem_codes_dapi_answers() {
    let app = spawn_app().await;
    let document: Value = app.get_json("/openapi.json").await;
    let doc = read("docs/api.md");
    let written = codes_in_words(&doc);
    let answered = codes_in_code(&read("src/http/error.rs"));
    assert!(
        answered.len() >= 20,
        "found too few codes in src/http/error.rs: {answered:?}"
    );

    let missing: Vec<_> = answered.difference(&written).collect();
    let extra: Vec<_> = written.difference(&answered).collect();
    assert!(
        missing.is_empty(),
        "answered by src/http/error.rs but not in docs/api.md's table: {missing:?}"
    );
    assert!(
        extra.is_empty(),
        "in docs/api.md's table but answered nowhere: {extra:?}"
    );

    // The OpenAPI document names codes in its response descriptions: each is a real one.
    let mut named = BTreeSet::new();
    for item in document["paths"].as_object().unwrap().values() {
        for operation in item.as_object().unwrap().values() {
            for response in operation["responses"].as_object().into_iter().flat_map(|r| r.values()) {
                let description = response["description"].as_str().unwrap_or_default();
                named.extend(
                    backticked(description)
                        .into_iter()
                        .filter(|word| word.contains('_') && word.chars().all(|c| c.is_ascii_lowercase() || c == '_')),
                );
            }
        }
    }
    assert!(!named.is_empty(), "the OpenAPI document names no problem code");
    let unknown: Vec<_> = named.difference(&written).collect();
    assert!(
        unknown.is_empty(),
        "/openapi.json names codes docs/api.md does not list: {unknown:?}"
    );
}

#[test]
fn the_parsers_read_what_they_are_meant_to() {
    let doc = "### GET /data\n### Compressed bodies\n## Problem codes\n\n| status | `code` | when |\n|---|---|---|\n| 400 | `invalid_id` | a `page` |\n\n## Guarantees\n| 1 | `not_a_code` | |\n";
    assert_eq!(
        endpoints_in_words(doc),
        BTreeSet::from([("get".to_owned(), "/data".to_owned())])
    );
    assert_eq!(codes_in_words(doc), BTreeSet::from(["invalid_id".to_owned()]));
    let source =
        "E::A => (StatusCode::BAD_REQUEST, \"invalid_id\"),\nE::B => (StatusCode::NOT_FOUND,\n \"not_found\"),";
    assert_eq!(
        codes_in_code(source),
        BTreeSet::from(["invalid_id".to_owned(), "not_found".to_owned()])
    );
}
