// `sqlx::migrate!` embeds `migrations/` at compile time; without this, a migration added to the
// folder would not rebuild the crate (the sqlx documentation recommends exactly this line).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
