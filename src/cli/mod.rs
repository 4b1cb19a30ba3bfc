//! The command line: `run`, `migrate`, `enqueue`, `fake-aliyun`, and the operator commands,
//! with their clap definitions. `main.rs` only calls [`main`].

pub mod bench;
pub mod check_config;
pub mod dead_letters;
pub mod output;
pub mod retention;
pub mod sandbox;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use serde_json::json;
use tokio::sync::watch;

use crate::aliyun::Product;
use crate::config::{self, ClientSettings, Config, LogFormat};
use crate::fake_aliyun::{FakeAliyun, FakeConfig, FaultRule};
use crate::phone::PhoneNumber;
use crate::report;
use crate::sms_client::SmsClient;
use crate::store::{JobDetail, JobFilter, Store};
use crate::wire::{JobType, Status};
use crate::{out, outln, telemetry, worker};
use dead_letters::{DeadLetters, Selection};

#[derive(Parser)]
#[command(
    name = "aliyun-sms-worker",
    version,
    about = "Sends and checks SMS verification codes through Alibaba Cloud, fed by RabbitMQ, recorded in Postgres",
    after_help = "Configuration is read from the environment (and .env); see docs/configuration.md for every variable."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the worker: consume jobs, call Aliyun, record and publish results.
    Run(RunArgs),
    /// Apply pending database migrations and exit.
    Migrate,
    /// Publish one job the way a backend would.
    #[command(subcommand)]
    Enqueue(EnqueueCommand),
    /// Serve the fake Aliyun (signature-checking, fault-injecting) over HTTP.
    FakeAliyun(FakeArgs),
    /// Inspect jobs in the results table.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// Counts by type and status, the most frequent failure codes with their meaning, and the
    /// live workers with the jobs each holds (and dead ones still holding claims).
    Stats(StatsArgs),
    /// Measure throughput, latency, RSS and CPU against the local RabbitMQ and Postgres and an
    /// in-process fake Aliyun, next to the bare-broker ceiling of this machine; with --workers,
    /// the throughput of fleets of worker processes instead.
    Bench(BenchArgs),
    /// Look at the dead-letter queue, or send messages from it back to the jobs queue.
    #[command(subcommand)]
    DeadLetters(DeadLettersCommand),
    /// Delete finished jobs (with their attempts and delivery receipts) past a retention age.
    Purge(PurgeArgs),
    /// Check the configuration, RabbitMQ, Postgres (migrations) and Aliyun (credentials),
    /// sending nothing; exits non-zero if any check fails.
    CheckConfig,
}

#[derive(Subcommand)]
enum DeadLettersCommand {
    /// Show messages from the head of the dead-letter queue, leaving them all in it.
    List {
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Re-publish dead letters to the jobs queue, then remove them from the dead-letter queue.
    Redrive {
        /// Job id (or AMQP message id) to redrive; repeatable.
        #[arg(long = "id")]
        ids: Vec<String>,
        /// Redrive every message in the dead-letter queue.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
}

#[derive(Args)]
struct PurgeArgs {
    /// Retention age: jobs finished longer ago than this go (at least 1d), e.g. 90d.
    #[arg(long)]
    older_than: String,
    /// Count what would be deleted, delete nothing.
    #[arg(long)]
    dry_run: bool,
    /// Jobs per delete statement.
    #[arg(long, default_value_t = crate::cli::retention::DEFAULT_BATCH, hide = true)]
    batch_size: i64,
}

#[derive(Subcommand)]
enum JobsCommand {
    /// Recent jobs, newest first.
    List(ListArgs),
    /// One job with every attempt and delivery receipt.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct ListArgs {
    /// A status: sending, sent, verified, not_verified, rate_limited, rejected, failed,
    /// unknown, invalid, expired.
    #[arg(long, value_parser = known_status)]
    status: Option<String>,
    /// A phone number, written as the job had it or not (+86, spaces, hyphens).
    #[arg(long)]
    phone: Option<String>,
    /// A job type: send_verify_code, check_verify_code, send_sms, send_batch_sms.
    #[arg(long = "type", value_parser = known_type)]
    job_type: Option<String>,
    /// Aliyun's (or the worker's) code, e.g. isv.BUSINESS_LIMIT_CONTROL.
    #[arg(long)]
    code: Option<String>,
    /// Only jobs created within this age: 30s, 15m, 1h, 7d.
    #[arg(long)]
    since: Option<String>,
    #[arg(long, default_value_t = 50)]
    limit: i64,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct StatsArgs {
    #[arg(long, default_value = "1h")]
    since: String,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchArgs {
    #[arg(long, default_value_t = 20_000)]
    jobs: usize,
    /// The fake Aliyun's latency per call [default: a run at 0 and one at 50].
    #[arg(long)]
    latency_ms: Option<u64>,
    /// Jobs in flight (WORKER_CONCURRENCY of each measured worker, and the ceiling's prefetch)
    /// [default: the worker's own default].
    #[arg(long)]
    concurrency: Option<u16>,
    /// Fleet sizes, e.g. 1,2,3: runs that many worker processes on one queue and one database
    /// for each size and latency, and prints their throughput as one table.
    #[arg(long, value_delimiter = ',')]
    workers: Vec<usize>,
    /// The measured workers' log level (`RUST_LOG`), to compare a quieter one with the
    /// default users run.
    #[arg(long, default_value = "info")]
    log_level: String,
}

#[derive(Args)]
struct RunArgs {
    /// Start an in-process fake Aliyun with generated credentials instead of calling Aliyun.
    #[arg(long)]
    sandbox: bool,
    /// Do not apply pending migrations at start.
    #[arg(long)]
    no_migrate: bool,
}

#[derive(Subcommand)]
enum EnqueueCommand {
    /// A `send_verify_code` job (Dypnsapi SendSmsVerifyCode).
    SendVerifyCode(SendVerifyCodeArgs),
    /// A `check_verify_code` job (Dypnsapi CheckSmsVerifyCode).
    CheckVerifyCode(CheckVerifyCodeArgs),
    /// A `send_sms` job (Dysmsapi SendSms).
    SendSms(SendSmsArgs),
    /// Any job, given as its JSON body (`-` reads standard input).
    Json(JsonArgs),
}

/// What every enqueue takes besides the job itself.
#[derive(Args)]
struct Delivery {
    /// Job id (idempotency key); a random one by default.
    #[arg(long)]
    id: Option<String>,
    /// Wait for the result and print it.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits, in seconds.
    #[arg(long, default_value_t = 30)]
    timeout_secs: u64,
}

#[derive(Args)]
struct CheckVerifyCodeArgs {
    #[arg(long)]
    phone: String,
    /// The code the user typed.
    #[arg(long)]
    code: String,
    #[command(flatten)]
    delivery: Delivery,
}

#[derive(Args)]
struct SendSmsArgs {
    /// One number, or several separated by commas.
    #[arg(long)]
    phone: String,
    #[arg(long)]
    sign_name: String,
    #[arg(long)]
    template_code: String,
    /// Template variables as a JSON object of strings.
    #[arg(long)]
    template_param: Option<String>,
    #[command(flatten)]
    delivery: Delivery,
}

#[derive(Args)]
struct JsonArgs {
    /// The job's JSON body, or `-` for standard input.
    body: String,
    #[command(flatten)]
    delivery: Delivery,
}

#[derive(Args)]
struct SendVerifyCodeArgs {
    #[arg(long)]
    phone: String,
    #[arg(long, default_value = "速通互联验证码")]
    sign_name: String,
    #[arg(long, default_value = "100001")]
    template_code: String,
    #[arg(long, default_value = r###"{"code":"##code##","min":"5"}"###)]
    template_param: String,
    #[arg(long)]
    code_length: Option<u8>,
    /// Ask Aliyun to return the code in the result (printed only with --wait).
    #[arg(long)]
    return_verify_code: bool,
    #[command(flatten)]
    delivery: Delivery,
}

#[derive(Args)]
struct FakeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8088")]
    listen: SocketAddr,
    /// Credentials the fake accepts.
    #[arg(
        long,
        env = "ALIBABA_CLOUD_ACCESS_KEY_ID",
        default_value = "sandbox-access-key-id"
    )]
    access_key_id: String,
    #[arg(
        long,
        env = "ALIBABA_CLOUD_ACCESS_KEY_SECRET",
        default_value = "sandbox-access-key-secret",
        hide_env_values = true,
        hide_default_value = true
    )]
    access_key_secret: String,
    /// Delay added to every answer.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Sends per number per minute before biz.FREQUENCY.
    #[arg(long)]
    per_number_per_minute: Option<u32>,
    /// Calls per action per second before Throttling.Api.
    #[arg(long)]
    max_qps: Option<u32>,
    /// Refuse a SendSmsVerifyCode within its Interval of the last send to the number
    /// (biz.FREQUENCY), as Aliyun does; `--enforce-interval false` to send codes back to back.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    enforce_interval: bool,
    /// A fault rule as JSON, e.g. '{"fault":{"kind":"http503"},"times":1}'; repeatable.
    #[arg(long = "fault", value_parser = parse_fault)]
    faults: Vec<FaultRule>,
}

fn parse_fault(s: &str) -> Result<FaultRule, String> {
    serde_json::from_str(s).map_err(|e| format!("not a fault rule: {e}"))
}

/// The `aliyun-sms-worker` program: parses the command line and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            telemetry::say(&format!("error: cannot start the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) if output::closed(&e) => ExitCode::SUCCESS,
        Err(e) => {
            telemetry::say(&format!("error: {}", telemetry::error_chain(e.as_ref())));
            ExitCode::FAILURE
        }
    }
}

fn log_format() -> LogFormat {
    match config::env_lookup(config::LOG_FORMAT).as_deref() {
        Some("json") => LogFormat::Json,
        _ => LogFormat::Pretty,
    }
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    // check-config's table says what each check found; the log lines of the calls it makes
    // (the Aliyun client's "account trouble") would only repeat it above the table.
    let quiet = matches!(command, Command::CheckConfig);
    telemetry::init(log_format(), quiet);
    match command {
        Command::Run(args) => run(args).await,
        Command::Migrate => {
            // Only the database: migrating needs no Aliyun credentials.
            operator_store().await?.migrate().await?;
            outln!("migrations applied")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Enqueue(command) => {
            let (job, delivery) = job_of(command)?;
            enqueue(job, delivery).await
        }
        Command::FakeAliyun(args) => fake(args).await,
        Command::Jobs(command) => jobs(command).await,
        Command::Stats(args) => {
            let since = report::parse_age(&args.since).map_err(anyhow::Error::msg)?;
            let store = operator_store().await?;
            let stats = store.stats(since).await?;
            let fleet = store.fleet().await?;
            if args.json {
                outln!(
                    "{}",
                    serde_json::to_string_pretty(&report::stats_json(&stats, &fleet))?
                )?;
            } else {
                out!("{}", report::render_stats(&stats, &fleet, &args.since))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::DeadLetters(command) => dead_letters(command).await,
        Command::Purge(args) => purge(args).await,
        Command::CheckConfig => {
            let checks = check_config::run(&config::env_lookup).await;
            for check in &checks {
                outln!("{check}")?;
            }
            let failed = checks
                .iter()
                .any(|c| c.verdict != check_config::Verdict::Ok);
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Bench(args) => {
            let lookup = config::env_lookup;
            let default = |name| {
                config::SETTINGS
                    .iter()
                    .find(|s| s.name == name)
                    .and_then(|s| s.default)
                    .unwrap_or_default()
                    .to_owned()
            };
            let base = bench::BenchOptions {
                jobs: args.jobs,
                latency: Duration::from_millis(args.latency_ms.unwrap_or(0)),
                // Measured as users run it, unless asked otherwise.
                concurrency: match args.concurrency {
                    Some(n) => n,
                    None => default(config::WORKER_CONCURRENCY)
                        .parse()
                        .context("the default WORKER_CONCURRENCY")?,
                },
                log_level: tracing_subscriber::EnvFilter::try_new(&args.log_level)
                    .map(|_| args.log_level)
                    .context("--log-level is not a RUST_LOG filter")?,
                amqp_url: lookup(config::AMQP_URL).unwrap_or_else(|| default(config::AMQP_URL)),
                database_url: lookup(config::DATABASE_URL)
                    .unwrap_or_else(|| default(config::DATABASE_URL)),
            };
            let latencies = match args.latency_ms {
                Some(ms) => vec![Duration::from_millis(ms)],
                None => vec![Duration::ZERO, Duration::from_millis(50)],
            };
            if args.workers.is_empty() {
                bench::run(base, &latencies).await?;
            } else {
                bench::run_fleet(bench::FleetOptions {
                    base,
                    workers: args.workers,
                    latencies,
                })
                .await?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn operator_store() -> anyhow::Result<Store> {
    let url = config::database_url(&config::env_lookup)?;
    Store::connect(url.expose(), 2)
        .await
        .context("connecting to Postgres")
}

async fn dead_letters(command: DeadLettersCommand) -> anyhow::Result<ExitCode> {
    // Refuse a redrive with no selection before touching RabbitMQ.
    if let DeadLettersCommand::Redrive { ids, all: false } = &command
        && ids.is_empty()
    {
        anyhow::bail!(
            "say which messages to redrive: --id ID (repeatable) or --all; see `dead-letters list`"
        );
    }
    let settings = ClientSettings::from_lookup(&config::env_lookup)?;
    let queue = config::dead_letter_queue(&config::env_lookup)?;
    let dlq = DeadLetters::connect(&settings.amqp_nodes, &queue, &settings.jobs_queue)
        .await
        .context("connecting to RabbitMQ")?;
    let outcome = match command {
        DeadLettersCommand::List { limit, json } => dlq.list(limit.max(1)).await.map(|letters| {
            if json {
                outln!("{}", serde_json::to_string_pretty(&letters)?)?;
            } else {
                out!("{}", dead_letters::render(&letters, &queue))?;
            }
            Ok(ExitCode::SUCCESS)
        }),
        DeadLettersCommand::Redrive { ids, all } => {
            let selection = if all {
                Selection::All
            } else {
                Selection::Ids(ids.into_iter().collect())
            };
            dlq.redrive(&selection).await.map(|r| {
                outln!(
                    "redrove {} message(s) from {queue} to {}",
                    r.moved.len(),
                    settings.jobs_queue
                )?;
                for id in &r.moved {
                    outln!("  {id}")?;
                }
                for id in &r.not_found {
                    outln!("not in {queue}: {id}")?;
                }
                if let Some(e) = &r.stopped {
                    telemetry::say(&format!(
                        "error: stopped after the {} above: {e}; the rest stay in {queue}",
                        r.moved.len()
                    ));
                    return Ok(ExitCode::FAILURE);
                }
                // Like `jobs show`: 2 tells a script that something asked for was not there.
                Ok(if r.not_found.is_empty() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(2)
                })
            })
        }
    };
    dlq.close().await;
    outcome?
}

async fn purge(args: PurgeArgs) -> anyhow::Result<ExitCode> {
    let age = report::parse_age(&args.older_than).map_err(anyhow::Error::msg)?;
    let cutoff = retention::cutoff(age)?;
    let store = operator_store().await?;
    let before = cutoff.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    if args.dry_run {
        let n = retention::count(&store, cutoff).await?;
        outln!(
            "would purge {} job(s) finished before {before} (older than {}), with {} attempt(s) and {} delivery receipt(s); nothing deleted (--dry-run)",
            n.jobs,
            args.older_than,
            n.attempts,
            n.deliveries
        )?;
    } else {
        let n = retention::purge(&store, cutoff, args.batch_size).await?;
        outln!(
            "purged {} job(s) finished before {before} (older than {}), with {} attempt(s) and {} delivery receipt(s), in {} batch(es)",
            n.jobs,
            args.older_than,
            n.attempts,
            n.deliveries,
            n.batches
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// A `--status` or `--type` the records can hold: a typo would otherwise list nothing, as if
/// there were no such jobs.
fn one_of(s: &str, names: &[&str]) -> Result<String, String> {
    if names.contains(&s) {
        Ok(s.to_owned())
    } else {
        Err(format!("not one of {}", names.join(", ")))
    }
}

fn known_status(s: &str) -> Result<String, String> {
    let names: Vec<&str> = Status::all().map(Status::as_str).collect();
    one_of(s, &names)
}

fn known_type(s: &str) -> Result<String, String> {
    let names: Vec<&str> = JobType::ALL.iter().map(|t| t.as_str()).collect();
    one_of(s, &names)
}

async fn jobs(command: JobsCommand) -> anyhow::Result<ExitCode> {
    let store = operator_store().await?;
    match command {
        JobsCommand::List(a) => {
            let filter = JobFilter {
                status: a.status,
                // Rows hold the number as the worker parsed it.
                phone: a.phone.map(|p| {
                    PhoneNumber::parse_international(&p).map_or(p, |n| n.as_str().to_owned())
                }),
                job_type: a.job_type,
                code: a.code,
                since: a
                    .since
                    .as_deref()
                    .map(report::parse_age)
                    .transpose()
                    .map_err(anyhow::Error::msg)?,
                limit: a.limit.clamp(1, 10_000),
            };
            let jobs = store.list_jobs(&filter).await?;
            if a.json {
                outln!("{}", serde_json::to_string_pretty(&jobs)?)?;
            } else {
                out!("{}", report::render_jobs(&jobs))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::Show { id, json } => match job_named(&store, &id).await? {
            Err(message) => {
                telemetry::say(&message);
                Ok(ExitCode::from(2))
            }
            Ok(detail) => Ok(show_detail(detail, json)?),
        },
    }
}

/// The job with this id, or what to say: the ids that start with it, when some do (an id
/// half-copied from a table), so the operator can pick one. Never a guess.
async fn job_named(store: &Store, id: &str) -> anyhow::Result<Result<JobDetail, String>> {
    if let Some(detail) = store.job_detail(id).await? {
        return Ok(Ok(detail));
    }
    const SHOWN: i64 = 10;
    let found = if id.is_empty() {
        Vec::new()
    } else {
        store.search_jobs(None, id, SHOWN + 1).await?
    };
    let ids: Vec<&str> = found.iter().filter_map(|j| j["id"].as_str()).collect();
    Ok(Err(if ids.is_empty() {
        format!("no job with id {id:?}")
    } else {
        format!(
            "no job with id {id:?}; {} whose id starts with it:\n  {}{}",
            if ids.len() == 1 { "one" } else { "jobs" },
            ids.iter()
                .take(SHOWN as usize)
                .copied()
                .collect::<Vec<_>>()
                .join("\n  "),
            if ids.len() as i64 > SHOWN {
                "\n  …"
            } else {
                ""
            }
        )
    }))
}

fn show_detail(detail: JobDetail, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&report::detail_json(&detail))?
        )?;
    } else {
        out!("{}", report::render_detail(&detail))?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let (config, _fake) = if args.sandbox {
        let (config, fake) = sandbox::start(&config::env_lookup).await?;
        let banner = format!(
            "SANDBOX MODE: no real SMS is sent. Aliyun is played by the in-process fake at {} with generated credentials.",
            fake.endpoint()
        );
        telemetry::say(&format!(
            "\n{}\n{banner}\n{}\n",
            "=".repeat(banner.len().min(100)),
            "=".repeat(banner.len().min(100))
        ));
        tracing::warn!(fake_aliyun = %fake.endpoint(), "sandbox mode: no real SMS is sent");
        (config, Some(fake))
    } else {
        (Config::from_env()?, None)
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let (ready_tx, _ready_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutdown requested: finishing in-flight jobs");
        let _ = stop_tx.send(true);
    });
    let options = worker::RunOptions {
        migrate: !args.no_migrate,
        ..worker::RunOptions::default()
    };
    worker::run(config, options, stop_rx, ready_tx).await?;
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn json_object(flag: &str, raw: &str) -> anyhow::Result<serde_json::Value> {
    let v: serde_json::Value =
        serde_json::from_str(raw).with_context(|| format!("{flag} must be a JSON object"))?;
    anyhow::ensure!(v.is_object(), "{flag} must be a JSON object");
    Ok(v)
}

/// The job body a subcommand describes.
fn job_of(command: EnqueueCommand) -> anyhow::Result<(serde_json::Value, Delivery)> {
    Ok(match command {
        EnqueueCommand::SendVerifyCode(a) => {
            let mut job = json!({
                "type": "send_verify_code",
                "phone_number": a.phone,
                "sign_name": a.sign_name,
                "template_code": a.template_code,
                "template_param": json_object("--template-param", &a.template_param)?,
            });
            if let Some(n) = a.code_length {
                job["code_length"] = json!(n);
            }
            if a.return_verify_code {
                job["return_verify_code"] = json!(true);
            }
            (job, a.delivery)
        }
        EnqueueCommand::CheckVerifyCode(a) => (
            json!({"type": "check_verify_code", "phone_number": a.phone, "verify_code": a.code}),
            a.delivery,
        ),
        EnqueueCommand::SendSms(a) => {
            let mut job = json!({
                "type": "send_sms",
                "phone_numbers": a.phone.split(',').map(str::trim).collect::<Vec<_>>(),
                "sign_name": a.sign_name,
                "template_code": a.template_code,
            });
            if let Some(t) = &a.template_param {
                job["template_param"] = json_object("--template-param", t)?;
            }
            (job, a.delivery)
        }
        EnqueueCommand::Json(a) => {
            let raw = if a.body == "-" {
                std::io::read_to_string(std::io::stdin()).context("reading standard input")?
            } else {
                a.body
            };
            (json_object("the job", &raw)?, a.delivery)
        }
    })
}

async fn enqueue(mut job: serde_json::Value, delivery: Delivery) -> anyhow::Result<ExitCode> {
    let settings = ClientSettings::from_lookup(&config::env_lookup)?;
    let id = match (delivery.id, job.get("id").and_then(|v| v.as_str())) {
        (Some(id), _) => id,
        (None, Some(id)) => id.to_owned(),
        (None, None) => format!("cli-{}", uuid::Uuid::new_v4().simple()),
    };
    job["id"] = json!(id);
    let body = serde_json::to_vec(&job)?;
    let client = SmsClient::connect_nodes(&settings.amqp_nodes, &settings.jobs_queue).await?;
    let code = if delivery.wait {
        let result = match client
            .request(&body, &id, Duration::from_secs(delivery.timeout_secs))
            .await
        {
            Ok(result) => result,
            // The job is out: enqueued again under a new id, it would be a second SMS.
            Err(crate::sms_client::ClientError::Timeout(waited)) => {
                client.close().await;
                telemetry::say(&format!(
                    "no result for job {id} within {waited:?}: it is published and stays queued until a \
                     worker takes it (is one running on {}?). Do not enqueue it again under a \
                     new id: that would be a second SMS. To wait again, publish the same id \
                     (`--id {id} --wait`: a job already done is answered from its stored result, \
                     never sent twice), or look it up later with `aliyun-sms-worker jobs show \
                     {id}`.",
                    settings.jobs_queue
                ));
                return Ok(ExitCode::from(3));
            }
            Err(e) => return Err(e.into()),
        };
        outln!("{}", serde_json::to_string_pretty(&result)?)?;
        if matches!(result.status, Status::Sent | Status::Verified) {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(2)
        }
    } else {
        client.publish(&body, &id).await?;
        outln!("published job {id} to {}", settings.jobs_queue)?;
        ExitCode::SUCCESS
    };
    client.close().await;
    Ok(code)
}

async fn fake(args: FakeArgs) -> anyhow::Result<ExitCode> {
    let mut config = FakeConfig::new(args.access_key_id, args.access_key_secret);
    config.latency = Duration::from_millis(args.latency_ms);
    config.per_number_per_minute = args.per_number_per_minute;
    config.faults = args.faults;
    config.max_qps = args.max_qps;
    config.enforce_interval = args.enforce_interval;
    let fake = FakeAliyun::start(config, args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(endpoint = %fake.endpoint(), "fake Aliyun listening");
    // A server keeps serving when nobody reads its standard output; the address is logged too.
    let interval = if args.enforce_interval {
        "enforced (--enforce-interval false to turn it off)"
    } else {
        "not enforced"
    };
    let _ = outln!(
        "fake Aliyun listening on {} (both products)",
        fake.endpoint()
    );
    // Aliyun serves each product on its own host, where the other's actions do not exist.
    let _ = outln!("  Dypnsapi only: {}", fake.endpoint_for(Product::Dypnsapi));
    let _ = outln!("  Dysmsapi only: {}", fake.endpoint_for(Product::Dysmsapi));
    let _ = outln!("  Dypnsapi Interval: {interval}");
    tokio::select! {
        _ = fake.serve_forever() => {}
        _ = shutdown_signal() => {}
    }
    Ok(ExitCode::SUCCESS)
}
