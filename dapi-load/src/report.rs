//! The human-readable summary, drawn from the JSON one.

use serde_json::Value;

use crate::check::Check;

/// The human-readable summary: a table per endpoint, then totals, latency and check lines.
pub(crate) fn report(summary: &Value, check: Option<&Check>) -> String {
    use std::fmt::Write;
    let num = |v: &Value, key: &str| v[key].as_f64().unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<23} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7}  statuses",
        "endpoint", "requests", "req/s", "msgs/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "retries"
    );
    for e in summary["endpoints"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let messages = if num(e, "messages") > 0.0 {
            format!("{:.0}", num(e, "messages_per_second"))
        } else {
            "-".to_owned()
        };
        let items = if e["item_statuses"].is_object() {
            format!(", items {}", e["item_statuses"])
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "{:<23} {:>9} {:>8.0} {:>8} {:>8.2} {:>8.2} {:>8.2} {:>8.1} {:>7}  {}{items}",
            e["endpoint"].as_str().unwrap_or_default(),
            e["requests"].as_u64().unwrap_or_default(),
            num(e, "per_second"),
            messages,
            num(e, "p50_ms"),
            num(e, "p90_ms"),
            num(e, "p99_ms"),
            num(e, "max_ms"),
            e["retries"].as_u64().unwrap_or_default(),
            e["statuses"]
        );
    }
    let causes = &summary["retry_causes"];
    let _ = writeln!(
        out,
        "messages staged: {} ({:.0}/s); retries: {} (timeouts {}, transport errors {}, 503s {}), answered as duplicates: {}; requests without an answer: {}",
        summary["messages"],
        num(summary, "messages_per_second"),
        summary["retries"],
        causes["timeout"],
        causes["transport"],
        causes["503"],
        summary["duplicate_answers"],
        summary["transport_errors"]
    );
    let visibility = &summary["grant_to_readable"];
    let _ = write!(
        out,
        "grant → readable: {} probes, p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms, not readable after 10 s: {}",
        visibility["probes"],
        num(visibility, "p50_ms"),
        num(visibility, "p90_ms"),
        num(visibility, "p99_ms"),
        num(visibility, "max_ms"),
        visibility["not_readable_after_10s"]
    );
    let erasures = &summary["erasures"];
    if erasures.is_object() {
        let _ = write!(
            out,
            "\nerasures: {} requested — {} completed ({} of them after 503 erasure_pending), {} still pending, {} refused, {} without an answer; request → completed: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            erasures["requested"],
            erasures["completed"],
            erasures["completed_after_pending"],
            erasures["pending"],
            erasures["rejected"],
            erasures["unanswered"],
            num(erasures, "p50_ms"),
            num(erasures, "p90_ms"),
            num(erasures, "p99_ms"),
            num(erasures, "max_ms"),
        );
    }
    if let Some(c) = check {
        let _ = write!(
            out,
            "\ncheck: {} granted dialogs ({} acknowledged messages), {} refused, {} undecided — lost {}, duplicated {}, leaked {} (stored without a 202: {}, under another messageId: {})",
            c.granted_dialogs,
            c.acknowledged_granted_messages,
            c.refused_dialogs,
            c.undecided_dialogs,
            c.lost,
            c.duplicated,
            c.leaked,
            c.unacknowledged_but_stored,
            c.wrong_message_id
        );
        if let Some(e) = &c.erasure {
            let _ = write!(
                out,
                "\nerasure check: {} messages acknowledged before their customer's erasure — readable {}, in a dialog not read as refused {} (of {} dialogs: {} not refused); {} in flight while an erasure ran (either way is right)",
                e.erased_messages,
                e.erased_but_readable,
                e.erased_dialog_not_refused,
                e.erased_dialogs,
                e.erased_dialogs_not_refused,
                e.racing_messages
            );
        }
        if let Some(e) = &c.export {
            let _ = write!(
                out,
                "\nexport check: {} syncs, {} messages received ({} incomplete bodies asked again) — missing {}, duplicated {}, leaked {}",
                e.syncs, e.messages_received, e.incomplete_bodies, e.missing, e.duplicated, e.leaked
            );
        }
    }
    out
}
