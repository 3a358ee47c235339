//! Erasure a person can be shown: where a dialog's consent stands, a whole customer
//! erased with a receipt (through a PostgreSQL outage and a crash too), the audit trail,
//! and who may ask.

use std::time::Duration;

use dapi::config::Tokens;
use dapi::domain::CustomerId;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{TestApp, assert_problem, drain, flusher, post_to, spawn_api_only, test_settings};
use crate::outage::without_postgres;

async fn delete_customer(app: &TestApp, customer: i64) -> reqwest::Response {
    app.http
        .delete(format!("{}/customers/{customer}", app.base))
        .send()
        .await
        .unwrap()
}

async fn status(app: &TestApp, dialog: i64) -> Value {
    app.get_json(&format!("/consents/{dialog}")).await
}

/// Every event of the audit trail, newest first, following `next`.
async fn audit(app: &TestApp, query: &str) -> Vec<Value> {
    let mut events = Vec::new();
    let mut url = format!("{}/audit?pageSize=2&{query}", app.base);
    loop {
        let page: Value = app.http.get(&url).send().await.unwrap().json().await.unwrap();
        assert!(page["results"].is_array(), "{url}: {page}");
        events.extend(page["results"].as_array().unwrap().iter().cloned());
        match page["next"].as_str() {
            Some(next) => url = next.to_owned(),
            None => return events,
        }
    }
}

/// What a flusher-role process's pass over pending erasures does, run now.
async fn finish_pending(app: &TestApp) -> usize {
    let staging = dapi::staging::Staging::new(
        crate::helpers::connector(&app.settings),
        &app.settings.redis_prefix,
        app.settings.staging_ttl,
    )
    .unwrap();
    dapi::erasure::finish_pending(&staging, &app.store, Duration::from_secs(1)).await
}

/// An erasure of `customer` recorded and nothing else done: a process that died there.
async fn begin_erasure(app: &TestApp, customer: i64) -> dapi::store::erasure::Receipt {
    app.store
        .begin_erasure(
            CustomerId::from_stored(customer),
            uuid::Uuid::now_v7(),
            time::OffsetDateTime::now_utc(),
        )
        .await
        .unwrap()
}

fn kinds(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["event"].as_str().unwrap()).collect()
}

#[tokio::test]
async fn consent_status_follows_a_dialog_from_pending_to_erased() {
    let app = spawn_api_only(test_settings()).await;
    let mut flusher = flusher(&app);
    app.stage(1, 500, "a", "EN").await;
    app.stage(1, 500, "b", "EN").await;
    let pending = status(&app, 500).await;
    assert_eq!(
        (
            &pending["consent"],
            &pending["decidedAt"],
            &pending["staged"],
            &pending["stored"],
            &pending["customerId"]
        ),
        (&json!("pending"), &Value::Null, &json!(2), &json!(0), &json!(1)),
        "{pending}"
    );
    app.consent(500, true).await;
    drain(&mut flusher).await;
    let granted = status(&app, 500).await;
    assert_eq!(
        (&granted["consent"], &granted["staged"], &granted["stored"]),
        (&json!("granted"), &json!(0), &json!(2))
    );
    assert!(granted["decidedAt"].as_str().unwrap().ends_with('Z'));
    assert_eq!(granted["erasedAt"], Value::Null);

    assert_eq!(app.consent(500, false).await.status(), StatusCode::OK);
    let refused = status(&app, 500).await;
    assert_eq!(
        (&refused["consent"], &refused["staged"], &refused["stored"]),
        (&json!("refused"), &json!(0), &json!(0))
    );
    assert!(refused["erasedAt"].is_string(), "{refused}");
    // Redis forgets it: PostgreSQL still tells.
    app.lose(500).await;
    assert_eq!(status(&app, 500).await["consent"], "refused");
    assert_problem(
        app.get("/consents/501").await,
        StatusCode::NOT_FOUND,
        "dialog_not_found",
    )
    .await;
    assert_problem(app.get("/consents/x").await, StatusCode::BAD_REQUEST, "invalid_id").await;
}

#[tokio::test]
async fn a_customer_is_erased_everywhere_with_an_exact_receipt() {
    let app = spawn_api_only(test_settings()).await;
    let mut flusher = flusher(&app);
    // Customer 7: a granted, flushed dialog with one more message staged; a pending one;
    // a granted one Redis forgot; and customer 8's dialog, which stays.
    for text in ["a", "b"] {
        app.stage(7, 510, text, "EN").await;
    }
    app.consent(510, true).await;
    app.stage(7, 512, "x", "EN").await;
    app.consent(512, true).await;
    drain(&mut flusher).await;
    app.lose(512).await;
    app.stage(7, 510, "c, staged", "EN").await;
    app.stage(7, 511, "pending", "EN").await;
    app.stage(8, 520, "someone else", "EN").await;
    app.consent(520, true).await;
    drain(&mut flusher).await;
    app.stage(7, 510, "d, staged after the flush", "EN").await;

    let response = delete_customer(&app, 7).await;
    assert_eq!(response.status(), StatusCode::OK);
    let receipt: Value = response.json().await.unwrap();
    // 510: a, b, c stored, d staged (4); 511: 1 staged; 512: x stored (1).
    assert_eq!(
        (
            &receipt["customerId"],
            &receipt["status"],
            &receipt["dialogs"],
            &receipt["messages"]
        ),
        (&json!(7), &json!("completed"), &json!(3), &json!(6)),
        "{receipt}"
    );
    let id = receipt["erasureId"].as_str().unwrap();
    assert_eq!(id.len(), 36);
    assert!(receipt["completedAt"].is_string() && receipt["requestedAt"].is_string());

    for dialog in [510, 511, 512] {
        assert!(app.stored_seqs(dialog).await.is_empty(), "{dialog}");
        assert_eq!(app.staged_len(dialog).await, 0, "{dialog}");
        assert_eq!(status(&app, dialog).await["consent"], "refused");
        let later = app
            .post_json(&format!("/data/7/{dialog}"), &json!({"text": "t", "language": "EN"}))
            .await;
        assert_problem(later, StatusCode::CONFLICT, "consent_refused").await;
    }
    assert_eq!(app.get_json("/data?customerId=7").await["count"], 0);
    assert_eq!(app.get_json("/data?customerId=8").await["count"], 1);
    // A later grant brings nothing back.
    assert_eq!(app.consent(510, true).await.status(), StatusCode::ACCEPTED);
    drain(&mut flusher).await;
    assert!(app.stored_seqs(510).await.is_empty());

    assert_eq!(app.get_json(&format!("/erasures/{id}")).await, receipt);
    let again: Value = delete_customer(&app, 7).await.json().await.unwrap();
    assert_ne!(
        again["erasureId"], receipt["erasureId"],
        "a completed erasure is not answered again"
    );

    let events = audit(&app, "customerId=7").await;
    let erased: Vec<&Value> = events.iter().filter(|e| e["erasureId"] == json!(id)).collect();
    assert_eq!(
        kinds(&erased.iter().map(|e| (*e).clone()).collect::<Vec<_>>())[0],
        "customer_erased"
    );
    assert_eq!(erased.len(), 4, "three refused and one customer_erased: {events:?}");
    assert!(
        events
            .iter()
            .all(|e| e.get("text").is_none() && e.get("language").is_none())
    );
}

#[tokio::test]
async fn an_unknown_customer_gets_a_receipt_of_nothing_and_an_event() {
    let app = spawn_api_only(test_settings()).await;
    let receipt: Value = delete_customer(&app, 99).await.json().await.unwrap();
    assert_eq!(
        (&receipt["dialogs"], &receipt["messages"], &receipt["status"]),
        (&json!(0), &json!(0), &json!("completed"))
    );
    let events = audit(&app, "customerId=99").await;
    assert_eq!(kinds(&events), ["customer_erased"]);
    assert_eq!(events[0]["messages"], 0);
    assert_eq!(events[0]["at"], receipt["completedAt"]);
}

#[tokio::test]
async fn receipts_are_found_by_the_exact_id_only() {
    let app = spawn_api_only(test_settings()).await;
    let receipt: Value = delete_customer(&app, 5).await.json().await.unwrap();
    let id = receipt["erasureId"].as_str().unwrap();
    for bad in [
        id.to_uppercase(),
        id.replace('-', ""),
        format!("{{{id}}}"),
        "nope".to_owned(),
        uuid::Uuid::now_v7().to_string(),
    ] {
        assert_problem(
            app.get(&format!("/erasures/{bad}")).await,
            StatusCode::NOT_FOUND,
            "erasure_not_found",
        )
        .await;
    }
    assert_problem(delete_customer(&app, -1).await, StatusCode::BAD_REQUEST, "invalid_id").await;
}

#[tokio::test]
async fn the_audit_holds_one_event_per_decision_and_pages_newest_first() {
    let app = spawn_api_only(test_settings()).await;
    let mut flusher = flusher(&app);
    app.stage(3, 530, "a", "EN").await;
    app.consent(530, true).await;
    app.consent(530, true).await; // equal to the standing one: no event
    drain(&mut flusher).await;
    app.stage(3, 530, "b", "EN").await;
    drain(&mut flusher).await;
    assert_eq!(app.consent(530, false).await.status(), StatusCode::OK);
    assert_eq!(app.consent(530, false).await.status(), StatusCode::OK);
    // A grant refused before it was ever flushed still has its event, before the refusal.
    app.stage(3, 531, "c", "EN").await;
    app.consent(531, true).await;
    assert_eq!(app.consent(531, false).await.status(), StatusCode::OK);
    // Redis re-learning a granted dialog is no decision.
    app.stage(3, 532, "d", "EN").await;
    app.consent(532, true).await;
    drain(&mut flusher).await;
    app.lose(532).await;
    app.stage(3, 532, "e", "EN").await;
    drain(&mut flusher).await;

    let d530 = audit(&app, "dialogId=530").await;
    assert_eq!(kinds(&d530), ["refused", "granted"], "{d530:?}");
    assert_eq!(d530[0]["messages"], 2);
    let d531 = audit(&app, "dialogId=531&customerId=3").await;
    assert_eq!(kinds(&d531), ["refused", "granted"], "{d531:?}");
    assert_eq!(kinds(&audit(&app, "dialogId=532").await), ["granted"]);
    let all = audit(&app, "customerId=3").await;
    assert_eq!(all.len(), 5);
    let ats: Vec<&str> = all.iter().map(|e| e["at"].as_str().unwrap()).collect();
    assert!(ats.windows(2).all(|w| w[0] >= w[1]), "newest first: {ats:?}");
    assert!(audit(&app, "customerId=4").await.is_empty());
    for bad in ["page=1", "customerId=x", "dialogId=-1", "pageSize=0", "cursor=zz"] {
        let response = app.get(&format!("/audit?{bad}")).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{bad}");
    }
}

/// With PostgreSQL away the erasure is recorded in Redis and the customer's staged
/// dialogs refused at once (503 `erasure_pending` with the receipt); dapi finishes it
/// once PostgreSQL answers, under the same erasureId.
#[tokio::test]
async fn an_erasure_through_a_postgresql_outage_is_finished_by_itself() {
    let app = spawn_api_only(test_settings()).await;
    let mut flusher = flusher(&app);
    app.stage(9, 540, "stored", "EN").await;
    app.consent(540, true).await;
    drain(&mut flusher).await;
    app.stage(9, 541, "staged", "EN").await;

    let broken = without_postgres(&app).await;
    let response = app.http.delete(format!("{broken}/customers/9")).send().await.unwrap();
    let problem = assert_problem(response, StatusCode::SERVICE_UNAVAILABLE, "erasure_pending").await;
    let receipt = &problem["erasure"];
    assert_eq!(
        (&receipt["status"], &receipt["completedAt"]),
        (&json!("pending"), &Value::Null),
        "{problem}"
    );
    let id = receipt["erasureId"].as_str().unwrap().to_owned();
    // The staged dialog refuses new messages already.
    let later = post_to(&app, &broken, "/data/9/541", json!({"text": "t", "language": "EN"})).await;
    assert_problem(later, StatusCode::CONFLICT, "consent_refused").await;
    // A repeat answers the same receipt.
    let again = app.http.delete(format!("{broken}/customers/9")).send().await.unwrap();
    let again = assert_problem(again, StatusCode::SERVICE_UNAVAILABLE, "erasure_pending").await;
    assert_eq!(again["erasure"]["erasureId"], json!(id));
    // Its receipt is served from Redis meanwhile.
    let pending: Value = app
        .http
        .get(format!("{broken}/erasures/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(pending["status"], "pending");

    let left = finish_pending(&app).await;
    assert_eq!(left, 0);
    let done = app.get_json(&format!("/erasures/{id}")).await;
    // Exact: the stored message, and the staged one Redis deleted during the outage (the
    // refusal kept its seq until PostgreSQL's part committed).
    assert_eq!(
        (&done["status"], &done["dialogs"], &done["messages"]),
        (&json!("completed"), &json!(2), &json!(2)),
        "{done}"
    );
    assert!(app.stored_seqs(540).await.is_empty());
}

/// A crash right after the erasure was recorded: any flusher-role process finishes it;
/// meanwhile the flush leaves the customer's dialogs queued.
#[tokio::test]
async fn an_erasure_recorded_then_abandoned_is_finished_and_nothing_flushes_meanwhile() {
    let app = spawn_api_only(test_settings()).await;
    let mut flusher = flusher(&app);
    app.stage(11, 550, "a", "EN").await;
    app.consent(550, true).await;
    let receipt = begin_erasure(&app, 11).await;
    // The process died here. The flusher does not write the customer's dialog meanwhile.
    flusher.flush_once().await.unwrap();
    assert!(app.stored_seqs(550).await.is_empty());

    assert_eq!(finish_pending(&app).await, 0);
    let done = app.store.receipt(receipt.erasure_id).await.unwrap().unwrap();
    assert!(done.is_completed());
    assert_eq!((done.dialogs, done.messages), (1, 1));
    drain(&mut flusher).await;
    assert!(app.stored_seqs(550).await.is_empty());
}

#[tokio::test]
async fn the_privacy_role_does_only_its_own_work_and_reads_see_only_granted_status() {
    let mut settings = test_settings();
    settings.tokens = Tokens {
        ingest: vec!["bot".into()],
        read: vec!["analyst".into()],
        privacy: vec!["officer".into()],
    };
    let app = spawn_api_only(settings).await;
    let send = async |method: reqwest::Method, path: &str, token: &str| {
        let mut request = app
            .http
            .request(method, format!("{}{path}", app.base))
            .bearer_auth(token);
        if path.starts_with("/data/1") || path.starts_with("/consents/1?") {
            request = request.json(&json!({"text": "t", "language": "EN"}));
        }
        request.send().await.unwrap().status()
    };
    use reqwest::Method as M;
    assert_eq!(send(M::POST, "/data/1/600", "bot").await, StatusCode::ACCEPTED);
    for (method, path) in [(M::GET, "/data"), (M::POST, "/data/1/600")] {
        assert_eq!(send(method, path, "officer").await, StatusCode::FORBIDDEN, "{path}");
    }
    for token in ["bot", "analyst"] {
        for (method, path) in [(M::DELETE, "/customers/1"), (M::GET, "/audit"), (M::GET, "/erasures/x")] {
            assert_eq!(send(method, path, token).await, StatusCode::FORBIDDEN, "{token} {path}");
        }
    }
    assert_eq!(send(M::GET, "/consents/600", "bot").await, StatusCode::OK);
    assert_eq!(send(M::GET, "/consents/600", "officer").await, StatusCode::OK);
    // Pending: a read token sees nothing of it.
    assert_eq!(send(M::GET, "/consents/600", "analyst").await, StatusCode::NOT_FOUND);
    assert_eq!(send(M::GET, "/audit", "officer").await, StatusCode::OK);
    assert_eq!(send(M::GET, "/audit", "nobody").await, StatusCode::UNAUTHORIZED);
    let grant = app
        .http
        .post(format!("{}/consents/600", app.base))
        .bearer_auth("bot")
        .json(&json!(true))
        .send()
        .await
        .unwrap();
    assert_eq!(grant.status(), StatusCode::ACCEPTED);
    assert_eq!(send(M::GET, "/consents/600", "analyst").await, StatusCode::OK);
}

/// With flushers running beside the erasure, the refusals it records in Redis are its
/// own to write: no flusher erases them first (which left the receipt short and wrote a
/// second, erasure-less `refused` event per dialog).
#[tokio::test]
async fn a_running_flusher_leaves_an_erasures_refusals_to_it_and_the_counts_stay_exact() {
    let app = crate::helpers::spawn_app().await;
    for round in 0..5 {
        let (stored, staged) = (600 + 2 * round, 601 + 2 * round);
        app.stage(20 + round, stored, "stored", "EN").await;
        app.consent(stored, true).await;
        app.wait_for_seqs(stored, &[1]).await;
        app.stage(20 + round, staged, "staged", "EN").await;
        let receipt: Value = delete_customer(&app, 20 + round).await.json().await.unwrap();
        assert_eq!(
            (&receipt["dialogs"], &receipt["messages"]),
            (&json!(2), &json!(2)),
            "{receipt}"
        );
        let events = audit(&app, &format!("customerId={}", 20 + round)).await;
        let refused: Vec<&Value> = events.iter().filter(|e| e["event"] == "refused").collect();
        assert_eq!(refused.len(), 2, "{events:?}");
        assert!(
            refused.iter().all(|e| e["erasureId"] == receipt["erasureId"]),
            "{events:?}"
        );
    }
}

/// Writers racing an erasure: every message acknowledged before the DELETE was sent is
/// gone when it answers, and every message of those dialogs after the answer is refused;
/// nothing of the customer is stored afterwards.
#[tokio::test]
async fn writers_racing_an_erasure_leave_nothing_of_the_customer_stored() {
    let app = crate::helpers::spawn_app().await;
    for dialog in 700..705 {
        app.stage(30, dialog, "before", "EN").await;
        app.consent(dialog, true).await;
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (700..705)
        .map(|dialog| {
            let (http, base, stop) = (app.http.clone(), app.base.clone(), stop.clone());
            tokio::spawn(async move {
                let mut after_stop = Vec::new();
                for i in 0.. {
                    let done = stop.load(std::sync::atomic::Ordering::SeqCst);
                    let response = http
                        .post(format!("{base}/data/30/{dialog}"))
                        .json(&json!({"text": format!("racing {i}"), "language": "EN"}))
                        .send()
                        .await
                        .unwrap();
                    if done {
                        after_stop.push(response.status());
                        if after_stop.len() == 3 {
                            return after_stop;
                        }
                    }
                }
                after_stop
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let receipt = delete_customer(&app, 30).await;
    assert_eq!(receipt.status(), StatusCode::OK);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for writer in writers {
        let after = writer.await.unwrap();
        assert!(after.iter().all(|s| *s == StatusCode::CONFLICT), "{after:?}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(app.get_json("/data?customerId=30").await["count"], 0);
    for dialog in 700..705 {
        assert!(app.stored_seqs(dialog).await.is_empty(), "{dialog}");
    }
}

/// `DAPI_AUDIT_RETENTION` drops the audit trail by whole months, and completed receipts
/// with them; a pending receipt stays. ("Now" moves instead of waiting months.)
#[tokio::test]
async fn audit_retention_drops_whole_months_and_keeps_pending_receipts() {
    let app = spawn_api_only(test_settings()).await;
    app.stage(40, 800, "a", "EN").await;
    assert_eq!(app.consent(800, false).await.status(), StatusCode::OK);
    let completed: Value = delete_customer(&app, 41).await.json().await.unwrap();
    let pending = begin_erasure(&app, 42).await;
    assert_eq!(audit(&app, "").await.len(), 2, "a refusal and a customer_erased");

    let now = time::OffsetDateTime::now_utc();
    let made = app
        .store
        .ensure_audit_partitions_through(now + time::Duration::days(130))
        .await
        .unwrap();
    assert!(!made.is_empty(), "months beyond the two made at migration");
    let (dropped, receipts) = app.store.drop_old_audit(now + time::Duration::days(40)).await.unwrap();
    assert!(
        !dropped.is_empty(),
        "this month's partition is past a horizon 40 days ahead"
    );
    assert_eq!(receipts, 1);
    assert!(audit(&app, "").await.is_empty());
    let id = completed["erasureId"].as_str().unwrap();
    assert_problem(
        app.get(&format!("/erasures/{id}")).await,
        StatusCode::NOT_FOUND,
        "erasure_not_found",
    )
    .await;
    assert_eq!(
        app.get_json(&format!("/erasures/{}", pending.erasure_id)).await["status"],
        "pending"
    );
    // Events go on being written: the months ahead have their partitions.
    app.stage(40, 801, "b", "EN").await;
    assert_eq!(app.consent(801, false).await.status(), StatusCode::OK);
    assert_eq!(audit(&app, "").await.len(), 1);
}

/// A refusal applied by its request and by a flusher at once (PostgreSQL holds no row of
/// the dialog yet to lock) is one decision: one event.
#[tokio::test]
async fn a_refusal_applied_twice_at_once_writes_one_event() {
    let app = spawn_api_only(test_settings()).await;
    for dialog in 900..920 {
        let refusal = dapi::domain::DialogState {
            audit: Default::default(),
            dialog: dapi::domain::DialogId::from_stored(dialog),
            customer: CustomerId::from_stored(50),
            decision: dapi::domain::Decision::Refused,
            epoch: 7,
            decided_at_us: 1_795_000_000_000_000 + dialog,
            unerased_refusal: Some(dapi::domain::Refusal {
                epoch: 7,
                decided_at_us: 1_795_000_000_000_000 + dialog,
            }),
            messages: Vec::new(),
        };
        let twice = [refusal.clone()];
        let (a, b) = tokio::join!(app.store.apply(std::slice::from_ref(&refusal)), app.store.apply(&twice));
        a.unwrap();
        b.unwrap();
    }
    let events = audit(&app, "customerId=50").await;
    assert_eq!(events.len(), 20, "{events:?}");
}

/// A refusal of a dialog whose customer's erasure is pending is that erasure's to write:
/// 503 `erasure_pending` until it has, then 200.
#[tokio::test]
async fn a_refusal_while_its_customers_erasure_is_pending_waits_for_it() {
    let app = spawn_api_only(test_settings()).await;
    let mut flusher = flusher(&app);
    app.stage(51, 930, "stored", "EN").await;
    app.consent(930, true).await;
    drain(&mut flusher).await;
    begin_erasure(&app, 51).await;
    assert_problem(
        app.consent(930, false).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "erasure_pending",
    )
    .await;

    assert_eq!(finish_pending(&app).await, 0);
    assert!(app.stored_seqs(930).await.is_empty());
    assert_eq!(app.consent(930, false).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn an_audit_cursor_at_an_impossible_time_is_400() {
    let app = spawn_api_only(test_settings()).await;
    for at in [-1, i64::MIN, i64::MAX] {
        let cursor = dapi::domain::Cursor {
            received_at_us: at,
            dialog_id: 1,
            seq: 1,
        };
        let response = app.get(&format!("/audit?cursor={}", cursor.encode())).await;
        assert_problem(response, StatusCode::BAD_REQUEST, "invalid_cursor").await;
    }
}

/// The members of the customer index in the shard of `dialog`, in the buckets of
/// `customers`, sorted.
async fn indexed(app: &TestApp, dialog: i64, customers: &[i64]) -> Vec<String> {
    let shard = dapi::staging::Keyspace::shard_of(dialog);
    let mut conn = app.redis.clone();
    let mut members = Vec::new();
    for &customer in customers {
        let found: Vec<String> = redis::cmd("ZRANGE")
            .arg(app.keys.customer_index(shard, customer))
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .unwrap();
        members.extend(found);
    }
    members.sort();
    members.dedup();
    members
}

/// Sweep passes enough to visit every bucket of every shard once.
async fn sweep_every_shard(app: &TestApp) {
    let staging = dapi::staging::Staging::new(
        crate::helpers::connector(&app.settings),
        &app.settings.redis_prefix,
        app.settings.staging_ttl,
    )
    .unwrap();
    let mut sweep = dapi::staging::IndexSweep::default();
    for _ in 0..sweep.passes_per_cycle() {
        sweep.pass(&staging).await.unwrap();
    }
}

#[tokio::test]
async fn the_customer_index_is_written_on_a_dialogs_creation_and_swept_of_dialogs_gone() {
    let app = spawn_api_only(test_settings()).await;
    // Three dialogs of one shard: customer 7's two, customer 8's one.
    let shard = dapi::staging::Keyspace::shard_of(540);
    let dialogs: Vec<i64> = (540..)
        .filter(|d| dapi::staging::Keyspace::shard_of(*d) == shard)
        .take(3)
        .collect();
    let (gone, kept, other) = (dialogs[0], dialogs[1], dialogs[2]);
    for (customer, dialog) in [(7, gone), (7, kept), (8, other)] {
        app.stage(customer, dialog, "first", "EN").await;
        app.stage(customer, dialog, "second: no second member", "EN").await;
    }
    let mut want = vec![format!("7:{gone}"), format!("7:{kept}"), format!("8:{other}")];
    want.sort();
    assert_eq!(indexed(&app, gone, &[7, 8]).await, want);

    // `gone`, granted and flushed, expires (its keys leave Redis); the sweep removes its
    // member, not the others'.
    app.consent(gone, true).await;
    drain(&mut flusher(&app)).await;
    app.lose(gone).await;
    sweep_every_shard(&app).await;
    assert_eq!(
        indexed(&app, gone, &[7, 8]).await,
        [format!("7:{kept}"), format!("8:{other}")]
    );

    // A dialog Redis forgot, revived by a decision from what PostgreSQL holds, is indexed
    // again.
    assert_eq!(app.consent(gone, true).await.status(), StatusCode::ACCEPTED);
    assert!(indexed(&app, gone, &[7]).await.contains(&format!("7:{gone}")));

    // The erasure finds the customer's staged dialogs through the index, the other
    // customer's stays.
    let receipt: Value = delete_customer(&app, 7).await.json().await.unwrap();
    assert_eq!(
        (&receipt["dialogs"], &receipt["messages"]),
        (&json!(2), &json!(4)),
        "{receipt}"
    );
    assert_eq!(app.staged_len(kept).await, 0);
    assert_eq!(app.staged_len(other).await, 2);
}

#[tokio::test]
async fn an_erasure_finds_dialogs_indexed_in_the_earlier_per_customer_layout() {
    let app = spawn_api_only(test_settings()).await;
    app.stage(9, 560, "staged before an upgrade", "EN").await;
    // As the earlier layout indexed it: `<shard>:c<customer>`, dialog → deadline (ms).
    let shard = dapi::staging::Keyspace::shard_of(560);
    let mut conn = app.redis.clone();
    let _: () = redis::cmd("ZREM")
        .arg(app.keys.customer_index(shard, 9))
        .arg("9:560")
        .query_async(&mut conn)
        .await
        .unwrap();
    let deadline = (time::OffsetDateTime::now_utc().unix_timestamp() + 3600) * 1000;
    let _: () = redis::cmd("ZADD")
        .arg(app.keys.earlier_customer_index(shard, 9))
        .arg(deadline)
        .arg(560)
        .query_async(&mut conn)
        .await
        .unwrap();
    let receipt: Value = delete_customer(&app, 9).await.json().await.unwrap();
    assert_eq!(
        (&receipt["dialogs"], &receipt["messages"]),
        (&json!(1), &json!(1)),
        "{receipt}"
    );
    assert_eq!(app.staged_len(560).await, 0);
}

/// An erasure that died after refusing a dialog in Redis (its staged messages deleted)
/// and before its PostgreSQL transaction committed: the run that finishes it still counts
/// those messages, from the seqs the refusal keeps until its erasure is confirmed.
#[tokio::test]
async fn an_erasure_that_died_between_redis_and_postgresql_still_counts_what_redis_deleted() {
    let app = spawn_api_only(test_settings()).await;
    app.stage(12, 570, "a", "EN").await;
    app.stage(12, 570, "b", "EN").await;
    let receipt = begin_erasure(&app, 12).await;
    let staging = dapi::staging::Staging::new(
        crate::helpers::connector(&app.settings),
        &app.settings.redis_prefix,
        app.settings.staging_ttl,
    )
    .unwrap();
    let dialog = dapi::domain::DialogId::from_stored(570);
    staging
        .decide(
            dialog,
            dapi::staging::Choice::Refuse,
            None,
            Some(CustomerId::from_stored(12)),
        )
        .await
        .unwrap();
    assert_eq!(app.staged_len(570).await, 0);

    assert_eq!(finish_pending(&app).await, 0);
    let done = app.get_json(&format!("/erasures/{}", receipt.erasure_id)).await;
    assert_eq!(
        (&done["status"], &done["dialogs"], &done["messages"]),
        (&json!("completed"), &json!(1), &json!(2)),
        "{done}"
    );
}

/// A grant no flush has written yet, overtaken by its customer's erasure: the audit still
/// shows the grant, then the erasure's refusal (one event per decision answered).
#[tokio::test]
async fn an_erasure_overtaking_an_unflushed_grant_keeps_the_grant_in_the_audit() {
    let app = spawn_api_only(test_settings()).await;
    app.stage(13, 580, "granted, never flushed", "EN").await;
    assert_eq!(app.consent(580, true).await.status(), StatusCode::ACCEPTED);
    let receipt: Value = delete_customer(&app, 13).await.json().await.unwrap();
    assert_eq!(
        (&receipt["dialogs"], &receipt["messages"]),
        (&json!(1), &json!(1)),
        "{receipt}"
    );
    assert_eq!(
        kinds(&audit(&app, "dialogId=580").await),
        ["refused", "granted"],
        "newest first"
    );
}

/// A refusal made while PostgreSQL is away is written by the flusher once it is back: its
/// audit event still counts the staged messages Redis deleted when it was made.
#[tokio::test]
async fn a_refusal_the_flusher_writes_after_an_outage_counts_what_redis_deleted() {
    let app = spawn_api_only(test_settings()).await;
    let mut flusher = flusher(&app);
    app.stage(14, 590, "one", "EN").await;
    app.stage(14, 590, "two", "EN").await;
    let broken = without_postgres(&app).await;
    let refusal = app
        .http
        .post(format!("{broken}/consents/590"))
        .json(&json!(false))
        .send()
        .await
        .unwrap();
    assert!(
        refusal.status().is_server_error() || refusal.status().is_success(),
        "{}",
        refusal.status()
    );
    assert_eq!(app.staged_len(590).await, 0);

    drain(&mut flusher).await;
    let events = audit(&app, "dialogId=590").await;
    assert_eq!(kinds(&events), ["refused"], "{events:?}");
    assert_eq!(events[0]["messages"], 2, "{events:?}");
}
