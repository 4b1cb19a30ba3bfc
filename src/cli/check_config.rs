//! `check-config`: before starting (or when a deploy misbehaves), check in plain words what
//! `run` needs — the configuration, RabbitMQ, Postgres with its migrations, Aliyun with the
//! credentials — without sending anything.
//!
//! No check prints a secret: URLs are reduced to host and port, and the AccessKey secret is
//! only ever used to sign.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use lapin::types::ShortString;
use sqlx::{Connection as _, PgConnection};

use crate::aliyun::outcome;
use crate::aliyun::{AliyunClient, CallError, Product};
use crate::config::{
    ALIBABA_CLOUD_ACCESS_KEY_ID, ALIBABA_CLOUD_ACCESS_KEY_SECRET, Config, host_of,
};
use crate::store::china_time;

/// Longest any one check may take: an unreachable host must not hang the command.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Fail,
    /// Not run because an earlier check failed.
    Skipped,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub verdict: Verdict,
    pub detail: String,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            verdict: Verdict::Ok,
            detail: detail.into(),
        }
    }

    fn fail(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            verdict: Verdict::Fail,
            detail: detail.into(),
        }
    }

    fn skipped(name: &'static str) -> Self {
        Self {
            name,
            verdict: Verdict::Skipped,
            detail: "not checked: the configuration did not load".into(),
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = match self.verdict {
            Verdict::Ok => "ok",
            Verdict::Fail => "FAIL",
            Verdict::Skipped => "skip",
        };
        write!(f, "{verdict:<5} {:<9} {}", self.name, self.detail)
    }
}

/// Runs every check; with a configuration that does not load, the others are skipped.
pub async fn run(lookup: &dyn Fn(&str) -> Option<String>) -> Vec<Check> {
    let config = match Config::from_lookup(lookup) {
        Ok(c) => c,
        Err(e) => {
            return vec![
                Check::fail("config", e.to_string()),
                Check::skipped("rabbitmq"),
                Check::skipped("postgres"),
                Check::skipped("aliyun"),
            ];
        }
    };
    let summary = format!(
        "loads: jobs queue {:?}, dead letters {:?}, AccessKey ID {}",
        config.queues.jobs,
        config.queues.dead_letter,
        key_id_hint(&config.aliyun.credentials.access_key_id)
    );
    let (rabbitmq, postgres, aliyun) =
        tokio::join!(rabbitmq(&config), postgres(&config), aliyun(&config));
    vec![Check::ok("config", summary), rabbitmq, postgres, aliyun]
}

/// Enough of the key ID to recognise which key is configured; the ID is not a secret, but
/// there is no need to print all of it.
fn key_id_hint(id: &str) -> String {
    let head: String = id.chars().take(8).collect();
    if head.chars().count() < id.chars().count() {
        format!("{head}…")
    } else {
        head
    }
}

async fn within<T>(what: &str, f: impl Future<Output = Result<T, String>>) -> Result<T, String> {
    tokio::time::timeout(CHECK_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| Err(format!("{what}: no answer within {CHECK_TIMEOUT:?}")))
}

async fn rabbitmq(config: &Config) -> Check {
    const NAME: &str = "rabbitmq";
    crate::tls::install_crypto_provider();
    let nodes = &config.amqp_nodes;
    let queue = config.queues.jobs.clone();
    let result = within(&format!("RabbitMQ at {nodes}"), async {
        let connected = nodes
            .connect("aliyun-sms-worker check-config", 0)
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let connection = connected.connection;
        let host = match nodes.len() {
            1 => nodes.host(connected.node).to_owned(),
            n => format!("{} (node {} of {n})", nodes.host(connected.node), connected.node + 1),
        };
        let declared = async {
            let channel = connection.create_channel().await?;
            let declared = crate::broker::inspect_queue(&channel, &queue).await;
            // A refused passive declare has closed the channel already.
            if declared.is_ok() {
                let _ = channel.close(200, ShortString::from("checked")).await;
            }
            declared
        }
        .await;
        // The queue is there: declared as `run` declares it, it changes nothing unless its
        // arguments differ, and then `run` would never consume from it.
        let settings = match &declared {
            Ok(_) => match connection.create_channel().await {
                Ok(channel) => {
                    let same = crate::broker::declare_jobs_queue(&channel, &config.queues).await;
                    if same.is_ok() {
                        let _ = channel.close(200, ShortString::from("checked")).await;
                    }
                    same.map_err(|e| e.to_string())
                }
                Err(e) => Err(format!("checking the jobs queue's settings failed: {e}")),
            },
            Err(_) => Ok(()),
        };
        let _ = connection.close(200, ShortString::from("checked")).await;
        settings.map_err(|e| format!("connected to {host}, but {e}"))?;
        match declared {
            Ok(q) => Ok(format!(
                "connected to {host}; jobs queue {queue:?} exists with this worker's settings ({} ready, {} consumers)",
                q.message_count(),
                q.consumer_count()
            )),
            Err(e) if e.to_string().contains("NOT_FOUND") => Err(format!(
                "connected to {host}, but the jobs queue {queue:?} does not exist (`run` declares it at start; check SMS_JOBS_QUEUE)"
            )),
            Err(e) => Err(format!("connected to {host}, but checking queue {queue:?} failed: {e}")),
        }
    })
    .await;
    match result {
        Ok(detail) => Check::ok(NAME, detail),
        Err(detail) => Check::fail(NAME, detail),
    }
}

async fn postgres(config: &Config) -> Check {
    const NAME: &str = "postgres";
    let host = host_of(config.database_url.expose());
    let result = within(&format!("Postgres at {host}"), async {
        let mut conn = crate::store::plain_connection(config.database_url.expose())
            .await
            .map_err(|e| e.to_string())?;
        let status = migration_status(&mut conn).await;
        let _ = conn.close().await;
        status.map(|s| format!("connected to {host}; {s}"))
    })
    .await;
    match result {
        Ok(detail) => Check::ok(NAME, detail),
        Err(detail) => Check::fail(NAME, detail),
    }
}

/// Compares `_sqlx_migrations` with the migrations embedded in this binary.
async fn migration_status(conn: &mut PgConnection) -> Result<String, String> {
    let (exists,): (bool,) = sqlx::query_as("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| format!("cannot read the migrations table: {e}"))?;
    let embedded: BTreeMap<i64, &[u8]> = crate::store::MIGRATOR
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .map(|m| (m.version, m.checksum.as_ref()))
        .collect();
    if !exists {
        return Err(format!(
            "no migrations applied ({} pending): run `aliyun-sms-worker migrate`, or start `run` without --no-migrate",
            embedded.len()
        ));
    }
    let applied: Vec<(i64, Vec<u8>, bool)> =
        sqlx::query_as("SELECT version, checksum, success FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| format!("cannot read the migrations table: {e}"))?;
    if let Some((v, _, _)) = applied.iter().find(|(_, _, ok)| !ok) {
        return Err(format!(
            "migration {v} failed part-way: the schema needs a look before the worker runs"
        ));
    }
    if let Some((v, _, _)) = applied
        .iter()
        .find(|(v, sum, _)| embedded.get(v).is_some_and(|e| *e != sum.as_slice()))
    {
        return Err(format!(
            "migration {v} differs from the one this binary carries (edited after it was applied)"
        ));
    }
    if let Some((v, _, _)) = applied.iter().find(|(v, _, _)| !embedded.contains_key(v)) {
        return Err(format!(
            "the database has migration {v}, which this binary does not know: it is older than the schema"
        ));
    }
    let pending: Vec<String> = embedded
        .keys()
        .filter(|v| !applied.iter().any(|(a, _, _)| a == *v))
        .map(i64::to_string)
        .collect();
    if !pending.is_empty() {
        return Err(format!(
            "{} migration(s) not applied ({}): run `aliyun-sms-worker migrate`",
            pending.len(),
            pending.join(", ")
        ));
    }
    Ok(format!("all {} migrations applied", embedded.len()))
}

/// A signed `QuerySendDetails` for a number and day with no sends: it reads, sends nothing and
/// costs nothing, but passes through the same signature and AccessKey checks as a send.
async fn aliyun(config: &Config) -> Check {
    const NAME: &str = "aliyun";
    const PROBE_NUMBER: &str = "13800000000";
    let endpoint = config.aliyun.dysmsapi_endpoint.clone();
    let client = match AliyunClient::new(config.aliyun.clone()) {
        Ok(c) => c,
        Err(e) => return Check::fail(NAME, format!("cannot build the HTTP client: {e}")),
    };
    let today = chrono::Utc::now().with_timezone(&china_time());
    let params = [
        ("PhoneNumber", PROBE_NUMBER.to_owned()),
        ("SendDate", today.format("%Y%m%d").to_string()),
        ("PageSize", "1".to_owned()),
        ("CurrentPage", "1".to_owned()),
    ];
    let answer = tokio::time::timeout(
        CHECK_TIMEOUT,
        client.call(Product::Dysmsapi, "QuerySendDetails", &params, &[]),
    )
    .await;
    let answer = match answer {
        Err(_) | Ok(Err(CallError::Timeout(_))) => {
            return Check::fail(NAME, format!("no answer from {endpoint} in time"));
        }
        Ok(Err(e)) => return Check::fail(NAME, format!("{endpoint}: {e}")),
        Ok(Ok(a)) => a,
    };
    let code = answer.code.clone().unwrap_or_default();
    let request_id = answer.request_id.clone().unwrap_or_else(|| "-".into());
    if answer.is_ok() {
        return Check::ok(
            NAME,
            format!(
                "{endpoint} accepted the credentials (signed QuerySendDetails, nothing sent; RequestId {request_id})"
            ),
        );
    }
    if outcome::is_credentials(&code) {
        let which = if code.starts_with("InvalidAccessKeyId") {
            ALIBABA_CLOUD_ACCESS_KEY_ID
        } else if code.contains("SecurityToken") {
            "ALIBABA_CLOUD_SECURITY_TOKEN"
        } else {
            ALIBABA_CLOUD_ACCESS_KEY_SECRET
        };
        return Check::fail(
            NAME,
            format!("credentials rejected by {endpoint} ({code}): check {which}"),
        );
    }
    if outcome::is_account(&code) {
        return Check::fail(
            NAME,
            format!(
                "credentials accepted, but the account cannot go on ({code}: {})",
                outcome::meaning(&code)
            ),
        );
    }
    if answer.http_status >= 500 || code.is_empty() {
        return Check::fail(
            NAME,
            format!(
                "{endpoint} answered HTTP {} {} — Aliyun (or whatever answers there) is not well",
                answer.http_status,
                if code.is_empty() {
                    "without an Aliyun code"
                } else {
                    &code
                }
            ),
        );
    }
    // Any other business answer means the gateway accepted the key and the signature.
    Check::ok(
        NAME,
        format!(
            "{endpoint} accepted the credentials (QuerySendDetails answered {code}; RequestId {request_id})"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_missing_variable_is_named_and_the_rest_skipped() {
        let checks = run(&|_| None).await;
        assert_eq!(checks[0].verdict, Verdict::Fail);
        assert!(
            checks[0].detail.contains(ALIBABA_CLOUD_ACCESS_KEY_ID),
            "{}",
            checks[0]
        );
        assert!(checks[1..].iter().all(|c| c.verdict == Verdict::Skipped));
    }
}
