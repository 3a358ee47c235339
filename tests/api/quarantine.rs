//! docs/operations.md's "Quarantine" commands, run as written (the prefix, the shard tag
//! and the dialog id put in), for each kind of dialog set aside: its messages alone, and
//! its state with them.

use std::process::Command;

use crate::helpers::{TestApp, drain, flusher, redis_url, spawn_api_only, test_settings};

/// The `redis-cli` lines of the section's code blocks, each split into its arguments
/// (single quotes as the shell reads them).
fn documented_commands() -> Vec<Vec<String>> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md")).unwrap();
    let section = &doc[doc.find("## Quarantine").expect("the section")..];
    let section = section[3..].find("\n## ").map_or(section, |end| &section[..end + 3]);
    let mut commands = Vec::new();
    let mut in_block = false;
    for line in section.lines() {
        if line.starts_with("```") {
            in_block = !in_block;
        } else if in_block && line.starts_with("redis-cli ") {
            commands.push(shell_words(line));
        }
    }
    commands
}

fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let (mut quoted, mut started) = (false, false);
    for c in line.chars() {
        match c {
            '\'' => (quoted, started) = (!quoted, true),
            ' ' if !quoted => {
                if started {
                    words.push(std::mem::take(&mut word));
                }
                started = false;
            }
            c => (word, started) = (word + &c.to_string(), true),
        }
    }
    if started {
        words.push(word);
    }
    words
}

/// Runs the documented commands for `dialog` of `app`; returns each one's output.
fn run_documented(app: &TestApp, dialog: i64) -> Vec<String> {
    let stem = app.keys.meta(dialog).strip_suffix("meta").unwrap().to_owned();
    let shard = stem.strip_suffix(&format!("d{dialog}:")).unwrap().to_owned();
    let prefix = app.keys.prefix();
    documented_commands()
        .into_iter()
        .map(|words| {
            let args: Vec<String> = words[1..]
                .iter()
                .map(|w| {
                    let w = w
                        .replace("dapi:{s9.3}:d42:", &stem)
                        .replace("dapi:{s9.3}:", &shard)
                        .replace("dapi:{*}:d42:", &format!("{prefix}:{{*}}:d{dialog}:"))
                        .replace("dapi:{*}:", &format!("{prefix}:{{*}}:"));
                    if w == "42" { dialog.to_string() } else { w }
                })
                .collect();
            let out = Command::new("redis-cli")
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .arg("-u")
                .arg(redis_url())
                .args(&args)
                .output()
                .expect("redis-cli runs");
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                out.status.success() && !text.starts_with("(error)") && !text.starts_with("ERR"),
                "{args:?}: {text}"
            );
            text
        })
        .collect()
}

async fn rpush(app: &TestApp, key: &str, item: &str) {
    let mut conn = app.redis.clone();
    let _: i64 = redis::cmd("RPUSH")
        .arg(key)
        .arg(item)
        .query_async(&mut conn)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_dialog_whose_messages_alone_were_set_aside_is_replayed_as_documented() {
    let app = spawn_api_only(test_settings()).await;
    let mut flusher = flusher(&app);
    app.stage(1, 400, "one", "EN").await;
    // A staged message that does not decode: the flusher sets the messages aside.
    rpush(&app, &app.keys.msgs(400), "not a staged message").await;
    app.consent(400, true).await;
    drain(&mut flusher).await;
    assert!(app.quarantine_index().await.contains_key("400"));
    assert!(app.stored_seqs(400).await.is_empty());

    // The repair: drop the bad item (its text could be fixed instead).
    let mut conn = app.redis.clone();
    let _: i64 = redis::cmd("LREM")
        .arg(app.keys.quarantined_msgs(400))
        .arg(0)
        .arg("not a staged message")
        .query_async(&mut conn)
        .await
        .unwrap();
    // Meanwhile the dialog received another message.
    app.stage(1, 400, "two", "EN").await;
    drain(&mut flusher).await;

    let outputs = run_documented(&app, 400);
    assert_eq!(outputs.last().unwrap().trim(), "1", "one message put back");
    drain(&mut flusher).await;
    assert_eq!(app.stored_seqs(400).await, [1, 2]);
    assert!(!app.quarantine_index().await.contains_key("400"));
}

#[tokio::test]
async fn a_dialog_set_aside_whole_is_replayed_as_documented() {
    let app = spawn_api_only(test_settings()).await;
    let mut flusher = flusher(&app);
    app.stage(1, 401, "one", "EN").await;
    app.stage(1, 401, "two", "EN").await;
    app.consent(401, true).await;
    // A decision dapi does not write: the flusher sets the whole dialog aside.
    let mut conn = app.redis.clone();
    let _: () = redis::cmd("HSET")
        .arg(app.keys.meta(401))
        .arg("d")
        .arg("z")
        .query_async(&mut conn)
        .await
        .unwrap();
    drain(&mut flusher).await;
    assert!(app.quarantine_index().await.contains_key("401"));

    // The repair the docs give as their example.
    let _: () = redis::cmd("HSET")
        .arg(app.keys.quarantined_meta(401))
        .arg("d")
        .arg("g")
        .query_async(&mut conn)
        .await
        .unwrap();
    let outputs = run_documented(&app, 401);
    assert_eq!(outputs.last().unwrap().trim(), "2");
    drain(&mut flusher).await;
    assert_eq!(app.stored_seqs(401).await, [1, 2]);
}
