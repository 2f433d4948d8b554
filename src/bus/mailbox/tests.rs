//! The mailbox on its own: budgets, refusals, closing, paced pushes.

use super::*;

fn control(text: &str) -> Frame {
    Frame::Control(text.into())
}

fn take(outbound: &Outbound) -> Option<String> {
    let next = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async {
            tokio::time::timeout(std::time::Duration::from_millis(50), outbound.next()).await
        });
    match next {
        Ok(Next::Frame(frame)) => frame.render(),
        Ok(Next::Close(reason)) => Some(format!("close {reason:?}")),
        Err(_) => None,
    }
}

#[test]
fn events_carry_their_subscriptions() {
    let event = |envelope: &str, subscriptions: Vec<u32>| Frame::Event {
        id: 1,
        envelope: envelope.into(),
        subscriptions: subscriptions.into(),
        history: false,
        committed_at: 0,
        text: None,
    };
    let frame = event(r#"{"id":1}"#, vec![1, 3]);
    assert_eq!(frame.render().as_deref(), Some(r#"{"id":1,"subscription_ids":["s1","s3"]}"#));
    let frame = event("{}\n", vec![2]);
    assert_eq!(frame.render().as_deref(), Some(r#"{"subscription_ids":["s2"]}"#));
    assert_eq!(Frame::Live { subscription: 1, caught_up: Some(3) }.render(), None);
}

#[test]
fn an_offer_over_the_budget_is_refused_and_changes_nothing() {
    let frame = control("0123456789");
    let outbound = Outbound::new(3 * frame.size());
    for _ in 0..3 {
        outbound.offer(frame.clone()).expect("room");
    }
    assert_eq!(outbound.offer(control("x")), Err(Rejected::Full));
    assert_eq!(outbound.len(), 3, "what was queued stays queued");
    assert!(!outbound.is_closing(), "being full is not a reason to close");
    assert_eq!(take(&outbound).as_deref(), Some("0123456789"));
    outbound.offer(control("y")).expect("room again");
    // Markers and fixed-place frames still go in; they are few by construction.
    outbound.push(Frame::Live { subscription: 1, caught_up: None }).expect("pushed");
    outbound.close(Closing::SlowConsumer(Slow::Stalled(Duration::from_secs(30))));
    assert_eq!(outbound.offer(control("z")), Err(Rejected::Closed));
    assert_eq!(outbound.push(control("z")), Err(Rejected::Closed));
    assert_eq!(take(&outbound).as_deref(), Some("close SlowConsumer(Stalled(30s))"));
}

#[test]
fn one_big_frame_passes_an_empty_queue_and_batches_are_all_or_nothing() {
    let outbound = Outbound::new(0);
    let big = control(&"x".repeat(10 * outbound.budget()));
    outbound.offer(big.clone()).expect("alone it passes");
    assert_eq!(outbound.offer(control("x")), Err(Rejected::Full));
    assert_eq!(outbound.offer_all(vec![control("a"), control("b")]), Err(Rejected::Full));
    assert_eq!(outbound.len(), 1);
    outbound.drain_now();
    outbound.offer_all(vec![big, control("b")]).expect("an empty queue takes a batch");
    assert_eq!(outbound.len(), 2);
}

#[test]
fn shutdown_drains_first() {
    let outbound = Outbound::new(1 << 20);
    outbound.push(control("a")).expect("room");
    outbound.close(Closing::Shutdown);
    outbound.close(Closing::Idle);
    assert_eq!(take(&outbound).as_deref(), Some("a"));
    assert_eq!(take(&outbound).as_deref(), Some("close Shutdown"));
}

#[tokio::test]
async fn paced_pushes_wait_for_half_the_queue() {
    let size = control("a").size();
    let outbound = Outbound::new(4 * size);
    outbound.push_paced(control("a")).await.expect("room");
    outbound.push_paced(control("b")).await.expect("room");
    let third = tokio::time::timeout(
        std::time::Duration::from_millis(50),
        outbound.push_paced(control("c")),
    )
    .await;
    assert!(third.is_err(), "half full: waits");
    outbound.offer(control("l")).expect("the other half is for live frames");
    let waiting = {
        let outbound = outbound.clone();
        tokio::spawn(async move { outbound.push_paced(control("c")).await })
    };
    for _ in 0..2 {
        assert!(matches!(outbound.next().await, Next::Frame(_)));
    }
    waiting.await.expect("joined").expect("pushed after the writer took two");
    outbound.close(Closing::Gone);
    assert_eq!(outbound.push_paced(control("d")).await, Err(Rejected::Closed));
    assert_eq!(outbound.room(0).await, Err(Rejected::Closed));
}

#[tokio::test]
async fn a_fall_behind_signal_waits_for_its_reader() {
    let outbound = Outbound::new(1 << 20);
    outbound.fell_behind();
    tokio::time::timeout(std::time::Duration::from_millis(50), outbound.behind())
        .await
        .expect("the signal was kept");
    let again = tokio::time::timeout(std::time::Duration::from_millis(50), outbound.behind()).await;
    assert!(again.is_err(), "once per signal");
}
