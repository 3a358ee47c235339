//! The store's fenced write, driven directly: the orders of commits that the HTTP tests
//! cannot force.

use dapi::domain::{CustomerId, Decision, DialogId, DialogState, Refusal, StagedMessage};

use dapi::store::HeldDialog;

use crate::helpers::{spawn_api_only, test_settings};

/// Dialog 1's state at `epoch`, carrying the unconfirmed refusal of epoch `refused` (if any).
fn state(decision: Decision, epoch: i64, refused: Option<i64>, seqs: &[i64]) -> DialogState {
    DialogState {
        audit: Default::default(),
        dialog: DialogId::from_stored(1),
        customer: CustomerId::from_stored(9),
        decision,
        epoch,
        decided_at_us: 1_795_000_000_000_000,
        unerased_refusal: refused.map(|epoch| Refusal {
            epoch,
            decided_at_us: 1_795_000_000_000_000,
        }),
        messages: seqs
            .iter()
            .map(|&seq| StagedMessage {
                seq,
                received_at_us: 1_795_000_000_000_000 + seq,
                language: "EN".into(),
                text: format!("message {seq}"),
                message_id: None,
            })
            .collect(),
    }
}

#[tokio::test]
async fn a_stale_grant_cannot_write_after_a_refusal() {
    let app = spawn_api_only(test_settings()).await;
    app.store
        .apply(&[state(Decision::Refused, 2, Some(2), &[])])
        .await
        .unwrap();

    // A flusher that read the dialog under the grant of epoch 1 commits late.
    let applied = app
        .store
        .apply(&[state(Decision::Granted, 1, None, &[1, 2, 3])])
        .await
        .unwrap();

    assert_eq!((applied.inserted, applied.fenced), (0, 1));
    assert!(applied.granted.is_empty(), "a fenced grant wrote nothing to trim");
    assert_eq!(app.stored_seqs(1).await, Vec::<i64>::new());
}

#[tokio::test]
async fn a_refusal_that_never_reached_postgresql_is_completed_by_the_next_grant() {
    let app = spawn_api_only(test_settings()).await;
    app.store
        .apply(&[state(Decision::Granted, 1, None, &[1, 2, 3])])
        .await
        .unwrap();

    // Refused at epoch 2 while PostgreSQL was away, granted again at epoch 3, one more
    // message: the flusher's write carries the unconfirmed refusal and applies it first.
    let applied = app
        .store
        .apply(&[state(Decision::Granted, 3, Some(2), &[4])])
        .await
        .unwrap();

    assert_eq!((applied.erased, applied.inserted), (3, 1));
    assert_eq!(app.stored_seqs(1).await, [4]);
    assert_eq!(app.get_json("/data/").await["count"], 1);
}

#[tokio::test]
async fn a_late_refusal_write_under_an_older_epoch_leaves_the_newer_grant_alone() {
    let app = spawn_api_only(test_settings()).await;
    app.store
        .apply(&[state(Decision::Granted, 1, None, &[1, 2, 3])])
        .await
        .unwrap();
    // The grant of epoch 3 (which carried the refusal of epoch 2) committed first.
    app.store
        .apply(&[state(Decision::Granted, 3, Some(2), &[4])])
        .await
        .unwrap();

    // The refusal handler's own write of epoch 2 arrives late.
    let applied = app
        .store
        .apply(&[state(Decision::Refused, 2, Some(2), &[])])
        .await
        .unwrap();

    assert_eq!((applied.fenced, applied.erased), (1, 0));
    assert_eq!(app.stored_seqs(1).await, [4]);
    assert_eq!(app.get_json("/data/").await["count"], 1);
}

#[tokio::test]
async fn a_refusal_erases_every_stored_message_whatever_its_seq() {
    let app = spawn_api_only(test_settings()).await;
    // Seqs far beyond anything Redis counts now: an earlier incarnation of the dialog.
    app.store
        .apply(&[state(Decision::Granted, 1, None, &[1, 2, 40, 41])])
        .await
        .unwrap();

    let applied = app
        .store
        .apply(&[state(Decision::Refused, 5, Some(5), &[])])
        .await
        .unwrap();

    assert_eq!(applied.erased, 4);
    assert_eq!(app.stored_seqs(1).await, Vec::<i64>::new());
    assert_eq!(app.get_json("/data/").await["count"], 0);
}

#[tokio::test]
async fn concurrent_quick_lookups_each_get_exactly_their_own_dialogs() {
    // The ingest path's lookups are answered many at once (store::lookup); each caller
    // must still get what PostgreSQL holds of its own dialogs (grants and refusals), and
    // nothing of the others'.
    let app = spawn_api_only(test_settings()).await;
    sqlx::raw_sql(
        "INSERT INTO dialogs (dialog_id, customer_id, decision, epoch, decided_at, last_seq)
         SELECT d, d % 7, CASE WHEN d % 3 = 0 THEN 'refused' ELSE 'granted' END, 1, now(), d % 4
         FROM generate_series(1, 300) d;
         INSERT INTO messages (dialog_id, seq, customer_id, language, text, received_at)
         SELECT d, s, d % 7, 'EN', 'x', now() FROM generate_series(1, 300) d, generate_series(1, d % 4) s
         WHERE d % 3 <> 0;",
    )
    .execute(app.store.pool())
    .await
    .unwrap();

    let lookups = (0..60i64).map(|caller| {
        let store = app.store.clone();
        // Overlapping sets: dialogs caller … caller+9, and some no store holds.
        let dialogs: Vec<DialogId> = (caller * 5..caller * 5 + 10)
            .chain([10_000 + caller])
            .map(DialogId::from_stored)
            .collect();
        async move {
            (
                dialogs.clone(),
                store.decided_dialogs_quickly(&dialogs, &[]).await.unwrap().dialogs,
            )
        }
    });
    let answers = futures_util::future::join_all(lookups).await;

    for (dialogs, found) in answers {
        let mut expected: Vec<(i64, i64, i64)> = dialogs
            .iter()
            .map(|d| d.get())
            .filter(|d| (1..=300).contains(d))
            // A refusal as last seq -1.
            .map(|d| (d, d % 7, if d % 3 == 0 { -1 } else { d % 4 }))
            .collect();
        let mut got: Vec<(i64, i64, i64)> = found
            .iter()
            .map(|(d, held)| match held {
                HeldDialog::Granted(g) => (d.get(), g.customer.get(), g.last_seq),
                HeldDialog::Refused { customer, .. } => (d.get(), customer.get(), -1),
            })
            .collect();
        expected.sort_unstable();
        got.sort_unstable();
        assert_eq!(got, expected, "lookup of {dialogs:?}");
    }
}

/// The revival lookup's last seq, kept in `dialogs` by the writes themselves: raised by
/// each grant's messages, never lowered by a redelivery, reset by a refusal's erasure.
#[tokio::test]
async fn the_last_stored_seq_follows_grants_and_refusals() {
    let app = spawn_api_only(test_settings()).await;
    let last = async || {
        app.store
            .granted_dialog(DialogId::from_stored(1))
            .await
            .unwrap()
            .map(|g| g.last_seq)
    };

    app.store
        .apply(&[state(Decision::Granted, 1, None, &[1, 2, 3])])
        .await
        .unwrap();
    assert_eq!(last().await, Some(3));
    app.store
        .apply(&[state(Decision::Granted, 1, None, &[4])])
        .await
        .unwrap();
    assert_eq!(last().await, Some(4));
    // A batch delivered again (seq 2 is stored already) does not move it back.
    app.store
        .apply(&[state(Decision::Granted, 1, None, &[2])])
        .await
        .unwrap();
    assert_eq!(last().await, Some(4));

    app.store
        .apply(&[state(Decision::Refused, 2, Some(2), &[])])
        .await
        .unwrap();
    assert_eq!(last().await, None, "refused: no revival");
    app.store
        .apply(&[state(Decision::Granted, 3, None, &[1])])
        .await
        .unwrap();
    assert_eq!(last().await, Some(1), "the erasure reset it; the new life starts over");
    assert_eq!(app.stored_seqs(1).await, [1]);
}
