// The migrations are compiled into the binary by `sqlx::migrate!`, which cannot tell cargo that
// it read them: without this, a changed or added migration would leave a stale binary behind.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
