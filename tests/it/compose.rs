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

fn compose() -> Value {
    let text = std::fs::read_to_string(COMPOSE_PATH)
        .unwrap_or_else(|e| panic!("cannot read {COMPOSE_PATH}: {e}"));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{COMPOSE_PATH} is not YAML: {e}"))
}

fn dockerfile() -> String {
    std::fs::read_to_string(DOCKERFILE_PATH)
        .unwrap_or_else(|e| panic!("cannot read {DOCKERFILE_PATH}: {e}"))
}

fn service<'a>(doc: &'a Value, name: &str) -> &'a Value {
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

fn str_list<'a>(service: &'a Value, service_name: &str, field: &str) -> Vec<&'a str> {
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
fn fake_aliyun_and_worker_share_default_credentials() {
    let doc = compose();
    for var in CREDENTIAL_VARS {
        assert_eq!(
            env_var(&doc, "fake-aliyun", var),
            env_var(&doc, "worker", var),
            "fake-aliyun and worker must use the same {var} expression, or signatures fail"
        );
    }
}

#[test]
fn tests_service_is_behind_a_profile_and_uses_the_builder_stage() {
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
