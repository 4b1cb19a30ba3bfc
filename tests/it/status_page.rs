//! The admin status page as an operator sees it: rendered by headless Chromium from a worker
//! that has just handled real jobs.

use aliyun_sms_worker::config;
use aliyun_sms_worker::fake_aliyun::{Fault, FaultRule};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::Value;

use crate::admin_access::TOKEN;
use crate::chromium::{dump_dom, element, screenshot, visible_text};
use crate::helpers::{
    PATIENCE, TestApp, TestEnv, admin_get, drop_database, free_addr, publish_to,
    remove_topology_and_close, send_job, test_link, unique_id,
};
use crate::operators::{hold_a_job_and_plant_a_dead_worker, hold_slow_calls};
use crate::process::WorkerProcess;
use crate::proxy::{Proxy, target_of, through};

fn phone(job: &Value) -> &str {
    job["phone_number"].as_str().expect("phone number")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_counts_chart_masked_latest_jobs_and_a_jobs_attempts() {
    let admin = free_addr();
    let admin_setting = admin.clone();
    let app = TestApp::spawn_with(|s| {
        s.insert(config::ADMIN_ADDR.into(), admin_setting);
        hold_slow_calls(s);
    })
    .await;

    let sent = send_job(&unique_id("page-sent"));
    let retried_id = unique_id("page-retried");
    let retried = send_job(&retried_id);
    let refused = send_job(&unique_id("page-refused"));
    // Ids are the backend's to choose: this one is markup, and has a path and a query in it.
    let hostile_id = format!(
        "x/<img src=x onerror=alert(1)>?\"'&-{}",
        uuid::Uuid::new_v4().simple()
    );
    let hostile = send_job(&hostile_id);
    app.fake.push_fault(
        FaultRule::every(Fault::Http503)
            .on_phone(phone(&retried))
            .times(1),
    );
    app.fake.push_fault(
        FaultRule::every(Fault::error(
            "isv.SMS_SIGNATURE_ILLEGAL",
            "<script>alert('message')</script>",
        ))
        .on_phone(phone(&refused))
        .times(1),
    );
    for job in [&sent, &retried, &refused, &hostile] {
        app.publish(job).await;
    }
    app.results(4).await;
    let base = format!("http://{admin}");

    let dom = dump_dom(&format!("{base}/")).await;
    let row =
        |status: &str| visible_text(element(&dom, &format!("data-status=\"{status}\""), "tr"));
    // status, last hour, last day
    assert_eq!(row("sent"), "sent 3 3", "{dom}");
    assert_eq!(row("rejected"), "rejected 1 1", "{dom}");
    assert_eq!(row("total"), "total 4 4", "{dom}");
    let legend = visible_text(element(&dom, "class=\"legend\"", "div"));
    assert_eq!(legend, "succeeded: 3 failed: 1", "{dom}");
    assert!(
        element(&dom, "id=\"chart\"", "section").contains("<svg"),
        "the chart is inline SVG"
    );
    let codes = visible_text(element(&dom, "id=\"codes\"", "section"));
    assert!(
        codes.contains("isv.SMS_SIGNATURE_ILLEGAL 1 signature (sign name) not approved"),
        "{codes}"
    );
    assert!(
        visible_text(element(&dom, "id=\"readiness\"", "p")).starts_with("ready ready"),
        "{dom}"
    );

    let latest = element(&dom, "id=\"latest\"", "section");
    for job in [&sent, &retried, &refused, &hostile] {
        let number = phone(job);
        let masked = format!("{}****{}", &number[..3], &number[7..]);
        assert!(
            latest.contains(&masked),
            "masked {masked} in the list: {latest}"
        );
        assert!(!dom.contains(number), "full number {number} on the page");
    }
    assert!(
        latest.contains(&format!("href=\"/jobs/{retried_id}\">{retried_id}</a>")),
        "the job id links to its page: {latest}"
    );
    // The hostile id is shown as text, and its link names it as one path segment.
    assert!(
        visible_text(latest).contains(&hostile_id),
        "the odd id shows as written: {latest}"
    );
    assert!(
        !dom.contains("<img"),
        "markup from an id became markup: {dom}"
    );
    let hostile_href = latest
        .split("href=\"")
        .filter_map(|rest| rest.split('"').next())
        .find(|href| href.starts_with("/jobs/x%2F"))
        .unwrap_or_else(|| panic!("no link to the odd id: {latest}"))
        .replace("&amp;", "&");

    // The retried job: both calls, the 503 one first.
    let detail = dump_dom(&format!("{base}/jobs/{retried_id}")).await;
    assert_eq!(
        visible_text(element(&detail, "id=\"job-id\"", "code")),
        retried_id
    );
    let attempts = element(&detail, "id=\"attempts\"", "section");
    let rows: Vec<String> = attempts.split("<tr>").skip(2).map(visible_text).collect();
    assert_eq!(rows.len(), 2, "two calls: {attempts}");
    let request_ids: Vec<String> = app
        .attempts(&retried_id)
        .await
        .iter()
        .map(|a| a["request_id"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(
        rows[0].starts_with("1 ")
            && rows[0].contains("SendSmsVerifyCode 503 ServiceUnavailable retry")
            && rows[0].contains(&request_ids[0]),
        "{rows:?}"
    );
    assert!(
        rows[1].starts_with("2 ")
            && rows[1].contains("SendSmsVerifyCode 200 OK success")
            && rows[1].contains(&request_ids[1]),
        "{rows:?}"
    );
    let retried_phone = phone(&retried);
    assert!(
        !detail.contains(retried_phone),
        "full number on the job page"
    );
    assert!(
        visible_text(&detail).contains(&format!(
            "phone {}****{}",
            &retried_phone[..3],
            &retried_phone[7..]
        )),
        "{detail}"
    );

    // Aliyun's message is data too.
    let refused_page = dump_dom(&format!("{base}/jobs/{}", refused["id"].as_str().unwrap())).await;
    assert!(!refused_page.contains("<script"), "{refused_page}");
    assert!(
        visible_text(&refused_page).contains("<script>alert('message')</script>"),
        "{refused_page}"
    );

    let followed = dump_dom(&format!("{base}{hostile_href}")).await;
    assert_eq!(
        visible_text(element(&followed, "id=\"job-id\"", "code")),
        hostile_id,
        "the link leads to the odd id's own page"
    );
    assert!(!followed.contains("<img"), "{followed}");

    let (status, missing) = admin_get(&admin, "/jobs/no-such-job").await;
    assert_eq!(status, 404);
    assert!(missing.contains("No such job"));

    // The fleet: this worker holding a slow job, and a crashed one still holding a claim.
    let fleet = hold_a_job_and_plant_a_dead_worker(&app).await;
    let dom = dump_dom(&format!("{base}/")).await;
    let worker = |id: &str| {
        visible_text(element(
            &dom,
            &format!("data-worker=\"{}\"", &id[..8]),
            "tr",
        ))
    };
    let live = worker(&fleet.live);
    assert!(
        live.starts_with("live aliyun-sms-worker@")
            && live.contains(&format!(" {} ", &fleet.live[..8]))
            && live.ends_with(" s ago 1"),
        "the live worker, beating, holding the slow job {}: {live}",
        fleet.held_job
    );
    let dead = worker(&fleet.dead);
    assert!(
        dead.starts_with(&format!("dead crashed-worker {} ", &fleet.dead[..8]))
            && dead.ends_with(" 3 h ago 1"),
        "{dead}"
    );
    assert_eq!(
        visible_text(element(&dom, "id=\"fleet-summary\"", "p")),
        "1 live worker(s) (0 draining), holding 1 job(s)"
    );
    assert_eq!(
        visible_text(element(&dom, "id=\"fleet-alarm\"", "p")),
        "dead 1 worker(s) stopped beating but still hold 1 sending job(s)"
    );

    let png = std::env::temp_dir().join(format!("smsw-status-{}.png", uuid::Uuid::new_v4()));
    screenshot(&format!("{base}/"), &png).await;
    let bytes = std::fs::read(&png).expect("Chromium wrote the screenshot");
    let _ = std::fs::remove_file(&png);
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 10_000,
        "a real screenshot ({} bytes)",
        bytes.len()
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_says_so_when_the_database_is_gone_and_recovers_by_itself() {
    let admin = free_addr();
    let mut env = TestEnv::new(|s| {
        s.insert(config::ADMIN_ADDR.into(), admin.clone());
    })
    .await;
    let url = env.settings[config::DATABASE_URL].clone();
    let db = Proxy::start(target_of(&url)).await;
    env.settings
        .insert(config::DATABASE_URL.into(), through(&url, &db));
    let app = TestApp::start(env).await;
    let job = send_job(&unique_id("page-outage"));
    app.publish(&job).await;
    app.next_result().await;
    let (status, page) = admin_get(&admin, "/").await;
    assert_eq!(status, 200, "{page}");

    db.cut();
    let asked = std::time::Instant::now();
    let (status, page) = admin_get(&admin, "/").await;
    assert_eq!(status, 503, "{page}");
    assert!(page.contains("Database unavailable"), "{page}");
    assert!(
        asked.elapsed() < PATIENCE / 2,
        "an operator is not kept waiting: {:?}",
        asked.elapsed()
    );
    let id = job["id"].as_str().unwrap();
    assert_eq!(admin_get(&admin, &format!("/jobs/{id}")).await.0, 503);

    db.restore();
    // The pool reconnects on the next query; ask until it has.
    let back = async {
        loop {
            let (status, page) = admin_get(&admin, &format!("/jobs/{id}")).await;
            if status == 200 {
                return page;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    };
    let page = tokio::time::timeout(PATIENCE, back)
        .await
        .expect("the page works again once the database is back");
    assert!(page.contains(id), "{page}");
    app.shutdown().await;
}

/// A value no field may turn into markup: it closes an attribute, adds an element with a
/// handler, and a script, each of which would mark the page if it ran.
fn hostile(field: &str) -> String {
    format!(
        "{field}\"'><img src=x onerror=\"document.documentElement.dataset.pwned=1\">\
         <script>document.documentElement.dataset.pwned=1</script>&amp;"
    )
}

/// Every text field the two pages show, planted in the database as a backend, Aliyun or another
/// worker could leave it; the browser (logged in with the token) must show each literally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_field_the_pages_show_is_text_never_markup() {
    let admin = free_addr();
    let admin_setting = admin.clone();
    let app = TestApp::spawn_with(|s| {
        s.insert(config::ADMIN_ADDR.into(), admin_setting);
        s.insert(config::ADMIN_TOKEN.into(), TOKEN.into());
    })
    .await;
    let id = hostile(&unique_id("id"));
    let phone = hostile("phone");
    sqlx::query(
        "INSERT INTO sms_jobs (id, type, status, phone_number, out_id, reply_to, biz_id,
                               request_id, code, message, attempts, finished_at)
         VALUES ($1, $2, 'rejected', $3, $4, $5, $6, $7, $8, $9, 1, now())",
    )
    .bind(&id)
    .bind(hostile("type"))
    .bind(&phone)
    .bind(hostile("out_id"))
    .bind(hostile("reply_to"))
    .bind(hostile("biz_id"))
    .bind(hostile("request_id"))
    .bind(hostile("code"))
    .bind(hostile("message"))
    .execute(&app.pool)
    .await
    .expect("plant the job");
    sqlx::query(
        "INSERT INTO sms_attempts (job_id, attempt, action, started_at, finished_at, http_status,
                                   code, message, request_id, outcome)
         VALUES ($1, 1, $2, now(), now(), 400, $3, $4, $5, $6)",
    )
    .bind(&id)
    .bind(hostile("action"))
    .bind(hostile("attempt_code"))
    .bind(hostile("attempt_message"))
    .bind(hostile("attempt_request_id"))
    .bind(hostile("outcome"))
    .execute(&app.pool)
    .await
    .expect("plant its call");
    sqlx::query(
        "INSERT INTO sms_deliveries (job_id, phone_number, send_date, delivery_status, err_code,
                                     received_at)
         VALUES ($1, $2, current_date, 'failed', $3, now())",
    )
    .bind(&id)
    .bind(&phone)
    .bind(hostile("err_code"))
    .execute(&app.pool)
    .await
    .expect("plant its receipt");
    // Beating once an hour, so it stays live however slow the browser is.
    sqlx::query("INSERT INTO sms_workers (id, name, heartbeat_ms) VALUES ($1::uuid, $2, 3600000)")
        .bind(uuid::Uuid::new_v4().to_string())
        .bind(hostile("worker"))
        .execute(&app.pool)
        .await
        .expect("plant a worker");

    let base = format!("http://{admin}");
    let index = dump_dom(&format!("{base}/?token={TOKEN}")).await;
    let encoded = utf8_percent_encode(&id, NON_ALPHANUMERIC).to_string();
    let job = dump_dom(&format!("{base}/jobs/{encoded}?token={TOKEN}")).await;
    // Searched for by its hostile id; logging in keeps the search.
    let found = dump_dom(&format!("{base}/search?q={encoded}&token={TOKEN}")).await;
    // The phone number shows masked: its first three and last four characters.
    let masked = aliyun_sms_worker::phone::mask(&phone);
    for (page, marker, dom, shown) in [
        (
            "index",
            "id=\"latest\"",
            &index,
            vec![
                id.clone(),
                hostile("type"),
                hostile("code"),
                hostile("worker"),
                masked.clone(),
            ],
        ),
        (
            "job",
            "id=\"job-id\"",
            &job,
            vec![
                id.clone(),
                hostile("type"),
                hostile("code"),
                hostile("message"),
                hostile("biz_id"),
                hostile("request_id"),
                hostile("out_id"),
                hostile("reply_to"),
                hostile("action"),
                hostile("attempt_code"),
                hostile("attempt_message"),
                hostile("attempt_request_id"),
                hostile("outcome"),
                hostile("err_code"),
                masked.clone(),
            ],
        ),
        (
            "search",
            "id=\"results\"",
            &found,
            vec![
                format!("Jobs for job id {id}"),
                hostile("type"),
                hostile("code"),
                masked.clone(),
            ],
        ),
    ] {
        assert!(
            dom.contains(marker),
            "the browser did not log in on the {page} page:\n{dom}"
        );
        assert!(
            !dom.contains("data-pwned"),
            "a planted script or handler ran on the {page} page:\n{dom}"
        );
        assert!(
            !dom.contains("<img") && !dom.contains("<script"),
            "a planted element is in the {page} page:\n{dom}"
        );
        let text = visible_text(dom);
        for value in shown {
            assert!(
                text.contains(&value),
                "the {page} page does not show {value:?} as written:\n{text}"
            );
        }
        assert!(
            !text.contains("phone\"'"),
            "the {page} page shows the unmasked number"
        );
    }
    app.shutdown().await;
}

/// The text of `<b id="{id}">…</b>` in a page.
fn bold(page: &str, id: &str) -> String {
    let start = format!("<b id=\"{id}\">");
    page.split_once(&start)
        .and_then(|(_, rest)| rest.split_once("</b>"))
        .map(|(inside, _)| crate::chromium::visible_text(inside))
        .unwrap_or_else(|| panic!("no {id} on the page:\n{page}"))
}

/// The real binary with nobody else on its queues (the in-process harness would consume the
/// dead letters as they arrive): one job held on a slow call, jobs waiting behind it, letters
/// in the dead-letter queue. The page counts them as RabbitMQ holds them, and a search by the
/// held job's number, typed as people write it, finds it without the number reaching the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_counts_the_queues_and_a_search_leaves_no_number_in_the_log() {
    let admin = free_addr();
    let env = TestEnv::new(|s| {
        s.insert(config::ADMIN_ADDR.into(), admin.clone());
        // One job in hand at a time, so the rest wait in the queue.
        s.insert(config::WORKER_CONCURRENCY.into(), "1".into());
        hold_slow_calls(s);
    })
    .await;
    let held = send_job(&unique_id("queues-held"));
    env.fake.push_fault(
        FaultRule::every(Fault::Latency { ms: 25_000 })
            .on_phone(phone(&held))
            .times(1),
    );
    let worker = WorkerProcess::start(&["run"], &env.settings).await;
    let (connection, channel) = test_link().await;
    let queue = |name: &str| env.settings[name].clone();
    for n in 0..3 {
        publish_to(
            &channel,
            &queue(config::SMS_DEAD_LETTER_QUEUE),
            format!("letter {n}").as_bytes(),
            Default::default(),
        )
        .await;
    }
    let jobs_queue = queue(config::SMS_JOBS_QUEUE);
    let json = |job: &Value| serde_json::to_vec(job).expect("json");
    publish_to(&channel, &jobs_queue, &json(&held), Default::default()).await;
    let pool = sqlx::PgPool::connect(&env.db_url).await.expect("test db");
    let held_id = held["id"].as_str().expect("id");
    let claimed = async {
        loop {
            let status: Option<(String,)> =
                sqlx::query_as("SELECT status FROM sms_jobs WHERE id = $1")
                    .bind(held_id)
                    .fetch_optional(&pool)
                    .await
                    .expect("query the job");
            if status.is_some_and(|s| s.0 == "sending") {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(PATIENCE, claimed)
        .await
        .expect("the slow job is taken");
    for n in 0..4 {
        let job = send_job(&unique_id(&format!("queues-waiting-{n}")));
        publish_to(&channel, &jobs_queue, &json(&job), Default::default()).await;
    }

    let page = admin_get(&admin, "/").await.1;
    assert_eq!(bold(&page, "jobs-waiting"), "4", "{page}");
    assert_eq!(bold(&page, "jobs-held"), "1", "{page}");
    assert_eq!(bold(&page, "dead-letters"), "3", "{page}");
    assert!(page.contains(" waiting, 1 consumer(s)"), "{page}");

    let number = phone(&held);
    let typed = format!("+86 {} {} {}", &number[..3], &number[3..7], &number[7..]);
    let encoded = utf8_percent_encode(&typed, NON_ALPHANUMERIC);
    let (status, found) = admin_get(&admin, &format!("/search?q={encoded}")).await;
    assert_eq!(status, 200, "{found}");
    assert!(
        found.contains(&format!(">{held_id}</a>")) && found.contains(">sending</span>"),
        "{found}"
    );
    assert!(
        !found.contains(number) && !found.contains(&typed),
        "{found}"
    );
    // A value Postgres refuses as data names no job; it is no outage.
    for path in ["/jobs/a%00b", "/search?q=a%00b"] {
        let (status, page) = admin_get(&admin, path).await;
        assert!(status == 404 || status == 200, "{path}: {status} {page}");
        assert!(!page.contains("Database unavailable"), "{path}: {page}");
    }

    channel.close(200, "done".into()).await.ok();
    // At debug level: the listener's and the libraries' own lines included.
    let (_, log) = worker.terminate().await;
    for secret in [number, &typed, &encoded.to_string(), &number[3..]] {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
    }
    assert!(
        !log.contains("status page: database query failed"),
        "bad input logged as an outage:\n{log}"
    );
    remove_topology_and_close(&connection, &env.settings).await;
    pool.close().await;
    drop_database(&env.db_name).await;
}
