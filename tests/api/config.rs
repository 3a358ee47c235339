//! Configuration as an operator meets it, through the built `dapi` binary: `dapi --help`
//! documents every variable, and an invalid value stops dapi at once with exit code 2
//! and one line naming the variable.

use std::process::{Command, Output};

use dapi::config::VARIABLES;

/// Runs the built `dapi` with `vars` as its whole environment.
fn dapi(args: &[&str], vars: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dapi"))
        .args(args)
        .env_clear()
        .envs(vars.iter().copied())
        .output()
        .unwrap()
}

#[test]
fn dapi_help_names_every_variable_with_its_meaning_and_prints_no_secret() {
    let secrets = [
        ("DAPI_INGEST_TOKENS", "secret-ingest-7f3a"),
        ("DAPI_READ_TOKENS", "secret-read-9c1e"),
        ("DATABASE_URL", "postgres://dapi:secret-pw-1@db:5432/dapi"),
        ("REDIS_URL", "redis://:secret-pw-2@cache:6379"),
    ];
    for args in [&["--help"][..], &["serve", "--help"], &["flusher", "--help"]] {
        // Act
        let output = dapi(args, &secrets);

        // Assert
        assert!(output.status.success(), "{args:?}: {:?}", output.status);
        let help = String::from_utf8(output.stdout).unwrap();
        for &name in VARIABLES {
            let tag = format!("[env: {name}]");
            let line = help.lines().find(|line| line.contains(&tag));
            let line = line.unwrap_or_else(|| panic!("`dapi {args:?}` does not name {name}:\n{help}"));
            assert!(
                line.trim().len() > tag.len() + 20,
                "{name} is named without a meaning: {line:?}"
            );
        }
        assert!(!help.contains("secret-"), "a secret in `dapi {args:?}`:\n{help}");
    }
}

#[test]
fn dapi_help_shows_each_default_beside_its_variable() {
    let help = String::from_utf8(dapi(&["--help"], &[]).stdout).unwrap();

    for (name, default) in [
        ("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/dapi"),
        ("REDIS_URL", "redis://127.0.0.1:6379"),
        ("DAPI_BIND", "127.0.0.1:8000"),
        ("DAPI_STAGING_TTL", "7d"),
        ("DAPI_MAX_TEXT_BYTES", "32768"),
        ("DAPI_MAX_BODY_BYTES", "65536"),
        ("DAPI_ALLOW_OPEN", "false"),
        ("DAPI_SHUTDOWN_TIMEOUT", "30s"),
        ("DAPI_MIGRATE", "true"),
    ] {
        let expected = format!("[env: {name}] [default: {default}]");
        assert!(help.contains(&expected), "no `{expected}`:\n{help}");
    }
    let failpoint = help
        .lines()
        .find(|line| line.contains("[env: DAPI_FAILPOINT]"))
        .unwrap();
    assert!(failpoint.contains("fault tests"), "{failpoint}");
}

#[test]
fn an_invalid_value_exits_2_with_one_line_naming_its_variable() {
    // `healthcheck` stands for every command: settings are parsed before any runs, and
    // were one accepted, healthcheck would end at once with 0 or 1 rather than serve.
    for (name, value) in [
        ("DAPI_LOG", "dapi=chatty"),
        ("RUST_LOG", "info,[{"),
        ("DATABASE_URL", "postgres://dapi:secret-pw@127.0.0.1:port/dapi"),
        ("DATABASE_URL", "mysql://dapi:secret-pw@127.0.0.1/dapi"),
        ("DAPI_BIND", "localhost:8000"),
        ("DAPI_BIND", "127.0.0.1"),
        ("REDIS_URL", "redis://:secret-pw@127.0.0.1:6379/zero"),
        ("DAPI_PUBLIC_URL", "api.example.com"),
        ("DAPI_STAGING_TTL", "soon"),
        ("DAPI_RETENTION", "12h"),
        ("DAPI_REDIS_CLUSTER", "maybe"),
        ("DAPI_FAILPOINT", "crash-sometimes"),
    ] {
        // Act
        let output = dapi(&["healthcheck"], &[(name, value)]);

        // Assert
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{name}={value:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{name}={value:?}: {stderr}");
        assert!(
            stderr.starts_with(&format!("dapi: configuration error: {name}: ")),
            "{name}={value:?}: {stderr}"
        );
        assert!(!stderr.contains("secret-"), "{name}={value:?}: {stderr}");
    }
}

#[test]
fn an_option_on_the_command_line_is_checked_like_its_variable() {
    let output = dapi(
        &["healthcheck", "--bind", "nowhere"],
        &[("DAPI_BIND", "127.0.0.1:8000")],
    );

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.starts_with("dapi: configuration error: DAPI_BIND: "), "{stderr}");
}

#[test]
fn the_operations_guide_shows_the_help_of_this_dapi() {
    let guide = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md")).unwrap();
    let copy = guide
        .split_once("<!-- dapi --help -->\n```text\n")
        .and_then(|(_, rest)| rest.split_once("\n```"))
        .map(|(copy, _)| copy)
        .expect("docs/operations.md has the `dapi --help` block");

    let help = String::from_utf8(dapi(&["--help"], &[]).stdout).unwrap();

    assert_eq!(
        copy,
        help.trim_end(),
        "docs/operations.md's copy of `dapi --help` is stale: paste `cargo run -q -- --help`"
    );
}
