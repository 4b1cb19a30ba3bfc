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
