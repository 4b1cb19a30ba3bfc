//! Dysmsapi as the fake plays it: `SendSms`, `SendBatchSms` and `QuerySendDetails`, with the
//! documented limits, business codes (HTTP 200) and receipts that arrive after a delay.

use std::time::{Duration, Instant};

use chrono::{Duration as ChronoDuration, Utc};
use rand::Rng;
use serde_json::{Value, json};

use super::dypnsapi::{Executed, get, require};
use super::state::{SmsRecord, State};
use super::{FakeConfig, Reply};
use crate::phone::PhoneNumber;
use crate::store::china_time;

/// Dysmsapi business failures: HTTP 200 with the code.
fn business(code: &str, message: &str) -> Reply {
    Reply::ok_json(json!({
        "Code": code,
        "Message": message,
        "RequestId": super::request_id(),
    }))
}

fn not_executed(reply: Reply) -> Executed {
    Executed {
        reply,
        biz_id: None,
        executed: false,
    }
}

fn template_ok(raw: &str) -> bool {
    serde_json::from_str::<serde_json::Map<String, Value>>(raw)
        .is_ok_and(|m| m.values().all(Value::is_string))
}

/// Records the send of each number and answers with one BizId, as Aliyun does.
fn execute(
    config: &FakeConfig,
    state: &State,
    phones: &[String],
    template_code: &str,
    out_id: Option<&str>,
) -> Executed {
    if let Some(limit) = config.per_number_per_minute {
        let now = Instant::now();
        let over = state.with(|s| {
            phones.iter().any(|p| {
                let sends = s.sends.entry(p.clone()).or_default();
                sends.retain(|t| now.duration_since(*t) < Duration::from_secs(60));
                sends.len() >= limit as usize
            })
        });
        if over {
            return not_executed(business(
                "isv.BUSINESS_LIMIT_CONTROL",
                "触发分钟级流控Permits:1",
            ));
        }
    }
    let sent_at = Utc::now();
    let receipt_at =
        sent_at + ChronoDuration::from_std(config.receipt_delay).unwrap_or(ChronoDuration::zero());
    let biz_id = state.with(|s| {
        s.biz_counter += 1;
        let biz_id = format!(
            "{}^{}",
            700_000_000_000u64 + s.biz_counter,
            rand::rng().random_range(0..10)
        );
        for p in phones {
            s.sends.entry(p.clone()).or_default().push(Instant::now());
            s.sms.push(SmsRecord {
                phone: p.clone(),
                biz_id: biz_id.clone(),
                out_id: out_id.map(str::to_owned),
                template_code: template_code.to_owned(),
                sent_at,
                receipt_at,
                failure: None,
            });
        }
        biz_id
    });
    Executed {
        reply: Reply::ok_json(json!({
            "Code": "OK",
            "Message": "OK",
            "BizId": biz_id,
            "RequestId": super::request_id(),
        })),
        biz_id: Some(biz_id),
        executed: true,
    }
}

/// Aliyun's checks on a list of numbers: how many, and each one's format.
fn check_numbers(numbers: &[String], max: usize) -> Result<(), Reply> {
    if numbers.is_empty() || numbers.len() > max {
        return Err(business(
            "isv.MOBILE_COUNT_OVER_LIMIT",
            "手机号码数量超过限制",
        ));
    }
    if !numbers
        .iter()
        .all(|n| PhoneNumber::parse_international(n).is_ok())
    {
        return Err(business("isv.MOBILE_NUMBER_ILLEGAL", "非法手机号"));
    }
    Ok(())
}

pub(super) fn send_sms(
    config: &FakeConfig,
    state: &State,
    params: &[(String, String)],
) -> Executed {
    if let Err(reply) = require(params, &["PhoneNumbers", "SignName", "TemplateCode"]) {
        return not_executed(reply);
    }
    let numbers: Vec<String> = get(params, "PhoneNumbers")
        .unwrap_or_default()
        .split(',')
        .map(str::to_owned)
        .collect();
    if let Err(reply) = check_numbers(&numbers, 1000) {
        return not_executed(reply);
    }
    if get(params, "TemplateParam").is_some_and(|t| !template_ok(t)) {
        return not_executed(business(
            "isv.INVALID_JSON_PARAM",
            "JSON参数不合法，只接受字符串值",
        ));
    }
    execute(
        config,
        state,
        &numbers,
        get(params, "TemplateCode").unwrap_or_default(),
        get(params, "OutId"),
    )
}

pub(super) fn send_batch_sms(
    config: &FakeConfig,
    state: &State,
    params: &[(String, String)],
) -> Executed {
    if let Err(reply) = require(params, &["PhoneNumberJson", "SignNameJson", "TemplateCode"]) {
        return not_executed(reply);
    }
    let list = |name| -> Option<Vec<Value>> { serde_json::from_str(get(params, name)?).ok() };
    let (Some(numbers), Some(signs)) = (list("PhoneNumberJson"), list("SignNameJson")) else {
        return not_executed(business("isv.INVALID_PARAMETERS", "参数异常"));
    };
    let numbers: Vec<String> = numbers
        .iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    if let Err(reply) = check_numbers(&numbers, 100) {
        return not_executed(reply);
    }
    let params_ok = match list("TemplateParamJson") {
        None => get(params, "TemplateParamJson").is_none(),
        Some(t) => {
            t.len() == numbers.len()
                && t.iter().all(|o| {
                    o.as_object()
                        .is_some_and(|m| m.values().all(Value::is_string))
                })
        }
    };
    if signs.len() != numbers.len() || !params_ok {
        return not_executed(business("isv.INVALID_PARAMETERS", "参数异常"));
    }
    execute(
        config,
        state,
        &numbers,
        get(params, "TemplateCode").unwrap_or_default(),
        get(params, "OutId"),
    )
}

pub(super) fn query_send_details(state: &State, params: &[(String, String)]) -> Executed {
    if let Err(reply) = require(
        params,
        &["PhoneNumber", "SendDate", "PageSize", "CurrentPage"],
    ) {
        return not_executed(reply);
    }
    let phone = get(params, "PhoneNumber").unwrap_or_default();
    let date = get(params, "SendDate").unwrap_or_default();
    let page_size = get(params, "PageSize").and_then(|p| p.parse::<usize>().ok());
    let page = get(params, "CurrentPage").and_then(|p| p.parse::<usize>().ok());
    let (Some(page_size @ 1..=50), Some(page @ 1..)) = (page_size, page) else {
        return not_executed(business("isv.INVALID_PARAMETERS", "参数异常"));
    };
    let biz_id = get(params, "BizId");
    let china = china_time();
    let now = Utc::now();
    let matching: Vec<SmsRecord> = state.with(|s| {
        s.sms
            .iter()
            .filter(|r| r.phone == phone)
            .filter(|r| r.sent_at.with_timezone(&china).format("%Y%m%d").to_string() == date)
            .filter(|r| biz_id.is_none_or(|b| b == r.biz_id))
            .cloned()
            .collect()
    });
    let details: Vec<Value> = matching
        .iter()
        .skip((page - 1) * page_size)
        .take(page_size)
        .map(|r| {
            let delivered = now >= r.receipt_at;
            let (status, err_code) = match (&r.failure, delivered) {
                (_, false) => (1, ""),
                (None, true) => (3, "DELIVERED"),
                (Some(code), true) => (2, code.as_str()),
            };
            let mut d = json!({
                "PhoneNum": r.phone,
                "SendStatus": status,
                "ErrCode": err_code,
                "TemplateCode": r.template_code,
                "Content": "【阿里云】您的验证码为******",
                "SendDate": r.sent_at.with_timezone(&china).format("%Y-%m-%d %H:%M:%S").to_string(),
                "OutId": r.out_id.clone().unwrap_or_default(),
            });
            if delivered {
                d["ReceiveDate"] = Value::String(
                    r.receipt_at
                        .with_timezone(&china)
                        .format("%Y-%m-%d %H:%M:%S")
                        .to_string(),
                );
            }
            d
        })
        .collect();
    Executed {
        reply: Reply::ok_json(json!({
            "Code": "OK",
            "Message": "OK",
            "RequestId": super::request_id(),
            "TotalCount": matching.len().to_string(),
            "SmsSendDetailDTOs": {"SmsSendDetailDTO": details},
        })),
        biz_id: None,
        executed: false,
    }
}
