use super::*;

fn session(id: &str) -> SessionRecord {
    SessionRecord {
        id: id.into(),
        runtime: "default".into(),
        state: "stopped".into(),
        uid_slot: 0,
        stop_reason: None,
        cpu_ns: 0,
        peak_memory_bytes: 0,
        workspace_bytes: 0,
        created_at_ms: 1,
        last_activity_ms: 1,
        started_at_ms: None,
    }
}

#[tokio::test]
async fn runtimes_and_sessions_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("state.db")).await.unwrap();
    store
        .insert_runtime(&RuntimeSpec::named("default"), 5)
        .await
        .unwrap();
    assert!(matches!(
        store
            .insert_runtime(&RuntimeSpec::named("default"), 5)
            .await,
        Err(StoreError::AlreadyExists { .. })
    ));
    assert_eq!(
        store
            .get_runtime("default")
            .await
            .unwrap()
            .unwrap()
            .spec
            .name,
        "default"
    );

    let mut a = session("a");
    let mut b = session("b");
    let mut c = session("c");
    store.insert_session(&mut a).await.unwrap();
    store.insert_session(&mut b).await.unwrap();
    assert_eq!((a.uid_slot, b.uid_slot), (0, 1));
    store.delete_session("a").await.unwrap();
    store.insert_session(&mut c).await.unwrap();
    assert_eq!(c.uid_slot, 0, "freed slot is reused");
    let mut d = session("d");
    store.insert_session(&mut d).await.unwrap();
    assert_eq!(d.uid_slot, 2);

    b.state = "running".into();
    b.cpu_ns = 42;
    store.update_session(&b).await.unwrap();
    assert_eq!(store.get_session("b").await.unwrap().unwrap(), b);
    assert_eq!(store.sessions_using_runtime("default").await.unwrap(), 3);
    assert!(matches!(
        store.insert_session(&mut session("b")).await,
        Err(StoreError::AlreadyExists { .. })
    ));
}

#[tokio::test]
async fn records_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    {
        let store = Store::open(&path).await.unwrap();
        store
            .insert_runtime(&RuntimeSpec::named("default"), 5)
            .await
            .unwrap();
        store.insert_session(&mut session("keep")).await.unwrap();
        store.insert_token("t1", "abc", "admin", 1).await.unwrap();
    }
    let store = Store::open(&path).await.unwrap();
    assert!(store.get_session("keep").await.unwrap().is_some());
    use std::os::unix::fs::PermissionsExt;
    for file in ["state.db", "state.db-wal", "state.db-shm"] {
        let mode = std::fs::metadata(dir.path().join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{file} is {mode:o}");
    }
    assert_eq!(
        store.token_role("abc").await.unwrap().as_deref(),
        Some("admin")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_session_inserts_all_succeed_with_distinct_slots() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("state.db")).await.unwrap();
    store
        .insert_runtime(&RuntimeSpec::named("default"), 5)
        .await
        .unwrap();
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut rec = session(&format!("s{i}"));
                store.insert_session(&mut rec).await.map(|()| rec.uid_slot)
            })
        })
        .collect();
    let mut slots = Vec::new();
    for t in tasks {
        slots.push(t.await.unwrap().unwrap());
    }
    slots.sort_unstable();
    assert_eq!(slots, (0..50).collect::<Vec<u32>>());
}
