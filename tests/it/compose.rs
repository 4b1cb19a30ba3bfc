//! Keeps docker-compose.yml and the Dockerfile in step with the settings the worker reads.

use aliyun_sms_worker::config::SETTINGS;
use serde_yaml_ng::{Mapping, Value};

const COMPOSE_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docker-compose.yml");
const DOCKERFILE_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile");

/// Variables the worker reads that are not in `SETTINGS`.
const EXTRA_WORKER_VARS: &[&str] = &["RUST_LOG"];

const CREDENTIAL_VARS: &[&str] = &[
    "ALIBABA_CLOUD_ACCESS_KEY_ID",
    "ALIBABA_CLOUD_ACCESS_KEY_SECRET",
];

const ENDPOINT_VARS: &[&str] = &["ALIYUN_DYPNSAPI_ENDPOINT", "ALIYUN_DYSMSAPI_ENDPOINT"];

pub(crate) fn compose() -> Value {
    let text = std::fs::read_to_string(COMPOSE_PATH)
        .unwrap_or_else(|e| panic!("cannot read {COMPOSE_PATH}: {e}"));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{COMPOSE_PATH} is not YAML: {e}"))
}

fn dockerfile() -> String {
    std::fs::read_to_string(DOCKERFILE_PATH)
        .unwrap_or_else(|e| panic!("cannot read {DOCKERFILE_PATH}: {e}"))
}

fn services(doc: &Value) -> &Mapping {
    doc.get("services")
        .and_then(Value::as_mapping)
        .expect("docker-compose.yml has services")
}

/// The compose Prometheus's configuration file, as the service loads it.
pub(crate) fn prometheus_config(doc: &Value) -> Value {
    let command = str_list(service(doc, "prometheus"), "prometheus", "command");
    let config_path = command
        .iter()
        .find_map(|arg| arg.strip_prefix("--config.file="))
        .expect("prometheus command sets --config.file=");
    yaml_file(&host_file(doc, "prometheus", config_path))
}

pub(crate) fn service<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc.get("services")
        .and_then(|services| services.get(name))
        .unwrap_or_else(|| panic!("docker-compose.yml has no service `{name}`"))
}

fn str_field<'a>(service: &'a Value, service_name: &str, field: &str) -> &'a str {
    service
        .get(field)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("service `{service_name}` has no string `{field}`"))
}

pub(crate) fn str_list<'a>(service: &'a Value, service_name: &str, field: &str) -> Vec<&'a str> {
    let Some(items) = service.get(field).and_then(Value::as_sequence) else {
        panic!("service `{service_name}` has no `{field}` list");
    };
    items
        .iter()
        .map(|item| {
            item.as_str().unwrap_or_else(|| {
                panic!("service `{service_name}`: `{field}` entry {item:?} is not a string")
            })
        })
        .collect()
}

/// The `environment:` of a service, which must use the map form (`KEY: value`).
fn environment<'a>(doc: &'a Value, name: &str) -> &'a Mapping {
    service(doc, name)
        .get("environment")
        .and_then(Value::as_mapping)
        .unwrap_or_else(|| panic!("service `{name}` has no `environment:` map (KEY: value)"))
}

fn env_var<'a>(doc: &'a Value, name: &str, var: &str) -> &'a str {
    environment(doc, name)
        .get(var)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("service `{name}` does not set {var} as a string"))
}

fn env_keys<'a>(doc: &'a Value, name: &str) -> Vec<&'a str> {
    environment(doc, name)
        .keys()
        .map(|key| {
            key.as_str().unwrap_or_else(|| {
                panic!("service `{name}`: environment key {key:?} is not a string")
            })
        })
        .collect()
}

/// The value compose uses when the host does not set the variable: `${VAR:-default}` gives
/// `default`, and a literal value is its own default.
fn compose_default(value: &str) -> &str {
    match value
        .strip_prefix("${")
        .and_then(|inner| inner.strip_suffix('}'))
    {
        Some(inner) => inner
            .split_once(":-")
            .map(|(_, default)| default)
            .unwrap_or_else(|| panic!("`{value}` has no `:-default`")),
        None => value,
    }
}

/// `host:port` of a URL such as `amqp://user:pass@host:5672/vhost`.
fn authority(url: &str) -> &str {
    let (_, rest) = url
        .split_once("://")
        .unwrap_or_else(|| panic!("`{url}` is not a URL"));
    let host_port = rest.split(['/', '?']).next().unwrap_or(rest);
    host_port.rsplit_once('@').map_or(host_port, |(_, hp)| hp)
}

fn port_of(host_port: &str) -> u16 {
    host_port
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or_else(|| panic!("`{host_port}` has no numeric port"))
}

/// Container ports a service publishes, from `"host:container[/proto]"` or long-form entries.
fn published_ports(doc: &Value, name: &str) -> Vec<u16> {
    let Some(ports) = service(doc, name).get("ports").and_then(Value::as_sequence) else {
        return Vec::new();
    };
    ports
        .iter()
        .map(|entry| match entry {
            Value::String(spec) => {
                let container = spec.rsplit(':').next().unwrap_or(spec);
                let container = container.split('/').next().unwrap_or(container);
                container
                    .parse()
                    .unwrap_or_else(|_| panic!("service `{name}`: bad port spec `{spec}`"))
            }
            Value::Number(n) => n
                .as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .unwrap_or_else(|| panic!("service `{name}`: bad port {n}")),
            other => other
                .get("target")
                .and_then(Value::as_u64)
                .and_then(|n| u16::try_from(n).ok())
                .unwrap_or_else(|| panic!("service `{name}`: bad port entry {other:?}")),
        })
        .collect()
}

fn assert_depends_healthy(doc: &Value, name: &str, dependencies: &[&str]) {
    let Some(depends_on) = service(doc, name).get("depends_on") else {
        panic!("service `{name}` has no depends_on");
    };
    for dependency in dependencies {
        let condition = depends_on
            .get(*dependency)
            .and_then(|d| d.get("condition"))
            .and_then(Value::as_str);
        assert_eq!(
            condition,
            Some("service_healthy"),
            "service `{name}` must depend on `{dependency}` with condition service_healthy"
        );
    }
}

/// One `FROM` line of the Dockerfile.
struct Stage {
    image: String,
    name: Option<String>,
    /// The stage's instruction lines after `FROM`.
    lines: Vec<String>,
}

fn dockerfile_stages(text: &str) -> Vec<Stage> {
    let mut stages: Vec<Stage> = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        if words[0].eq_ignore_ascii_case("FROM") {
            let args: Vec<&str> = words[1..]
                .iter()
                .copied()
                .filter(|w| !w.starts_with("--"))
                .collect();
            let image = args.first().expect("FROM without an image").to_string();
            let name = match args.as_slice() {
                [_, as_kw, name] if as_kw.eq_ignore_ascii_case("AS") => Some(name.to_string()),
                _ => None,
            };
            stages.push(Stage {
                image,
                name,
                lines: Vec::new(),
            });
        } else if let Some(stage) = stages.last_mut() {
            stage.lines.push(line.to_string());
        }
    }
    stages
}

fn instruction<'a>(line: &'a str, keyword: &str) -> Option<&'a str> {
    let (word, rest) = line.split_once(char::is_whitespace)?;
    word.eq_ignore_ascii_case(keyword).then(|| rest.trim())
}

#[test]
fn compose_has_services_with_pinned_healthy_infrastructure() {
    let doc = compose();
    for name in ["rabbitmq", "postgres", "fake-aliyun", "worker", "tests"] {
        service(&doc, name);
    }
    for name in ["rabbitmq", "postgres"] {
        let svc = service(&doc, name);
        let image = str_field(svc, name, "image");
        let tag = image
            .rsplit_once(':')
            .map(|(_, tag)| tag)
            .filter(|tag| !tag.contains('/'));
        assert!(
            matches!(tag, Some(tag) if !tag.is_empty() && tag != "latest"),
            "service `{name}` image `{image}` must be pinned to a tag other than latest"
        );
        assert!(
            svc.get("healthcheck").and_then(|h| h.get("test")).is_some(),
            "service `{name}` needs a healthcheck with a test"
        );
    }
    assert_depends_healthy(&doc, "worker", &["rabbitmq", "postgres"]);
}

#[test]
fn worker_environment_matches_settings() {
    let doc = compose();
    let keys = env_keys(&doc, "worker");
    for key in &keys {
        assert!(
            SETTINGS.iter().any(|s| s.name == *key) || EXTRA_WORKER_VARS.contains(key),
            "worker sets {key}, which is not a setting the worker reads (see config::SETTINGS)"
        );
    }
    for setting in SETTINGS.iter().filter(|s| s.default.is_none()) {
        assert!(
            keys.contains(&setting.name),
            "worker environment lacks the required setting {}",
            setting.name
        );
    }
}

#[test]
fn worker_urls_point_at_compose_services() {
    let doc = compose();

    let amqp = compose_default(env_var(&doc, "worker", "AMQP_URL"));
    assert_eq!(authority(amqp), "rabbitmq:5672", "worker AMQP_URL `{amqp}`");
    assert!(
        published_ports(&doc, "rabbitmq").contains(&5672),
        "rabbitmq must publish 5672"
    );

    let database = compose_default(env_var(&doc, "worker", "DATABASE_URL"));
    assert_eq!(
        authority(database),
        "postgres:5432",
        "worker DATABASE_URL `{database}`"
    );
    assert!(
        published_ports(&doc, "postgres").contains(&5432),
        "postgres must publish 5432"
    );

    let command = str_list(service(&doc, "fake-aliyun"), "fake-aliyun", "command");
    let listen = command
        .iter()
        .position(|arg| *arg == "--listen")
        .and_then(|i| command.get(i + 1).copied())
        .or_else(|| command.iter().find_map(|arg| arg.strip_prefix("--listen=")))
        .expect("fake-aliyun command has no --listen address");
    let fake_port = port_of(listen);

    for var in ENDPOINT_VARS {
        let endpoint = compose_default(env_var(&doc, "worker", var));
        let host_port = authority(endpoint);
        assert_eq!(
            host_port,
            format!("fake-aliyun:{fake_port}"),
            "worker {var} default `{endpoint}` must reach fake-aliyun on its --listen port"
        );
    }
}

#[test]
fn fake_aliyun_gets_fixed_sandbox_credentials_that_the_worker_defaults_to() {
    let doc = compose();
    for var in CREDENTIAL_VARS {
        let fake = env_var(&doc, "fake-aliyun", var);
        // A real AccessKey exported for the worker must never reach the fake.
        assert!(
            !fake.contains('$'),
            "fake-aliyun's {var} is `{fake}`: it must be a literal, not interpolated from the host"
        );
        assert_eq!(
            compose_default(env_var(&doc, "worker", var)),
            fake,
            "with nothing exported the worker must sign with the fake's {var}, or signatures fail"
        );
    }
    let fake_env = serde_yaml_ng::to_string(environment(&doc, "fake-aliyun")).expect("yaml");
    assert!(
        !fake_env.contains("${ALIBABA_CLOUD_"),
        "fake-aliyun interpolates a host credential: {fake_env}"
    );
}

/// Every port of every service on the host's loopback: the stack's RabbitMQ, Postgres and admin
/// pages use development passwords and tokens.
#[test]
fn every_published_port_is_on_the_hosts_loopback() {
    let doc = compose();
    let services = services(&doc);
    let mut checked = 0;
    for (name, svc) in services {
        let name = name.as_str().expect("service name");
        let Some(ports) = svc.get("ports").and_then(Value::as_sequence) else {
            continue;
        };
        for entry in ports {
            let ip = match entry {
                // "ip:host:container" (host may be empty); shorter forms bind every interface.
                Value::String(spec) => match spec.split(':').collect::<Vec<_>>().as_slice() {
                    [ip, _, _] => Some((*ip).to_owned()),
                    _ => None,
                },
                other => other
                    .get("host_ip")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
            };
            assert_eq!(
                ip.as_deref(),
                Some("127.0.0.1"),
                "service `{name}` publishes {entry:?} on every interface of the host"
            );
            checked += 1;
        }
    }
    assert!(checked >= 7, "only {checked} ports checked");
}

#[test]
fn the_worker_and_prometheus_share_an_admin_token() {
    let doc = compose();
    let worker = env_var(&doc, "worker", "ADMIN_TOKEN");
    let token = compose_default(worker);
    assert!(
        token.len() >= aliyun_sms_worker::config::ADMIN_TOKEN_MIN_LEN,
        "the compose default ADMIN_TOKEN `{token}` is too short for the worker to start"
    );
    assert_eq!(
        env_var(&doc, "prometheus", "ADMIN_TOKEN"),
        worker,
        "Prometheus must get the same ADMIN_TOKEN expression as the worker"
    );

    let config = prometheus_config(&doc);
    let jobs = config
        .get("scrape_configs")
        .and_then(Value::as_sequence)
        .expect("prometheus.yml has scrape_configs");
    let job = jobs
        .iter()
        .find(|job| job.get("job_name").and_then(Value::as_str) == Some("aliyun-sms-worker"))
        .expect("a scrape job for the workers");
    let authorization = job
        .get("authorization")
        .unwrap_or_else(|| panic!("the workers' scrape job sends no authorization: {job:?}"));
    assert_eq!(
        authorization
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("Bearer"),
        "Bearer"
    );
    let file = authorization
        .get("credentials_file")
        .and_then(Value::as_str)
        .expect("prometheus reads the token from credentials_file");
    // The entrypoint writes ADMIN_TOKEN to that file before Prometheus starts.
    let entrypoint = str_list(service(&doc, "prometheus"), "prometheus", "entrypoint").join(" ");
    assert!(
        entrypoint.contains(&format!("\"$$ADMIN_TOKEN\" > {file}"))
            && entrypoint.contains("exec /bin/prometheus \"$$@\""),
        "the prometheus entrypoint must write $ADMIN_TOKEN to {file} and exec Prometheus: {entrypoint}"
    );
}

#[test]
fn tests_service_is_behind_a_profile_and_builds_a_dockerfile_stage() {
    let doc = compose();
    let tests = service(&doc, "tests");
    assert!(
        str_list(tests, "tests", "profiles").contains(&"tests"),
        "tests service must be behind the `tests` profile"
    );
    let target = tests
        .get("build")
        .and_then(|build| build.get("target"))
        .and_then(Value::as_str)
        .expect("tests service must build a Dockerfile target");
    assert!(
        dockerfile_stages(&dockerfile())
            .iter()
            .any(|stage| stage.name.as_deref() == Some(target)),
        "tests service builds target `{target}`, which the Dockerfile does not define"
    );
    for var in ["AMQP_URL", "DATABASE_URL"] {
        assert_eq!(
            env_var(&doc, "tests", var),
            env_var(&doc, "worker", var),
            "tests and worker must reach the same {var}"
        );
    }
}

/// The suite renders the status page in Chromium, runs the Python and Node examples (docs/backend.md)
/// and checks the metrics with promtool (Debian's prometheus package); the image the `tests`
/// service runs in must carry them all.
#[test]
fn the_tests_image_has_what_the_suite_drives() {
    let doc = compose();
    let target = service(&doc, "tests")
        .get("build")
        .and_then(|build| build.get("target"))
        .and_then(Value::as_str)
        .expect("tests service must build a Dockerfile target")
        .to_owned();
    let stages = dockerfile_stages(&dockerfile());
    let stage = stages
        .iter()
        .find(|stage| stage.name.as_deref() == Some(target.as_str()))
        .expect("the tests target is a stage");
    let text = stage.lines.join("\n");
    for needed in ["chromium", "python3-pika", "nodejs", "npm ci", "prometheus"] {
        assert!(
            text.contains(needed),
            "the `{target}` stage must install {needed}:\n{text}"
        );
    }
}

/// A stage's instructions, each with its continuation lines (`\`) joined.
fn instructions(stage: &Stage) -> Vec<String> {
    let mut joined: Vec<String> = Vec::new();
    let mut continues = false;
    for line in &stage.lines {
        let (text, next_continues) = match line.strip_suffix('\\') {
            Some(text) => (text.trim_end(), true),
            None => (line.as_str(), false),
        };
        match joined.last_mut() {
            Some(last) if continues => {
                last.push(' ');
                last.push_str(text);
            }
            _ => joined.push(text.to_owned()),
        }
        continues = next_continues;
    }
    joined
}

/// The second `docker compose run tests` starts testing in seconds: the `tests` image carries
/// the test build, on top of a dependency layer that a change to the sources leaves cached,
/// and it installs its tools before it copies the sources.
#[test]
fn the_tests_image_carries_the_test_build_with_its_dependencies_cached() {
    let stages = dockerfile_stages(&dockerfile());
    let stage = stages
        .iter()
        .find(|stage| stage.name.as_deref() == Some("tests"))
        .expect("the Dockerfile has a `tests` stage");
    assert!(
        !stages
            .iter()
            .any(|other| other.name.as_deref() == Some(stage.image.as_str())),
        "the `tests` stage is based on the stage `{}`, whose layers (with the sources) it \
         would rebuild on every source change",
        stage.image
    );
    let steps = instructions(stage);
    let position = |what: &str, found: &dyn Fn(&str) -> bool| {
        steps
            .iter()
            .position(|step| found(step))
            .unwrap_or_else(|| panic!("the `tests` stage has no {what}:\n{}", steps.join("\n")))
    };
    let test_build = |step: &str| {
        instruction(step, "RUN")
            .is_some_and(|run| run.contains("cargo test --locked") && run.contains("--no-run"))
    };
    let manifests = position("COPY Cargo.toml Cargo.lock", &|step| {
        instruction(step, "COPY")
            .is_some_and(|copy| copy.contains("Cargo.toml") && copy.contains("Cargo.lock"))
    });
    let dependencies = position(
        "dependency build (cargo test --locked --no-run)",
        &test_build,
    );
    let sources = position("COPY . .", &|step| {
        instruction(step, "COPY").is_some_and(|copy| copy.split_whitespace().eq([".", "."]))
    });
    let build = steps
        .iter()
        .skip(sources)
        .position(|step| test_build(step))
        .map(|offset| sources + offset);
    let tools = position("apt-get install", &|step| step.contains("apt-get install"));
    assert!(
        manifests < dependencies && dependencies < sources,
        "the dependencies must be built from Cargo.toml and Cargo.lock alone, before the \
         sources are copied:\n{}",
        steps.join("\n")
    );
    assert!(
        build.is_some(),
        "the tests must be built in the image, after the sources are copied:\n{}",
        steps.join("\n")
    );
    assert!(
        tools < sources,
        "the tools are installed after the sources are copied, so again on every change"
    );
}

#[test]
fn dockerfile_builds_offline_and_runs_unprivileged() {
    let stages = dockerfile_stages(&dockerfile());
    let builder = stages
        .iter()
        .find(|stage| stage.name.as_deref() == Some("builder"))
        .expect("Dockerfile needs a `FROM … AS builder` stage");
    assert!(
        builder.lines.iter().any(|line| {
            instruction(line, "ENV").is_some_and(|env| {
                env.split_whitespace()
                    .any(|pair| pair == "SQLX_OFFLINE=true")
                    || env == "SQLX_OFFLINE true"
            })
        }),
        "builder stage must set ENV SQLX_OFFLINE=true"
    );

    let runtime = stages.last().expect("Dockerfile has no FROM");
    let image = runtime.image.rsplit('/').next().unwrap_or(&runtime.image);
    assert!(
        !image.starts_with("rust:") && image != "rust",
        "runtime stage must not be based on a rust image, found `{}`",
        runtime.image
    );
    let user = runtime
        .lines
        .iter()
        .rev()
        .find_map(|line| instruction(line, "USER"))
        .expect("runtime stage needs a USER line");
    let uid = user.split(':').next().unwrap_or(user);
    assert!(
        uid != "root" && uid != "0",
        "runtime stage must not run as root, found `USER {user}`"
    );
}

const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");

/// Bind mounts of a service as (host path relative to the compose file, container path).
/// Named volumes (no `./` or `/`) are left out.
fn bind_mounts(doc: &Value, name: &str) -> Vec<(String, String)> {
    let Some(volumes) = service(doc, name)
        .get("volumes")
        .and_then(Value::as_sequence)
    else {
        return Vec::new();
    };
    volumes
        .iter()
        .filter_map(|entry| {
            let spec = entry.as_str().unwrap_or_else(|| {
                panic!("service `{name}`: use the short volume syntax, got {entry:?}")
            });
            let mut parts = spec.split(':');
            let source = parts.next().unwrap_or_default();
            let target = parts
                .next()
                .unwrap_or_else(|| panic!("service `{name}`: volume `{spec}` has no target"));
            (source.starts_with("./") || source.starts_with('/'))
                .then(|| (source.to_owned(), target.to_owned()))
        })
        .collect()
}

/// The host file behind a container path of a service, through its bind mounts (a file
/// mount, or a file under a directory mount).
pub(crate) fn host_file(doc: &Value, name: &str, container_path: &str) -> std::path::PathBuf {
    for (source, target) in bind_mounts(doc, name) {
        let rest = if container_path == target {
            Some("")
        } else {
            container_path
                .strip_prefix(&target)
                .and_then(|r| r.strip_prefix('/'))
        };
        if let Some(rest) = rest {
            let mut path = std::path::Path::new(MANIFEST_DIR).join(&source);
            if !rest.is_empty() {
                path = path.join(rest);
            }
            return path;
        }
    }
    panic!("service `{name}` mounts nothing at {container_path}")
}

pub(crate) fn yaml_file(path: &std::path::Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()))
}

fn assert_pinned(doc: &Value, name: &str) {
    let image = str_field(service(doc, name), name, "image");
    let tag = image.rsplit_once(':').map(|(_, tag)| tag);
    assert!(
        matches!(tag, Some(tag) if !tag.is_empty() && tag != "latest" && !tag.contains('/')),
        "service `{name}` image `{image}` must be pinned to a tag other than latest"
    );
}

#[test]
fn every_bind_mounted_file_exists() {
    let doc = compose();
    let services = services(&doc);
    let mut checked = 0;
    for name in services.keys().filter_map(Value::as_str) {
        for (source, target) in bind_mounts(&doc, name) {
            let path = std::path::Path::new(MANIFEST_DIR).join(&source);
            assert!(
                path.exists(),
                "service `{name}` mounts {source} at {target}, which does not exist"
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 4,
        "prometheus and grafana mount their configuration"
    );
}

#[test]
fn prometheus_scrapes_the_workers_admin_port() {
    let doc = compose();
    assert_pinned(&doc, "prometheus");
    let config = prometheus_config(&doc);

    let admin = compose_default(env_var(&doc, "worker", "ADMIN_ADDR"));
    let admin_port = port_of(admin);
    assert!(
        admin.starts_with("0.0.0.0:"),
        "the worker's ADMIN_ADDR `{admin}` must listen beyond its container's loopback"
    );
    assert!(
        published_ports(&doc, "worker").contains(&admin_port),
        "the worker must publish its admin port {admin_port}"
    );

    let jobs = config
        .get("scrape_configs")
        .and_then(Value::as_sequence)
        .expect("prometheus.yml has scrape_configs");
    // One target per replica: the service name's A records, on the admin port. (Without a
    // port, dns_sd_configs asks for SRV records, which Docker's DNS does not serve.)
    let job = jobs
        .iter()
        .find(|job| {
            job.get("dns_sd_configs")
                .and_then(Value::as_sequence)
                .into_iter()
                .flatten()
                .any(|sd| {
                    sd.get("type").and_then(Value::as_str) == Some("A")
                        && sd.get("port").and_then(Value::as_u64) == Some(u64::from(admin_port))
                        && sd
                            .get("names")
                            .and_then(Value::as_sequence)
                            .is_some_and(|n| n.iter().any(|n| n.as_str() == Some("worker")))
                })
        })
        .unwrap_or_else(|| {
            panic!("no scrape job finds every `worker` replica by DNS (type A, port {admin_port}): {config:?}")
        });
    // A static `worker:PORT` resolves to one replica at random on each scrape, mixing their
    // counters into one jagged series.
    let static_worker_targets: Vec<&str> = jobs
        .iter()
        .filter_map(|job| job.get("static_configs").and_then(Value::as_sequence))
        .flatten()
        .filter_map(|c| c.get("targets").and_then(Value::as_sequence))
        .flatten()
        .filter_map(Value::as_str)
        .filter(|t| t.split(':').next() == Some("worker"))
        .collect();
    assert!(
        static_worker_targets.is_empty(),
        "static targets on the scaled worker service: {static_worker_targets:?}"
    );
    let path = job
        .get("metrics_path")
        .and_then(Value::as_str)
        .unwrap_or("/metrics");
    assert_eq!(path, "/metrics", "the worker serves /metrics");
    assert_depends_started(&doc, "prometheus", "worker");
}

/// The host side of each port a service publishes: `None` when Docker picks it, else the
/// fixed port or range as written.
fn host_ports(doc: &Value, name: &str) -> Vec<Option<String>> {
    let Some(ports) = service(doc, name).get("ports").and_then(Value::as_sequence) else {
        return Vec::new();
    };
    ports
        .iter()
        .map(|entry| {
            let host = match entry {
                // "container", "host:container" or "ip:host:container" (host may be empty).
                Value::String(spec) => {
                    let parts: Vec<&str> = spec.split(':').collect();
                    match parts.as_slice() {
                        [_] => None,
                        [host, _] | [_, host, _] => Some(host.to_string()),
                        _ => panic!("service `{name}`: bad port spec `{spec}`"),
                    }
                }
                Value::Number(_) => None,
                other => other.get("published").map(|p| match p {
                    Value::String(s) => s.clone(),
                    other => format!("{other:?}"),
                }),
            };
            host.filter(|h| !h.is_empty())
        })
        .collect()
}

/// `docker compose up --scale worker=3` must start three replicas that do not collide, each
/// with its own admin listener.
#[test]
fn the_worker_service_scales() {
    let doc = compose();
    let worker = service(&doc, "worker");
    for fixed in ["container_name", "hostname"] {
        assert!(
            worker.get(fixed).is_none(),
            "a fixed {fixed} on the worker makes a second replica impossible (or a copy of the first)"
        );
    }
    let ports = host_ports(&doc, "worker");
    assert!(!ports.is_empty(), "the worker publishes its admin port");
    for host in ports.into_iter().flatten() {
        assert!(
            host.contains('-'),
            "the worker publishes the fixed host port {host}: a second replica cannot bind it \
             (leave the host port to Docker, or give a range)"
        );
    }
    let admin = compose_default(env_var(&doc, "worker", "ADMIN_ADDR"));
    assert!(
        admin.starts_with("0.0.0.0:"),
        "each replica's admin listener must answer on its container's address, for Prometheus: `{admin}`"
    );
}

#[test]
fn host_ports_tell_fixed_from_picked() {
    let doc: Value = serde_yaml_ng::from_str(
        "services:\n  w:\n    ports: [\"8080\", \"127.0.0.1::8080\", \"9000:8080\", \"1.2.3.4:9001-9003:8080\", {target: 8080, published: \"9100\"}, {target: 8080}]",
    )
    .expect("yaml");
    assert_eq!(
        host_ports(&doc, "w"),
        vec![
            None,
            None,
            Some("9000".into()),
            Some("9001-9003".into()),
            Some("9100".into()),
            None
        ]
    );
}

fn assert_depends_started(doc: &Value, name: &str, dependency: &str) {
    assert!(
        service(doc, name)
            .get("depends_on")
            .and_then(|d| d.get(dependency))
            .is_some(),
        "service `{name}` must depend on `{dependency}`"
    );
}

/// Metric names used in a PromQL expression: identifiers starting `sms_`.
pub(crate) fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let starts_word = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if starts_word && expr[i..].starts_with("sms_") {
            let end = expr[i..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .map_or(expr.len(), |n| i + n);
            names.push(expr[i..end].to_owned());
            i = end;
        } else {
            i += 1;
        }
    }
    names
}

fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

#[test]
fn grafana_is_provisioned_with_prometheus_and_a_dashboard_of_real_metrics() {
    use aliyun_sms_worker::metrics::FAMILIES;

    let doc = compose();
    assert_pinned(&doc, "grafana");
    assert_depends_started(&doc, "grafana", "prometheus");

    let datasources = yaml_file(&host_file(
        &doc,
        "grafana",
        "/etc/grafana/provisioning/datasources/prometheus.yml",
    ));
    let source = datasources
        .get("datasources")
        .and_then(Value::as_sequence)
        .and_then(|d| {
            d.iter()
                .find(|d| d.get("type").and_then(Value::as_str) == Some("prometheus"))
        })
        .expect("a prometheus datasource is provisioned");
    let url = str_field(source, "datasource", "url");
    assert_eq!(authority(url), "prometheus:9090", "datasource url `{url}`");
    assert!(
        published_ports(&doc, "prometheus").contains(&9090),
        "prometheus listens on 9090"
    );
    let uid = str_field(source, "datasource", "uid");

    let providers = yaml_file(&host_file(
        &doc,
        "grafana",
        "/etc/grafana/provisioning/dashboards/dashboards.yml",
    ));
    let dashboards_dir = providers
        .get("providers")
        .and_then(Value::as_sequence)
        .and_then(|p| p.first())
        .and_then(|p| p.get("options"))
        .and_then(|o| o.get("path"))
        .and_then(Value::as_str)
        .expect("a file provider with options.path");
    let dir = host_file(&doc, "grafana", dashboards_dir);
    let home = env_var(&doc, "grafana", "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH");
    assert!(
        host_file(&doc, "grafana", home).is_file(),
        "the home dashboard {home} is mounted"
    );

    let mut files = 0;
    for entry in std::fs::read_dir(&dir).expect("dashboards directory") {
        let path = entry.expect("dir entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        files += 1;
        let text = std::fs::read_to_string(&path).expect("read dashboard");
        let dashboard: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
        let panels = dashboard["panels"].as_array().expect("dashboard panels");
        for panel in panels {
            assert_eq!(
                panel["datasource"]["uid"], uid,
                "panel {} uses another datasource",
                panel["title"]
            );
        }
        let mut all = Vec::new();
        exprs(&dashboard, &mut all);
        let mut used = std::collections::BTreeSet::new();
        for expr in &all {
            for name in metric_names(expr) {
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|b| FAMILIES.contains(b)))
                    .unwrap_or(&name)
                    .to_owned();
                assert!(
                    FAMILIES.contains(&family.as_str()),
                    "{} queries `{name}`, which the worker does not export (metrics::FAMILIES)",
                    path.display()
                );
                used.insert(family);
            }
        }
        for wanted in [
            "sms_jobs_total",
            "sms_aliyun_call_codes_total",
            "sms_aliyun_call_duration_seconds",
            "sms_jobs_in_flight",
            "sms_aliyun_retries_total",
            "sms_rate_limit_waits_total",
        ] {
            assert!(
                used.contains(wanted),
                "the dashboard shows nothing of {wanted}"
            );
        }
        assert!(
            all.iter().any(|e| e.contains("histogram_quantile(0.99"))
                && all.iter().any(|e| e.contains("histogram_quantile(0.5")),
            "the dashboard shows p50 and p99 latency"
        );
    }
    assert!(files >= 1, "no dashboard JSON in {}", dir.display());
}

#[test]
fn metric_names_are_found_in_promql() {
    assert_eq!(
        metric_names("histogram_quantile(0.5, sum by (le) (rate(sms_a_bucket[5m]))) / x_sms_b"),
        vec!["sms_a_bucket"]
    );
}
