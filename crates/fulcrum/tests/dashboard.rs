//! The live dashboard (`GET /dashboard`), rendered by a real headless Chromium against a
//! real node with real simulated backends: the page's own scripts must fetch the admin
//! API and show what it says.

mod common;

use common::{Backend, DEADLINE, Node, client, element, eventually, render_page};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_pools_backends_endpoints_and_strategies() {
    let b1 = Backend::start("b1", &[]);
    let b2 = Backend::start("b2", &[]);
    let yaml = format!(
        "admin:\n  listen: 127.0.0.1:0\n  token: s3cret\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    routes:\n      - pool: app\npools:\n  app:\n    strategy: round_robin\n    backends:\n      - address: {}\n      - address: {}\n",
        b1.address(),
        b2.address()
    );
    let node = Node::start(&yaml);
    let http = client();
    for i in 0..20 {
        let r = http
            .get(format!("{}/api/items/{i}", node.url("web")))
            .send()
            .await
            .expect("proxied request");
        assert_eq!(r.status(), 200);
    }
    let disabled = http
        .post(node.admin_url(&format!("/api/pools/app/backends/{}/disable", b2.address())))
        .bearer_auth("s3cret")
        .send()
        .await
        .expect("disable");
    assert_eq!(disabled.status(), 200);

    // `/` leads to the page; the page is self-contained HTML under a strict CSP.
    let root = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
        .get(node.admin_url("/"))
        .send()
        .await
        .expect("GET /");
    assert!(root.status().is_redirection(), "{}", root.status());
    assert_eq!(root.headers()["location"], "/dashboard");
    let page = http
        .get(node.admin_url("/dashboard"))
        .send()
        .await
        .expect("GET /dashboard");
    assert_eq!(page.status(), 200);
    assert!(
        page.headers()["content-type"]
            .to_str()
            .is_ok_and(|t| t.starts_with("text/html"))
    );
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .expect("ascii CSP")
        .to_owned();
    assert!(csp.contains("connect-src 'self'"), "{csp}");
    let html = page.text().await.expect("page text");
    assert!(!html.contains("/*STRATEGIES*/"), "strategy names filled in");

    // Rendered by the page's scripts from the live API.
    let (dom, console) = eventually(DEADLINE, "the dashboard renders the pool", async || {
        let (dom, console) = render_page(&node.admin_url("/dashboard")).await;
        dom.contains(r#"data-pool="app""#).then_some((dom, console))
    })
    .await;
    assert!(!console.contains("Uncaught"), "script errors: {console}");
    assert!(
        dom.contains(r#"<div id="banner" style="display: none;">"#),
        "the API error banner is hidden: {dom}"
    );
    let pool = element(&dom, r#"data-pool="app""#, "h2").expect("pool heading");
    assert!(
        pool.contains(r#"<b class="strategy">round_robin</b>"#),
        "{pool}"
    );
    for name in fulcrum_balance::StrategyKind::NAMES {
        assert!(
            dom.contains(&format!(r#"<option value="{name}""#)),
            "strategy {name} offered"
        );
    }
    let row1 =
        element(&dom, &format!(r#"data-backend="{}""#, b1.address()), "tr").expect("b1's row");
    assert!(row1.contains(r#"class="state healthy">healthy<"#), "{row1}");
    let row2 =
        element(&dom, &format!(r#"data-backend="{}""#, b2.address()), "tr").expect("b2's row");
    assert!(
        row2.contains(r#"class="state disabled">disabled<"#),
        "{row2}"
    );
    // Round robin split the 20 requests 10/10, and the page shows the counts.
    assert!(row1.contains(r#"<td class="num">10</td>"#), "{row1}");
    assert!(row2.contains(r#"<td class="num">10</td>"#), "{row2}");
    let endpoint =
        element(&dom, r#"data-endpoint="GET /api/items/{id}""#, "tr").expect("the endpoint's row");
    assert!(
        endpoint.contains(r#"<td class="num">20</td>"#),
        "{endpoint}"
    );
    assert!(endpoint.contains(">short<"), "{endpoint}");
    // A single node has no cluster panel.
    assert!(dom.contains(r#"<section id="cluster" hidden="">"#), "{dom}");
}
