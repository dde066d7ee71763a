//! Unit tests of the lease core (acquire, release, reset, expiry, refill back-off, death
//! watch, shutdown, hand-over and adoption, and their races) on the fake runtime: no root, no
//! sandboxes, milliseconds each.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::auth::{Auth, Owner};
use super::manager::{Manager, ShutdownMode};
use super::records::Records;
use super::testing::FakeRuntime;
use crate::api::{AcquireRequest, ErrorCode, PoolSpec, PoolStatus, ReusePolicy};
use crate::util::random_id;

const ALICE: Owner = Some([1u8; 32]);
const BOB: Owner = Some([2u8; 32]);

fn spec(min_idle: usize, max: usize) -> PoolSpec {
    PoolSpec {
        min_idle,
        max,
        ..PoolSpec::default()
    }
}

fn manager(fake: &Arc<FakeRuntime>, records: Records) -> Arc<Manager> {
    Manager::new(fake.clone(), Auth::new(None).expect("auth"), 16, records)
}

async fn started(
    fake: &Arc<FakeRuntime>,
    records: Records,
    pools: &[(&str, PoolSpec)],
) -> Arc<Manager> {
    let mgr = manager(fake, records);
    let pools = pools
        .iter()
        .map(|(name, spec)| (name.to_string(), spec.clone()))
        .collect();
    mgr.start(&pools).await.expect("start");
    mgr
}

fn acquire_req(pool: &str) -> AcquireRequest {
    AcquireRequest {
        pool: pool.into(),
        count: None,
        env: Default::default(),
        labels: Default::default(),
        ttl_seconds: None,
        idle_timeout_seconds: None,
        request_id: None,
    }
}

fn status(mgr: &Manager, pool: &str) -> PoolStatus {
    mgr.pool_view(pool).expect("pool").status
}

/// Polls `cond` until it holds; fails the test after 2 s.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while !cond() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Waits until the pool is idle at `idle` with nothing starting.
async fn settled(mgr: &Manager, pool: &str, idle: usize) {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let s = status(mgr, pool);
        if s.idle == idle && s.starting == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{pool} never settled at {idle} idle: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn temp_state() -> PathBuf {
    let dir = std::env::temp_dir().join(random_id("arl-lease-"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_takes_warm_sandboxes_and_the_pool_refills() {
    let fake = FakeRuntime::new();
    let mgr = started(&fake, Records::disabled(), &[("p", spec(2, 4))]).await;
    settled(&mgr, "p", 2).await;
    let got = mgr.acquire(ALICE, acquire_req("p")).await.expect("acquire");
    assert_eq!(got.len(), 1);
    assert_eq!(status(&mgr, "p").allocated, 1);
    settled(&mgr, "p", 2).await;
    let s = status(&mgr, "p");
    assert_eq!((s.allocated, s.total), (1, 3));
    assert_eq!(fake.live().len(), 3);
    // Another token neither sees nor reaches it.
    assert!(mgr.list(&BOB).is_empty());
    let err = mgr.sandbox(&got[0].id, &BOB).err().expect("forbidden");
    assert_eq!(err.code, ErrorCode::Forbidden);
    assert_eq!(mgr.list(&ALICE).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_max_an_acquire_is_refused_and_takes_nothing() {
    let fake = FakeRuntime::new();
    let mgr = started(&fake, Records::disabled(), &[("p", spec(1, 2))]).await;
    settled(&mgr, "p", 1).await;
    let mut req = acquire_req("p");
    req.count = Some(3);
    let err = mgr.acquire(ALICE, req).await.expect_err("exhausted");
    assert_eq!(err.code, ErrorCode::PoolExhausted);
    let s = status(&mgr, "p");
    assert_eq!((s.idle, s.allocated, s.starting), (1, 0, 0));
    // Two fit: one warm, one created on demand.
    let mut req = acquire_req("p");
    req.count = Some(2);
    assert_eq!(mgr.acquire(ALICE, req).await.expect("two").len(), 2);
    let s = status(&mgr, "p");
    assert_eq!((s.idle, s.allocated, s.starting, s.total), (0, 2, 0, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_destroys_and_refills() {
    let fake = FakeRuntime::new();
    let mgr = started(&fake, Records::disabled(), &[("p", spec(1, 2))]).await;
    settled(&mgr, "p", 1).await;
    let id = mgr.acquire(ALICE, acquire_req("p")).await.expect("acquire")[0]
        .id
        .clone();
    // Another token may not release it.
    assert_eq!(
        mgr.release(&id, &BOB).expect_err("forbidden").code,
        ErrorCode::Forbidden
    );
    mgr.release(&id, &ALICE).expect("release");
    eventually("destroyed", || !fake.live().contains(&id)).await;
    settled(&mgr, "p", 1).await;
    assert_eq!(status(&mgr, "p").allocated, 0);
    // Releasing it again: it is unknown now, and the answer does not claim why.
    let err = mgr.release(&id, &ALICE).expect_err("unknown");
    assert_eq!(err.code, ErrorCode::NotFound);
    assert!(!err.message.contains("released"), "{}", err.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reuse_reset_returns_the_same_sandbox_and_a_failed_reset_replaces_it() {
    let fake = FakeRuntime::new();
    let mut reuse = spec(1, 1);
    reuse.reuse = ReusePolicy::Reset;
    let mgr = started(&fake, Records::disabled(), &[("p", reuse)]).await;
    settled(&mgr, "p", 1).await;
    let first = mgr.acquire(ALICE, acquire_req("p")).await.expect("acquire")[0]
        .id
        .clone();
    mgr.release(&first, &ALICE).expect("release");
    settled(&mgr, "p", 1).await;
    let again = mgr.acquire(BOB, acquire_req("p")).await.expect("acquire")[0]
        .id
        .clone();
    assert_eq!(again, first, "reset and reused");
    assert_eq!(fake.destroys.load(Ordering::Relaxed), 0);

    fake.fail_resets.store(true, Ordering::Relaxed);
    mgr.release(&again, &BOB).expect("release");
    eventually("replaced", || {
        let live = fake.live();
        live.len() == 1 && live[0] != first
    })
    .await;
    settled(&mgr, "p", 1).await;
    assert_eq!(status(&mgr, "p").total, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_leases_end_and_their_holder_is_told_why() {
    let fake = FakeRuntime::new();
    let mgr = started(&fake, Records::disabled(), &[("p", spec(1, 4))]).await;
    settled(&mgr, "p", 1).await;
    let mut req = acquire_req("p");
    req.ttl_seconds = Some(60);
    let ttl = mgr.acquire(ALICE, req).await.expect("acquire")[0]
        .id
        .clone();
    let mut req = acquire_req("p");
    req.idle_timeout_seconds = Some(30);
    let idle = mgr.acquire(ALICE, req).await.expect("acquire")[0]
        .id
        .clone();
    let forever = mgr.acquire(ALICE, acquire_req("p")).await.expect("acquire")[0]
        .id
        .clone();
    let now = crate::util::now_ms();
    assert_eq!(mgr.expire_leases(now + 1_000), 0);
    assert_eq!(mgr.expire_leases(now + 40_000), 1, "the idle one");
    assert_eq!(mgr.expire_leases(now + 70_000), 1, "the ttl one");
    for id in [&ttl, &idle] {
        let err = mgr.sandbox(id, &ALICE).err().expect("expired");
        assert_eq!(err.code, ErrorCode::SandboxUnavailable);
        assert!(err.message.contains("expired"), "{}", err.message);
        // Releasing an expired lease is done, not an error.
        mgr.release(id, &ALICE).expect("release after expiry");
    }
    assert!(mgr.sandbox(&forever, &ALICE).is_ok());
    eventually("both destroyed", || {
        let live = fake.live();
        !live.contains(&ttl) && !live.contains(&idle)
    })
    .await;
    assert_eq!(status(&mgr, "p").allocated, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_creations_back_off_show_their_error_and_recover() {
    let fake = FakeRuntime::new();
    fake.fail_creates.store(2, Ordering::Relaxed);
    let started_at = Instant::now();
    let mgr = started(&fake, Records::disabled(), &[("p", spec(1, 2))]).await;
    eventually("the error shows", || status(&mgr, "p").last_error.is_some()).await;
    assert!(
        status(&mgr, "p")
            .last_error
            .is_some_and(|e| e.contains("injected failure"))
    );
    settled(&mgr, "p", 1).await;
    // Two failures in a row wait 100 ms, then 200 ms.
    assert!(
        started_at.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started_at.elapsed()
    );
    assert_eq!(fake.creates.load(Ordering::Relaxed), 3);
    assert_eq!(status(&mgr, "p").last_error, None);
    let metrics = String::from_utf8(mgr.metrics.render()).expect("utf-8");
    assert!(
        metrics.contains(r#"arl_sandbox_failures_total{pool="p",reason="create"} 2"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_sandbox_is_replaced_and_its_holder_told() {
    let fake = FakeRuntime::new();
    let mgr = started(&fake, Records::disabled(), &[("p", spec(1, 3))]).await;
    settled(&mgr, "p", 1).await;
    let held = mgr.acquire(ALICE, acquire_req("p")).await.expect("acquire")[0]
        .id
        .clone();
    settled(&mgr, "p", 1).await;
    let idle: Vec<String> = fake.live().into_iter().filter(|id| *id != held).collect();
    fake.kill(&held);
    fake.kill(&idle[0]);
    eventually("both replaced", || {
        let live = fake.live();
        !live.contains(&held) && !live.contains(&idle[0])
    })
    .await;
    settled(&mgr, "p", 1).await;
    let s = status(&mgr, "p");
    assert_eq!((s.allocated, s.total), (0, 1));
    let err = mgr.sandbox(&held, &ALICE).err().expect("died");
    assert_eq!(err.code, ErrorCode::SandboxUnavailable);
    assert!(err.message.contains("died"), "{}", err.message);
    let metrics = String::from_utf8(mgr.metrics.render()).expect("utf-8");
    assert!(
        metrics.contains(r#"arl_sandbox_failures_total{pool="p",reason="died"} 2"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_destroys_everything_and_refuses_new_leases() {
    let fake = FakeRuntime::new();
    let state = temp_state();
    let records = Records::open(&state).expect("records");
    let mgr = started(&fake, records, &[("p", spec(2, 4))]).await;
    settled(&mgr, "p", 2).await;
    mgr.acquire(ALICE, acquire_req("p")).await.expect("acquire");
    mgr.shutdown(ShutdownMode::Stop).await;
    assert_eq!(fake.live(), Vec::<String>::new());
    assert_eq!(Records::open(&state).expect("records").load(), vec![]);
    let err = mgr
        .acquire(ALICE, acquire_req("p"))
        .await
        .expect_err("draining");
    assert_eq!(err.code, ErrorCode::Draining);
    let _ = std::fs::remove_dir_all(&state);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_takes_back_leases_and_idle_sandboxes_after_a_hand_over() {
    let fake = FakeRuntime::new();
    let state = temp_state();
    let pools = [("p", spec(2, 5))];
    let first = started(&fake, Records::open(&state).expect("records"), &pools).await;
    settled(&first, "p", 2).await;
    let mut req = acquire_req("p");
    req.env.insert("EPISODE".into(), "7".into());
    req.labels.insert("run".into(), "a".into());
    req.ttl_seconds = Some(600);
    let kept = first.acquire(ALICE, req).await.expect("acquire")[0].clone();
    let lost = first
        .acquire(ALICE, acquire_req("p"))
        .await
        .expect("acquire")[0]
        .id
        .clone();
    settled(&first, "p", 2).await;
    // A pool created through the API comes back too, with its lease.
    first.put_pool("api", spec(0, 1)).expect("put pool");
    let in_api_pool = first
        .acquire(BOB, acquire_req("api"))
        .await
        .expect("acquire")[0]
        .id
        .clone();
    first.shutdown(ShutdownMode::HandOver).await;
    assert_eq!(fake.live().len(), 5, "nothing destroyed");
    let creates = fake.creates.load(Ordering::Relaxed);
    // One of them dies while no daemon is there.
    fake.kill(&lost);

    let second = started(&fake, Records::open(&state).expect("records"), &pools).await;
    settled(&second, "p", 2).await;
    let s = status(&second, "p");
    assert_eq!((s.allocated, s.total), (1, 3));
    assert_eq!(status(&second, "api").allocated, 1);
    assert!(second.sandbox(&in_api_pool, &BOB).is_ok());
    assert_eq!(
        fake.creates.load(Ordering::Relaxed),
        creates,
        "the pool was refilled from the adopted idle sandboxes, not warmed again"
    );
    let sb = second
        .sandbox(&kept.id, &ALICE)
        .expect("same owner, same id");
    let lease = sb.lease().expect("leased");
    assert_eq!(lease.env.get("EPISODE").map(String::as_str), Some("7"));
    assert_eq!(sb.info().labels, kept.labels);
    assert_eq!(sb.info().expires_at_ms, kept.expires_at_ms);
    assert_eq!(
        second
            .sandbox(&kept.id, &BOB)
            .err()
            .expect("another token")
            .code,
        ErrorCode::Forbidden
    );
    // The one that died meanwhile: its holder hears that the node restarted, retryably.
    let err = second.sandbox(&lost, &ALICE).err().expect("lost");
    assert_eq!(err.code, ErrorCode::SandboxUnavailable);
    assert!(err.message.contains("restarted"), "{}", err.message);
    let metrics = String::from_utf8(second.metrics.render()).expect("utf-8");
    for line in [
        r#"arl_sandboxes_adopted_total{runtime="process",state="allocated"} 2"#,
        r#"arl_sandboxes_adopted_total{runtime="process",state="idle"} 2"#,
        r#"arl_sandboxes_adopted_total{runtime="process",state="lost"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    // The adopted lease works as any other: released, destroyed, refilled.
    second.release(&kept.id, &ALICE).expect("release");
    eventually("destroyed", || !fake.live().contains(&kept.id)).await;
    second.shutdown(ShutdownMode::Stop).await;
    assert_eq!(fake.live(), Vec::<String>::new());
    let _ = std::fs::remove_dir_all(&state);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_follow_leases_and_resets() {
    let fake = FakeRuntime::new();
    let state = temp_state();
    let mut reuse = spec(0, 2);
    reuse.reuse = ReusePolicy::Reset;
    let mgr = started(
        &fake,
        Records::open(&state).expect("records"),
        &[("p", reuse)],
    )
    .await;
    let records = Records::open(&state).expect("records");
    let id = mgr.acquire(ALICE, acquire_req("p")).await.expect("acquire")[0]
        .id
        .clone();
    let leased = records.load();
    assert_eq!(leased.len(), 1);
    assert_eq!(leased[0].id, id);
    assert!(leased[0].lease.is_some());
    // Reset and back in the pool: recorded idle.
    mgr.release(&id, &ALICE).expect("release");
    settled(&mgr, "p", 1).await;
    let idle = records.load();
    assert_eq!(idle.len(), 1);
    assert_eq!(idle[0].lease, None);
    // A failed reset destroys it, record first.
    mgr.acquire(ALICE, acquire_req("p")).await.expect("acquire");
    fake.fail_resets.store(true, Ordering::Relaxed);
    mgr.release(&id, &ALICE).expect("release");
    eventually("destroyed", || fake.live().is_empty()).await;
    assert_eq!(records.load(), vec![]);
    let _ = std::fs::remove_dir_all(&state);
}

/// Acquires, releases, expiries and deaths at once: whatever the interleaving, every
/// sandbox ends up counted exactly once, and nothing is leased twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_release_expiry_and_death_race_without_skewing_counts() {
    let fake = FakeRuntime::new();
    let mut pool = spec(3, 6);
    pool.reuse = ReusePolicy::Reset;
    let mgr = started(&fake, Records::disabled(), &[("p", pool)]).await;
    settled(&mgr, "p", 3).await;
    // Ids leased now (expired ones stay: they are never handed out again).
    let held = Arc::new(std::sync::Mutex::new(HashSet::new()));
    let holders = (0..6u8).map(|n| {
        let mgr = mgr.clone();
        let held = held.clone();
        tokio::spawn(async move {
            let owner: Owner = Some([n + 10; 32]);
            for round in 0..40 {
                let mut req = acquire_req("p");
                req.ttl_seconds = Some(3600);
                let Ok(got) = mgr.acquire(owner, req).await else {
                    tokio::task::yield_now().await;
                    continue;
                };
                let id = got[0].id.clone();
                assert!(
                    held.lock().expect("held").insert(id.clone()),
                    "{id} leased twice"
                );
                if round % 3 != 0 {
                    held.lock().expect("held").remove(&id);
                    let _ = mgr.release(&id, &owner);
                }
            }
        })
    });
    let holders: Vec<_> = holders.collect();
    let chaos = {
        let mgr = mgr.clone();
        let fake = fake.clone();
        tokio::spawn(async move {
            for round in 0..40 {
                mgr.expire_leases(u64::MAX);
                if round % 5 == 0
                    && let Some(id) = fake.live().first()
                {
                    fake.kill(id);
                }
                tokio::task::yield_now().await;
            }
        })
    };
    for h in holders {
        h.await.expect("holder");
    }
    chaos.await.expect("chaos");
    mgr.expire_leases(u64::MAX);
    // At least `min_idle` idle, nothing starting, every teardown done. A reset sandbox may
    // come back while the refill that replaced it is under way, so there can be one more.
    eventually("settled", || {
        let s = status(&mgr, "p");
        s.starting == 0 && s.idle >= 3 && fake.live().len() == s.idle
    })
    .await;
    let s = status(&mgr, "p");
    assert_eq!((s.allocated, s.total), (0, s.idle), "{s:?}");
    assert!(s.total <= 6, "over the pool's max: {s:?}");
    // The idle ones are exactly the live ones, each once.
    let mut idle: Vec<String> = mgr.pool("p").expect("pool").state().idle_ids();
    idle.sort();
    assert_eq!(idle, fake.live());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cordoned_node_refuses_new_leases_and_stops_refilling_but_leases_run_on() {
    let fake = FakeRuntime::new();
    let mgr = started(&fake, Records::disabled(), &[("p", spec(2, 8))]).await;
    settled(&mgr, "p", 2).await;
    let held = mgr.acquire(ALICE, acquire_req("p")).await.expect("acquire");
    settled(&mgr, "p", 2).await;
    let creates = fake.creates.load(Ordering::Relaxed);

    assert!(mgr.set_cordoned(true));
    assert!(!mgr.set_cordoned(true), "already cordoned");
    let err = mgr
        .acquire(BOB, acquire_req("p"))
        .await
        .expect_err("refused");
    assert_eq!(err.code, ErrorCode::Draining);
    assert!(err.retryable);
    assert!(mgr.unready_reason().is_some_and(|r| r.contains("cordoned")));
    // The lease runs on; the idle sandboxes that die are not replaced.
    assert!(mgr.sandbox(&held[0].id, &ALICE).is_ok());
    for id in fake.live() {
        if id != held[0].id {
            fake.kill(&id);
        }
    }
    eventually("the dead idle ones gone", || status(&mgr, "p").idle == 0).await;
    mgr.release(&held[0].id, &ALICE).expect("release");
    eventually("the release done", || status(&mgr, "p").total == 0).await;
    assert_eq!(
        fake.creates.load(Ordering::Relaxed),
        creates,
        "a cordoned node refilled"
    );

    // Uncordoned: warm again and serving.
    assert!(mgr.set_cordoned(false));
    settled(&mgr, "p", 2).await;
    assert!(mgr.unready_reason().is_none());
    assert_eq!(
        mgr.acquire(BOB, acquire_req("p"))
            .await
            .expect("acquire")
            .len(),
        1
    );
}
