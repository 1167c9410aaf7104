//! ZDS over a real SOCK_SEQPACKET socket with real descriptors: the node agent's side and
//! ztunnel's side in one process. Hello, add with a network namespace, keep, del, snapshot; bad
//! descriptors and malformed requests refused with a reason while the connection keeps working;
//! ztunnel retries until the agent appears.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::fd::AsFd;
use std::time::Duration;

use proto::api::istio::workload::zds::WorkloadInfo;
use ztunnel::zds::{ZdsClient, ZdsError, ZdsEvent, ZdsListener};

#[tokio::test]
async fn agent_and_ztunnel_speak_zds_and_bad_requests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run/ztunnel.sock");
    // ztunnel starts first and waits for the agent.
    let client_path = path.clone();
    let ztunnel = tokio::spawn(async move {
        let client = ZdsClient::connect(&client_path).await;
        let mut seen = Vec::new();
        loop {
            match client.next().await {
                Ok(event) => {
                    let refuse = matches!(&event, ZdsEvent::Del { uid } if uid == "unknown");
                    seen.push(match &event {
                        ZdsEvent::Add { uid, info, .. } => {
                            format!("add {uid} {}", info.as_ref().map_or("", |i| i.name.as_str()))
                        }
                        ZdsEvent::Keep { uid } => format!("keep {uid}"),
                        ZdsEvent::Del { uid } => format!("del {uid}"),
                        ZdsEvent::SnapshotSent => "snapshot".into(),
                    });
                    client.ack(refuse.then(|| "unknown uid".to_owned())).await.unwrap();
                }
                Err(ZdsError::Closed) => return seen,
                Err(e) => panic!("{e}"),
            }
        }
    });
    // Under test: the agent appears only later; ztunnel keeps trying until it does.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut listener = ZdsListener::bind(&path).unwrap();
    let agent = listener.accept().await.unwrap();

    let netns = std::fs::File::open("/proc/self/ns/net").unwrap();
    let info = WorkloadInfo { name: "client".into(), namespace: "demo".into(), service_account: "client".into() };
    agent.add("uid-1", info, netns.as_fd()).await.unwrap();

    // A descriptor that is not a network namespace, and none at all: refused with the reason.
    let file = std::fs::File::open("/proc/self/status").unwrap();
    let err = agent.add_raw("uid-2", Some(file.as_fd())).await.unwrap_err();
    assert!(matches!(&err, ZdsError::Refused(r) if r.contains("not a network namespace")), "{err}");
    let err = agent.add_raw("uid-3", None).await.unwrap_err();
    assert!(matches!(&err, ZdsError::Refused(r) if r.contains("exactly one netns descriptor")), "{err}");
    // ztunnel decides about uids it does not know.
    let err = agent.del("unknown").await.unwrap_err();
    assert!(matches!(&err, ZdsError::Refused(r) if r == "unknown uid"), "{err}");

    // The connection still works.
    agent.keep("uid-1").await.unwrap();
    agent.snapshot_sent().await.unwrap();
    agent.del("uid-1").await.unwrap();
    drop(agent);
    let seen = tokio::time::timeout(Duration::from_secs(5), ztunnel).await.unwrap().unwrap();
    assert_eq!(seen, ["add uid-1 client", "del unknown", "keep uid-1", "snapshot", "del uid-1"]);
}

/// A stand-in ztunnel: acknowledges everything and records what it was sent, until dropped.
struct FakeZtunnel {
    seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeZtunnel {
    fn connect(path: &std::path::Path) -> FakeZtunnel {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (path, record) = (path.to_owned(), seen.clone());
        let task = tokio::spawn(async move {
            let client = ZdsClient::connect(&path).await;
            while let Ok(event) = client.next().await {
                record.lock().unwrap().push(match event {
                    ZdsEvent::Add { uid, .. } => format!("add {uid}"),
                    ZdsEvent::Keep { uid } => format!("keep {uid}"),
                    ZdsEvent::Del { uid } => format!("del {uid}"),
                    ZdsEvent::SnapshotSent => "snapshot".into(),
                });
                client.ack(None).await.unwrap();
            }
        });
        FakeZtunnel { seen, task }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

/// During a handover two ztunnels are connected to the node agent: the second gets the whole
/// snapshot without the first being cut off, every enrollment reaches both, and once one goes
/// away the agent notices and carries on with the other.
#[tokio::test]
async fn the_node_agent_serves_a_ztunnel_and_its_successor() {
    use ztunnel::node::agent::NodeAgent;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ztunnel.sock");
    let agent = NodeAgent::bind(&path).unwrap();
    let pod = ztunnel::netns::NetNs::new_isolated().unwrap();
    let info = WorkloadInfo { name: "app".into(), namespace: "demo".into(), service_account: "app".into() };
    agent.enroll("uid-1", info.clone(), pod.clone()).await.unwrap();

    let old = FakeZtunnel::connect(&path);
    tokio::time::timeout(Duration::from_secs(5), agent.wait_for_snapshot(0)).await.unwrap();
    let new = FakeZtunnel::connect(&path);
    tokio::time::timeout(Duration::from_secs(5), agent.wait_for_snapshot(1)).await.unwrap();
    assert_eq!(agent.connected().await, 2);
    agent.enroll("uid-2", info, pod.clone()).await.unwrap();
    for z in [&old, &new] {
        assert_eq!(z.seen(), ["add uid-1", "snapshot", "add uid-2"]);
    }

    // The old one lets go (it drains); the agent drops it and goes on with the new one.
    old.task.abort();
    proto::testing::eventually("the agent to notice the old ztunnel left", Duration::from_secs(5), || async {
        (agent.connected().await == 1).then_some(())
    })
    .await;
    agent.unenroll("uid-1").await.unwrap();
    assert_eq!(new.seen(), ["add uid-1", "snapshot", "add uid-2", "del uid-1"]);
    assert_eq!(old.seen().len(), 3, "the old ztunnel heard of the pod leaving after it left");
}

/// A (re)starting node agent serves ztunnel only once it has enrolled the node's pods: a ztunnel
/// connecting earlier waits, then gets a first snapshot that names every pod, never an empty one
/// (which would make it drop the pods it serves).
#[tokio::test]
async fn a_closed_node_agent_serves_ztunnel_only_once_opened() {
    use ztunnel::node::agent::NodeAgent;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ztunnel.sock");
    let agent = NodeAgent::bind_closed(&path).unwrap();
    let early = FakeZtunnel::connect(&path);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(agent.snapshots(), 0);
    assert!(early.seen().is_empty(), "{:?}", early.seen());
    let pod = ztunnel::netns::NetNs::new_isolated().unwrap();
    let info = WorkloadInfo { name: "app".into(), namespace: "demo".into(), service_account: "app".into() };
    agent.enroll("uid-1", info, pod).await.unwrap();
    assert!(agent.open(), "the first open");
    assert!(!agent.open(), "open twice");
    tokio::time::timeout(Duration::from_secs(5), agent.wait_for_snapshot(0)).await.unwrap();
    assert_eq!(early.seen(), ["add uid-1", "snapshot"]);
}
