//! `fulcrum demo` runs three simulated backends, a node and the admin API with no config.

mod common;

use std::process::Command;

use common::{DEADLINE, client, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_serves_through_three_backends() {
    let mut cmd = Command::new(common::fulcrum_bin());
    cmd.args(["demo", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"]);
    let demo = common::Spawned::start("fulcrum demo", cmd);
    let ready = &demo.ready;
    let proxy = ready["listeners"][0]["listen"]
        .as_str()
        .expect("listener")
        .to_owned();
    let admin = ready["admin"].as_str().expect("admin").to_owned();

    let c = client();
    for _ in 0..30 {
        let response = c
            .get(format!("http://{proxy}/hello"))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200);
    }
    let backends = eventually(DEADLINE, "three healthy demo backends", async || {
        let v: serde_json::Value = c
            .get(format!("http://{admin}/api/pools/demo/backends"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let list = v["backends"].as_array()?.clone();
        (list.len() == 3 && list.iter().all(|b| b["state"] == "healthy")).then_some(list)
    })
    .await;
    let served: u64 = backends
        .iter()
        .map(|b| b["requests"].as_u64().unwrap_or(0))
        .sum();
    assert!(served >= 30, "{backends:?}");
    let pools: serde_json::Value = c
        .get(format!("http://{admin}/api/pools"))
        .send()
        .await
        .expect("pools")
        .json()
        .await
        .expect("json");
    assert_eq!(pools["pools"][0]["strategy"], "peak_ewma");
}
