//! The store's fenced write, driven directly: the orders of commits that the HTTP tests
//! cannot force.

use dapi::domain::{CustomerId, Decision, DialogId, DialogState, StagedMessage};

use crate::helpers::{TestApp, spawn_app_with, test_settings};

fn state(decision: Decision, epoch: i64, erased_through: i64, seqs: &[i64]) -> DialogState {
    DialogState {
        dialog: DialogId::from_stored(1),
        customer: CustomerId::from_stored(9),
        decision,
        epoch,
        decided_at_us: 1_795_000_000_000_000,
        erased_through,
        messages: seqs
            .iter()
            .map(|&seq| StagedMessage {
                seq,
                received_at_us: 1_795_000_000_000_000 + seq,
                language: "EN".into(),
                text: format!("message {seq}"),
            })
            .collect(),
    }
}

async fn app() -> TestApp {
    spawn_app_with(
        test_settings(),
        dapi::app::Roles {
            http: true,
            flusher: false,
        },
    )
    .await
}

#[tokio::test]
async fn a_stale_grant_cannot_write_after_a_refusal() {
    let app = app().await;
    app.store.apply(&[state(Decision::Refused, 2, 3, &[])]).await.unwrap();

    // A flusher that read the dialog under the grant of epoch 1 commits late.
    let applied = app
        .store
        .apply(&[state(Decision::Granted, 1, 0, &[1, 2, 3])])
        .await
        .unwrap();

    assert_eq!((applied.inserted, applied.fenced), (0, 1));
    assert_eq!(app.stored_seqs(1).await, Vec::<i64>::new());
}

#[tokio::test]
async fn a_refusal_that_never_reached_postgresql_is_completed_by_the_next_grant() {
    let app = app().await;
    app.store
        .apply(&[state(Decision::Granted, 1, 0, &[1, 2, 3])])
        .await
        .unwrap();

    // Refused at epoch 2 while PostgreSQL was away, granted again at epoch 3, one more
    // message: the flusher's write carries the refusal's horizon.
    app.store.apply(&[state(Decision::Granted, 3, 3, &[4])]).await.unwrap();

    assert_eq!(app.stored_seqs(1).await, [4]);
    assert_eq!(app.get_json("/data/").await["count"], 1);
}

#[tokio::test]
async fn a_refusal_that_loses_the_row_to_a_newer_grant_still_erases_what_it_refused() {
    let app = app().await;
    app.store
        .apply(&[state(Decision::Granted, 1, 0, &[1, 2, 3])])
        .await
        .unwrap();
    // The grant of epoch 3 commits first, from a snapshot taken before the refusal's
    // horizon reached it (the worst case).
    app.store.apply(&[state(Decision::Granted, 3, 0, &[4])]).await.unwrap();

    let applied = app.store.apply(&[state(Decision::Refused, 2, 3, &[])]).await.unwrap();

    assert_eq!((applied.fenced, applied.erased), (1, 3));
    assert_eq!(app.stored_seqs(1).await, [4]);
    assert_eq!(app.get_json("/data/").await["count"], 1);
}
