//! Settings from the environment, validated once at start.
//!
//! Every setting has one name, one default and one parser, listed in [`SETTINGS`] so that the
//! configuration table (docs/configuration.md), `--help` and the compose-file check all agree with what the code reads.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use thiserror::Error;

pub use crate::amqp_nodes::AmqpNodes;

/// A value that must never reach a log line or an error message.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The only way to read the secret: grep for it when auditing.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{name} is required but not set ({hint})")]
    Missing {
        name: &'static str,
        hint: &'static str,
    },
    #[error("{name} is malformed: {reason}")]
    Malformed { name: &'static str, reason: String },
    /// A value that is well formed but not allowed with the others (a listener open to the
    /// network without a token).
    #[error("{name}: {reason}")]
    Refused { name: &'static str, reason: String },
}

/// Which RabbitMQ queue type carries jobs. Quorum queues give the delivery limit that stops a
/// poison message from looping forever; classic exists for brokers without quorum support.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueType {
    Quorum,
    Classic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureVersion {
    V1,
    V3,
}

#[derive(Debug, Clone)]
pub struct Credentials {
    pub access_key_id: String,
    pub access_key_secret: Secret,
    pub security_token: Option<Secret>,
}

#[derive(Debug, Clone)]
pub struct QueueConfig {
    pub jobs: String,
    pub results: String,
    pub dead_letter: String,
    pub dead_letter_exchange: String,
    pub jobs_queue_type: QueueType,
    pub delivery_limit: u32,
    /// Where final delivery receipts are published; None turns the events off.
    pub receipts: Option<String>,
}

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_delay: Duration,
    pub max_delay: Duration,
    /// No new attempt starts once this much time has passed since the first one.
    pub max_elapsed: Duration,
}

#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// Requests open at once at most; also the connections kept open between calls, per
    /// endpoint, so a wave of calls finds its connections again.
    pub max_open_calls: usize,
}

#[derive(Debug, Clone)]
pub struct AliyunConfig {
    pub credentials: Credentials,
    pub dypnsapi_endpoint: String,
    pub dysmsapi_endpoint: String,
    pub signature_version: SignatureVersion,
    pub http: HttpConfig,
    pub max_qps: u32,
}

/// Sends allowed per number per window (Aliyun's defaults: 1/min, 5/h, 10/day), checked
/// before calling Aliyun, across every worker instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumberLimits {
    pub windows: Vec<(Duration, u32)>,
}

impl std::str::FromStr for NumberLimits {
    type Err = String;

    /// `1/min,5/h,10/day` (units: s, min, h, day).
    fn from_str(s: &str) -> Result<Self, String> {
        let windows = s
            .split(',')
            .map(|part| {
                let (count, unit) = part
                    .trim()
                    .split_once('/')
                    .ok_or_else(|| format!("{part:?} is not COUNT/UNIT"))?;
                let count: u32 = count
                    .trim()
                    .parse()
                    .map_err(|_| format!("{count:?} is not a count"))?;
                let secs = match unit.trim() {
                    "s" => 1,
                    "min" => 60,
                    "h" => 3600,
                    "day" => 86_400,
                    other => return Err(format!("unit {other:?} is not one of s, min, h, day")),
                };
                Ok((Duration::from_secs(secs), count))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if windows.is_empty() {
            return Err("no limits given".into());
        }
        Ok(Self { windows })
    }
}

/// The abuse guards, counted in Postgres so that they hold across the fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardConfig {
    /// Checks per number per window; None when the guard is off.
    pub check_limit: Option<CheckLimit>,
    pub countries: CountryCodes,
    pub daily: Option<DailyLimits>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckLimit {
    pub max_attempts: u32,
    pub window: Duration,
}

/// The fleet's SMS budget per day; either limit may be off, not both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DailyLimits {
    pub total: Option<u32>,
    pub per_prefix: Option<u32>,
    /// Seconds east of UTC at which the day starts.
    pub utc_offset_secs: i32,
}

/// Country calling codes templated SMS may go to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CountryCodes {
    Any,
    Only(Vec<String>),
}

impl CountryCodes {
    /// Whether a number as stored (11 digits for the mainland, else country code + number)
    /// is in an allowed country. Calling codes are prefix-free, so a prefix match is exact.
    pub fn allows(&self, number: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Only(codes) => {
                // Mainland numbers are stored without their 86 (and start with 1, which is
                // also North America's code): their country is known from their shape.
                let mainland =
                    crate::phone::PhoneNumber::parse(number).is_ok_and(|p| p.as_str() == number);
                codes.iter().any(|c| {
                    if mainland {
                        c == "86"
                    } else {
                        number.starts_with(c.as_str())
                    }
                })
            }
        }
    }
}

impl std::str::FromStr for CountryCodes {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim() == "*" {
            return Ok(Self::Any);
        }
        let codes = s
            .split(',')
            .map(|c| {
                let c = c.trim().trim_start_matches('+');
                if (1..=3).contains(&c.len())
                    && c.bytes().all(|b| b.is_ascii_digit())
                    && !c.starts_with('0')
                {
                    Ok(c.to_owned())
                } else {
                    Err(format!(
                        "{c:?} is not a country calling code (1 to 3 digits, e.g. 86, 852, 1)"
                    ))
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::Only(codes))
    }
}

/// `+08:00`, `-05:30`, `Z` or `+0` → seconds east of UTC.
fn parse_utc_offset(raw: &str) -> Result<i32, String> {
    let raw = raw.trim();
    if raw.eq_ignore_ascii_case("z") || raw == "0" {
        return Ok(0);
    }
    let bad = || format!("expected an offset like +08:00 or -05:30, got {raw:?}");
    let (sign, rest) = match raw.split_at_checked(1) {
        Some(("+", rest)) => (1, rest),
        Some(("-", rest)) => (-1, rest),
        _ => return Err(bad()),
    };
    let (h, m) = rest.split_once(':').unwrap_or((rest, "0"));
    let h: i32 = h.parse().map_err(|_| bad())?;
    let m: i32 = m.parse().map_err(|_| bad())?;
    if !(0..=14).contains(&h) || !(0..60).contains(&m) {
        return Err(bad());
    }
    Ok(sign * (h * 3600 + m * 60))
}

/// The receipt poller and the reconciler of unknown Dysmsapi sends.
#[derive(Debug, Clone)]
pub struct ReceiptsConfig {
    pub enabled: bool,
    pub poll_interval: Duration,
    /// QuerySendDetails calls per second at most, for the fleet (Aliyun's budget is 5000/s per
    /// account, shared with every other user of the account).
    pub max_qps: u32,
    /// How long an unknown send is looked up before it is declared never sent.
    pub reconcile_grace: Duration,
}

/// The duties one worker of the fleet does at a time (see `worker::duties`).
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// How often the leader sweeps stale claims and the result outbox.
    pub sweep_interval: Duration,
    /// A final result not confirmed by RabbitMQ for this long is published again.
    pub republish_after: Duration,
    /// A stale claim that never reached Aliyun and whose message did not come back for this
    /// long ends `failed` (`ABANDONED`).
    pub abandon_after: Duration,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub amqp_nodes: AmqpNodes,
    pub database_url: Secret,
    pub database_max_connections: u32,
    /// See [`DATABASE_WRITE_TIMEOUT_MS`].
    pub database_write_timeout: Duration,
    pub queues: QueueConfig,
    pub aliyun: AliyunConfig,
    pub concurrency: u16,
    pub retry: RetryPolicy,
    pub code_job_max_age: Duration,
    /// None when the local per-number limit is off.
    pub number_limits: Option<NumberLimits>,
    pub guards: GuardConfig,
    pub receipts: ReceiptsConfig,
    pub heartbeat: Duration,
    pub fleet: FleetConfig,
    pub shutdown_grace: Duration,
    /// None when the admin listener is off.
    pub admin_addr: Option<std::net::SocketAddr>,
    /// None leaves the admin listener open to anyone who reaches it (loopback only).
    pub admin_token: Option<Secret>,
    pub log_format: LogFormat,
}

/// One documented environment variable.
pub struct Setting {
    pub name: &'static str,
    pub default: Option<&'static str>,
    pub help: &'static str,
}

macro_rules! settings {
    ($($ident:ident = $name:literal, $default:expr, $help:literal;)*) => {
        $(pub const $ident: &str = $name;)*
        /// Every variable the worker reads, in the order of docs/configuration.md.
        pub const SETTINGS: &[Setting] = &[$(Setting { name: $name, default: $default, help: $help }),*];
    };
}

settings! {
    AMQP_URL = "AMQP_URL", Some("amqp://guest:guest@127.0.0.1:5672/%2f"), "RabbitMQ connection URL (amqps:// for TLS), or a cluster's node URLs separated by commas: the first that answers is used, the next one when it is lost";
    DATABASE_URL = "DATABASE_URL", Some("postgres://postgres@127.0.0.1:5432/postgres"), "Postgres connection URL";
    DATABASE_MAX_CONNECTIONS = "DATABASE_MAX_CONNECTIONS", Some("16"), "size of the Postgres connection pool";
    DATABASE_WRITE_TIMEOUT_MS = "DATABASE_WRITE_TIMEOUT_MS", Some("30000"), "a statement on a job's way or of the leader's duties with no answer for this long, while Postgres works on none of the worker's statements begun with it, means its connection went silent: the worker exits (non-zero) so the fleet takes its jobs over, as after a crash; Postgres also ends the worker's sessions whose client has been silent this long";
    SMS_JOBS_QUEUE = "SMS_JOBS_QUEUE", Some("sms.jobs"), "queue the worker consumes jobs from";
    SMS_RESULTS_QUEUE = "SMS_RESULTS_QUEUE", Some("sms.results"), "queue results go to when a job has no reply_to";
    SMS_DEAD_LETTER_QUEUE = "SMS_DEAD_LETTER_QUEUE", Some("sms.jobs.dead"), "queue that receives invalid and poison jobs";
    SMS_DEAD_LETTER_EXCHANGE = "SMS_DEAD_LETTER_EXCHANGE", Some("sms.jobs.dlx"), "exchange that routes dead letters to SMS_DEAD_LETTER_QUEUE";
    SMS_JOBS_QUEUE_TYPE = "SMS_JOBS_QUEUE_TYPE", Some("quorum"), "quorum | classic (quorum enforces the delivery limit and replicates the jobs over the cluster's nodes)";
    SMS_JOBS_DELIVERY_LIMIT = "SMS_JOBS_DELIVERY_LIMIT", Some("5"), "redeliveries before a message is dead-lettered (quorum queues)";
    ALIBABA_CLOUD_ACCESS_KEY_ID = "ALIBABA_CLOUD_ACCESS_KEY_ID", None, "AccessKey ID (required; `run --sandbox` generates one)";
    ALIBABA_CLOUD_ACCESS_KEY_SECRET = "ALIBABA_CLOUD_ACCESS_KEY_SECRET", None, "AccessKey secret (required; never printed)";
    ALIBABA_CLOUD_SECURITY_TOKEN = "ALIBABA_CLOUD_SECURITY_TOKEN", Some(""), "STS security token, for temporary credentials";
    ALIYUN_DYPNSAPI_ENDPOINT = "ALIYUN_DYPNSAPI_ENDPOINT", Some("https://dypnsapi.aliyuncs.com"), "Dypnsapi endpoint (verification codes)";
    ALIYUN_DYSMSAPI_ENDPOINT = "ALIYUN_DYSMSAPI_ENDPOINT", Some("https://dysmsapi.aliyuncs.com"), "Dysmsapi endpoint (templated SMS)";
    ALIYUN_SIGNATURE_VERSION = "ALIYUN_SIGNATURE_VERSION", Some("v1"), "v1 (HMAC-SHA1 RPC signature) | v3 (ACS3-HMAC-SHA256)";
    ALIYUN_MAX_QPS = "ALIYUN_MAX_QPS", Some("1000"), "calls per Aliyun action in any one-second window at most, across all workers sharing the database (bursts are spread out, not throttled by Aliyun)";
    ALIYUN_MAX_OPEN_CALLS = "ALIYUN_MAX_OPEN_CALLS", Some("512"), "Aliyun requests open at once at most, per process; each holds an HTTP connection (about 30 KiB), so this is the worker's memory budget for calls. With Aliyun's latency it bounds the calls per second: 512 at 50 ms allow 10,000/s";
    HTTP_CONNECT_TIMEOUT_MS = "HTTP_CONNECT_TIMEOUT_MS", Some("3000"), "TCP+TLS connect timeout for Aliyun calls";
    HTTP_REQUEST_TIMEOUT_MS = "HTTP_REQUEST_TIMEOUT_MS", Some("10000"), "whole-request timeout for one Aliyun call";
    WORKER_CONCURRENCY = "WORKER_CONCURRENCY", Some("1024"), "jobs in flight at once (also the AMQP prefetch); enough to keep Aliyun's latency and the database's commits out of the throughput. A job waiting for its claim, outcome or result holds a few KiB; one in a call to Aliyun also holds a connection (see ALIYUN_MAX_OPEN_CALLS)";
    RETRY_MAX_ATTEMPTS = "RETRY_MAX_ATTEMPTS", Some("5"), "Aliyun calls per job at most, first one included";
    RETRY_INITIAL_DELAY_MS = "RETRY_INITIAL_DELAY_MS", Some("200"), "first backoff step (full jitter applies)";
    RETRY_MAX_DELAY_MS = "RETRY_MAX_DELAY_MS", Some("5000"), "largest backoff step";
    LOCAL_NUMBER_LIMIT_ENABLED = "LOCAL_NUMBER_LIMIT_ENABLED", Some("false"), "refuse send_verify_code jobs past LOCAL_NUMBER_LIMITS as rate_limited, without a paid call";
    LOCAL_NUMBER_LIMITS = "LOCAL_NUMBER_LIMITS", Some("1/min,5/h,10/day"), "sends per number per window for the local limit (units s, min, h, day)";
    CHECK_MAX_ATTEMPTS = "CHECK_MAX_ATTEMPTS", Some("5"), "check_verify_code jobs per number per CHECK_WINDOW_MS at most, across the fleet; past it, rate_limited (CHECK_LIMIT) without a call; a verified check starts a new window; 0 turns the guard off";
    CHECK_WINDOW_MS = "CHECK_WINDOW_MS", Some("600000"), "the window of CHECK_MAX_ATTEMPTS";
    SMS_ALLOWED_COUNTRY_CODES = "SMS_ALLOWED_COUNTRY_CODES", Some("86"), "country calling codes send_sms and send_batch_sms may send to, comma-separated; others are rejected (COUNTRY_NOT_ALLOWED) without a call; * allows every country";
    SMS_DAILY_LIMIT = "SMS_DAILY_LIMIT", Some(""), "SMS the fleet may send per day (every send job type, one per number), counted at the claim; past it, rate_limited (DAILY_LIMIT) without a call; empty means no limit";
    SMS_DAILY_LIMIT_PER_PREFIX = "SMS_DAILY_LIMIT_PER_PREFIX", Some(""), "SMS the fleet may send per day to the numbers sharing their first 7 digits (a number range, where SMS pumping concentrates); empty means no limit";
    SMS_DAILY_LIMIT_UTC_OFFSET = "SMS_DAILY_LIMIT_UTC_OFFSET", Some("+08:00"), "where the day of the daily limits starts, as an offset from UTC (Aliyun's own daily limits follow Beijing time)";
    CODE_JOB_MAX_AGE_MS = "CODE_JOB_MAX_AGE_MS", Some("600000"), "a code job without expires_at expires this long after it was published (AMQP timestamp) or first seen";
    RETRY_MAX_ELAPSED_MS = "RETRY_MAX_ELAPSED_MS", Some("30000"), "no retry starts later than this after the first attempt";
    RECEIPTS_ENABLED = "RECEIPTS_ENABLED", Some("true"), "poll delivery receipts and reconcile unknown Dysmsapi sends";
    RECEIPTS_POLL_INTERVAL_MS = "RECEIPTS_POLL_INTERVAL_MS", Some("30000"), "how often due receipts are checked; a number still waiting is checked less and less often";
    RECEIPTS_MAX_QPS = "RECEIPTS_MAX_QPS", Some("50"), "QuerySendDetails calls in any one-second window at most, across all workers sharing the database";
    RECONCILE_GRACE_MS = "RECONCILE_GRACE_MS", Some("300000"), "how long an unknown Dysmsapi send is looked up by OutId before it is declared never sent";
    SMS_RECEIPTS_QUEUE = "SMS_RECEIPTS_QUEUE", Some("sms.receipts"), "queue that receives a delivery event when a receipt turns final";
    RECEIPT_EVENTS_ENABLED = "RECEIPT_EVENTS_ENABLED", Some("true"), "publish delivery events to SMS_RECEIPTS_QUEUE";
    WORKER_HEARTBEAT_MS = "WORKER_HEARTBEAT_MS", Some("2000"), "how often a worker renews its heartbeat (it beats until it exits, drain included); a worker silent for 5 of its own beats is taken for dead: its claims that never reached Aliyun are taken over, the others end unknown";
    SWEEP_INTERVAL_MS = "SWEEP_INTERVAL_MS", Some("5000"), "how often one worker of the fleet sweeps stale claims and re-publishes unconfirmed results";
    RESULT_REPUBLISH_AFTER_MS = "RESULT_REPUBLISH_AFTER_MS", Some("30000"), "a final result that no queue confirmed for this long is published again (the outbox)";
    ABANDONED_CLAIM_AFTER_MS = "ABANDONED_CLAIM_AFTER_MS", Some("900000"), "a dead worker's claim that never reached Aliyun, and whose message did not come back, ends failed (ABANDONED) after this long";
    SHUTDOWN_GRACE_MS = "SHUTDOWN_GRACE_MS", Some("30000"), "on SIGTERM, how long in-flight jobs may take to finish";
    ADMIN_ADDR = "ADMIN_ADDR", Some("127.0.0.1:8080"), "admin HTTP listener (status page /, /healthz, /readyz, /metrics); empty turns it off";
    ADMIN_TOKEN = "ADMIN_TOKEN", Some(""), "bearer token every admin page but /healthz and /readyz requires (at least 16 characters; never printed); required when ADMIN_ADDR is not a loopback address";
    LOG_FORMAT = "LOG_FORMAT", Some("pretty"), "pretty | json (one JSON object per line)";
}

fn default_of(name: &str) -> Option<&'static str> {
    SETTINGS
        .iter()
        .find(|s| s.name == name)
        .and_then(|s| s.default)
}

/// Reads settings through a lookup function, so tests can configure without touching the
/// process environment.
struct Reader<'a> {
    lookup: &'a dyn Fn(&str) -> Option<String>,
}

impl Reader<'_> {
    fn raw(&self, name: &'static str) -> Option<String> {
        (self.lookup)(name)
            .filter(|v| !v.trim().is_empty())
            .or_else(|| default_of(name).map(str::to_owned))
            .filter(|v| !v.is_empty())
    }

    fn required(&self, name: &'static str, hint: &'static str) -> Result<String, ConfigError> {
        self.raw(name).ok_or(ConfigError::Missing { name, hint })
    }

    fn string(&self, name: &'static str) -> Result<String, ConfigError> {
        self.required(name, "it has no default")
    }

    fn number<T>(&self, name: &'static str, min: T, max: T) -> Result<T, ConfigError>
    where
        T: std::str::FromStr + PartialOrd + fmt::Display + Copy,
    {
        let raw = self.string(name)?;
        let value: T = raw.trim().parse().map_err(|_| ConfigError::Malformed {
            name,
            reason: format!("expected a whole number, got {raw:?}"),
        })?;
        if value < min || value > max {
            return Err(ConfigError::Malformed {
                name,
                reason: format!("{value} is outside {min}..={max}"),
            });
        }
        Ok(value)
    }

    fn millis(&self, name: &'static str, min: u64, max: u64) -> Result<Duration, ConfigError> {
        self.number::<u64>(name, min, max)
            .map(Duration::from_millis)
    }

    fn url(&self, name: &'static str, schemes: &[&str]) -> Result<String, ConfigError> {
        let value = self.string(name)?;
        let scheme = value.split("://").next().unwrap_or_default();
        if !value.contains("://") || !schemes.contains(&scheme) {
            return Err(ConfigError::Malformed {
                name,
                // The whole form, not only the scheme: `postgresql:/host/db` starts with one.
                reason: format!(
                    "expected {}://… (for example {})",
                    schemes.join("://… or "),
                    example_url(schemes)
                ),
            });
        }
        Ok(value)
    }

    /// `AMQP_URL`: one node's URL or several, comma-separated.
    fn amqp_nodes(&self) -> Result<AmqpNodes, ConfigError> {
        AmqpNodes::parse(&self.string(AMQP_URL)?).map_err(|reason| ConfigError::Malformed {
            name: AMQP_URL,
            reason,
        })
    }

    fn queue_name(&self, name: &'static str) -> Result<String, ConfigError> {
        let value = self.string(name)?;
        if value.len() > 255 || value.starts_with("amq.") {
            return Err(ConfigError::Malformed {
                name,
                reason: "queue names are at most 255 bytes and may not start with \"amq.\"".into(),
            });
        }
        Ok(value)
    }

    fn guards(&self) -> Result<GuardConfig, ConfigError> {
        let max_attempts = self.number(CHECK_MAX_ATTEMPTS, 0, 1000)?;
        let window = self.millis(CHECK_WINDOW_MS, 1000, 7 * 86_400_000)?;
        let malformed = |name| move |reason| ConfigError::Malformed { name, reason };
        let countries = self
            .string(SMS_ALLOWED_COUNTRY_CODES)?
            .parse()
            .map_err(malformed(SMS_ALLOWED_COUNTRY_CODES))?;
        let optional = |name| {
            self.raw(name)
                .map(|_| self.number::<u32>(name, 1, 100_000_000))
                .transpose()
        };
        let total = optional(SMS_DAILY_LIMIT)?;
        let per_prefix = optional(SMS_DAILY_LIMIT_PER_PREFIX)?;
        let daily = if total.is_some() || per_prefix.is_some() {
            Some(DailyLimits {
                total,
                per_prefix,
                utc_offset_secs: parse_utc_offset(&self.string(SMS_DAILY_LIMIT_UTC_OFFSET)?)
                    .map_err(malformed(SMS_DAILY_LIMIT_UTC_OFFSET))?,
            })
        } else {
            None
        };
        Ok(GuardConfig {
            check_limit: (max_attempts > 0).then_some(CheckLimit {
                max_attempts,
                window,
            }),
            countries,
            daily,
        })
    }

    fn flag(&self, name: &'static str) -> Result<bool, ConfigError> {
        self.choice(
            name,
            &[
                ("true", true),
                ("1", true),
                ("yes", true),
                ("false", false),
                ("0", false),
                ("no", false),
            ],
        )
    }

    fn choice<T: Copy>(&self, name: &'static str, options: &[(&str, T)]) -> Result<T, ConfigError> {
        let value = self.string(name)?.to_ascii_lowercase();
        options
            .iter()
            .find(|(k, _)| *k == value)
            .map(|(_, v)| *v)
            .ok_or_else(|| ConfigError::Malformed {
                name,
                reason: format!(
                    "expected one of {:?}, got {value:?}",
                    options.iter().map(|(k, _)| *k).collect::<Vec<_>>()
                ),
            })
    }
}

/// Shorter tokens are guessable by whoever can reach the listener.
pub const ADMIN_TOKEN_MIN_LEN: usize = 16;

fn admin_token(r: &Reader<'_>) -> Result<Option<Secret>, ConfigError> {
    let Some(token) = r.raw(ADMIN_TOKEN) else {
        return Ok(None);
    };
    let token = token.trim();
    if token.chars().count() < ADMIN_TOKEN_MIN_LEN {
        return Err(ConfigError::Malformed {
            name: ADMIN_TOKEN,
            reason: format!("at least {ADMIN_TOKEN_MIN_LEN} characters are required"),
        });
    }
    // A token travels in a header and a cookie: visible ASCII only, so nothing is lost on the way.
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConfigError::Malformed {
            name: ADMIN_TOKEN,
            reason: "only visible ASCII characters (no spaces) are allowed".into(),
        });
    }
    Ok(Some(Secret::new(token)))
}

/// `scheme://user:password@host:port/path` → `host:port`: how a URL is shown in logs and
/// errors, since its user info may hold a password.
pub fn host_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host)
        .to_owned()
}

/// Reads the process environment, after loading `.env` if there is one.
pub fn env_lookup(name: &str) -> Option<String> {
    static DOTENV: std::sync::Once = std::sync::Once::new();
    // A missing .env is the normal case in production.
    DOTENV.call_once(|| {
        let _ = dotenvy::dotenv();
    });
    std::env::var(name).ok()
}

/// What a program that only publishes jobs needs (no Aliyun credentials).
#[derive(Debug, Clone)]
pub struct ClientSettings {
    pub amqp_nodes: AmqpNodes,
    pub jobs_queue: String,
}

/// What the operator commands need: only the database.
pub fn database_url(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Secret, ConfigError> {
    let r = Reader { lookup };
    Ok(Secret::new(
        r.url(DATABASE_URL, &["postgres", "postgresql"])?,
    ))
}

/// What `dead-letters` needs besides [`ClientSettings`]: the dead-letter queue's name.
pub fn dead_letter_queue(lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, ConfigError> {
    Reader { lookup }.queue_name(SMS_DEAD_LETTER_QUEUE)
}

/// A well-formed URL of the first scheme, to copy from.
fn example_url(schemes: &[&str]) -> String {
    match schemes.first().copied() {
        Some(scheme @ ("postgres" | "postgresql")) => {
            format!("{scheme}://user:password@127.0.0.1:5432/database")
        }
        Some(scheme) => format!("{scheme}://host"),
        None => String::new(),
    }
}

impl ClientSettings {
    pub fn from_lookup(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let r = Reader { lookup };
        Ok(Self {
            amqp_nodes: r.amqp_nodes()?,
            jobs_queue: r.queue_name(SMS_JOBS_QUEUE)?,
        })
    }
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(&env_lookup)
    }

    pub fn from_map(map: &HashMap<String, String>) -> Result<Self, ConfigError> {
        Self::from_lookup(&|name| map.get(name).cloned())
    }

    pub fn from_lookup(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let r = Reader { lookup };
        let credentials = Credentials {
            access_key_id: r.required(
                ALIBABA_CLOUD_ACCESS_KEY_ID,
                "set your AccessKey, or use `run --sandbox` to try the worker without one",
            )?,
            access_key_secret: Secret::new(r.required(
                ALIBABA_CLOUD_ACCESS_KEY_SECRET,
                "set your AccessKey secret, or use `run --sandbox`",
            )?),
            security_token: r.raw(ALIBABA_CLOUD_SECURITY_TOKEN).map(Secret::new),
        };
        let concurrency: u16 = r.number(WORKER_CONCURRENCY, 1, 10_000)?;
        let retry = RetryPolicy {
            max_attempts: r.number(RETRY_MAX_ATTEMPTS, 1, 100)?,
            initial_delay: r.millis(RETRY_INITIAL_DELAY_MS, 1, 600_000)?,
            max_delay: r.millis(RETRY_MAX_DELAY_MS, 1, 600_000)?,
            max_elapsed: r.millis(RETRY_MAX_ELAPSED_MS, 0, 3_600_000)?,
        };
        if retry.max_delay < retry.initial_delay {
            return Err(ConfigError::Malformed {
                name: RETRY_MAX_DELAY_MS,
                reason: "must not be smaller than RETRY_INITIAL_DELAY_MS".into(),
            });
        }
        let config = Self {
            amqp_nodes: r.amqp_nodes()?,
            database_url: Secret::new(r.url(DATABASE_URL, &["postgres", "postgresql"])?),
            database_max_connections: r.number(DATABASE_MAX_CONNECTIONS, 1, 1000)?,
            database_write_timeout: r.millis(DATABASE_WRITE_TIMEOUT_MS, 1_000, 3_600_000)?,
            queues: QueueConfig {
                jobs: r.queue_name(SMS_JOBS_QUEUE)?,
                results: r.queue_name(SMS_RESULTS_QUEUE)?,
                dead_letter: r.queue_name(SMS_DEAD_LETTER_QUEUE)?,
                dead_letter_exchange: r.queue_name(SMS_DEAD_LETTER_EXCHANGE)?,
                jobs_queue_type: r.choice(
                    SMS_JOBS_QUEUE_TYPE,
                    &[
                        ("quorum", QueueType::Quorum),
                        ("classic", QueueType::Classic),
                    ],
                )?,
                delivery_limit: r.number(SMS_JOBS_DELIVERY_LIMIT, 1, 1000)?,
                receipts: if r.flag(RECEIPT_EVENTS_ENABLED)? {
                    Some(r.queue_name(SMS_RECEIPTS_QUEUE)?)
                } else {
                    None
                },
            },
            aliyun: AliyunConfig {
                credentials,
                dypnsapi_endpoint: r.url(ALIYUN_DYPNSAPI_ENDPOINT, &["https", "http"])?,
                dysmsapi_endpoint: r.url(ALIYUN_DYSMSAPI_ENDPOINT, &["https", "http"])?,
                signature_version: r.choice(
                    ALIYUN_SIGNATURE_VERSION,
                    &[("v1", SignatureVersion::V1), ("v3", SignatureVersion::V3)],
                )?,
                http: HttpConfig {
                    connect_timeout: r.millis(HTTP_CONNECT_TIMEOUT_MS, 1, 600_000)?,
                    request_timeout: r.millis(HTTP_REQUEST_TIMEOUT_MS, 1, 600_000)?,
                    max_open_calls: r.number(ALIYUN_MAX_OPEN_CALLS, 1, 10_000)?,
                },
                max_qps: r.number(ALIYUN_MAX_QPS, 1, 100_000)?,
            },
            concurrency,
            retry,
            code_job_max_age: r.millis(CODE_JOB_MAX_AGE_MS, 1000, 86_400_000)?,
            number_limits: if r.flag(LOCAL_NUMBER_LIMIT_ENABLED)? {
                let raw = r.string(LOCAL_NUMBER_LIMITS)?;
                Some(raw.parse().map_err(|reason| ConfigError::Malformed {
                    name: LOCAL_NUMBER_LIMITS,
                    reason,
                })?)
            } else {
                None
            },
            guards: r.guards()?,
            receipts: ReceiptsConfig {
                enabled: r.flag(RECEIPTS_ENABLED)?,
                poll_interval: r.millis(RECEIPTS_POLL_INTERVAL_MS, 10, 86_400_000)?,
                max_qps: r.number(RECEIPTS_MAX_QPS, 1, 5000)?,
                reconcile_grace: r.millis(RECONCILE_GRACE_MS, 0, 30 * 86_400_000)?,
            },
            heartbeat: r.millis(WORKER_HEARTBEAT_MS, 50, 60_000)?,
            fleet: FleetConfig {
                sweep_interval: r.millis(SWEEP_INTERVAL_MS, 50, 3_600_000)?,
                // A result is confirmed within milliseconds; below this the outbox would publish
                // again results still on their way, and a presumed result would be handed to it
                // (`store::presumed::hand_over_after`) after a confirm only a little slow.
                republish_after: r.millis(RESULT_REPUBLISH_AFTER_MS, 500, 86_400_000)?,
                abandon_after: r.millis(ABANDONED_CLAIM_AFTER_MS, 1_000, 7 * 86_400_000)?,
            },
            shutdown_grace: r.millis(SHUTDOWN_GRACE_MS, 0, 3_600_000)?,
            // Set but empty means off; unset means the default.
            admin_addr: match lookup(ADMIN_ADDR) {
                Some(v) if v.trim().is_empty() => None,
                _ => {
                    let raw = r.string(ADMIN_ADDR)?;
                    Some(raw.trim().parse().map_err(|_| ConfigError::Malformed {
                        name: ADMIN_ADDR,
                        reason: format!("expected host:port, got {raw:?}"),
                    })?)
                }
            },
            admin_token: admin_token(&r)?,
            log_format: r.choice(
                LOG_FORMAT,
                &[("pretty", LogFormat::Pretty), ("json", LogFormat::Json)],
            )?,
        };
        if let Some(addr) = config.admin_addr
            && !addr.ip().is_loopback()
            && config.admin_token.is_none()
        {
            // The status page shows masked numbers, codes and messages of every job, and
            // /metrics the traffic: nothing to hand to whoever reaches the port.
            return Err(ConfigError::Refused {
                name: ADMIN_ADDR,
                reason: format!(
                    "{addr} is not a loopback address, so {ADMIN_TOKEN} must be set (or bind \
                     {ADMIN_ADDR} to 127.0.0.1, or set it empty to turn the listener off)"
                ),
            });
        }
        Ok(config)
    }

    /// How long a fresh claim is held before it is stamped (the call about to leave). A claim
    /// whose reply was lost, or whose worker gave up before calling, is taken over after this,
    /// even though its owner is alive: until stamped, it never reached Aliyun.
    pub fn claim_lease(&self) -> Duration {
        self.heartbeat * 5
    }

    /// How long one job may keep its `sending` claim: every attempt, every backoff, plus slack.
    /// A claim older than this belongs to a worker that died mid-call.
    pub fn job_lease(&self) -> Duration {
        let per_attempt = self.aliyun.http.request_timeout + self.aliyun.http.connect_timeout;
        self.retry.max_elapsed + self.retry.max_delay + per_attempt * 2 + Duration::from_secs(5)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_map(&map)
    }

    const CREDS: [(&str, &str); 2] = [
        (ALIBABA_CLOUD_ACCESS_KEY_ID, "id"),
        (ALIBABA_CLOUD_ACCESS_KEY_SECRET, "very-secret"),
    ];

    #[test]
    fn defaults_apply_when_only_credentials_are_set() {
        let c = with(&CREDS).unwrap();
        assert_eq!(c.queues.jobs, "sms.jobs");
        assert_eq!(c.queues.results, "sms.results");
        assert_eq!(c.queues.dead_letter, "sms.jobs.dead");
        assert_eq!(c.aliyun.dypnsapi_endpoint, "https://dypnsapi.aliyuncs.com");
        assert_eq!(c.concurrency, 1024);
        assert_eq!(c.aliyun.http.max_open_calls, 512);
        assert!(c.aliyun.credentials.security_token.is_none());
    }

    #[test]
    fn missing_credentials_name_the_variable() {
        let err = with(&[]).unwrap_err();
        assert!(
            err.to_string().contains(ALIBABA_CLOUD_ACCESS_KEY_ID),
            "{err}"
        );
    }

    #[test]
    fn malformed_numbers_name_the_variable() {
        let mut pairs = CREDS.to_vec();
        pairs.push((WORKER_CONCURRENCY, "lots"));
        let err = with(&pairs).unwrap_err();
        assert!(err.to_string().contains(WORKER_CONCURRENCY), "{err}");
        pairs.pop();
        pairs.push((WORKER_CONCURRENCY, "0"));
        assert!(with(&pairs).is_err());
    }

    #[test]
    fn bad_urls_and_choices_are_refused() {
        let mut pairs = CREDS.to_vec();
        pairs.push((DATABASE_URL, "mysql://x"));
        assert!(matches!(
            with(&pairs),
            Err(ConfigError::Malformed {
                name: DATABASE_URL,
                ..
            })
        ));
        let mut pairs = CREDS.to_vec();
        pairs.push((SMS_JOBS_QUEUE_TYPE, "stream"));
        assert!(with(&pairs).is_err());
        // One slash short: the message shows the whole form, not only the scheme it has.
        let mut pairs = CREDS.to_vec();
        pairs.push((DATABASE_URL, "postgresql:/localhost/db"));
        let said = with(&pairs).map(|_| ()).unwrap_err().to_string();
        assert!(
            said.contains("postgresql://") && said.contains("@127.0.0.1:5432/database"),
            "{said}"
        );
    }

    #[test]
    fn country_codes_match_numbers_as_stored() {
        let only: CountryCodes = "86, +852".parse().unwrap();
        assert!(only.allows("13800138000"));
        assert!(only.allows("85291234567"));
        assert!(!only.allows("2348012345678"));
        let us: CountryCodes = "1".parse().unwrap();
        assert!(
            !us.allows("13800138000"),
            "a mainland number is not North American"
        );
        assert!(us.allows("12025550123"));
        assert!(CountryCodes::Any.allows("2348012345678"));
        for bad in ["", "0086", "86a", "1234", "86,"] {
            assert!(bad.parse::<CountryCodes>().is_err(), "{bad}");
        }
    }

    #[test]
    fn guards_default_to_five_checks_per_ten_minutes_and_mainland_only() {
        let c = with(&CREDS).unwrap();
        assert_eq!(
            c.guards.check_limit,
            Some(CheckLimit {
                max_attempts: 5,
                window: Duration::from_secs(600)
            })
        );
        assert_eq!(c.guards.countries, CountryCodes::Only(vec!["86".into()]));
        assert_eq!(c.guards.daily, None);
        let mut pairs = CREDS.to_vec();
        pairs.extend([
            (CHECK_MAX_ATTEMPTS, "0"),
            (SMS_DAILY_LIMIT_PER_PREFIX, "20"),
        ]);
        let c = with(&pairs).unwrap();
        assert_eq!(c.guards.check_limit, None);
        assert_eq!(
            c.guards.daily,
            Some(DailyLimits {
                total: None,
                per_prefix: Some(20),
                utc_offset_secs: 8 * 3600
            })
        );
    }

    #[test]
    fn utc_offsets_parse() {
        assert_eq!(parse_utc_offset("+08:00"), Ok(28_800));
        assert_eq!(parse_utc_offset("-05:30"), Ok(-19_800));
        assert_eq!(parse_utc_offset("Z"), Ok(0));
        for bad in ["08:00", "+15:00", "+8:60", "", "+"] {
            assert!(parse_utc_offset(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn number_limits_parse_and_refuse_nonsense() {
        let l: NumberLimits = "1/min, 5/h,10/day".parse().unwrap();
        assert_eq!(
            l.windows,
            vec![
                (Duration::from_secs(60), 1),
                (Duration::from_secs(3600), 5),
                (Duration::from_secs(86_400), 10)
            ]
        );
        for bad in ["", "1", "x/min", "1/week"] {
            assert!(bad.parse::<NumberLimits>().is_err(), "{bad}");
        }
        let mut pairs = CREDS.to_vec();
        pairs.push((LOCAL_NUMBER_LIMIT_ENABLED, "true"));
        pairs.push((LOCAL_NUMBER_LIMITS, "1/fortnight"));
        assert!(matches!(
            with(&pairs),
            Err(ConfigError::Malformed {
                name: LOCAL_NUMBER_LIMITS,
                ..
            })
        ));
    }

    #[test]
    fn a_republish_delay_below_500_ms_is_refused() {
        let mut pairs = CREDS.to_vec();
        pairs.push((RESULT_REPUBLISH_AFTER_MS, "499"));
        assert!(
            matches!(
                with(&pairs),
                Err(ConfigError::Malformed {
                    name: RESULT_REPUBLISH_AFTER_MS,
                    ..
                })
            ),
            "{:?}",
            with(&pairs).map(|c| c.fleet.republish_after)
        );
        pairs.pop();
        pairs.push((RESULT_REPUBLISH_AFTER_MS, "500"));
        assert_eq!(
            with(&pairs).unwrap().fleet.republish_after,
            Duration::from_millis(500)
        );
    }

    #[test]
    fn amqp_url_takes_a_node_list_and_names_a_bad_entry_without_its_password() {
        let mut pairs = CREDS.to_vec();
        pairs.push((
            AMQP_URL,
            "amqp://u:pw1@rabbit-1:5672/%2f, amqp://u:pw1@rabbit-2:5672/%2f,amqp://u:pw1@rabbit-3:5672/%2f",
        ));
        let c = with(&pairs).unwrap();
        assert_eq!(c.amqp_nodes.len(), 3);
        assert!(!format!("{c:?}").contains("pw1"));
        pairs.pop();
        pairs.push((AMQP_URL, "amqp://u:pw1@rabbit-1:5672/%2f,rabbit-2:5672"));
        let err = with(&pairs).unwrap_err();
        assert!(
            matches!(err, ConfigError::Malformed { name: AMQP_URL, .. }),
            "{err}"
        );
        let text = err.to_string();
        assert!(text.contains("node 2 of 2"), "{text}");
        assert!(!text.contains("pw1"), "{text}");
    }

    #[test]
    fn the_jobs_queue_is_a_quorum_queue_unless_told_otherwise() {
        assert_eq!(
            with(&CREDS).unwrap().queues.jobs_queue_type,
            QueueType::Quorum
        );
    }

    #[test]
    fn host_of_keeps_only_host_and_port() {
        assert_eq!(
            host_of("amqp://guest:s3cret@rabbit:5672/%2f"),
            "rabbit:5672"
        );
        assert_eq!(
            host_of("postgres://u:p@db.internal:5432/sms?sslmode=require"),
            "db.internal:5432"
        );
        assert_eq!(host_of("postgres://localhost/sms"), "localhost");
    }

    #[test]
    fn a_listener_off_loopback_needs_a_token() {
        let mut pairs = CREDS.to_vec();
        pairs.push((ADMIN_ADDR, "0.0.0.0:8080"));
        let err = with(&pairs).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(ADMIN_ADDR) && text.contains(ADMIN_TOKEN),
            "{text}"
        );
        // The address is fine; the token is what is missing.
        assert!(!text.contains("malformed"), "{text}");
        pairs.push((ADMIN_TOKEN, "a-long-enough-admin-token"));
        let c = with(&pairs).unwrap();
        assert_eq!(
            c.admin_token.as_ref().map(Secret::expose),
            Some("a-long-enough-admin-token")
        );
        for loopback in ["127.0.0.1:8080", "[::1]:8080"] {
            let mut pairs = CREDS.to_vec();
            pairs.push((ADMIN_ADDR, loopback));
            assert!(with(&pairs).unwrap().admin_token.is_none(), "{loopback}");
        }
    }

    #[test]
    fn short_or_odd_tokens_are_refused_without_being_shown() {
        for bad in [
            "too-short",
            "has a space in the middle",
            "ünïcödé-tökén-lönger",
        ] {
            let mut pairs = CREDS.to_vec();
            pairs.push((ADMIN_TOKEN, bad));
            let err = with(&pairs).unwrap_err();
            assert!(
                matches!(
                    err,
                    ConfigError::Malformed {
                        name: ADMIN_TOKEN,
                        ..
                    }
                ),
                "{bad}: {err}"
            );
            assert!(!err.to_string().contains(bad), "{err}");
        }
    }

    #[test]
    fn secrets_never_print() {
        let mut pairs = CREDS.to_vec();
        pairs.push((ADMIN_TOKEN, "admin-token-never-printed"));
        let debug = format!("{:?}", with(&pairs).unwrap());
        assert!(!debug.contains("admin-token-never-printed"), "{debug}");
        let c = with(&CREDS).unwrap();
        let debug = format!("{c:?}");
        assert!(!debug.contains("very-secret"), "{debug}");
        assert!(!debug.contains("guest:guest"), "{debug}");
    }
}
