//! The README is the user's door: it must document every setting and every status the code has.

use aliyun_sms_worker::config::SETTINGS;
use aliyun_sms_worker::wire::Status;

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README.md")
}

#[test]
fn every_setting_is_in_the_configuration_table_with_its_default() {
    let readme = readme();
    for s in SETTINGS {
        let row = readme
            .lines()
            .find(|l| l.starts_with(&format!("| `{}` |", s.name)))
            .unwrap_or_else(|| panic!("README has no configuration row for {}", s.name));
        if let Some(default) = s.default.filter(|d| !d.is_empty()) {
            assert!(
                row.contains(&format!("`{default}`")),
                "README row for {} does not show its default {default:?}: {row}",
                s.name
            );
        }
    }
}

#[test]
fn every_final_status_is_explained() {
    let readme = readme();
    for status in Status::FINAL {
        assert!(
            readme.contains(&format!("| `{}` |", status.as_str())),
            "README does not explain status {status}"
        );
    }
}

#[test]
fn the_backend_examples_in_the_readme_are_the_files_the_tests_run() {
    let readme = readme();
    for (lang, path) in [
        ("rust", "examples/send_code.rs"),
        ("python", "examples/python/send_code.py"),
        ("js", "examples/node/send_code.js"),
    ] {
        let file = std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR")))
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(
            readme.contains(&format!("```{lang}\n{file}```")),
            "the README's {lang} example is not exactly {path}"
        );
    }
}

#[test]
fn every_operator_command_is_in_the_commands_table() {
    let readme = readme();
    for command in [
        "dead-letters list",
        "dead-letters redrive",
        "purge --older-than",
        "check-config",
    ] {
        assert!(
            readme.contains(&format!("| `aliyun-sms-worker {command}")),
            "README's Commands table has no row for {command}"
        );
    }
}

#[test]
fn every_setting_is_classified_for_a_fleet() {
    let readme = readme();
    let section = readme
        .split("### Settings: per account, per fleet, per process")
        .nth(1)
        .and_then(|rest| rest.split("\n### ").next())
        .expect("README has the fleet settings section");
    for s in SETTINGS {
        assert!(
            section.contains(&format!("`{}`", s.name)),
            "{} is not classified in \"Settings: per account, per fleet, per process\"",
            s.name
        );
    }
}

/// The README's test command is exactly what CI runs: `.ci/run` ends by calling it.
#[test]
fn the_readme_test_command_is_what_ci_runs() {
    let readme = readme();
    let command = readme
        .split("### Run the tests")
        .nth(1)
        .and_then(|rest| rest.split("```sh\n").nth(1))
        .and_then(|block| block.split("```").next())
        .map(str::trim)
        .expect("README's \"Run the tests\" shows the command in a sh block");
    let ci =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/run")).expect(".ci/run");
    let last = ci
        .lines()
        .map(str::trim)
        .rfind(|line| !line.is_empty() && !line.starts_with('#'));
    assert_eq!(
        last,
        Some(command),
        ".ci/run must end with the README's test command"
    );
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(command);
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
}
