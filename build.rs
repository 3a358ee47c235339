//! Rebuilds the crate when a migration is added. `sqlx::migrate!` embeds `migrations/`
//! at compile time and tracks the files it saw, but not a new file in the directory:
//! without this, a build after adding a migration keeps migrating to the old list (the
//! build script sqlx's documentation recommends).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
