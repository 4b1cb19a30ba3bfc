//! `aliyun-sms-worker`: every command lives in [`aliyun_sms_worker::cli`].

fn main() -> std::process::ExitCode {
    aliyun_sms_worker::cli::main()
}
