//! `ADMIN_TOKEN`: every admin page but the probes needs it, a browser logs in once with it,
//! and a listener reachable from other hosts does not start without it.

use aliyun_sms_worker::config;
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, COOKIE, LOCATION, SET_COOKIE, WWW_AUTHENTICATE};

use crate::helpers::{TestApp, TestEnv, amqp_url, free_addr, send_job, unique_id};
use crate::process::{WorkerProcess, run_to_end};

pub const TOKEN: &str = "it-admin-token-0123456789";

fn client() -> reqwest::Client {
    aliyun_sms_worker::tls::install_crypto_provider();
    // The login answer is a redirect the test looks at, not one to follow.
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("HTTP client")
}

async fn get(
    addr: &str,
    path: &str,
    headers: &[(reqwest::header::HeaderName, &str)],
) -> reqwest::Response {
    let mut request = client().get(format!("http://{addr}{path}"));
    for (name, value) in headers {
        request = request.header(name, *value);
    }
    request.send().await.expect("admin listener answers")
}

async fn spawn_guarded() -> (TestApp, String) {
    let admin = free_addr();
    let setting = admin.clone();
    let app = TestApp::spawn_with(|s| {
        s.insert(config::ADMIN_ADDR.into(), setting);
        s.insert(config::ADMIN_TOKEN.into(), TOKEN.into());
    })
    .await;
    (app, admin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_guards_every_page_but_the_probes() {
    let (app, admin) = spawn_guarded().await;
    let id = unique_id("guarded");
    app.publish(&send_job(&id)).await;
    app.next_result().await;

    let bearer = format!("Bearer {TOKEN}");
    let wrong = format!("Bearer {TOKEN}x");
    let prefix = format!("Bearer {}", &TOKEN[..TOKEN.len() - 1]);
    for path in [
        "/",
        &format!("/jobs/{id}"),
        &format!("/search?q={id}"),
        "/metrics",
    ] {
        for (what, headers) in [
            ("no header", vec![]),
            ("a wrong token", vec![(AUTHORIZATION, wrong.as_str())]),
            (
                "a prefix of the token",
                vec![(AUTHORIZATION, prefix.as_str())],
            ),
            (
                "the token as Basic",
                vec![(AUTHORIZATION, "Basic aXQ6dG9rZW4=")],
            ),
            (
                "the token as a cookie",
                vec![(COOKIE, &*format!("smsw_admin={TOKEN}"))],
            ),
        ] {
            let response = get(&admin, path, &headers).await;
            assert_eq!(
                response.status(),
                StatusCode::UNAUTHORIZED,
                "{path} with {what}"
            );
            assert_eq!(
                response
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .map(|v| v.as_bytes()),
                Some(&b"Bearer"[..]),
                "{path} with {what}"
            );
            let body = response.text().await.expect("body");
            assert!(
                !body.contains(&id) && !body.contains("sms_"),
                "{path}: {body}"
            );
        }
        let response = get(&admin, path, &[(AUTHORIZATION, bearer.as_str())]).await;
        assert_eq!(response.status(), StatusCode::OK, "{path} with the token");
    }
    let page = get(
        &admin,
        &format!("/jobs/{id}"),
        &[(AUTHORIZATION, bearer.as_str())],
    )
    .await
    .text()
    .await
    .expect("body");
    assert!(page.contains(&id), "{page}");
    let found = get(
        &admin,
        &format!("/search?q={id}"),
        &[(AUTHORIZATION, bearer.as_str())],
    )
    .await
    .text()
    .await
    .expect("body");
    assert!(found.contains(&format!(">{id}</a>")), "{found}");
    // Orchestrators probe without credentials.
    for path in ["/healthz", "/readyz"] {
        assert_eq!(
            get(&admin, path, &[]).await.status(),
            StatusCode::OK,
            "{path}"
        );
    }
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_logs_in_once_with_the_token_and_keeps_a_cookie_instead() {
    let (app, admin) = spawn_guarded().await;

    let refused = get(&admin, "/metrics?token=not-the-admin-token", &[]).await;
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    assert!(refused.headers().get(SET_COOKIE).is_none());

    let login = get(&admin, &format!("/metrics?token={TOKEN}"), &[]).await;
    assert_eq!(login.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        login.headers().get(LOCATION).map(|v| v.as_bytes()),
        Some(&b"/metrics"[..]),
        "the token leaves the address bar"
    );
    let cookie = login
        .headers()
        .get(SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .expect("a session cookie")
        .to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert!(
        !cookie.contains(TOKEN),
        "the cookie is not the token: {cookie}"
    );
    let session = cookie.split(';').next().expect("name=value");

    let metrics = get(&admin, "/metrics", &[(COOKIE, session)]).await;
    assert_eq!(metrics.status(), StatusCode::OK);
    assert!(
        metrics
            .text()
            .await
            .expect("body")
            .contains("sms_worker_ready")
    );
    app.shutdown().await;
}

/// The built binary, as an operator starts it: the error names both settings.
#[tokio::test]
async fn a_listener_reachable_from_other_hosts_does_not_start_without_a_token() {
    let amqp = amqp_url();
    let (code, _, stderr) = run_to_end(
        [
            (config::AMQP_URL, amqp.as_str()),
            (config::ALIBABA_CLOUD_ACCESS_KEY_ID, "id"),
            (config::ALIBABA_CLOUD_ACCESS_KEY_SECRET, "secret"),
            (config::ADMIN_ADDR, "0.0.0.0:0"),
        ],
        &["run", "--no-migrate"],
    )
    .await;
    assert_ne!(code, 0, "{stderr}");
    assert!(
        stderr.contains(config::ADMIN_ADDR) && stderr.contains(config::ADMIN_TOKEN),
        "the message names both settings: {stderr}"
    );
}

/// With the token, the same listener starts; the token is in no log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_the_listener_on_every_interface_starts_and_the_token_is_not_logged() {
    let admin = format!("0.0.0.0:{}", free_addr().rsplit_once(':').expect("port").1);
    let env = TestEnv::new(|s| {
        s.insert(config::ADMIN_ADDR.into(), admin.clone());
        s.insert(config::ADMIN_TOKEN.into(), TOKEN.into());
    })
    .await;
    let worker = WorkerProcess::start(&["run"], &env.settings).await;
    let local = admin.replace("0.0.0.0", "127.0.0.1");
    assert_eq!(
        get(&local, "/", &[]).await.status(),
        StatusCode::UNAUTHORIZED
    );
    let bearer = format!("Bearer {TOKEN}");
    assert_eq!(
        get(&local, "/metrics", &[(AUTHORIZATION, bearer.as_str())])
            .await
            .status(),
        StatusCode::OK
    );
    let (status, log) = worker.terminate().await;
    assert!(status.success(), "{log}");
    assert!(log.contains("admin listener"), "{log}");
    assert!(
        !log.contains(TOKEN),
        "the admin token is in the log:\n{log}"
    );

    env.remove().await;
}
