//! The dead-letter queue, for operators: look at what is in it without taking anything out,
//! and send chosen messages back to the jobs queue.
//!
//! Listing takes messages with `basic.get` and never acks them; closing the channel hands every
//! one back to the queue, so a crash mid-listing loses nothing either. Redriving acks a message
//! off the dead-letter queue only after RabbitMQ confirmed its copy on the jobs queue: a crash
//! in between leaves it in both (at least once), and the worker's idempotency on the job id
//! absorbs the duplicate.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::time::Duration;

use lapin::message::{BasicGetMessage, Delivery};
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use serde::Serialize;
use serde_json::Value;

use crate::amqp_nodes::{AmqpNodes, ConnectError};
use crate::broker::{HEADER_INVALID_CODE, HEADER_INVALID_REASON};
use crate::phone;

/// Characters of body shown in the table.
const PREVIEW_CHARS: usize = 120;

#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("queue {0:?} does not exist")]
    NoSuchQueue(String),
    #[error(
        "RabbitMQ did not hand over the next message within {0:?} (the connection may have failed; see the log above)"
    )]
    NoAnswer(Duration),
    #[error(
        "RabbitMQ could not route the message to {0:?} (the jobs queue is missing); it stays in the dead-letter queue"
    )]
    Unroutable(String),
    #[error(
        "RabbitMQ refused the re-published message (publisher nack); it stays in the dead-letter queue"
    )]
    Nacked,
}

/// One dead-lettered message as an operator sees it. Phone numbers are masked and
/// verification codes hidden in `preview`; `body` keeps the numbers (for scripts that fix and
/// re-publish) but never a verification code.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub message_id: Option<String>,
    /// The `id` field of a JSON body.
    pub job_id: Option<String>,
    pub invalid_code: Option<String>,
    pub invalid_reason: Option<String>,
    /// RabbitMQ's own dead-lettering (delivery limit, TTL, rejection): how often and why.
    pub death_count: Option<i64>,
    pub death_reason: Option<String>,
    pub death_queue: Option<String>,
    /// The AMQP timestamp the producer set, RFC 3339.
    pub timestamp: Option<String>,
    pub redelivered: bool,
    pub bytes: usize,
    pub preview: String,
    pub body: Value,
}

impl DeadLetter {
    /// The id a `--id` selects by: the job id, else the AMQP message id.
    pub fn id(&self) -> Option<&str> {
        self.job_id.as_deref().or(self.message_id.as_deref())
    }
}

/// Which messages `redrive` moves.
#[derive(Debug, Clone)]
pub enum Selection {
    All,
    /// Job ids (or AMQP message ids).
    Ids(BTreeSet<String>),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Redriven {
    pub moved: Vec<String>,
    /// Ids asked for that were not in the dead-letter queue.
    pub not_found: Vec<String>,
    /// What stopped the redrive part way, after `moved`; the rest stay in the queue.
    pub stopped: Option<String>,
}

pub struct DeadLetters {
    connection: Connection,
    dead_letter_queue: String,
    jobs_queue: String,
}

fn short(s: &str) -> ShortString {
    ShortString::from(s)
}

impl DeadLetters {
    pub async fn connect(
        nodes: &AmqpNodes,
        dead_letter_queue: &str,
        jobs_queue: &str,
    ) -> Result<Self, DeadLetterError> {
        // Whatever the queue holds must be readable, including a message whose headers did
        // not fit the worker's frames (which is why it is here).
        let connection = nodes
            .with_server_frame_max()
            .connect("aliyun-sms-worker dead-letters", 0)
            .await?
            .connection;
        Ok(Self {
            connection,
            dead_letter_queue: dead_letter_queue.to_owned(),
            jobs_queue: jobs_queue.to_owned(),
        })
    }

    /// A passive declare on its own channel: a missing queue closes the channel it is asked
    /// on, and a clear message beats a channel error later. Returns the ready messages.
    async fn ensure_queue(&self, queue: &str) -> Result<u32, DeadLetterError> {
        let channel = self.connection.create_channel().await?;
        let declared = crate::broker::inspect_queue(&channel, queue).await;
        match declared {
            Ok(q) => {
                let _ = channel.close(200, short("checked")).await;
                Ok(q.message_count())
            }
            Err(e) if is_not_found(&e) => Err(DeadLetterError::NoSuchQueue(queue.to_owned())),
            Err(e) => Err(e.into()),
        }
    }

    /// Up to `limit` messages from the head of the queue, all left in it.
    pub async fn list(&self, limit: usize) -> Result<Vec<DeadLetter>, DeadLetterError> {
        self.ensure_queue(&self.dead_letter_queue).await?;
        let channel = self.connection.create_channel().await?;
        let mut out = Vec::new();
        let taken = self.take(&channel, limit, |d| out.push(describe(d))).await;
        // Closing the channel returns every message it got, unacked, to the queue.
        let _ = channel.close(200, short("listed")).await;
        taken.map(|_| out)
    }

    /// The next message at the head of the dead-letter queue, held unacked. Bounded: a
    /// connection lapin gave up on leaves a `basic_get` waiting for ever.
    async fn next(&self, channel: &Channel) -> Result<Option<BasicGetMessage>, DeadLetterError> {
        const PATIENCE: Duration = Duration::from_secs(30);
        let get = channel.basic_get(
            short(&self.dead_letter_queue),
            BasicGetOptions { no_ack: false },
        );
        match tokio::time::timeout(PATIENCE, get).await {
            Ok(got) => Ok(got?),
            Err(_) => Err(DeadLetterError::NoAnswer(PATIENCE)),
        }
    }

    async fn take(
        &self,
        channel: &Channel,
        limit: usize,
        mut each: impl FnMut(&Delivery),
    ) -> Result<(), DeadLetterError> {
        for _ in 0..limit {
            let Some(message) = self.next(channel).await? else {
                break;
            };
            each(&message.delivery);
        }
        Ok(())
    }

    /// Re-publishes the selected messages to the jobs queue (persistent, confirmed), then acks
    /// each off the dead-letter queue. Messages not selected go back untouched.
    pub async fn redrive(&self, selection: &Selection) -> Result<Redriven, DeadLetterError> {
        let present = self.ensure_queue(&self.dead_letter_queue).await?;
        self.ensure_queue(&self.jobs_queue).await?;
        let get = self.connection.create_channel().await?;
        let publish = self.connection.create_channel().await?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let mut moved = Vec::new();
        let stopped = self
            .move_selected(&get, &publish, selection, present, &mut moved)
            .await
            .err()
            .map(|e| e.to_string());
        // Unselected messages were held unacked on `get`; closing it puts them back.
        let _ = get.close(200, short("redriven")).await;
        let _ = publish.close(200, short("redriven")).await;
        let not_found = match (selection, &stopped) {
            // Stopped part way: what was not reached yet is not known to be missing.
            (Selection::All, _) | (_, Some(_)) => Vec::new(),
            (Selection::Ids(ids), None) => ids
                .iter()
                .filter(|id| !moved.contains(id))
                .cloned()
                .collect(),
        };
        Ok(Redriven {
            moved,
            not_found,
            stopped,
        })
    }

    async fn move_selected(
        &self,
        get: &Channel,
        publish: &Channel,
        selection: &Selection,
        present: u32,
        moved: &mut Vec<String>,
    ) -> Result<(), DeadLetterError> {
        // Held messages are not handed out again on this channel, so this walks the queue once
        // (every copy of a selected id included). It stops after the messages that were there
        // when it began: a redriven job the worker refuses again comes back to this queue, and
        // must not be redriven round and round.
        for _ in 0..present {
            let Some(message) = self.next(get).await? else {
                break;
            };
            let delivery = message.delivery;
            let letter = describe(&delivery);
            let chosen = match selection {
                Selection::All => letter.id().map(str::to_owned),
                Selection::Ids(ids) => [letter.job_id.as_deref(), letter.message_id.as_deref()]
                    .into_iter()
                    .flatten()
                    .find(|id| ids.contains(*id))
                    .map(str::to_owned),
            };
            let Some(id) = chosen
                .or_else(|| matches!(selection, Selection::All).then(|| "(no id)".to_owned()))
            else {
                continue;
            };
            self.republish(publish, &delivery).await?;
            // Pushed before the ack: a message re-published whose ack failed is in the jobs
            // queue (and, once the channel closes, back in this one too: the worker answers
            // the second copy from Postgres).
            moved.push(id);
            delivery.ack(BasicAckOptions::default()).await?;
        }
        Ok(())
    }

    async fn republish(
        &self,
        channel: &Channel,
        delivery: &Delivery,
    ) -> Result<(), DeadLetterError> {
        let confirmation = channel
            .basic_publish(
                short(""),
                short(&self.jobs_queue),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &delivery.data,
                redrive_properties(&delivery.properties),
            )
            .await?
            .await?;
        match confirmation {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(_)) => Err(DeadLetterError::Unroutable(self.jobs_queue.clone())),
            Confirmation::Nack(_) => Err(DeadLetterError::Nacked),
        }
    }

    pub async fn close(self) {
        crate::broker::close_connection(&self.connection, "done").await;
    }
}

fn is_not_found(e: &lapin::Error) -> bool {
    // lapin reports the broker's channel close as text carrying the AMQP reply code.
    let text = e.to_string();
    text.contains("NOT_FOUND") || text.contains("404")
}

/// Headers the dead-lettering added; a redriven job starts over without them, so the worker
/// and the next dead-lettering see a fresh message.
fn is_dead_letter_header(name: &str) -> bool {
    name.starts_with("x-sms-invalid-")
        || name == "x-death"
        || name.starts_with("x-first-death-")
        || name.starts_with("x-last-death-")
        || name == "x-delivery-count"
}

/// The message's own properties (reply_to, correlation_id, message_id, timestamp …) so its
/// result still reaches the backend, persistent, without the dead-lettering headers.
pub fn redrive_properties(original: &BasicProperties) -> BasicProperties {
    let headers: FieldTable = original
        .headers()
        .as_ref()
        .map(|h| {
            h.inner()
                .iter()
                .filter(|(k, _)| !is_dead_letter_header(k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<std::collections::BTreeMap<_, _>>()
                .into()
        })
        .unwrap_or_default();
    original.clone().with_headers(headers).with_delivery_mode(2)
}

fn value_text(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn value_int(v: &AMQPValue) -> Option<i64> {
    match v {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        _ => None,
    }
}

pub fn describe(d: &Delivery) -> DeadLetter {
    let p = &d.properties;
    let headers = p.headers().clone().unwrap_or_default();
    let header = |name: &str| headers.inner().get(name).and_then(value_text);
    // x-death is a list of tables, most recent dead-lettering first.
    let death = headers.inner().get("x-death").and_then(|v| match v {
        AMQPValue::FieldArray(a) => a.as_slice().first().and_then(|first| match first {
            AMQPValue::FieldTable(t) => Some(t.clone()),
            _ => None,
        }),
        _ => None,
    });
    let death_field = |name: &str| death.as_ref().and_then(|t| t.inner().get(name));
    let parsed: Option<Value> = serde_json::from_slice(&d.data).ok();
    let job_id = parsed
        .as_ref()
        .and_then(|v| v.get("id"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let (preview, body) = shown_body(parsed, &d.data);
    DeadLetter {
        message_id: p.message_id().as_ref().map(|s| s.as_str().to_owned()),
        job_id,
        invalid_code: header(HEADER_INVALID_CODE),
        invalid_reason: header(HEADER_INVALID_REASON),
        death_count: death_field("count").and_then(value_int),
        death_reason: death_field("reason").and_then(value_text),
        death_queue: death_field("queue").and_then(value_text),
        timestamp: p
            .timestamp()
            .and_then(|t| i64::try_from(t).ok())
            .and_then(|t| chrono::DateTime::from_timestamp(t, 0))
            .map(|t| t.to_rfc3339()),
        redelivered: d.redelivered,
        bytes: d.data.len(),
        preview,
        body,
    }
}

/// What `list` shows of a body (the table's preview, and `--json`'s body): codes hidden and, in
/// the preview, numbers masked — from the JSON when it parses, else from the text.
fn shown_body(parsed: Option<Value>, data: &[u8]) -> (String, Value) {
    match parsed {
        Some(v) => (truncate(&masked_json(&v).to_string()), without_codes(v)),
        None => {
            let text = hide_code_values(&String::from_utf8_lossy(data));
            let masked = mask_digit_runs(&text);
            (truncate(&masked), Value::String(masked))
        }
    }
}

/// Hides the value after every code-like key (see [`is_code_key`]) in text that is not JSON: a
/// body cut short or missing a brace, a key written unquoted or in single quotes, a form.
/// `"verify_code":"778899"` becomes `"verify_code":"***"`; the placeholder `##code##` stays.
fn hide_code_values(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let len = chars.len();
    let is_key_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    let ends_bare_value = |c: char| matches!(c, ',' | '}' | ']' | '&' | ';') || c.is_whitespace();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < len {
        if !is_key_char(chars[i]) {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        let start = i;
        while i < len && is_key_char(chars[i]) {
            i += 1;
        }
        out.extend(&chars[start..i]);
        let key: String = chars[start..i].iter().collect();
        if !is_code_key(&key) {
            continue;
        }
        // The key's closing quote, then `:` or `=`, with spaces around.
        let mut j = i;
        if j < len && matches!(chars[j], '"' | '\'') {
            j += 1;
        }
        while j < len && chars[j].is_whitespace() {
            j += 1;
        }
        if j >= len || !matches!(chars[j], ':' | '=') {
            continue;
        }
        j += 1;
        while j < len && chars[j].is_whitespace() {
            j += 1;
        }
        out.extend(&chars[i..j]);
        i = j;
        match chars.get(j) {
            Some(&quote) if quote == '"' || quote == '\'' => {
                let mut k = j + 1;
                while k < len && chars[k] != quote {
                    k += if chars[k] == '\\' { 2 } else { 1 };
                }
                let end = k.min(len);
                let value: String = chars[j + 1..end].iter().collect();
                if value == crate::wire::CODE_PLACEHOLDER {
                    out.extend(&chars[j..(end + 1).min(len)]);
                } else {
                    out.push(quote);
                    out.push_str("***");
                    if end < len {
                        out.push(quote);
                    }
                }
                i = (end + 1).min(len);
            }
            Some(_) => {
                let mut k = j;
                while k < len && !ends_bare_value(chars[k]) {
                    k += 1;
                }
                out.push_str("***");
                i = k;
            }
            None => {}
        }
    }
    out
}

fn truncate(s: &str) -> String {
    if s.chars().count() <= PREVIEW_CHARS {
        return s.to_owned();
    }
    let cut: String = s.chars().take(PREVIEW_CHARS).collect();
    format!("{cut}…")
}

/// A key that may hold a verification code, however a backend spelled it (`verify_code`,
/// `verifyCode`, `sms-code`, `otp`, a template's `code`), but not the contract's fields that
/// only name a template, a country or a code's shape.
fn is_code_key(key: &str) -> bool {
    const NOT_SECRET: &[&str] = &[
        "templatecode",
        "countrycode",
        "smsupextendcode",
        "codelength",
        "codetype",
        "returnverifycode",
    ];
    let key: String = key
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let codeish = key.contains("code")
        || key.contains("otp")
        || key.contains("captcha")
        || key.ends_with("pin");
    codeish && !NOT_SECRET.contains(&key.as_str())
}

/// Verification codes out: `verify_code` (a typed code) and a literal template `code` (one
/// the backend generated), wherever they sit. The placeholder `##code##` is no secret.
fn without_codes(v: Value) -> Value {
    match v {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| {
                    let hide = is_code_key(&k)
                        && !matches!(&v, Value::String(s) if s == crate::wire::CODE_PLACEHOLDER);
                    let v = if hide {
                        Value::String("***".into())
                    } else {
                        without_codes(v)
                    };
                    (k, v)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(without_codes).collect()),
        // A template_param given as a string holding JSON.
        Value::String(s) => match serde_json::from_str::<Value>(&s) {
            Ok(inner @ Value::Object(_)) => Value::String(without_codes(inner).to_string()),
            _ => Value::String(s),
        },
        other => other,
    }
}

/// Fields whose digits are never a phone number; masking them would only hide what an
/// operator needs to recognise the job.
/// The job's own `id` (top level) is shown unmasked in the table's heading, as everywhere else.
const NOT_PHONES: &[&str] = &["template_code", "type", "code_length", "code_type"];

/// For the table: codes hidden, and every phone-like run of digits masked, in values and in
/// keys (a number can sit anywhere in a malformed job, not only in `phone_number`).
fn masked_json(v: &Value) -> Value {
    fn mask(v: Value, top: bool) -> Value {
        match v {
            Value::Object(map) => Value::Object(
                map.into_iter()
                    .map(|(k, v)| {
                        let keep = NOT_PHONES.contains(&k.as_str()) || (top && k == "id");
                        let v = if keep { v } else { mask(v, false) };
                        (mask_digit_runs(&k), v)
                    })
                    .collect(),
            ),
            Value::Array(items) => {
                Value::Array(items.into_iter().map(|v| mask(v, false)).collect())
            }
            Value::String(s) => Value::String(mask_digit_runs(&s)),
            // A short number stays a number: a preview that turned `1` into `"1"` would hide
            // the very type error a job may have been refused for.
            Value::Number(n) => {
                let text = n.to_string();
                let masked = mask_digit_runs(&text);
                if masked == text {
                    Value::Number(n)
                } else {
                    Value::String(masked)
                }
            }
            other => other,
        }
    }
    mask(without_codes(v.clone()), true)
}

/// Masks every phone-like run of 7 or more digits, as `phone::mask` does, in text that is not
/// known to be JSON. Digit groups joined by up to three of the separators `phone::compact`
/// drops are one run (`138 0013 8001`, `+86 (138) 0013-8001`, `138.0013.8001`): a number is
/// often written that way. A date written so is masked too; better than a number shown.
pub fn mask_digit_runs(text: &str) -> String {
    const MAX_JOIN: usize = 3;
    let is_separator = |c: char| matches!(c, ' ' | '-' | '.' | '(' | ')');
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut run = String::new();
    let mut digits = String::new();
    let flush = |run: &mut String, digits: &mut String, out: &mut String| {
        if digits.len() >= 7 {
            out.push_str(&phone::mask(digits));
        } else {
            out.push_str(run);
        }
        run.clear();
        digits.clear();
    };
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii_digit() {
            run.push(c);
            digits.push(c);
            i += 1;
            continue;
        }
        let gap = chars[i..]
            .iter()
            .take(MAX_JOIN + 1)
            .take_while(|c| is_separator(**c))
            .count();
        let joins = !digits.is_empty()
            && (1..=MAX_JOIN).contains(&gap)
            && chars.get(i + gap).is_some_and(char::is_ascii_digit);
        if joins {
            run.extend(&chars[i..i + gap]);
            i += gap;
        } else {
            flush(&mut run, &mut digits, &mut out);
            out.push(c);
            i += 1;
        }
    }
    flush(&mut run, &mut digits, &mut out);
    out
}

/// The `dead-letters list` table.
pub fn render(letters: &[DeadLetter], queue: &str) -> String {
    let mut out = format!(
        "{} message(s) shown from {queue} (all left in the queue)\n\n",
        letters.len()
    );
    for (i, l) in letters.iter().enumerate() {
        let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        let _ = match (&l.job_id, &l.message_id) {
            (Some(job), Some(msg)) if job != msg => {
                writeln!(out, "#{}  id {job} (AMQP message id {msg})", i + 1)
            }
            _ => writeln!(out, "#{}  id {}", i + 1, l.id().unwrap_or("-")),
        };
        let _ = writeln!(out, "    timestamp   {}", dash(&l.timestamp));
        if l.invalid_code.is_some() || l.invalid_reason.is_some() {
            let _ = writeln!(
                out,
                "    invalid     {}: {}",
                dash(&l.invalid_code),
                // A reason may quote the offending value, a number among them.
                mask_digit_runs(&dash(&l.invalid_reason))
            );
        }
        if let Some(n) = l.death_count {
            let _ = writeln!(
                out,
                "    x-death     {}x {} (from {})",
                n,
                dash(&l.death_reason),
                dash(&l.death_queue)
            );
        }
        let _ = writeln!(out, "    body        {} ({} bytes)", l.preview, l.bytes);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::LongString;
    use serde_json::json;

    #[test]
    fn previews_mask_numbers_and_hide_codes() {
        let job = json!({"id": "j1", "type": "check_verify_code",
            "phone_number": "13912345678", "verify_code": "QZX7K9",
            "template_param": "{\"code\":\"4821\",\"min\":\"5\"}",
            "phone_numbers": ["+8613800138000", "13700001111"]});
        let preview = masked_json(&job).to_string();
        for secret in [
            "13912345678",
            "QZX7K9",
            "4821",
            "13800138000",
            "13700001111",
        ] {
            assert!(!preview.contains(secret), "{secret} in {preview}");
        }
        assert!(preview.contains("139****5678"), "{preview}");
        let body = without_codes(job).to_string();
        assert!(body.contains("13912345678"), "scripts keep numbers: {body}");
        assert!(!body.contains("QZX7K9") && !body.contains("4821"), "{body}");
        let placeholder = without_codes(json!({"template_param": {"code": "##code##"}}));
        assert_eq!(placeholder["template_param"]["code"], "##code##");
    }

    /// Numbers are often written in groups; an id's digits are not a number.
    #[test]
    fn previews_mask_numbers_written_in_groups_and_leave_ids_whole() {
        let job = json!({"id": "cli-65ef3ef80af74078870e13a", "type": "send_verify_code",
            "phone_number": "138 0013 8001", "phone_numbers": ["+86 138-0013-8002",
            "+86 (138) 0013-8003", "138.0013.8004"],
            "template_param": {"min": "5", "id": "13800138005"}, "13800138006": "x"});
        let preview = masked_json(&job).to_string();
        for digits in ["0013", "138 0013", "138-0013", "13800138005", "13800138006"] {
            assert!(!preview.contains(digits), "{digits} in {preview}");
        }
        for masked in ["861****8003", "138****8004", "138****8005", "138****8006"] {
            assert!(preview.contains(masked), "{masked} in {preview}");
        }
        assert!(preview.contains("138****8001"), "{preview}");
        assert!(preview.contains("cli-65ef3ef80af74078870e13a"), "{preview}");
        assert_eq!(
            mask_digit_runs("call 138 0013 8001 - or 5"),
            "call 138****8001 - or 5"
        );
    }

    /// A body that is not JSON (a brace missing, keys unquoted, a form) still holds codes.
    #[test]
    fn codes_are_hidden_in_a_body_that_is_not_json() {
        for (body, kept) in [
            (
                r#"{"id":"bad-1","type":"check_verify_code","phone_number":"13800138000","verify_code":"778899""#,
                vec!["bad-1", "check_verify_code", "138****8000"],
            ),
            (
                r#"{"id":"bad-2", verify_code: 778899, 'otp' : '778899', "template_code":"SMS_1"}"#,
                vec!["bad-2", "SMS_1"],
            ),
            (
                "phone_number=13800138000&verifyCode=778899&sign_name=x",
                vec!["sign_name=x"],
            ),
            (
                r###"{"template_param":{"code":"##code##"},"code":"7788\"99"###,
                vec!["##code##"],
            ),
        ] {
            let (preview, shown) = shown_body(serde_json::from_str(body).ok(), body.as_bytes());
            for text in [preview, shown.to_string()] {
                for secret in ["778899", "7788", "13800138000"] {
                    assert!(!text.contains(secret), "{secret} in {text}");
                }
            }
            let (preview, _) = shown_body(None, body.as_bytes());
            for k in kept {
                assert!(preview.contains(k), "{k} not in {preview}");
            }
        }
        assert_eq!(
            hide_code_values(r#""verify_code": "12"#),
            r#""verify_code": "***"#
        );
        assert_eq!(hide_code_values("code="), "code=");
    }

    /// A backend that misspells the field still typed a code into it.
    #[test]
    fn codes_are_hidden_however_the_field_is_spelled() {
        let job = json!({"verifyCode": "770911", "verifycode": "770912", "sms-code": "770913",
            "otp": "770914", "template_param": {"authCode": "770915", "pin": "770916"},
            "template_code": "SMS_1", "country_code": "86", "code_length": 6,
            "sms_up_extend_code": "12", "return_verify_code": false});
        for shown in [
            masked_json(&job).to_string(),
            without_codes(job.clone()).to_string(),
        ] {
            for code in ["770911", "770912", "770913", "770914", "770915", "770916"] {
                assert!(!shown.contains(code), "{code} in {shown}");
            }
            for kept in ["SMS_1", "\"86\"", "\"12\"", "\"return_verify_code\":false"] {
                assert!(shown.contains(kept), "{kept} hidden: {shown}");
            }
        }
    }

    #[test]
    fn previews_keep_short_numbers_as_numbers_and_mask_long_ones() {
        let preview = masked_json(&json!({"valid_time": 300, "phone_number": 13912345678_u64}));
        assert_eq!(preview["valid_time"], json!(300));
        assert_eq!(preview["phone_number"], json!("139****5678"));
    }

    #[test]
    fn the_table_masks_numbers_quoted_in_reasons_and_names_both_ids() {
        let letter = DeadLetter {
            message_id: Some("amqp-1".into()),
            job_id: Some("j1".into()),
            invalid_code: Some("INVALID_FIELD".into()),
            invalid_reason: Some("invalid type: integer `13912345678`, expected a string".into()),
            death_count: Some(5),
            death_reason: Some("delivery_limit".into()),
            death_queue: Some("sms.jobs".into()),
            timestamp: None,
            redelivered: false,
            bytes: 10,
            preview: "{}".into(),
            body: Value::Null,
        };
        let out = render(&[letter], "sms.jobs.dead");
        assert!(!out.contains("13912345678"), "{out}");
        assert!(out.contains("139****5678"), "{out}");
        assert!(out.contains("id j1 (AMQP message id amqp-1)"), "{out}");
        assert!(out.contains("5x delivery_limit (from sms.jobs)"), "{out}");
    }

    #[test]
    fn text_bodies_are_masked_too() {
        assert_eq!(
            mask_digit_runs("not json 13912345678, id 42"),
            "not json 139****5678, id 42"
        );
    }

    #[test]
    fn redrive_strips_dead_letter_headers_and_keeps_the_rest() {
        let mut headers = FieldTable::default();
        for name in [
            HEADER_INVALID_CODE,
            HEADER_INVALID_REASON,
            "x-death",
            "x-first-death-reason",
            "x-delivery-count",
            "trace-id",
        ] {
            headers.insert(
                short(name),
                AMQPValue::LongString(LongString::from(b"v".to_vec())),
            );
        }
        let original = BasicProperties::default()
            .with_headers(headers)
            .with_reply_to(short("backend.replies"))
            .with_message_id(short("j1"));
        let props = redrive_properties(&original);
        let kept: Vec<&str> = props
            .headers()
            .as_ref()
            .map(|h| h.inner().keys().map(|k| k.as_str()).collect())
            .unwrap_or_default();
        assert_eq!(kept, vec!["trace-id"]);
        assert_eq!(
            props.reply_to().as_ref().map(|s| s.as_str()),
            Some("backend.replies")
        );
        assert_eq!(*props.delivery_mode(), Some(2));
    }
}
