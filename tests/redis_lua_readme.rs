//! The worked `redis-cli` examples of `lua/README.md` run, in order, on this
//! binary's own empty redis-server, and give the documented replies.

mod common;

use std::path::Path;

use common::redis::RedisServer;

/// Pairs of (```sh block, the ```text block right after it).
fn examples(readme: &str) -> Vec<(String, String)> {
    let mut out = vec![];
    let mut rest = readme;
    while let Some(i) = rest.find("```sh\n") {
        let body = &rest[i + 6..];
        let end = body.find("```\n").expect("closed sh block");
        let command = body[..end].to_string();
        let after = &body[end + 4..];
        let after_trim = after.trim_start_matches('\n');
        let expected = after_trim
            .strip_prefix("```text\n")
            .and_then(|t| t.find("```\n").map(|e| t[..e].to_string()))
            .expect("a ```text block follows each ```sh block");
        out.push((command, expected));
        rest = after;
    }
    out
}

#[test]
fn readme_examples_give_the_documented_replies() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("lua/README.md")).unwrap();
    let examples = examples(&readme);
    assert!(examples.len() >= 10, "found {} examples", examples.len());
    let server = RedisServer::shared();
    assert_eq!(server.cli(&["FLUSHALL"]).trim(), "OK");
    for script in [
        "create_customer",
        "grant",
        "update_bucket",
        "check",
        "apply",
        "balances",
        "reset_due",
    ] {
        assert!(
            readme.contains(&format!("lua/{script}.lua)")),
            "no example runs {script}.lua"
        );
    }
    // A script loaded by hand has the engine's SHA.
    let scripts = creditgate::engine::redis::Scripts::new();
    for s in scripts.all() {
        let lib = if s.with_library { "lua/lib.lua " } else { "" };
        let cmd = format!("$CLI SCRIPT LOAD \"$(cat {lib}lua/{}.lua)\"", s.name);
        assert_eq!(server.sh(root, &cmd).trim(), format!("\"{}\"", s.sha));
    }
    for (command, expected) in examples {
        let got = server.sh(root, &command);
        if std::env::var_os("CG_PRINT_EXAMPLES").is_some() {
            println!("=====\n{command}-----\n{got}");
        }
        assert_eq!(got, expected, "example:\n{command}");
    }
}
