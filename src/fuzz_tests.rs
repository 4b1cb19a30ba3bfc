//! Property tests over everything that comes from outside: job bodies, percent-encoding, and
//! Aliyun's answers. None of it may panic, whatever it is.

use proptest::prelude::*;
use serde_json::{Value, json};

use crate::aliyun::Answer;
use crate::aliyun::{CallError, Effect, classify, sign};
use crate::wire::decode_job;

/// Any JSON value, nested a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(".{0,12}", inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn valid_job() -> Value {
    json!({"id": "j", "type": "send_verify_code", "phone_number": "13800138000",
           "sign_name": "s", "template_code": "100001",
           "template_param": {"code": "##code##"}})
}

const FIELDS: &[&str] = &[
    "id",
    "type",
    "phone_number",
    "phone_numbers",
    "sign_name",
    "template_code",
    "template_param",
    "code_length",
    "expires_at",
    "verify_code",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_job(&body, None);
    }

    #[test]
    fn arbitrary_json_never_panics(v in any_json()) {
        let _ = decode_job(v.to_string().as_bytes(), Some("m"));
    }

    #[test]
    fn a_valid_job_with_one_field_replaced_never_panics(
        field in prop::sample::select(FIELDS),
        value in any_json(),
        job_type in prop::sample::select(&["send_verify_code", "check_verify_code", "send_sms", "send_batch_sms"][..]),
    ) {
        let mut job = valid_job();
        job["type"] = json!(job_type);
        job[field] = value;
        if let Err(e) = decode_job(job.to_string().as_bytes(), None) {
            prop_assert!(!e.message.is_empty());
            prop_assert!(!e.message.contains('\0'));
        }
    }

    #[test]
    fn percent_encoding_round_trips_and_uses_only_the_safe_alphabet(s in ".{0,64}") {
        let encoded = sign::percent_encode(&s);
        prop_assert!(encoded.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.~%".contains(&b)));
        prop_assert!(!encoded.contains("%7E") && !encoded.contains('+'));
        prop_assert_eq!(sign::percent_decode(&encoded, false), Some(s));
    }

    #[test]
    fn percent_decoding_garbage_never_panics(s in "[%0-9A-Za-z+]{0,32}") {
        let _ = sign::percent_decode(&s, true);
    }

    #[test]
    fn any_answer_parses_and_classifies(
        status in 100u16..600,
        body in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..256),
            any_json().prop_map(|v| v.to_string().into_bytes()),
        ],
    ) {
        let answer = Answer::parse(status, &body);
        let _ = answer.biz_id();
        let _ = answer.verify_code();
        let _ = answer.verify_result();
        let _ = classify(Effect::NotIdempotent, &Ok::<_, CallError>(answer));
    }
}

#[test]
fn a_huge_or_deeply_nested_body_is_refused_not_overflowed() {
    let deep = format!("{}{}", "{\"a\":".repeat(100_000), "}".repeat(100_000));
    assert!(decode_job(deep.as_bytes(), None).is_err());
    let answer = Answer::parse(200, deep.as_bytes());
    assert!(!answer.is_ok());
}
