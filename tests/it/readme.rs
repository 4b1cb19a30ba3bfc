//! The README and docs/ are the user's door: they must document every setting, status and
//! command the code has, the README must stay a front page, and every link must lead somewhere.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use aliyun_sms_worker::config::SETTINGS;
use aliyun_sms_worker::wire::Status;

use crate::process::BIN;

/// The README may not grow back into the reference: that lives in docs/.
const FRONT_PAGE_MAX_LINES: usize = 250;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A file of the repository, by its path from the root (`README.md`, `docs/wire-contract.md`).
pub(crate) fn doc(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The text of a section: from its heading line to the next heading of the same or a higher
/// level (outside code blocks, where `#` starts comments).
pub(crate) fn section(text: &str, heading: &str) -> String {
    let level = heading.chars().take_while(|&c| c == '#').count();
    let mut lines = prose_lines(text).skip_while(|(line, _)| *line != heading);
    assert!(
        lines.next().is_some(),
        "no section {heading:?} (is the heading spelled so?)"
    );
    lines
        .take_while(|(line, in_code)| {
            *in_code || heading_level(line).is_none_or(|other| other > level)
        })
        .map(|(line, _)| format!("{line}\n"))
        .collect()
}

/// Every line, with whether it is inside a fenced code block (fence lines count as inside).
fn prose_lines(text: &str) -> impl Iterator<Item = (&str, bool)> {
    let mut in_code = false;
    text.lines().map(move |line| {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            return (line, true);
        }
        (line, in_code)
    })
}

fn heading_level(line: &str) -> Option<usize> {
    let level = line.chars().take_while(|&c| c == '#').count();
    ((1..=6).contains(&level) && line[level..].starts_with(' ')).then_some(level)
}

#[test]
fn every_setting_is_in_the_configuration_table_with_its_default() {
    let configuration = doc("docs/configuration.md");
    for s in SETTINGS {
        let row = configuration
            .lines()
            .find(|l| l.starts_with(&format!("| `{}` |", s.name)))
            .unwrap_or_else(|| panic!("docs/configuration.md has no row for {}", s.name));
        if let Some(default) = s.default.filter(|d| !d.is_empty()) {
            assert!(
                row.contains(&format!("`{default}`")),
                "docs/configuration.md's row for {} does not show its default {default:?}: {row}",
                s.name
            );
        }
    }
}

#[test]
fn every_final_status_is_explained() {
    let contract = doc("docs/wire-contract.md");
    for status in Status::FINAL {
        assert!(
            contract.contains(&format!("| `{}` |", status.as_str())),
            "docs/wire-contract.md does not explain status {status}"
        );
    }
}

#[test]
fn the_backend_examples_in_the_docs_are_the_files_the_tests_run() {
    let backend = doc("docs/backend.md");
    for (lang, path) in [
        ("rust", "examples/send_code.rs"),
        ("python", "examples/python/send_code.py"),
        ("js", "examples/node/send_code.js"),
    ] {
        let file = doc(path);
        assert!(
            backend.contains(&format!("```{lang}\n{file}```")),
            "docs/backend.md's {lang} example is not exactly {path}"
        );
    }
}

/// The commands the binary has, from its own `--help`.
fn binary_commands() -> Vec<String> {
    let out = std::process::Command::new(BIN)
        .arg("--help")
        .output()
        .expect("run the binary's --help");
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    let commands: Vec<String> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect();
    assert!(
        commands.len() > 5,
        "could not read the commands from --help:\n{help}"
    );
    commands
}

#[test]
fn every_command_is_on_the_front_page_and_in_the_cli_reference() {
    let front = section(&doc("README.md"), "## Commands");
    let reference = section(&doc("docs/operations.md"), "## The CLI");
    for command in binary_commands() {
        assert!(
            front.contains(&format!("| `{command}")),
            "README's Commands list has no row for {command}"
        );
        assert!(
            reference.contains(&format!("| `aliyun-sms-worker {command}")),
            "docs/operations.md's CLI table has no row for {command}"
        );
    }
    for command in [
        "dead-letters list",
        "dead-letters redrive",
        "purge --older-than",
        "check-config",
    ] {
        assert!(
            reference.contains(&format!("| `aliyun-sms-worker {command}")),
            "docs/operations.md's CLI table has no row for {command}"
        );
    }
}

#[test]
fn every_setting_is_classified_for_a_fleet() {
    let classification = section(
        &doc("docs/configuration.md"),
        "## Settings: per account, per fleet, per process",
    );
    for s in SETTINGS {
        assert!(
            classification.contains(&format!("`{}`", s.name)),
            "{} is not classified in docs/configuration.md, \"Settings: per account, per fleet, \
             per process\"",
            s.name
        );
    }
}

/// The README's test command is exactly what CI runs: `.ci/run` ends by calling it.
#[test]
fn the_readme_test_command_is_what_ci_runs() {
    let tests = section(&doc("README.md"), "## Run the tests");
    let command = tests
        .split("```sh\n")
        .nth(1)
        .and_then(|block| block.split("```").next())
        .map(str::trim)
        .expect("README's \"Run the tests\" shows the command in a sh block");
    let ci = doc(".ci/run");
    let last = ci
        .lines()
        .map(str::trim)
        .rfind(|line| !line.is_empty() && !line.starts_with('#'));
    assert_eq!(
        last,
        Some(command),
        ".ci/run must end with the README's test command"
    );
    let script = root().join(command);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&script)
            .unwrap_or_else(|e| panic!("{}: {e}", script.display()))
            .permissions(),
    );
    assert!(
        mode & 0o111 != 0,
        "{} must be executable, as the README runs it",
        script.display()
    );
    assert!(
        tests.contains("`cargo test --lib`"),
        "README's \"Run the tests\" names the quick loop"
    );
}

#[test]
fn the_readme_front_page_fits_on_a_screen() {
    let lines = doc("README.md").lines().count();
    assert!(
        lines <= FRONT_PAGE_MAX_LINES,
        "README.md has {lines} lines; the front page keeps to {FRONT_PAGE_MAX_LINES}, the \
         reference goes to docs/"
    );
}

/// The README and every page of docs/.
fn documents() -> Vec<PathBuf> {
    let mut files = vec![root().join("README.md")];
    let mut pages: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs/")
        .map(|entry| entry.expect("docs/ entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "md"))
        .collect();
    pages.sort();
    files.extend(pages);
    files
}

/// The anchors GitHub gives a page's headings: lower case, punctuation dropped (but `-` and
/// `_`), spaces as `-`, and `-1`, `-2` … after a repeated one.
fn anchors(text: &str) -> Vec<String> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    prose_lines(text)
        .filter(|(_, in_code)| !in_code)
        .filter_map(|(line, _)| heading_level(line).map(|level| line[level..].trim()))
        .map(|title| {
            let slug: String = title
                .to_lowercase()
                .chars()
                .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
                .map(|c| if c == ' ' { '-' } else { c })
                .collect();
            let count = seen.entry(slug.clone()).or_insert(0);
            let anchor = match *count {
                0 => slug,
                n => format!("{slug}-{n}"),
            };
            *count += 1;
            anchor
        })
        .collect()
}

/// The targets of a page's inline links (`[text](target)`), outside code blocks and spans.
fn link_targets(text: &str) -> Vec<String> {
    let prose: String = prose_lines(text)
        .filter(|(_, in_code)| !in_code)
        .map(|(line, _)| format!("{line}\n"))
        .collect();
    // A code span may run over a line break; its text is never a link.
    let outside_spans: String = prose
        .split('`')
        .enumerate()
        .filter(|(i, _)| i % 2 == 0)
        .map(|(_, part)| part)
        .collect();
    outside_spans
        .split("](")
        .skip(1)
        .filter_map(|rest| rest.split_once(')').map(|(target, _)| target.to_owned()))
        .collect()
}

#[test]
fn every_relative_link_and_anchor_resolves() {
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in documents() {
        let text = std::fs::read_to_string(&file).expect("read a document");
        let name = file.strip_prefix(root()).unwrap_or(&file).display();
        for target in link_targets(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (path, anchor) = match target.split_once('#') {
                Some((path, anchor)) => (path, Some(anchor)),
                None => (target.as_str(), None),
            };
            let linked = if path.is_empty() {
                file.clone()
            } else {
                file.parent().unwrap_or(root()).join(path)
            };
            if !linked.exists() {
                broken.push(format!("{name}: ({target}): no file {}", linked.display()));
                continue;
            }
            if let Some(anchor) = anchor {
                let headings = std::fs::read_to_string(&linked)
                    .map(|t| anchors(&t))
                    .unwrap_or_default();
                if !headings.iter().any(|h| h == anchor) {
                    broken.push(format!("{name}: ({target}): no heading #{anchor}"));
                }
            }
        }
    }
    assert!(
        checked > 20,
        "only {checked} relative links found: the scan is broken"
    );
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn anchors_follow_github() {
    let page = "# For operators: reading `sms_jobs`\n```sh\n# not a heading\n```\n\
                ## Delivery receipts and reconciliation (Dysmsapi sends)\n## Jobs\n## Jobs\n";
    assert_eq!(
        anchors(page),
        [
            "for-operators-reading-sms_jobs",
            "delivery-receipts-and-reconciliation-dysmsapi-sends",
            "jobs",
            "jobs-1",
        ]
    );
    assert_eq!(
        link_targets("see [`a`](x.md#b) and `[c](not-a-link)`, [d\ne](#f)\n```\n[g](h)\n```\n"),
        ["x.md#b", "#f"]
    );
}

/// Every family `/metrics` exposes has its row in the operations guide's metrics table.
#[test]
fn every_metric_family_is_in_the_operations_table() {
    let guide = doc("docs/operations.md");
    for family in aliyun_sms_worker::metrics::FAMILIES {
        assert!(
            guide.contains(&format!("| `{family}` |")),
            "docs/operations.md has no row for {family}"
        );
    }
}
