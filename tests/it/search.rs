//! The status page's search, "did this user get their code?": by a phone number as an operator
//! pastes it, by a batch's other numbers, by job id; the number never shown in full.

use aliyun_sms_worker::config;
use aliyun_sms_worker::wire::Status;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::json;

use crate::helpers::{TestApp, admin_get, free_addr, send_job, unique_id, unique_phone};

fn masked(phone: &str) -> String {
    format!("{}****{}", &phone[..3], &phone[7..])
}

async fn search(admin: &str, q: &str) -> String {
    let (status, page) = admin_get(
        admin,
        &format!("/search?q={}", utf8_percent_encode(q, NON_ALPHANUMERIC)),
    )
    .await;
    assert_eq!(status, 200, "{q}: {page}");
    page
}

/// The job ids the results list, in order.
fn found(page: &str) -> Vec<String> {
    page.split("<a class=\"mono\" href=\"/jobs/")
        .skip(1)
        .filter_map(|rest| rest.split_once("\">"))
        .filter_map(|(_, rest)| rest.split_once("</a>"))
        .map(|(id, _)| id.to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_finds_a_number_in_any_form_a_batchs_other_numbers_and_ids() {
    let admin = free_addr();
    let setting = admin.clone();
    let app = TestApp::spawn_with(|s| {
        s.insert(config::ADMIN_ADDR.into(), setting);
    })
    .await;
    let number = unique_phone();
    let (first_id, second_id) = (unique_id("search-first"), unique_id("search-second"));
    let mut first = send_job(&first_id);
    first["phone_number"] = json!(number);
    let mut second = send_job(&second_id);
    second["phone_number"] = json!(format!("+86{number}"));
    let other_id = unique_id("search-other");
    let batch_id = unique_id("search-batch");
    let batch_numbers = [unique_phone(), unique_phone()];
    let batch = json!({
        "id": batch_id,
        "type": "send_batch_sms",
        "phone_numbers": batch_numbers,
        "sign_names": ["阿里云", "阿里云"],
        "template_code": "SMS_4",
    });
    // One at a time, so "newest first" has an order to check. The second code to the same
    // number so soon is refused (Aliyun's interval): a job all the same, and what the operator
    // is looking for.
    for job in [&first, &second, &send_job(&other_id)] {
        app.request(job).await;
    }
    // Sent, so its numbers have delivery rows.
    assert_eq!(app.request(&batch).await.status, Status::Sent);

    for typed in [
        format!("+86 {} {} {}", &number[..3], &number[3..7], &number[7..]),
        format!("0086-{}-{}-{}", &number[..3], &number[3..7], &number[7..]),
        number.clone(),
    ] {
        let page = search(&admin, &typed).await;
        assert_eq!(
            found(&page),
            [second_id.as_str(), first_id.as_str()],
            "{typed}: {page}"
        );
        assert!(
            page.contains(&format!(
                "<span class=\"mono\" id=\"searched\">{}</span>",
                masked(&number)
            )),
            "{typed}: {page}"
        );
        assert!(
            !page.contains(&number) && !page.contains(&typed),
            "the number in full: {page}"
        );
    }

    // A batch keeps its first number on the job: the second is found through its receipts.
    let second_number = &batch_numbers[1];
    let spaced = format!(
        "{} {} {}",
        &second_number[..3],
        &second_number[3..7],
        &second_number[7..]
    );
    let page = search(&admin, &spaced).await;
    assert_eq!(found(&page), [batch_id.as_str()], "{page}");
    assert!(!page.contains(second_number.as_str()), "{page}");

    let page = search(&admin, &other_id).await;
    assert_eq!(found(&page), [other_id.as_str()], "{page}");
    assert!(
        page.contains("value=\"search-other-"),
        "an id stays in the box: {page}"
    );
    // The start of an id, when no id is exactly that.
    let prefix = &batch_id[..batch_id.len() - 6];
    assert_eq!(found(&search(&admin, prefix).await), [batch_id.as_str()]);

    let page = search(&admin, "no-such-job").await;
    assert!(
        found(&page).is_empty() && page.contains("No job found."),
        "{page}"
    );
    let page = search(&admin, "  ").await;
    assert!(page.contains("Type a phone number"), "{page}");
    let long = format!("{}{}", number, "9".repeat(300));
    let page = search(&admin, &long).await;
    assert!(page.contains("nothing was searched"), "{page}");
    assert!(!page.contains(&number), "{page}");

    // The status page offers the search.
    let index = admin_get(&admin, "/").await.1;
    assert!(
        index.contains("<form id=\"search\" action=\"/search\" method=\"get\">"),
        "{index}"
    );
    app.shutdown().await;
}
